"""Slow, obvious float64 NorMuon / Muon / AdamW written straight from docs/algorithm.md.

One matrix at a time, no batching, no masking, no foreach: the thing every fast path is
compared against. Nothing here imports normuon except the coefficient schedule (a number table).
"""

from __future__ import annotations

import math

import torch

MUON_ABC = (3.4445, -4.7750, 2.0315)

#: The paper's ablations (arXiv 2510.05491, Sec. 4.1.3, App. A.2) as NorMuon options, shared by
#: the tests of every fast path: Muon+Adam, NorMuon (Front), NorMuon on m > n blocks only,
#: Muon with row normalization.
ABLATIONS = {
    "muon_adam": {"normalize": "elements"},
    "front": {"normalize_input": True},
    "tall_only": {"normalize_matrices": "tall"},
    "rownorm": {"beta2": 0.0},
}


def ns_reference(u: torch.Tensor, coefficients) -> torch.Tensor:
    """Newton-Schulz on one (m, n) matrix in float64."""
    x = u.double()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (torch.linalg.norm(x) + 1e-7)
    for a, b, c in coefficients:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if transposed else x


def as_matrices(t: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """(B, m, n) copy of a parameter-shaped tensor (docs/algorithm.md "Shapes": conv flattened,
    3-D stacked, transposed (in, out) weights read as (out, in))."""
    if layout == "transposed":
        return t.mT.reshape(-1, t.shape[-1], t.shape[-2])
    if layout == "conv" or (layout == "auto" and t.ndim >= 4):
        return t.reshape(1, t.shape[0], -1)
    if t.ndim == 2:
        return t.reshape(1, *t.shape)
    return t.reshape(-1, t.shape[-2], t.shape[-1])


class ReferenceMatrixOptimizer:
    """NorMuon (neuron_norm=True) or Muon (False) on a list of float64 tensors, with the
    paper's ablations as options: ``normalize="elements"`` (Muon+Adam), ``normalize_input``
    (NorMuon (Front)), ``normalize_matrices="tall"`` (NorMuon on m > n blocks only) and
    ``beta2=0`` (Muon with row normalization)."""

    def __init__(
        self,
        params,
        *,
        neuron_norm=True,
        lr=0.02,
        momentum=0.95,
        beta2=0.95,
        nesterov=True,
        eps=1e-10,
        weight_decay=0.0,
        coefficients=(MUON_ABC,) * 5,
        update_scale="preserve_norm",
        normalize="rows",
        split_sizes=None,
        layout="auto",
        cautious_weight_decay=False,
        normalize_input=False,
        normalize_matrices="all",
    ):
        self.params = [p.detach().double().clone() for p in params]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.v: list[list[torch.Tensor | None]] = [[] for _ in self.params]
        self.__dict__.update(
            neuron_norm=neuron_norm, lr=lr, beta1=momentum, beta2=beta2, nesterov=nesterov,
            eps=eps, wd=weight_decay, coefficients=coefficients, update_scale=update_scale,
            normalize=normalize, split_sizes=split_sizes, layout=layout,
            cautious=cautious_weight_decay, normalize_input=normalize_input,
            normalize_matrices=normalize_matrices,
        )  # fmt: skip

    def _blocks(self, m):
        if self.split_sizes is None:
            return [(0, m)]
        out, start = [], 0
        for s in self.split_sizes:
            out.append((start, start + s))
            start += s
        return out

    def step(self, grads):
        for i, (p, g) in enumerate(zip(self.params, grads)):
            g = g.double()
            M = self.momentum[i]
            M.mul_(self.beta1).add_((1 - self.beta1) * g)
            U = (1 - self.beta1) * g + self.beta1 * M if self.nesterov else M.clone()
            U3 = as_matrices(U, self.layout)
            D3 = torch.zeros_like(U3)
            B, m_full, n = U3.shape
            blocks = self._blocks(m_full)
            if not self.v[i]:
                self.v[i] = [None] * (B * len(blocks))
            for b in range(B):
                for k, (r0, r1) in enumerate(blocks):
                    m, slot = r1 - r0, b * len(blocks) + k
                    rescaled = self.neuron_norm and (self.normalize_matrices == "all" or m > n)
                    if rescaled and self.normalize_input:  # NorMuon (Front): rescale U, then Muon
                        Ub = U3[b, r0:r1]
                        O = ns_reference(
                            Ub / self._denominator(Ub, m, n, i, slot), self.coefficients
                        )
                        D3[b, r0:r1] = self._muon(O, m, n)
                        continue
                    O = ns_reference(U3[b, r0:r1], self.coefficients)
                    D3[b, r0:r1] = (
                        self._scale(O, m, n, i, slot) if rescaled else self._muon(O, m, n)
                    )
            D = D3.mT.reshape(p.shape) if self.layout == "transposed" else D3.reshape(p.shape)
            if self.cautious:  # arXiv 2510.12402: decay where D and W agree in sign (ties too)
                p.sub_(self.lr * (D + self.wd * (D * p >= 0) * p))
            else:
                p.mul_(1 - self.lr * self.wd).sub_(self.lr * D)

    def _muon(self, O, m, n):
        if self.update_scale == "preserve_norm":
            return O * math.sqrt(max(1.0, m / n))
        norm = torch.linalg.norm(O)
        return O * 0.2 * math.sqrt(m * n) / norm if norm > 0 else torch.zeros_like(O)

    def _denominator(self, X, m, n, i, slot):
        """sqrt(v) + eps after v's EMA step with X's statistic, shaped to divide X:
        per row (m, 1), per column (1, n), or per weight (m, n) for normalize="elements"."""
        if self.normalize == "elements":
            r = X * X
        elif self.normalize == "rows" or m >= n:
            r = (X * X).mean(dim=1, keepdim=True)
        else:
            r = (X * X).mean(dim=0, keepdim=True)
        if self.v[i][slot] is None:
            self.v[i][slot] = torch.zeros_like(r)
        v = self.v[i][slot]
        v.mul_(self.beta2).add_((1 - self.beta2) * r)
        return v.sqrt() + self.eps

    def _scale(self, O, m, n, i, slot):
        Oh = O / self._denominator(O, m, n, i, slot)
        if self.update_scale == "preserve_norm":
            return Oh * torch.linalg.norm(O) / torch.linalg.norm(Oh) * math.sqrt(max(1.0, m / n))
        norm = torch.linalg.norm(Oh)
        return Oh * 0.2 * math.sqrt(m * n) / norm if norm > 0 else torch.zeros_like(Oh)


def adamw_reference(params, grads_per_step, lr, betas, eps, weight_decay, cautious=False):
    """Textbook AdamW (decoupled decay, bias correction) in float64; returns final params.
    ``cautious``: decay only where the update and the weight agree in sign (>= 0)."""
    params = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            u = mhat / (vhat.sqrt() + eps)
            mask = (u * p >= 0) if cautious else torch.ones_like(p, dtype=torch.bool)
            p.sub_(lr * (u + weight_decay * mask * p))
    return params

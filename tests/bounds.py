"""Tolerances that follow from the math, for options whose result is discontinuous in its inputs.

Every other option of NorMuon, Muon and AdamW is continuous in the gradients and weights, so a
parallel run on identical gradients differs from one process by float rounding only (the
Newton-Schulz products of a batch assembled differently, a reduction in another order). The
exceptions, reviewed option by option:

- ``cautious_weight_decay``: the mask I(D * W >= 0) flips where D or W is within rounding of
  zero, and a flip moves that weight by lr * weight_decay * |W| in one step. Bounded by
  :class:`CautiousAllowance`.
- the per-neuron factor 1 / (sqrt(v) + eps) is 0 where v == 0: v is exactly 0 only for a neuron
  whose rows of O were all exactly zero (a zero gradient), the same in every placement.
- ``normalize="larger_dim"``, ``normalize_matrices="tall"``, the Gram iteration: chosen from
  shapes, never from values (``ns_kernel="auto"`` chooses the kernel by timing, per process:
  the parallel tests fix it by shape, ``ns_kernel="shape"``).
- non-finite gradients: a flag per parameter, exact (min/max of the gradient).

So only cautious decay needs more than a rounding tolerance, and only on the entries where its
mask is ambiguous.
"""

from __future__ import annotations

import contextlib

import torch

import normuon.functional as F

#: A mask entry counts as ambiguous where |D| or |W| is at most this fraction of its block's
#: largest entry: two runs on identical gradients differ in D and W by float32 rounding,
#: ~1e-6 of the largest entry (seen <= 1e-6), so 1e-4 leaves a margin of 100.
AMBIGUOUS = 1e-4


class CautiousAllowance(contextlib.AbstractContextManager):
    """How far each weight of a reference run may be from a parallel run of it on identical
    gradients because cautious decay's mask may flip.

    Used around the reference (one-process) steps: every call of
    :func:`normuon.functional.cautious_decay_` on a block of a parameter adds lr * weight_decay
    * |W| to the parameter's allowance at the entries where D or W is ambiguous
    (:data:`AMBIGUOUS`): a flip there changes the weight by exactly that, and with the
    gradients given (not recomputed from the weights) nothing else depends on the mask, so the
    parallel run's weight is within (rounding) + allowance of the reference's. Entries whose
    mask cannot flip get no allowance, so a wrong mask anywhere else still fails the test.
    """

    def __init__(self, named_params) -> None:
        self.params = dict(named_params)
        for name, p in self.params.items():
            if not p.is_contiguous():
                raise ValueError(f"{name}: CautiousAllowance maps blocks of contiguous params")
        self.allowance = {name: torch.zeros_like(p, dtype=torch.float64)
                          for name, p in self.params.items()}  # fmt: skip
        self.calls = 0
        self._original = F.cautious_decay_

    def __enter__(self):
        original = self._original

        def recording(param, update, ok, lr, weight_decay):
            self._record(param, update, ok, float(lr) * float(weight_decay))
            return original(param, update, ok, lr, weight_decay)

        F.cautious_decay_ = recording
        return self

    def __exit__(self, *exc) -> None:
        F.cautious_decay_ = self._original

    def _owner(self, block: torch.Tensor) -> str | None:
        """The reference parameter ``block`` views (None: another optimizer's, e.g. the
        parallel run's stepping in the same process)."""
        ptr = block.untyped_storage().data_ptr()
        for name, p in self.params.items():
            if p.untyped_storage().data_ptr() == ptr:
                return name
        return None

    def _record(self, block, update, ok, lr_wd: float) -> None:
        name = self._owner(block)
        if name is None or lr_wd == 0 or (ok is not None and not bool(ok)):
            return
        self.calls += 1
        w, d = block.detach().double(), update.detach().double()
        # An exact zero is not ambiguous: a zero row of the gradient gives a zero row of D in
        # every placement (Newton-Schulz keeps zero rows zero), decided as a tie everywhere.
        ambiguous = _small(d) | _small(w)
        p = self.params[name]
        view = self.allowance[name].as_strided(
            block.shape, block.stride(), block.storage_offset() - p.storage_offset()
        )
        view += torch.where(ambiguous, lr_wd * w.abs(), 0.0)

    def of(self, name: str) -> torch.Tensor:
        """The allowance of parameter ``name`` (float64, the parameter's shape)."""
        return self.allowance[name]


def _small(t: torch.Tensor) -> torch.Tensor:
    """Entries within rounding of zero, relative to the largest, but not exactly zero."""
    magnitude = t.abs()
    return (magnitude > 0) & (magnitude <= AMBIGUOUS * magnitude.max())


def excess_error(a: torch.Tensor, b: torch.Tensor, allowance: torch.Tensor | None) -> float:
    """max(|a - b| - allowance, 0), relative to max |b|: the error a rounding tolerance must
    cover once the discontinuity's allowance is taken off."""
    diff = (a.double() - b.double()).abs()
    if allowance is not None:
        diff = (diff - allowance).clamp_min(0.0)
    return (diff.max() / b.double().abs().max().clamp_min(1e-12)).item()

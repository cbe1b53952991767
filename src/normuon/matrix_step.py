"""Running one matrix group's step over its planned batches (``normuon.step_plan``).

Per batch of same-shaped blocks: write the Newton-Schulz input U into the workspace (the
momentum update of local matrices happens there too), orthogonalize it in place, compute the
per-neuron (NorMuon) or per-matrix (Muon) factors of the whole batch, and apply them. The math
is :mod:`normuon.functional` and :mod:`normuon.newton_schulz`; this module only decides which
tensor views they run on. Nothing here reads a tensor's value on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import functional as F
from . import newton_schulz as NS
from .distributed.distributor import OwnedMatrix
from .step_plan import BlockBatch, MatrixBlock, Workspace

__all__ = ["LocalMatrix", "MatrixHyper", "StepTensors", "run_batch"]


@dataclass(frozen=True)
class MatrixHyper:
    """A matrix group's hyperparameters for one step (Tensors stay on the device)."""

    lr: F.Scalar
    weight_decay: F.Scalar
    momentum: F.Scalar
    beta2: F.Scalar
    eps: F.Scalar
    nesterov: bool
    update_scale: str
    coefficients: tuple[NS.Coefficients, ...]
    ns_dtype: torch.dtype
    orthogonalizer: Callable[..., torch.Tensor] | None
    neuron_norm: bool
    #: decay only where D * W >= 0 (:func:`normuon.functional.cautious_decay_`), applied per
    #: block with its update instead of one decay of every matrix before the batches
    cautious: bool = False
    #: NorMuon (Front): the per-neuron rescale of the Newton-Schulz input, not of its output
    normalize_input: bool = False
    #: NorMuon's rescale for blocks with more rows than columns only; Muon for the others
    tall_only: bool = False

    def rescales(self, m: int, n: int) -> bool:
        """Whether (m, n) blocks get NorMuon's per-neuron rescale (else Muon's update)."""
        return self.neuron_norm and (not self.tall_only or m > n)

    @classmethod
    def of(cls, group: dict[str, Any], device: torch.device, ns_dtype: torch.dtype,
           orthogonalizer, neuron_norm: bool) -> MatrixHyper:  # fmt: skip
        """From a param group: Tensor values as 0-d tensors on ``device`` (a no-op when they
        live there, as they must for a sync-free step)."""

        def value(key: str, default: Any = 0.0) -> F.Scalar:
            return F.device_scalar(group.get(key, default), device)

        return cls(
            lr=value("lr"), weight_decay=value("weight_decay"), momentum=value("momentum"),
            beta2=value("beta2"), eps=value("eps"), nesterov=group["nesterov"],
            update_scale=group["update_scale"],
            coefficients=NS.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"]),
            ns_dtype=ns_dtype, orthogonalizer=orthogonalizer, neuron_norm=neuron_norm,
            cautious=group.get("cautious_weight_decay", False),
            normalize_input=group.get("normalize_input", False),
            tall_only=group.get("normalize_matrices", "all") == "tall",
        )  # fmt: skip


@dataclass(frozen=True)
class LocalMatrix:
    """A matrix parameter this rank updates in place: its local tensors for this step."""

    param: torch.Tensor
    grad: torch.Tensor
    momentum: torch.Tensor
    second_moment: torch.Tensor | None


@dataclass(frozen=True)
class StepTensors:
    """What one step's blocks read and write, by parameter index in the group.

    Attributes:
        local: matrices updated from their own tensors (one process, DDP owners, DTensors
            holding whole matrices).
        owned: sharded matrices assembled on this rank, their owner.
        ok: finite flag per parameter (0-d bool tensors), or None: nothing to mask.
    """

    local: dict[int, LocalMatrix]
    owned: dict[int, OwnedMatrix]
    ok: dict[int, torch.Tensor] | None

    def present(self, block: MatrixBlock) -> bool:
        return block.index in (self.owned if block.owned else self.local)

    def flag(self, block: MatrixBlock) -> torch.Tensor | None:
        return None if self.ok is None else self.ok[block.index]

    def second_moment(self, block: MatrixBlock) -> torch.Tensor:
        """(B, L) view of the block's second-moment entries ((B, m, n) for one per weight)."""
        v = (self.owned if block.owned else self.local)[block.index].second_moment
        if block.reduce_dim is None:  # normalize="elements": shaped like the parameter
            return block.plan.geometry.as_matrices(v)[:, block.row_slice]
        return v.view(block.stack, -1)[:, block.moment[0] : block.moment[1]]


def run_batch(
    batch: BlockBatch, tensors: StepTensors, hyper: MatrixHyper, workspace: Workspace
) -> None:
    """Orthogonalize, scale and apply the blocks of ``batch`` that have a gradient this step."""
    members = [block for block in batch.blocks if tensors.present(block)]
    if not members:
        return
    stack = sum(block.stack for block in members)
    # (stack, m, n): U is written here, overwritten by O, then read by the factors and updates.
    u = workspace.flat("input", batch.dtype, batch.device, stack * batch.m * batch.n)
    u = u.view(stack, batch.m, batch.n)
    _write_inputs(members, tensors, hyper, u, workspace)
    ok = _batch_ok(members, tensors)
    rescale = hyper.rescales(batch.m, batch.n)
    dim = batch.reduce_dim
    if rescale and hyper.normalize_input:  # NorMuon (Front): rescale U, then Muon
        moments, stacked = _stacked_moments(members, tensors)
        F.rescale_input_(u, stacked, ok, hyper.beta2, hyper.eps, dim)
        _write_back(moments, stacked, members)
        rescale = False
    _orthogonalize_(u, hyper, workspace)
    factors = _factors(members, tensors, hyper, u, ok, dim, rescale)
    if factors.ndim == 2:  # (B, L) per neuron along dim, or (B, 1) per matrix
        factors = factors.unsqueeze(-1 if dim is None else dim)
    _apply(members, tensors, hyper, u, factors)


def _write_inputs(
    members: Sequence[MatrixBlock],
    tensors: StepTensors,
    hyper: MatrixHyper,
    u: torch.Tensor,
    workspace: Workspace,
) -> None:
    """U of every member into its rows of ``u``; local matrices update their momentum here."""
    pos = 0
    for block in members:
        out = u[pos : pos + block.stack]
        pos += block.stack
        geometry, rows = block.plan.geometry, block.row_slice
        if block.owned:
            out.copy_(geometry.as_matrices(tensors.owned[block.index].u)[:, rows])
            continue
        local = tensors.local[block.index]
        momentum = geometry.as_matrices(local.momentum)[:, rows]
        grad = geometry.as_matrices(local.grad)[:, rows]
        # A bf16 momentum (state_dtype) is updated in float32 and stored rounded.
        rounding = None if momentum.dtype == out.dtype else workspace.rounding_scratch(out)
        F.momentum_and_input_(momentum, grad, tensors.flag(block), hyper.momentum,
                              hyper.nesterov, out, rounding)  # fmt: skip


def _orthogonalize_(u: torch.Tensor, hyper: MatrixHyper, workspace: Workspace) -> None:
    """O = NS(U), written over U. The default iteration runs in the workspace's scratch."""
    if hyper.orthogonalizer is not None:
        u.copy_(hyper.orthogonalizer(u, hyper.coefficients, hyper.ns_dtype))
        return
    _, m, n = u.shape
    chunk = NS.default_chunk_size(u.shape, hyper.ns_dtype, u.device)
    numel = NS.NSScratch.numel(chunk, m, n)
    flat = workspace.flat("newton_schulz", hyper.ns_dtype, u.device, numel)
    scratch = NS.NSScratch.carve(flat, chunk, m, n)
    NS.newton_schulz_(u, hyper.coefficients, scratch, use_gram=NS.prefers_gram(m, n))


def _batch_ok(members: Sequence[MatrixBlock], tensors: StepTensors) -> torch.Tensor | None:
    """(stack,) finite flags of the batch's matrices, or None: nothing to mask."""
    if tensors.ok is None:
        return None
    return torch.cat([tensors.flag(b).reshape(1).expand(b.stack) for b in members])


def _stacked_moments(members: Sequence[MatrixBlock], tensors: StepTensors):
    """(the members' second-moment views, one stack of them): the views themselves when there
    is one member, else a copy to be written back with :func:`_write_back`."""
    moments = [tensors.second_moment(block) for block in members]
    return moments, (moments[0] if len(moments) == 1 else torch.cat(moments))


def _write_back(moments, stacked: torch.Tensor, members: Sequence[MatrixBlock]) -> None:
    if len(moments) > 1:
        torch._foreach_copy_(moments, list(stacked.split([b.stack for b in members])))


def _factors(
    members: Sequence[MatrixBlock],
    tensors: StepTensors,
    hyper: MatrixHyper,
    o: torch.Tensor,
    ok: torch.Tensor | None,
    dim: int | None,
    rescale: bool,
) -> torch.Tensor:
    """Factors of the whole batch at once: (stack, L) per neuron, (stack, m, n) per weight
    (``rescale``: NorMuon, whose second moments are gathered into one stack and written back)
    or (stack, 1) per matrix (Muon). ``ok``: the batch's (stack,) finite flags, or None."""
    if not rescale:
        return F.muon_factors(o, ok, hyper.update_scale)
    moments, stacked = _stacked_moments(members, tensors)
    factors = F.normuon_factors_(
        o, stacked, ok, hyper.beta2, hyper.eps, dim, hyper.update_scale
    )
    _write_back(moments, stacked, members)
    return factors


def _apply(
    members: Sequence[MatrixBlock],
    tensors: StepTensors,
    hyper: MatrixHyper,
    o: torch.Tensor,
    factors: torch.Tensor,
) -> None:
    """W -= lr O g for local blocks (one foreach call); an owner's D = O g into its buffer."""
    targets, blocks, block_factors = [], [], []
    pos = 0
    for block in members:
        o_block, g_block = o[pos : pos + block.stack], factors[pos : pos + block.stack]
        pos += block.stack
        geometry, rows = block.plan.geometry, block.row_slice
        if block.owned:
            update = geometry.as_matrices(tensors.owned[block.index].update)[:, rows]
            torch.mul(o_block, g_block, out=update)
            continue
        param = tensors.local[block.index].param
        if param.is_contiguous():
            target = geometry.as_matrices(param)[:, rows]
            if hyper.cautious:  # W before the update, masked by the sign of D = O g
                F.cautious_decay_(target, o_block * g_block, tensors.flag(block), hyper.lr,
                                  hyper.weight_decay)  # fmt: skip
            targets.append(target)
            blocks.append(o_block)
            block_factors.append(g_block)
        else:  # cannot be viewed as matrices: D is scattered into a parameter-shaped tensor
            full = torch.zeros((geometry.batch, geometry.rows, geometry.cols),
                               dtype=o_block.dtype, device=param.device)  # fmt: skip
            full[:, rows] = o_block * g_block
            if hyper.cautious:  # W <- W - lr (D + wd I(D W >= 0) W), on this block's rows
                w = geometry.as_matrices(param)[:, rows].to(full.dtype)  # a copy of W
                decay = torch.where(full[:, rows] * w >= 0, w, 0.0) * hyper.weight_decay
                flag = tensors.flag(block)
                full[:, rows] += decay if flag is None else decay * flag
            F.sub_scaled_(param, geometry.from_matrices(full), hyper.lr)
    if targets:
        F.apply_updates_(targets, blocks, block_factors, hyper.lr)

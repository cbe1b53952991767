"""Pure tensor math of NorMuon and Muon: no optimizer state, no ``torch.distributed``.

Every function here takes tensors and numbers and returns tensors; the optimizer class keeps
the state and calls them, and the distributed layer only moves the tensors they consume.

Notation (SPEC section 1): a weight matrix W has shape (m, n) = (out_features, in_features), so
row i belongs to output neuron i. Batched functions take a stack (B, m, n) of same-shaped
matrices.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "accum_dtype",
    "adam_rms_target",
    "apply_matrix_update",
    "inverse_rms",
    "muon_scale_from_sum",
    "neuron_mean_square",
    "normuon_partial_sums",
    "normuon_row_factors",
    "reduce_dim",
]

#: Update RMS of the ``adam_rms`` convention (NorMuon paper, Algorithm 1; Moonlight's 0.2).
adam_rms_target = 0.2

# --------------------------------------------------------------------------------------------
# Neuron-wise normalization and update scale
# --------------------------------------------------------------------------------------------


def reduce_dim(m: int, n: int, normalize: str) -> int:
    """Axis of a (B, m, n) stack averaged to get one second-moment entry per neuron.

    ``"rows"`` (paper): one entry per row (output neuron), so average over columns (dim -1).
    ``"larger_dim"`` (modded-nanogpt): one entry per element of the larger dimension; rows win
    ties.
    """
    if normalize == "rows" or m >= n:
        return -1
    return -2


def neuron_mean_square(o: torch.Tensor, dim: int) -> torch.Tensor:
    """r = mean of O*O along ``dim`` of a (B, m, n) stack, in float32 or wider: (B, m) or (B, n)."""
    return o.to(accum_dtype(o.dtype)).square().mean(dim=dim)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise: the precision of statistics."""
    return torch.promote_types(dtype, torch.float32)


def normuon_row_factors(
    f: torch.Tensor,
    sum_r: torch.Tensor,
    sum_rf2: torch.Tensor,
    m: int,
    n: int,
    dim: int,
    update_scale: str,
) -> torch.Tensor:
    """Per-neuron multipliers g so that the NorMuon update is D = O * g (broadcast along ``dim``).

    ``f`` = :func:`inverse_rms` of the second moment (B, L). With k elements per neuron (k = n
    when ``dim`` is -1, m when it is -2), the two norms of the update-scale rule follow from r
    without touching O: ||O||_F^2 = k * sum(r) and ||O f||_F^2 = k * sum(r f^2); ``sum_r`` and
    ``sum_rf2`` (B,) are those sums over the whole matrix (:func:`normuon_partial_sums`, added
    over the shards of a row-sharded matrix).

    ``"preserve_norm"``: D = Oh * ||O|| / ||Oh|| * sqrt(max(1, m/n)) (authors' code).
    ``"adam_rms"``: D = Oh * 0.2 * sqrt(m n) / ||Oh|| (paper, Algorithm 1).
    """
    tiny = torch.finfo(torch.float32).tiny
    if update_scale == "preserve_norm":
        scale = (sum_r / sum_rf2.clamp_min(tiny)).sqrt() * math.sqrt(max(1.0, m / n))
    elif update_scale == "adam_rms":
        per_neuron = n if dim == -1 else m
        scale = adam_rms_target * math.sqrt(m * n) / (per_neuron * sum_rf2).clamp_min(tiny).sqrt()
    else:
        raise ValueError(
            f"update_scale must be 'preserve_norm' or 'adam_rms', got {update_scale!r}"
        )
    return f * scale.unsqueeze(-1)


def normuon_partial_sums(r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum r, sum r f^2) over the neurons held here: (B,) each. Summed across shards, they give
    the whole-matrix norms of :func:`normuon_row_factors`."""
    return r.sum(dim=-1), (r * f.square()).sum(dim=-1)


def inverse_rms(v: torch.Tensor, eps: float) -> torch.Tensor:
    """f = 1 / (sqrt(v) + eps): the per-neuron rescale of NorMuon.

    A neuron with v = 0 has had an all-zero row of O so far (its row of O is zero now too), so
    its factor is 0 rather than 1/eps: with eps = 0 that would be inf, and inf * 0 = NaN.
    """
    return torch.where(v > 0, 1.0 / (v.sqrt() + eps), 0.0)


def muon_scale_from_sum(sum_sq: torch.Tensor, m: int, n: int, update_scale: str) -> torch.Tensor:
    """Per-matrix Muon multiplier (B,) from ||O||_F^2 (B,) of whole (m, n) matrices."""
    if update_scale == "preserve_norm":
        return torch.full_like(sum_sq, math.sqrt(max(1.0, m / n)))
    if update_scale == "adam_rms":
        tiny = torch.finfo(torch.float32).tiny
        return adam_rms_target * math.sqrt(m * n) / sum_sq.clamp_min(tiny).sqrt()
    raise ValueError(f"update_scale must be 'preserve_norm' or 'adam_rms', got {update_scale!r}")


def apply_matrix_update(
    param_blocks: torch.Tensor, o: torch.Tensor, g: torch.Tensor, dim: int, lr: float
) -> None:
    """param_blocks -= lr * O * g, with g (B, L) broadcast along ``dim`` of the (B, m, n) O."""
    param_blocks.addcmul_(o, g.unsqueeze(dim), value=-lr)

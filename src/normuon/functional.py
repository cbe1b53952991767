"""The step math of NorMuon, Muon and AdamW: no optimizer state, no ``torch.distributed``.

Functions take tensors and numbers; those ending in ``_`` update the tensors they are given in
place, like torch.optim's functional forms. The optimizer class decides which tensors they run
on (``normuon.optimizer``) and the distributed layer only moves those tensors
(``normuon.distributed``). The equations are written down in ``docs/algorithm.md``.

Shapes: a stack of same-shaped matrices is (B, m, n), rows are output neurons. ``ok`` is a 0-d
bool tensor per parameter, False when its gradient had a NaN/Inf: every function then leaves
the state and parameter as they were, without a host sync.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: A hyperparameter: a Python number, or a 0-d tensor on the parameters' device (read by
#: device kernels only, never on the host, so schedulers can update it in place).
Scalar = float | torch.Tensor

__all__ = [
    "ADAM_RMS_TARGET",
    "ROUNDING_WINDOWS",
    "AdamWHyper",
    "accum_dtype",
    "adamw_step_",
    "apply_updates_",
    "cautious_decay_",
    "decay_",
    "device_scalar",
    "finite_flags",
    "inverse_rms",
    "momentum_and_input_",
    "muon_factors",
    "normuon_factors_",
    "rescale_input_",
    "rounding_key",
    "rounding_noise",
    "rounding_offset",
    "rounding_table",
    "stochastic_round_",
    "sub_scaled_",
    "update_second_moment_",
]

#: Update RMS of the ``adam_rms`` convention (NorMuon paper, Algorithm 1; Moonlight's 0.2).
ADAM_RMS_TARGET = 0.2


def device_scalar(value: Scalar, device: torch.device) -> Scalar:
    """A hyperparameter as the step uses it: a number as it is; a one-element Tensor of any shape
    (torch.optim accepts lr of shape (), (1,) or (1, 1)) as a 0-d tensor on ``device`` (a view
    where it already lives there, so a scheduler's in-place update is seen)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(()).to(device)
    return value


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise: the precision of statistics."""
    return torch.promote_types(dtype, torch.float32)


def finite_flags(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One 0-d bool tensor per tensor: True when every entry is finite (no host sync).

    min and max propagate NaN and are +-inf when an entry is, and unlike a sum or a 2-norm they
    never overflow on large finite values; ``aminmax`` is one vectorized pass (the max-abs norm
    is ~20x slower on CPUs). Empty tensors are finite.
    """
    flags = []
    for t in tensors:
        if t.numel() == 0:
            flags.append(torch.ones((), dtype=torch.bool, device=t.device))
            continue
        low, high = torch.aminmax(t)
        flags.append(torch.isfinite(low) & torch.isfinite(high))
    return flags


def momentum_and_input_(
    momentum_buffer: torch.Tensor,
    grad: torch.Tensor,
    ok: torch.Tensor | None,
    beta1: Scalar,
    nesterov: bool,
    out: torch.Tensor,
    rounding: tuple[torch.Tensor, torch.Tensor, torch.Generator | None] | None = None,
) -> None:
    """The momentum update M <- beta1 M + (1 - beta1) G in place, then the Newton-Schulz input
    U = G.lerp(M, beta1) (``nesterov``) or U = M written into ``out``, with ``out`` as the only
    scratch: no tensor is allocated (G is cast, or masked, into ``out`` first when its dtype
    differs from ``out``'s, or ``ok`` is given; bf16 gradients meet float32 state there).

    Where ``ok`` (a 0-d bool tensor) is False, G is replaced by M: M stays as it was and U = M
    (finite; the update is zeroed later anyway). None: the caller knows G is finite.

    ``rounding``, for a momentum stored in lower precision than ``out`` (bfloat16): (a tensor
    shaped like ``out`` in its dtype, an int32 one, a generator or None). M and U are then
    computed in ``out``'s precision and M is stored back with :func:`stochastic_round_`. The
    int32 tensor holds the random bits (uniform in [0, 2^16), e.g. a :func:`rounding_noise`
    view, which is only read); with a generator it is a scratch, filled from the generator
    first.
    """
    if ok is None and grad.dtype == out.dtype:
        g = grad  # read where it is: a copy into ``out`` would be one more pass over G
    else:
        g = out
        if ok is None:
            out.copy_(grad)
        else:
            torch.where(ok, grad, momentum_buffer, out=out)
    m = momentum_buffer
    if rounding is not None:
        m = rounding[0]
        m.copy_(momentum_buffer)
    m.lerp_(g, 1.0 - beta1)
    if nesterov:
        torch.lerp(g, m, beta1, out=out)
    else:
        out.copy_(m)
    if rounding is not None:
        noise = rounding[1]
        if rounding[2] is not None:
            noise.random_(0, 1 << 16, generator=rounding[2])
        stochastic_round_(momentum_buffer, m, noise)


#: The stochastic-rounding table's windows: a :func:`rounding_noise` view starts at one of the
#: first ROUNDING_WINDOWS entries of the table.
ROUNDING_WINDOWS = 1 << 16

_MASK32 = (1 << 32) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32) and c < 2^32, without int64 overflow (16-bit
    halves: every product is < 2^48)."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _MASK32


def rounding_table(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 (numel,): uniform random 16-bit values in [0, 2^16), the bits of
    :func:`stochastic_round_` that :func:`rounding_noise` views.

    Entry j is the top 16 bits of murmur3's 32-bit finalizer of j * 0x9E3779B9 + 0x5EED (a
    bijection of 32-bit counters, so the table is uniform and free of short-range patterns),
    computed exactly in int64 on the CPU: the table depends on nothing but j, so every device,
    rank, torch version and table size agrees on every entry (a table grown later keeps its
    prefix), and a resumed run reads the bits the uninterrupted one read.
    """
    if not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    table = torch.empty(numel, dtype=torch.int32)
    chunk = 1 << 15  # int64 temporaries of 256 KiB stay in cache: ~15 ns an entry on a CPU
    for start in range(0, numel, chunk):
        x = torch.arange(start, min(start + chunk, numel), dtype=torch.int64)
        x = (_mul32(x, 0x9E3779B9) + 0x5EED) & _MASK32
        x ^= x >> 16
        x = _mul32(x, 0x85EBCA6B)
        x ^= x >> 13
        x = _mul32(x, 0xC2B2AE35)
        x ^= x >> 16
        table[start : start + x.numel()].copy_(x >> 16)
    return table.to(device)


def rounding_offset(step: int, key: int) -> int:
    """Where the bits of rounding number ``step`` of the tensor named ``key`` start in the table:
    (a t + b floor(t / W) + c key) mod W, with t = ``step``, W = ``ROUNDING_WINDOWS`` and a odd
    (it depends on ``key``).

    a odd makes t -> a t mod W a bijection: a tensor's W consecutive roundings start at W
    different offsets, so each of its entries reads a different table entry every time (the
    entries being independent, its bits are independent across roundings); the b term shifts
    the next W roundings, so an entry's sequence does not repeat. Integers only (+, *, //, %),
    so a symbolic ``step`` traces.
    """
    w = ROUNDING_WINDOWS
    a = (40503 + 2 * (key % w)) % w  # odd: 40503 is, 2 (key mod W) and W are even
    return (a * step + 25033 * (step // w) + 31337 * key) % w


def rounding_key(*position: int) -> int:
    """One integer for a tensor's position (e.g. group, parameter, first row): the ``key`` of
    :func:`rounding_offset`."""
    key = 0
    for value in position:
        key = (key * 1_000_003 + value) & _MASK32
    return key


def rounding_noise(table: torch.Tensor, step: int, key: int, like: torch.Tensor) -> torch.Tensor:
    """The random bits of one rounding: a view of ``table`` (1-D int32, from
    :func:`rounding_table`) shaped like ``like``, starting at ``rounding_offset(step, key)``; no
    pass over memory. ``table`` must hold ``like.numel() + ROUNDING_WINDOWS`` entries."""
    if table.numel() < like.numel() + ROUNDING_WINDOWS:
        raise ValueError(
            f"the rounding table holds {table.numel()} entries; {like.numel()} entries need "
            f"{like.numel() + ROUNDING_WINDOWS}"
        )
    start = rounding_offset(step, key)
    return table[start : start + like.numel()].view(like.shape)


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, noise: torch.Tensor) -> None:
    """dst = bfloat16(src) rounded up with probability equal to the dropped fraction (unbiased).

    A float32's top 16 bits are its bfloat16 value (truncated toward zero); adding ``noise``,
    16 uniform random bits (int32 in [0, 2^16), shaped like ``src``, independent of it), below
    them and truncating rounds the magnitude up exactly with probability (dropped bits) / 2^16.
    Values already exact in bfloat16 come back unchanged (the carry never reaches bit 16).

    Two passes: the add, into ``src``'s bits (``src``, contiguous float32, is overwritten), and
    a copy of the top halves of those 32-bit words into ``dst``'s 16-bit words (a strided int16
    copy: no float conversion, no temporary).
    """
    if src.dtype != torch.float32 or dst.dtype != torch.bfloat16 or noise.dtype != torch.int32:
        raise TypeError(
            f"stochastic_round_ rounds float32 into bfloat16 with int32 bits, got src "
            f"{src.dtype}, dst {dst.dtype}, noise {noise.dtype}"
        )
    if not src.is_contiguous() or src.shape != dst.shape or noise.shape != src.shape:
        raise ValueError(
            f"stochastic_round_ needs a contiguous src, and dst and noise of its shape, got src "
            f"{tuple(src.shape)} (contiguous: {src.is_contiguous()}), dst {tuple(dst.shape)}, "
            f"noise {tuple(noise.shape)}"
        )
    if src.ndim == 0:  # int16 views need a last dimension
        src, dst, noise = src.reshape(1), dst.reshape(1), noise.reshape(1)
    bits = src.view(torch.int32)
    bits.add_(noise)
    high = 1 if sys.byteorder == "little" else 0  # the int16 holding bits 16..31
    dst.view(torch.int16).copy_(bits.view(torch.int16)[..., high::2])


def inverse_rms(v: torch.Tensor, eps: Scalar) -> torch.Tensor:
    """f = 1 / (sqrt(v) + eps): the per-neuron rescale of NorMuon.

    A neuron with v = 0 has had an all-zero row of O so far (its row of O is zero now too), so
    its factor is 0 rather than 1/eps: with eps = 0 that would be inf, and inf * 0 = NaN.
    """
    return torch.where(v > 0, 1.0 / (v.sqrt() + eps), 0.0)


def update_second_moment_(
    x: torch.Tensor,
    second_moment: torch.Tensor,
    ok: torch.Tensor | None,
    beta2: Scalar,
    dim: int | None,
) -> torch.Tensor:
    """v <- beta2 v + (1 - beta2) r in place, and return r.

    ``x`` is a (B, m, n) stack (the orthogonalized update O, or the Newton-Schulz input U for
    ``normalize_input``). r is the mean of x*x per neuron along ``dim``: (B, m) for -1 (rows),
    (B, n) for -2 (columns), accumulated in float32 without a float32 copy of x; or x*x itself,
    (B, m, n), for ``dim=None`` (one entry per weight, the Muon+Adam ablation). ``v`` keeps its
    value where ``ok`` (0-d, or (B,) per matrix) is False.
    """
    if dim is None:
        r = x.to(accum_dtype(x.dtype)).square()
    else:
        r = torch.linalg.vector_norm(x, dim=dim, dtype=accum_dtype(x.dtype)).square_()
        r /= x.shape[dim]
    # v's dtype may differ (float64 parameters with a float32 state_dtype: float32 O, float64 v)
    r = r.to(second_moment.dtype)
    if ok is not None:  # (1,) or (B,), broadcast over the entries of each matrix
        ok = ok.reshape((-1,) + (1,) * (r.ndim - 1))
        r = torch.where(ok, r, second_moment)
    second_moment.lerp_(r, 1.0 - beta2)
    return r


def _per_matrix(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1) or (B, 1, 1): broadcast over one matrix's factors."""
    return scale.reshape((-1,) + (1,) * (ndim - 1))


def normuon_factors_(
    o: torch.Tensor,
    second_moment: torch.Tensor,
    ok: torch.Tensor | None,
    beta2: Scalar,
    eps: Scalar,
    dim: int | None,
    update_scale: str,
) -> torch.Tensor:
    """Update NorMuon's second moment in place and return per-neuron multipliers g.

    ``o`` is a (B, m, n) stack of orthogonalized updates, ``second_moment`` its (B, L) state with
    one entry per neuron along ``dim`` (-1: rows, L = m; -2: columns, L = n), or (B, m, n) with
    one entry per weight (``dim=None``: the Muon+Adam ablation). The update is D = O * g, g
    broadcast along ``dim``:

        r  = mean of O*O per neuron;  v <- beta2 v + (1 - beta2) r;  f = 1 / (sqrt(v) + eps)
        preserve_norm: g = f * ||O|| / ||O f|| * sqrt(max(1, m/n))   (authors' code)
        adam_rms:      g = f * 0.2 sqrt(m n) / ||O f||                (paper, Algorithm 1)

    Both norms follow from r without another pass over O: with k entries per neuron,
    ||O||^2 = k sum(r) and ||O f||^2 = k sum(r f^2). g is 0 where ``ok`` is False (``ok``: a
    0-d flag for the whole stack, or one per matrix (B,); None: all finite). g is (B, L), or
    (B, m, n) for ``dim=None``.
    """
    m, n = o.shape[-2], o.shape[-1]
    r = update_second_moment_(o, second_moment, ok, beta2, dim)
    f = inverse_rms(second_moment, eps)
    entries = tuple(range(1, r.ndim))  # the entries of one matrix
    per_neuron = 1 if dim is None else o.shape[dim]  # weights behind one entry of r
    sum_r = r.sum(dim=entries)
    sum_rf2 = (r * f.square()).sum(dim=entries)
    tiny = torch.finfo(torch.float32).tiny
    if update_scale == "preserve_norm":
        scale = (sum_r / sum_rf2.clamp_min(tiny)).sqrt() * math.sqrt(max(1.0, m / n))
    elif update_scale == "adam_rms":
        scale = ADAM_RMS_TARGET * math.sqrt(m * n) / (per_neuron * sum_rf2).clamp_min(tiny).sqrt()
    else:
        raise ValueError(
            f"update_scale must be 'preserve_norm' or 'adam_rms', got {update_scale!r}"
        )
    if ok is not None:
        scale = scale * ok.reshape(-1)
    return f * _per_matrix(scale, f.ndim)


def rescale_input_(
    u: torch.Tensor,
    second_moment: torch.Tensor,
    ok: torch.Tensor | None,
    beta2: Scalar,
    eps: Scalar,
    dim: int | None,
) -> None:
    """NorMuon (Front), the paper's ablation: the per-neuron second moment of the Newton-Schulz
    input U (a (B, m, n) stack) and U <- U / (sqrt(v) + eps) in place, before orthogonalization
    (whose output is then scaled as Muon's). ``second_moment``, ``ok`` and ``dim`` as in
    :func:`normuon_factors_`."""
    update_second_moment_(u, second_moment, ok, beta2, dim)
    f = inverse_rms(second_moment, eps)
    u.mul_(f if dim is None else f.unsqueeze(dim))


def muon_factors(o: torch.Tensor, ok: torch.Tensor | None, update_scale: str) -> torch.Tensor:
    """Per-matrix Muon multiplier (B, 1): D = O * g.

    ``preserve_norm``: sqrt(max(1, m/n)) (Keller Jordan's Muon); ``adam_rms``: 0.2 sqrt(m n) /
    ||O|| (update RMS 0.2, Moonlight). 0 where ``ok`` (0-d, or (B,) per matrix) is False.
    """
    m, n = o.shape[-2], o.shape[-1]
    okf = 1.0 if ok is None else ok.reshape(-1).to(accum_dtype(o.dtype))  # (1,) or (B,)
    if update_scale == "preserve_norm":
        # In the accumulation dtype: a float32 sqrt(m/n) costs float64 runs ~1e-8 relative.
        scale = torch.full(
            (o.shape[0],), math.sqrt(max(1.0, m / n)), dtype=accum_dtype(o.dtype),
            device=o.device,
        )
        return (scale * okf)[:, None]
    if update_scale == "adam_rms":
        norm = torch.linalg.vector_norm(o, dim=(-2, -1), dtype=accum_dtype(o.dtype))
        # An all-zero O (a matrix whose gradient is still exactly zero, e.g. behind a
        # zero-initialised projection at step 0) gets g = 0: a clamped norm would give
        # 0.2 sqrt(mn) / tiny, which overflows float32 to inf, and inf * 0 is NaN.
        scale = torch.where(norm > 0, ADAM_RMS_TARGET * math.sqrt(m * n) / norm, 0.0)
        return (scale * okf)[:, None]
    raise ValueError(f"update_scale must be 'preserve_norm' or 'adam_rms', got {update_scale!r}")


def apply_updates_(
    param_matrices: list[torch.Tensor], o: list[torch.Tensor], g: list[torch.Tensor], lr: Scalar
) -> None:
    """W -= lr * O * g for every (B, m, n) view of a parameter, with its factors g already
    shaped to broadcast ((B, m, 1) per row, (B, 1, n) per column, (B, 1, 1) per matrix)."""
    if isinstance(lr, torch.Tensor):  # the small factors take -lr (no host read of lr)
        g = [factors * -lr for factors in g]
        torch._foreach_addcmul_(param_matrices, o, g)
    else:
        torch._foreach_addcmul_(param_matrices, o, g, value=-lr)


def sub_scaled_(param: torch.Tensor, delta: torch.Tensor, lr: Scalar) -> None:
    """W -= lr * delta, ``delta`` cast to W's dtype."""
    delta = delta.to(param.dtype)
    if isinstance(lr, torch.Tensor):
        param.sub_(delta * lr)
    else:
        param.add_(delta, alpha=-lr)


def decay_(
    params: list[torch.Tensor], ok: list[torch.Tensor] | None, lr: Scalar, weight_decay: Scalar
) -> None:
    """Decoupled weight decay W *= 1 - lr * weight_decay, skipped where ``ok`` is False (None:
    every parameter decays)."""
    if not params or (not isinstance(weight_decay, torch.Tensor) and weight_decay == 0):
        return
    if ok is None:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    else:
        factors = [
            1.0 - (lr * weight_decay) * f.to(accum_dtype(p.dtype)) for f, p in zip(ok, params)
        ]
        torch._foreach_mul_(params, factors)


@dataclass(frozen=True)
class AdamWHyper:
    """One AdamW group's hyperparameters for a step (numbers, or 0-d tensors on the device)."""

    lr: Scalar
    beta1: Scalar
    beta2: Scalar
    eps: Scalar
    weight_decay: Scalar
    #: decay only where the update agrees in sign with the weight (:func:`cautious_decay_`)
    cautious: bool = False


def cautious_decay_(
    param: torch.Tensor,
    update: torch.Tensor,
    ok: torch.Tensor | None,
    lr: Scalar,
    weight_decay: Scalar,
) -> None:
    """Cautious weight decay (Chen et al. 2025, "Cautious Weight Decay", arXiv 2510.12402):
    W <- W - lr * weight_decay * I(D * W >= 0) * W, with D the update that the step subtracts
    (W <- W - lr D) and W as it was before it, so only coordinates whose update agrees in sign
    with the weight are decayed. Ties decay, as the paper's indicator is ``>= 0`` (a zero
    weight is unchanged either way). Nothing where ``ok`` is False."""
    if not isinstance(weight_decay, torch.Tensor) and weight_decay == 0:
        return
    factor = lr * weight_decay
    if ok is not None:
        factor = factor * ok.to(accum_dtype(param.dtype))
    agree = torch.where(update * param >= 0, param, 0.0)
    param.sub_(agree * factor)


def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    ok: list[torch.Tensor] | None,
    hyper: AdamWHyper,
) -> None:
    """Bias-corrected AdamW with decoupled weight decay, as torch.optim.AdamW, in place.

    The second moment is formed as beta2 v + (1 - beta2) g g (not a lerp, same operation order
    as torch.optim.AdamW) so that a gradient whose square overflows gives the same v as
    torch.optim.AdamW (possibly inf, then a zero update) instead of inf - inf = NaN. Squares
    are taken in the state dtype (a bf16 g*g would round every EMA term to 8 bits). ``ok``
    None: every gradient is known to be finite (no masking passes). Tensor hyperparameters are
    used on the device, never read on the host.
    """
    lr, beta1, beta2, eps = hyper.lr, hyper.beta1, hyper.beta2, hyper.eps
    # Cautious decay needs the update's sign: it is applied below, once the update is known.
    weight_decay = 0.0 if hyper.cautious else hyper.weight_decay
    if ok is None:  # every gradient is known to be finite: no masking passes
        g_cast = [g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
        okf: list = [1.0] * len(params)
        torch._foreach_add_(steps, 1.0)
        decay_(params, None, lr, weight_decay)
        _lerp_all_(exp_avgs, g_cast, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        _addcmul_scaled_(exp_avg_sqs, g_cast, g_cast, 1.0 - beta2)
    else:
        # A skipped parameter sees its own state as the "gradient", so its first moment stays.
        g_safe = [torch.where(f, g.to(m.dtype), m) for f, g, m in zip(ok, grads, exp_avgs)]
        okf = [f.to(accum_dtype(p.dtype)) for f, p in zip(ok, params)]
        torch._foreach_add_(steps, [f.to(torch.float32) for f in ok])
        decay_(params, ok, lr, weight_decay)
        _lerp_all_(exp_avgs, g_safe, 1.0 - beta1)
        # v <- beta2 v + (1 - beta2) g^2, or v where skipped (factor 1, g masked to 0). addcmul
        # forms ((1 - beta2) g) g, as torch.optim.AdamW does: g = 1e20 gives 1e38, not g^2 = inf.
        masked = [g * f for g, f in zip(g_safe, okf)]
        torch._foreach_mul_(exp_avg_sqs, [torch.where(f, beta2, 1.0) for f in ok])
        _addcmul_scaled_(exp_avg_sqs, g_safe, masked, 1.0 - beta2)
    # step is 0 only for a parameter skipped since its first step; clamp keeps 1 - beta^0
    # away from a division by zero (its update is multiplied by 0 anyway).
    # The bias corrections are taken in the parameter's precision (float64 for float64
    # parameters): the float32 step counter alone would cost float64 runs ~1e-7 relative.
    safe_steps = [s.clamp_min(1.0).to(accum_dtype(p.dtype)) for s, p in zip(steps, params)]
    bias_correction1 = [1.0 - torch.pow(beta1, s) for s in safe_steps]
    bias_correction2_sqrt = [(1.0 - torch.pow(beta2, s)).sqrt() for s in safe_steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    # A Tensor eps as a list: the single-Tensor overload of _foreach_add_ reads it on the host.
    torch._foreach_add_(denom, [eps] * len(denom) if isinstance(eps, torch.Tensor) else eps)
    if ok is not None and (isinstance(eps, torch.Tensor) or eps == 0):
        # A skipped parameter may hold exp_avg = exp_avg_sq = 0: keep 0 / 0 out of it.
        denom = [torch.where(f, d, 1.0) for f, d in zip(ok, denom)]
    update = torch._foreach_div(exp_avgs, denom)
    if hyper.cautious:  # the update direction is exp_avg / denom up to a positive factor
        for i, (p, u) in enumerate(zip(params, update)):
            flag = None if ok is None else ok[i]
            cautious_decay_(p, u, flag, lr, hyper.weight_decay)
    torch._foreach_mul_(update, [-lr * f / bc for f, bc in zip(okf, bias_correction1)])
    torch._foreach_add_(params, update)


def _lerp_all_(tensors: list[torch.Tensor], ends: list[torch.Tensor], weight: Scalar) -> None:
    """t <- t.lerp(end, weight) for every pair (a Tensor weight stays on the device)."""
    if isinstance(weight, torch.Tensor):
        torch._foreach_lerp_(tensors, ends, [weight] * len(tensors))
    else:
        torch._foreach_lerp_(tensors, ends, weight)


def _addcmul_scaled_(
    tensors: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor], value: Scalar
) -> None:
    """t += value * a * b, formed as (value a) b when ``value`` is a Tensor (the order
    torch.optim.AdamW uses, so large finite gradients do not overflow)."""
    if isinstance(value, torch.Tensor):
        torch._foreach_addcmul_(tensors, torch._foreach_mul(a, value), b)
    else:
        torch._foreach_addcmul_(tensors, a, b, value=value)

"""Newton-Schulz orthogonalization: coefficient schedules and the batched iterations.

Pure tensor math (no optimizer state, no ``torch.distributed``). Every function takes a (B, m, n)
stack of same-shaped matrices and returns the approximate polar factor of each; see
``docs/algorithm.md`` for the iteration and the coefficient schedules.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CPU_CHUNK_BYTES",
    "GRAM_MIN_ASPECT",
    "MUON_COEFFICIENTS",
    "NS_NORM_EPS",
    "Coefficients",
    "Orthogonalizer",
    "FAST_NS_LOWER",
    "FAST_NS_STEPS",
    "cpu_chunk_size",
    "default_orthogonalizer",
    "fast_ns_coefficients",
    "gram_restarts",
    "native_half_matmul",
    "newton_schulz",
    "newton_schulz_gram",
    "ns_compute_dtype",
    "polar_express_coefficients",
    "resolve_ns_coefficients",
    "scalar_ns_map",
]

Coefficients = tuple[float, float, float]

#: The optimizer's ``orthogonalizer`` option: ``fn(u, coefficients, dtype) -> O``, with ``u`` a
#: (B, m, n) stack (never to be modified), ``coefficients`` one (a, b, c) per step and ``dtype``
#: the dtype to iterate in and return (``ns_dtype`` after :func:`ns_compute_dtype`); the result
#: has the shape of ``u``.
Orthogonalizer = Callable[[torch.Tensor, Sequence[Coefficients], torch.dtype], torch.Tensor]
#: Keller Jordan's fixed quintic for Muon: a steep slope at 0 so that small singular values grow
#: fast, at the price of never converging exactly (outputs land in roughly [0.7, 1.2]).
MUON_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)

#: Added to the Frobenius norm before the first Newton-Schulz step (so a zero input stays zero).
NS_NORM_EPS = 1e-7


# --------------------------------------------------------------------------------------------
# Newton-Schulz coefficient schedules
# --------------------------------------------------------------------------------------------


def _quintic(coeffs: Sequence[float], x: float) -> float:
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def _quintic_critical_points(coeffs: Sequence[float], lo: float, hi: float) -> list[float]:
    """Positive x in (lo, hi) where p'(x) = a + 3 b x^2 + 5 c x^4 vanishes."""
    a, b, c = coeffs
    # p'(x) is a quadratic in y = x^2: 5c y^2 + 3b y + a = 0.
    if abs(c) < 1e-300:
        roots_y = [-a / (3 * b)] if b != 0 else []
    else:
        disc = 9 * b * b - 20 * a * c
        if disc < 0:
            return []
        sq = math.sqrt(disc)
        roots_y = [(-3 * b - sq) / (10 * c), (-3 * b + sq) / (10 * c)]
    xs = sorted(math.sqrt(y) for y in roots_y if y > 0)
    return [x for x in xs if lo < x < hi]


def _minimax_quintic(lo: float, hi: float, iters: int = 100) -> Coefficients:
    """Odd quintic p(x) = a x + b x^3 + c x^5 minimizing max |1 - p(x)| over [lo, hi].

    Remez exchange with four alternation points: lo (p = 1 - E), the interior maximum (1 + E),
    the interior minimum (1 - E) and hi (1 + E). Solved in float64 on the host.
    """
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    # Start from Chebyshev-like points of the interval.
    span = hi - lo
    points = [lo, lo + span * 0.15, lo + span * 0.6, hi]
    coeffs: Coefficients = MUON_COEFFICIENTS
    for _ in range(iters):
        rows = [[x, x**3, x**5, (1.0 if i % 2 == 0 else -1.0)] for i, x in enumerate(points)]
        # p(x_i) + s_i E = 1 with s = (+, -, +, -): p(lo) = 1 - E, p(x1) = 1 + E, ...
        sol = torch.linalg.solve(
            torch.tensor(rows, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        ).tolist()
        coeffs = (sol[0], sol[1], sol[2])
        crit = _quintic_critical_points(coeffs, lo, hi)
        if len(crit) != 2:
            break
        new_points = [lo, crit[0], crit[1], hi]
        if max(abs(p - q) for p, q in zip(points, new_points, strict=True)) < 1e-15 * hi:
            points = new_points
            break
        points = new_points
    return coeffs


#: Newton-Schulz's degree-5 step: fixes 1 with zero first and second derivative.
_CONVERGED_QUINTIC: Coefficients = (15 / 8, -10 / 8, 3 / 8)


@functools.lru_cache(maxsize=64)
def polar_express_coefficients(
    steps: int, safety: float = 0.01, lower: float = 1e-3, cushion: float = 0.02407327424182761
) -> tuple[Coefficients, ...]:
    """Compute a Polar Express schedule (Amsel, Persson, Musco, Gower, arXiv 2505.16932).

    Greedy composition of minimax quintics: step t maps the current singular-value interval
    [l_t, u_t] as close to 1 as a quintic can, and the image of that interval becomes the next
    one. Starting interval [``lower``, 1] (singular values of U / ||U||_F lie in (0, 1]).

    ``cushion`` keeps each polynomial's lower end at least ``cushion * u_t`` (bounded slope at 0,
    which keeps bfloat16 round-off from being amplified); the polynomial is then rescaled so the
    image of the true interval is centred on 1. ``safety`` shrinks the input of every step except
    the last by (1 + safety), so singular values pushed slightly above the interval by round-off
    are not blown up by the x^5 term.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0 <= safety < 1:
        raise ValueError(f"safety must be in [0, 1), got {safety!r}")
    if not 0 < lower < 1:
        raise ValueError(f"lower must be in (0, 1), got {lower!r}")
    lo, hi = float(lower), 1.0
    schedule: list[Coefficients] = []
    for _ in range(steps):
        if lo > hi * (1.0 - 1e-9):
            # Converged to float64 resolution: keep the classical quintic with p(1) = 1 and
            # p'(1) = p''(1) = 0 (the minimax problem on a point has no unique answer).
            schedule.append(_CONVERGED_QUINTIC)
            continue
        a, b, c = _minimax_quintic(max(lo, cushion * hi), hi)
        # Image of the true interval [lo, hi] under p: extremes at the ends and critical points.
        candidates = [lo, hi, *_quintic_critical_points((a, b, c), lo, hi)]
        values = [_quintic((a, b, c), x) for x in candidates]
        img_lo, img_hi = min(values), max(values)
        recenter = 2.0 / (img_lo + img_hi)
        a, b, c = a * recenter, b * recenter, c * recenter
        schedule.append((a, b, c))
        lo, hi = img_lo * recenter, img_hi * recenter
    if safety > 0:
        shrink = 1.0 + safety
        schedule = [
            (a / shrink, b / shrink**3, c / shrink**5) for (a, b, c) in schedule[:-1]
        ] + schedule[-1:]
    return tuple(schedule)


#: Steps of the fast mode (:func:`fast_ns_coefficients`): one fewer than the default five.
FAST_NS_STEPS = 4
#: Normalized singular value s_i / ||U||_F from which the fast schedule is designed to land
#: within ~2% of 1 (directions carrying at least 1% of the Frobenius norm).
FAST_NS_LOWER = 1e-2


def fast_ns_coefficients(steps: int = FAST_NS_STEPS) -> tuple[Coefficients, ...]:
    """The fast mode: a Polar Express schedule of ``steps`` (4) steps designed for [1e-2, 1].

    Use as ``NorMuon(params, ns_steps=4, ns_coefficients=fast_ns_coefficients())``: 4/5 of the
    default's Newton-Schulz work. Measured against the float64 SVD polar factor
    (benchmarks/ns_quality.py, docs/performance.md): every singular direction with
    s_i / ||U||_F >= 1e-2 lands within ~0.02 of 1 (the default Muon quintic: within ~0.32),
    while directions below that are lifted less than by the default (s_i / ||U||_F = 1e-3 ends
    near 0.15 instead of 0.47), so the relative distance to the polar factor is 0.03-0.05
    larger.
    """
    return polar_express_coefficients(steps, lower=FAST_NS_LOWER)


def resolve_ns_coefficients(spec: object, steps: int) -> tuple[Coefficients, ...]:
    """Turn the ``ns_coefficients`` option into one (a, b, c) per Newton-Schulz step.

    Accepted: ``"muon"`` (the fixed quintic every step), ``"polar_express"`` (a schedule computed
    for ``steps``), one (a, b, c) triple (used every step) or a list of ``steps`` triples.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ns_steps must be a positive int, got {steps!r}")
    if spec == "muon":
        return (MUON_COEFFICIENTS,) * steps
    if spec == "polar_express":
        return polar_express_coefficients(steps)
    if isinstance(spec, str):
        raise ValueError(
            f"ns_coefficients must be 'muon', 'polar_express', an (a, b, c) tuple or a list of "
            f"them, got {spec!r}"
        )

    def as_triple(item: object) -> Coefficients:
        if (
            isinstance(item, (tuple, list))
            and len(item) == 3
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in item)
        ):
            return (float(item[0]), float(item[1]), float(item[2]))
        raise ValueError(f"ns_coefficients entry must be three finite numbers, got {item!r}")

    if isinstance(spec, (tuple, list)) and len(spec) == 3 and all(
        isinstance(v, (int, float)) for v in spec
    ):
        return (as_triple(spec),) * steps
    if isinstance(spec, (tuple, list)):
        triples = tuple(as_triple(item) for item in spec)
        if len(triples) != steps:
            raise ValueError(
                f"ns_coefficients lists {len(triples)} steps but ns_steps={steps}; give one "
                f"(a, b, c) per step"
            )
        return triples
    raise ValueError(
        f"ns_coefficients must be 'muon', 'polar_express', an (a, b, c) tuple or a list of them, "
        f"got {spec!r}"
    )


def scalar_ns_map(x: torch.Tensor, coefficients: Sequence[Coefficients]) -> torch.Tensor:
    """What Newton-Schulz does to one singular value: the composed odd polynomials at ``x``."""
    for a, b, c in coefficients:
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return x


# --------------------------------------------------------------------------------------------
# Newton-Schulz orthogonalization
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def native_half_matmul(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` matrix products on ``device_type`` run on fast hardware paths.

    On a CPU, PyTorch multiplies bfloat16/float16 matrices quickly only through oneDNN, which
    needs AVX512-BF16/AMX (or AVX512-FP16) instructions; otherwise it falls back to a scalar
    loop that is 50-200x slower than its own float32 GEMM (measured on an AVX2-only AMD EPYC:
    ~1 GFLOP/s bf16 against ~180 GFLOP/s fp32). Accelerators are assumed to be fast.
    """
    if dtype not in (torch.bfloat16, torch.float16) or device_type != "cpu":
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - very old or stripped builds
        return True


def ns_compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """dtype that :func:`newton_schulz` actually multiplies in when asked for ``dtype``.

    ``dtype`` itself, except a half type on a CPU without fast half matrix products (see
    :func:`native_half_matmul`), where float32 is both faster and more accurate.
    """
    device_type = torch.device(device).type
    return dtype if native_half_matmul(device_type, dtype) else torch.float32


#: Aspect ratio (long / short side) from which ``method="auto"`` iterates on the Gram matrix.
#: Flops with s steps and r restarts: 2(r+1)k^2N + (4s-3(r+1))k^3 against s(2k^2N + k^3) for
#: the plain loop, break-even at N = 1.5k whatever r; measured on a CPU (docs/performance.md):
#: 0.55x (float32) and 0.75x (bfloat16, two restarts) of the plain loop's time at N = 4k,
#: 0.86x and 0.95x at N = 2k, 1.2-1.3x (a loss) for square matrices.
GRAM_MIN_ASPECT = 2

_METHODS = ("standard", "gram", "auto")


def newton_schulz(
    u: torch.Tensor,
    coefficients: Sequence[Coefficients],
    dtype: torch.dtype = torch.bfloat16,
    *,
    compute_dtype: torch.dtype | None = None,
    method: str = "standard",
    restarts: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Approximate polar factor of every matrix in ``u``.

    Args:
        u: (B, m, n) stack of matrices (any floating dtype). Never modified.
        coefficients: one (a, b, c) per step; step t computes X <- a X + (b A + c A^2) X with
            A = X X^T.
        dtype: dtype of the result, and of the iteration wherever that dtype is fast (bfloat16
            is ~2x faster than float32 on GPUs and what the authors use).
        compute_dtype: dtype of the iteration. None (default) picks :func:`ns_compute_dtype`:
            ``dtype``, except a bfloat16/float16 request on a CPU without native half matrix
            products, which iterates in float32 and rounds only the result to ``dtype`` (there
            the half-precision GEMM is a scalar fallback 50-200x slower than float32).
        method: ``"standard"`` (the loop above), ``"gram"`` (:func:`newton_schulz_gram`: same
            result, fewer flops for rectangular matrices, restarted in half precision) or
            ``"auto"`` (gram when the long side is at least :data:`GRAM_MIN_ASPECT` times the
            short side, standard otherwise; what the optimizers use).
        restarts: passed to :func:`newton_schulz_gram` when it runs (None: its default for the
            iteration dtype); must be None with ``method="standard"``.
        chunk_size: matrices iterated together. None (default): on a CPU, as many as fit in
            :data:`CPU_CHUNK_BYTES` (:func:`cpu_chunk_size`; cache-resident operands are
            faster), elsewhere the whole batch (one kernel per operation). Each matrix is
            iterated on its own either way: the result changes at most by rounding.

    Returns:
        (B, m, n) tensor in ``dtype``: X_0 = U / (||U||_F + 1e-7) after the steps, i.e. singular
        values mapped by :func:`scalar_ns_map` and singular vectors kept.
    """
    if u.ndim != 3:
        raise ValueError(f"newton_schulz expects a (B, m, n) stack, got shape {tuple(u.shape)}")
    work = ns_compute_dtype(dtype, u.device) if compute_dtype is None else compute_dtype
    m, n = u.shape[-2], u.shape[-1]
    if method not in _METHODS:
        raise ValueError(f"method must be 'standard', 'gram' or 'auto', got {method!r}")
    if method == "standard" and restarts is not None:
        raise ValueError(f"restarts={restarts!r} needs method='gram' or 'auto'")
    use_gram = method == "gram" or (
        method == "auto" and max(m, n) >= GRAM_MIN_ASPECT * min(m, n)
    )
    if chunk_size is None:
        chunk_size = cpu_chunk_size(m, n, work) if u.device.type == "cpu" else u.shape[0]
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size >= u.shape[0]:
        return _ns_batch(u, coefficients, dtype, work, use_gram, restarts)
    # Chunks: each one's operands stay in the core's cache through all the steps.
    out = torch.empty(u.shape, dtype=dtype, device=u.device)
    for start in range(0, u.shape[0], chunk_size):
        part = u[start : start + chunk_size]  # (c, m, n) view
        out[start : start + chunk_size] = _ns_batch(
            part, coefficients, dtype, work, use_gram, restarts
        )
    return out


#: Bytes of one chunk's iterate from which :func:`newton_schulz` splits a batch on the CPU.
#: The standard loop touches X, A, P and the new X every step (~4x these bytes); kept within a
#: core's L2 cache they are not re-read from memory. Measured on an AMD EPYC with native bf16
#: GEMMs, 1 thread (docs/performance.md): 24 x (384, 384) bfloat16 in chunks of 2-3 took
#: 135-147 ms against 184 ms as one batch; float32 and the (1536, 384) buckets gain ~5%.
CPU_CHUNK_BYTES = 2**20


def cpu_chunk_size(m: int, n: int, work_dtype: torch.dtype) -> int:
    """Matrices per chunk of :func:`newton_schulz` on a CPU: as many (m, n) iterates in
    ``work_dtype`` as fit in :data:`CPU_CHUNK_BYTES`, at least one."""
    itemsize = torch.empty((), dtype=work_dtype).element_size()
    return max(1, CPU_CHUNK_BYTES // (m * n * itemsize))


def _ns_batch(
    u: torch.Tensor,
    coefficients: Sequence[Coefficients],
    dtype: torch.dtype,
    work: torch.dtype,
    use_gram: bool,
    restarts: Sequence[int] | None,
) -> torch.Tensor:
    """One batched iteration (standard loop or Gram) of a (c, m, n) stack, result in dtype."""
    if use_gram:
        return newton_schulz_gram(u, coefficients, dtype, compute_dtype=work, restarts=restarts)
    m, n = u.shape[-2], u.shape[-1]
    # Work on the wide orientation so that A = X X^T is the small (min, min) Gram matrix.
    x = u.mT if m > n else u
    x = _ns_normalize(x, work)
    for a, b, c in coefficients:
        gram = torch.bmm(x, x.mT)  # (B, k, k), k = min(m, n)
        poly = _gram_polynomial(gram, b, c)  # b A + c A A
        x = torch.baddbmm(x, poly, x, beta=a, alpha=1.0)  # a X + (b A + c A A) X
    x = x.to(dtype)
    return x.mT if m > n else x


def newton_schulz_gram(
    u: torch.Tensor,
    coefficients: Sequence[Coefficients],
    dtype: torch.dtype = torch.bfloat16,
    *,
    compute_dtype: torch.dtype | None = None,
    restarts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Same result as :func:`newton_schulz` (in exact arithmetic), iterating on the Gram matrix.

    Every step multiplies X by a polynomial P_t of the current Gram matrix A_t = X_t X_t^T, so
    X_t = Q_t X_0 with Q_t = P_{t-1} ... P_0, and all these k x k matrices (k = min(m, n)) are
    polynomials of A_0, hence commute: A_{t+1} = P_t A_t P_t. The loop therefore runs on k x k
    matrices only, and the long side N = max(m, n) is touched twice (A_0 = X_0 X_0^T and
    Q X_0) instead of twice per step. Multiply-adds with s steps and no restart:
    2 k^2 N + (4 s - 3) k^3, against s (2 k^2 N + k^3) for the plain loop: 0.56x at N = 4k and
    s = 5, break-even at N = 1.5 k, and 1.27x (a loss) for square matrices.

    Restarts (Zhang, Amsel, Chen, Dao 2026, "Gram Newton-Schulz"): before each step index in
    ``restarts``, X is replaced by Q X, the Gram matrix is recomputed from it and Q starts again
    from the identity. Without them, rounding errors of A_t are never corrected: in half
    precision, eigenvalues of A_0 below the rounding level (directions with small singular
    values) come out slightly negative or wrong, every later step multiplies them by ~a_t^2, and
    the result drifts away from the polar factor (bfloat16: O(1) errors on gradient-like inputs,
    see docs/performance.md). Each restart costs 2 k^2 N multiply-adds and saves 3 k^3: with r
    restarts, 2 (r + 1) k^2 N + (4 s - 3 (r + 1)) k^3 in all (s = 5, N = 4k: 0.67x of the plain
    loop's flops with one restart, 0.78x with two).

    Args:
        u, coefficients, dtype, compute_dtype: as for :func:`newton_schulz`.
        restarts: step indices t with 0 < t < len(coefficients). None (default) picks
            :func:`gram_restarts` for the iteration dtype (5 steps: before steps 2 and 3 in
            bfloat16, before step 2 in float16, none in float32/float64).

    Returns:
        (B, m, n) tensor in ``dtype``, as :func:`newton_schulz`.
    """
    if u.ndim != 3:
        raise ValueError(
            f"newton_schulz_gram expects a (B, m, n) stack, got shape {tuple(u.shape)}"
        )
    work = ns_compute_dtype(dtype, u.device) if compute_dtype is None else compute_dtype
    steps = len(coefficients)
    restart_at = _check_restarts(
        gram_restarts(steps, work) if restarts is None else restarts, steps
    )
    m, n = u.shape[-2], u.shape[-1]
    x = _ns_normalize(u.mT if m > n else u, work)  # (B, k, N), k <= N
    gram = torch.bmm(x, x.mT)  # A_0, (B, k, k)
    q: torch.Tensor | None = None  # Q_t = P_{t-1} ... P_r since the last (re)start r
    for t, (a, b, c) in enumerate(coefficients):
        if t in restart_at:
            # X_t = Q_t X_r exactly; the Gram matrix recomputed from it drops the drift of A.
            if q is not None:
                x = torch.bmm(q, x)
                q = None
            gram = torch.bmm(x, x.mT)
        poly = _gram_polynomial(gram, b, c)  # b A + c A A
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a I + b A + c A A
        q = poly if q is None else torch.bmm(poly, q)
        if t + 1 < steps and t + 1 not in restart_at:
            gram = torch.bmm(torch.bmm(poly, gram), poly)  # A <- P A P
            gram = (gram + gram.mT).mul_(0.5)
    x = x if q is None else torch.bmm(q, x)
    x = x.to(dtype)
    return x.mT if m > n else x


def gram_restarts(steps: int, work_dtype: torch.dtype) -> tuple[int, ...]:
    """Default restart steps of :func:`newton_schulz_gram` for ``steps`` steps in ``work_dtype``.

    Chosen from measurements against the float64 SVD polar factor (benchmarks/ns_quality.py,
    docs/performance.md), with the Muon and Polar Express schedules:

    - float32/float64: none (A_t stays accurate to ~1e-5 relative);
    - float16 (11-bit significand): before step 2, then every 3 steps (5 steps: ``(2,)``, the
      Gram Newton-Schulz paper's choice);
    - bfloat16 (8-bit significand): before steps 2 and 3, then every 2 steps (5 steps:
      ``(2, 3)``); a single restart leaves up to 2.5x the error of the standard bfloat16
      iteration with Polar Express coefficients, two restarts match it.
    """
    if work_dtype == torch.float16:
        return tuple(range(2, steps, 3))
    if work_dtype == torch.bfloat16:
        return tuple(t for t in range(2, steps) if t == 2 or t % 2 == 1)
    return ()


def _check_restarts(restarts: object, steps: int) -> frozenset[int]:
    if isinstance(restarts, (str, bytes)) or not isinstance(restarts, Sequence):
        raise TypeError(f"restarts must be a sequence of step indices, got {restarts!r}")
    for t in restarts:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 < t < steps:
            raise ValueError(
                f"restarts entries must be ints in [1, {steps - 1}] for {steps} steps, got "
                f"{t!r} in {restarts!r}"
            )
    return frozenset(restarts)


def _gram_polynomial(gram: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b A + c A A for a (B, k, k) stack, as a new tensor.

    A cubic step (c = 0) is computed without a GEMM: oneDNN's bfloat16 ``baddbmm`` ignores
    ``beta`` when ``alpha`` is 0 and returns A unscaled (seen with torch 2.13 on CPUs with
    AVX512-BF16), so a degenerate BLAS parameter is never passed to a half-precision GEMM.
    """
    if c == 0:
        return gram * b
    return torch.baddbmm(gram, gram, gram, beta=b, alpha=c)


def _ns_normalize(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """X / (||X||_F + 1e-7) in ``work``, contiguous (a transposed operand slows baddbmm ~20%)."""
    # The norm is taken in at least float32 so a bf16 input is not scaled by a rounded norm.
    norm_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
    return (x / (norm + NS_NORM_EPS)).to(work, memory_format=torch.contiguous_format)


def default_orthogonalizer(
    u: torch.Tensor, coefficients: Sequence[Coefficients], dtype: torch.dtype
) -> torch.Tensor:
    """The optimizers' default ``orthogonalizer``: :func:`newton_schulz` with ``method="auto"``.

    Rectangular matrices (aspect >= :data:`GRAM_MIN_ASPECT`) go through the Gram iteration, in
    half precision with the restarts of :func:`gram_restarts`, whose error against the float64
    polar factor matches the standard iteration's at the same dtype (docs/performance.md);
    square-ish matrices through the standard loop.

    ``dtype`` is the dtype to iterate in: the optimizers resolve it once per device with
    :func:`ns_compute_dtype` (a host-side capability query that ``torch.compile(fullgraph=True)``
    cannot trace) and pass the result, so it is not queried again here.
    """
    return newton_schulz(u, coefficients, dtype, compute_dtype=dtype, method="auto")

"""Newton-Schulz orthogonalization: coefficient schedules and the batched iterations.

Pure tensor math (no optimizer state, no ``torch.distributed``). Every function takes a (B, m, n)
stack of same-shaped matrices and returns the approximate polar factor of each; see
``docs/algorithm.md`` for the iteration and the coefficient schedules.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "CPU_CHUNK_BYTES",
    "CPU_HALF_MATMUL_ENV",
    "GRAM_MIN_ASPECT",
    "HALF_MATMUL_MIN_SPEEDUP",
    "KERNELS",
    "MUON_COEFFICIENTS",
    "NS_NORM_EPS",
    "Coefficients",
    "NSScratch",
    "Orthogonalizer",
    "FAST_NS_LOWER",
    "FAST_NS_STEPS",
    "cpu_chunk_size",
    "default_chunk_size",
    "default_orthogonalizer",
    "describe_cpu_half_choice",
    "fast_ns_coefficients",
    "gram_restarts",
    "half_matmul_speedup",
    "native_half_matmul",
    "newton_schulz",
    "newton_schulz_",
    "newton_schulz_gram",
    "ns_compute_dtype",
    "ns_multiply_adds",
    "polar_express_coefficients",
    "prefers_gram",
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


#: How much faster than float32 a CPU's half-precision matrix products must run before
#: Newton-Schulz iterates in half precision there (float32 is the more accurate of the two, so
#: half must win clearly). bf16 / float32 rates at 2048^2, 2 threads (benchmarks/results): an
#: Intel Xeon with AMX 6.3x, an AMD EPYC with AVX512-BF16 4.2x, an Intel Xeon with AVX512 but
#: no BF16 instructions (oneDNN emulates bf16 in float32 units) 0.25x, and 0.23-0.26x there
#: by :func:`half_matmul_speedup` (512^2, one thread) with both cores busy: far from this
#: margin on every kind.
HALF_MATMUL_MIN_SPEEDUP = 1.5

#: Environment variable that fixes the CPU decision instead of measuring it: ``half`` (iterate
#: in the half type wherever oneDNN supports it), ``float32`` (never), ``auto`` or unset
#: (measure once per process, :func:`half_matmul_speedup`).
CPU_HALF_MATMUL_ENV = "NORMUON_CPU_HALF_MATMUL"

_HALF_MATMUL_CHOICES = ("auto", "half", "float32")

#: The measured answers of :func:`native_half_matmul` on this CPU, per half dtype, for traces.
_CPU_HALF_DECIDED: dict[torch.dtype, bool] = {}


def _onednn_half_support(dtype: torch.dtype) -> bool:
    """Whether oneDNN multiplies ``dtype`` matrices on this CPU at all (natively or emulated in
    float32 units); without it torch falls back to a scalar loop."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - very old or stripped builds
        return True


def _fixed_cpu_half_choice() -> str:
    """:data:`CPU_HALF_MATMUL_ENV`, normalized (``auto`` when unset or empty); a value outside
    ``auto``, ``half``, ``float32`` raises ``ValueError`` naming it."""
    fixed = os.environ.get(CPU_HALF_MATMUL_ENV, "auto").strip().lower() or "auto"
    if fixed not in _HALF_MATMUL_CHOICES:
        raise ValueError(
            f"{CPU_HALF_MATMUL_ENV} must be one of {', '.join(_HALF_MATMUL_CHOICES)}, got "
            f"{os.environ[CPU_HALF_MATMUL_ENV]!r}"
        )
    return fixed


@functools.lru_cache(maxsize=4)
def half_matmul_speedup(dtype: torch.dtype, size: int = 512, reps: int = 5) -> float:
    """float32 time / ``dtype`` time of one (size, size) matrix product on this CPU core.

    The minimum of ``reps`` timed rounds after one warm-up, the two dtypes alternating, on one
    thread: a product that needs one core is far likelier than one that needs all of them to
    run uninterrupted somewhere among the rounds on a loaded machine, and the ratio per core is
    the ratio of the kernels. Measured once per process (~20 ms; ~80 ms on a CPU whose half
    products are emulated)."""
    # On the CPU in float32 whatever the default device and dtype (meta would time nothing).
    gen = torch.Generator(device="cpu").manual_seed(0)
    a32 = torch.randn(size, size, generator=gen, device="cpu", dtype=torch.float32)
    b32 = torch.randn(size, size, generator=gen, device="cpu", dtype=torch.float32)
    operands = {torch.float32: (a32, b32), dtype: (a32.to(dtype), b32.to(dtype))}
    best = dict.fromkeys(operands, math.inf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(reps + 1):
            for key, (a, b) in operands.items():
                start = time.perf_counter()
                torch.mm(a, b)
                if round_:  # round 0 warms up (oneDNN builds its kernels on first use)
                    best[key] = min(best[key], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[dtype]


def native_half_matmul(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``dtype`` matrix products on ``device_type`` are fast enough for Newton-Schulz to
    iterate in ``dtype`` (accelerators: assumed; CPUs: measured).

    On a CPU, PyTorch multiplies bfloat16/float16 matrices through oneDNN, or else in a scalar
    loop 50-200x slower than its float32 GEMM (an AVX2-only AMD EPYC: ~1 GFLOP/s bf16 against
    ~180 GFLOP/s fp32). oneDNN's support does not mean speed: with AVX512-BF16/AMX instructions
    bf16 runs 4-6x float32's rate, but on an AVX512 CPU without them (Intel Cascade Lake, Ice
    Lake) oneDNN emulates bf16 in float32 units at ~0.25x float32's rate (52 against 211
    GFLOP/s, bf16 at 1024^2 and float32 at 2048^2, 2 threads). So where oneDNN supports
    ``dtype`` the answer is measured once per process (:func:`half_matmul_speedup` >=
    :data:`HALF_MATMUL_MIN_SPEEDUP`), unless :data:`CPU_HALF_MATMUL_ENV` fixes it. Never
    measured inside a ``torch.compile`` trace (the optimizers ask before tracing): there an
    earlier measurement's answer stands, or float32.
    """
    if dtype not in (torch.bfloat16, torch.float16) or device_type != "cpu":
        return True
    fixed = _fixed_cpu_half_choice()
    if fixed == "float32" or not _onednn_half_support(dtype):
        return False
    if fixed == "half":
        return True
    if torch.compiler.is_compiling():  # nothing is timed in a trace: an earlier answer, or float32
        return _CPU_HALF_DECIDED.get(dtype, False)
    fast = _CPU_HALF_DECIDED[dtype] = half_matmul_speedup(dtype) >= HALF_MATMUL_MIN_SPEEDUP
    return fast


def describe_cpu_half_choice(dtype: torch.dtype = torch.bfloat16) -> str:
    """What Newton-Schulz asked for ``dtype`` iterates in on this CPU, and why (for reports:
    ``normuon check``, the benchmarks), e.g. ``"float32: bfloat16 products measured at 0.25x
    float32's rate (512^2); bfloat16 needs >= 1.5x"``."""
    name = str(dtype).removeprefix("torch.")
    chosen = str(ns_compute_dtype(dtype, "cpu")).removeprefix("torch.")
    if not _onednn_half_support(dtype):
        return f"{chosen}: no oneDNN {name} kernels on this CPU (a scalar fallback)"
    fixed = _fixed_cpu_half_choice()
    if fixed != "auto":
        return f"{chosen}: fixed by {CPU_HALF_MATMUL_ENV}={fixed}"
    return (f"{chosen}: {name} products measured at {half_matmul_speedup(dtype):.2f}x float32's "
            f"rate (512^2); {name} needs >= {HALF_MATMUL_MIN_SPEEDUP}x")


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

#: The iterations :func:`newton_schulz_` can run over a (B, m, n) stack, all the same map:
#: ``"standard"`` (the plain loop, batched products over a chunk of matrices), ``"loop"`` (the
#: plain loop as 2-D products, one matrix at a time: other GEMM kernels than the batched ones,
#: which some libraries and shapes favour) and ``"gram"`` (:func:`newton_schulz_gram`'s
#: iteration, batched).
KERNELS = ("standard", "loop", "gram")

_METHODS = ("standard", "loop", "gram", "auto")


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
        method: ``"standard"`` (the loop above), ``"loop"`` (the same loop as 2-D products,
            one matrix at a time), ``"gram"`` (:func:`newton_schulz_gram`: same result, fewer
            flops for rectangular matrices, restarted in half precision) or ``"auto"`` (gram
            when the long side is at least :data:`GRAM_MIN_ASPECT` times the short side,
            standard otherwise: the optimizers' ``ns_kernel="shape"``).
        restarts: passed to :func:`newton_schulz_gram` when it runs (None: its default for the
            iteration dtype); must be None with ``method="standard"`` or ``"loop"``.
        chunk_size: matrices iterated together. None (default): on a CPU, as many as fit in
            :data:`CPU_CHUNK_BYTES` (:func:`cpu_chunk_size`; cache-resident operands are
            faster), elsewhere the whole batch (one kernel per operation). Each matrix is
            iterated on its own either way: the result changes at most by rounding.

    Returns:
        (B, m, n) tensor in ``dtype``: X_0 = U / (||U||_F + 1e-7) after the steps, i.e. singular
        values mapped by :func:`scalar_ns_map` and singular vectors kept.

    :func:`newton_schulz_` is the same iteration writing into given buffers (no allocation).

    Examples:
        >>> import torch
        >>> from normuon.newton_schulz import newton_schulz, resolve_ns_coefficients
        >>> u = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
        >>> o = newton_schulz(u, resolve_ns_coefficients("polar_express", 5), torch.float32)
        >>> o.shape
        torch.Size([2, 16, 64])
        >>> s = torch.linalg.svdvals(o)  # singular values pushed towards 1
        >>> bool(((s - 1).abs() < 0.35).all())
        True
    """
    if u.ndim != 3:
        raise ValueError(f"newton_schulz expects a (B, m, n) stack, got shape {tuple(u.shape)}")
    work = ns_compute_dtype(dtype, u.device) if compute_dtype is None else compute_dtype
    kernel = _kernel_of(u.shape[-2], u.shape[-1], method, restarts)
    if chunk_size is None:
        chunk_size = default_chunk_size(u.shape, work, u.device)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    out = torch.empty(u.shape, dtype=dtype, device=u.device)
    scratch = NSScratch.allocate(min(chunk_size, u.shape[0]), u.shape[-2], u.shape[-1], work,
                                 u.device)  # fmt: skip
    newton_schulz_(u, coefficients, scratch, kernel=kernel, restarts=restarts, out=out)
    return out


def prefers_gram(m: int, n: int) -> bool:
    """Whether ``method="auto"`` runs the Gram iteration for (m, n) matrices; also where the
    optimizers' measured kernel choice offers it (below this aspect it does about as many
    flops as the standard loop or more, so it cannot gain, and its half-precision error bound
    is looser than the standard loop's)."""
    return max(m, n) >= GRAM_MIN_ASPECT * min(m, n)


def _kernel_of(m: int, n: int, method: str, restarts: Sequence[int] | None) -> str:
    """The kernel ``method`` runs for (m, n) matrices (validates both)."""
    if method not in _METHODS:
        raise ValueError(
            f"method must be 'standard', 'loop', 'gram' or 'auto', got {method!r}"
        )
    if method in ("standard", "loop") and restarts is not None:
        raise ValueError(f"restarts={restarts!r} needs method='gram' or 'auto'")
    if method == "auto":
        return "gram" if prefers_gram(m, n) else "standard"
    return method


def ns_multiply_adds(
    m: int, n: int, steps: int, kernel: str = "standard", restarts: Sequence[int] = ()
) -> int:
    """Multiply-adds of the matrix products of ``steps`` steps of ``kernel`` on one (m, n)
    matrix (twice this is its flops): the floor a bucket is measured against.

    With k = min(m, n), N = max(m, n): ``"standard"`` and ``"loop"``: s (2 k^2 N + k^3);
    ``"gram"`` with r = len(restarts) restarts: 2 (r + 1) k^2 N + (4 s - 3 (r + 1)) k^3 (see
    :func:`newton_schulz_gram`; ``restarts`` as it runs them, e.g. :func:`gram_restarts`).
    Cubic steps (c = 0) are counted as quintic ones.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    k, big = min(m, n), max(m, n)
    if kernel != "gram":
        return steps * (2 * k * k * big + k**3)
    segments = len(_check_restarts(restarts, steps)) + 1
    return 2 * segments * k * k * big + (4 * steps - 3 * segments) * k**3


#: Bytes of one chunk's iterate from which :func:`newton_schulz` splits a batch on the CPU.
#: Fewer, larger batched GEMM calls run closer to the matmul rate than cache-sized ones: on a
#: 2-core Intel Xeon with AMX, 2 threads (docs/performance.md, "Batch and chunk sizes"), the
#: gpt-small step took 82.5 ms with 16 MiB chunks against 93.2 ms with 4 MiB (the batch
#: budget raised alike), gpt2-124m 1110 against 1422 ms; a bf16 (3, 384, 1536) X X^T runs at
#: 1520 GFLOP/s, (6, 384, 1536) at 2050. Earlier, on a 2-core AMD EPYC, 1 MiB chunks were 9%
#: slower than 4 MiB at 2 threads. ``ns_kernel="auto"`` also times a chunk of a quarter of
#: this, for CPUs whose caches favour it.
CPU_CHUNK_BYTES = 16 * 2**20


def cpu_chunk_size(m: int, n: int, work_dtype: torch.dtype) -> int:
    """Matrices per chunk of :func:`newton_schulz` on a CPU: as many (m, n) iterates in
    ``work_dtype`` as fit in :data:`CPU_CHUNK_BYTES`, at least one."""
    return max(1, CPU_CHUNK_BYTES // (m * n * work_dtype.itemsize))


def default_chunk_size(
    shape: Sequence[int], work_dtype: torch.dtype, device: torch.device | str
) -> int:
    """Matrices of a (B, m, n) batch iterated together: :func:`cpu_chunk_size` on a CPU (cache
    reuse), the whole batch elsewhere (one kernel per operation)."""
    batch, m, n = shape
    if torch.device(device).type == "cpu":
        return max(1, min(batch, cpu_chunk_size(m, n, work_dtype)))
    return max(1, batch)


@dataclass(frozen=True)
class NSScratch:
    """Buffers of one chunk of the Newton-Schulz iteration, reused across chunks and steps.

    For a chunk of ``c`` (m, n) matrices, k = min(m, n) and N = max(m, n): the iterate ``x``
    and ``x_next`` (c, k, N; a chunk of tall matrices views them as (c, N, k)), and four
    (c, k, k) Gram-side buffers (the Gram matrix, the polynomial P, the product Q of the Gram
    iteration and a spare), all in the iteration dtype.
    Carved from one flat buffer (:meth:`carve`) so that an owner can keep a single arena.
    """

    x: torch.Tensor  # (c, k, N)
    x_next: torch.Tensor  # (c, k, N)
    gram: torch.Tensor  # (c, k, k)
    poly: torch.Tensor  # (c, k, k)
    q: torch.Tensor  # (c, k, k)
    spare: torch.Tensor  # (c, k, k)

    @staticmethod
    def numel(chunk: int, m: int, n: int) -> int:
        """Elements of the flat buffer :meth:`carve` needs."""
        k, big = min(m, n), max(m, n)
        return chunk * (2 * k * big + 4 * k * k)

    @classmethod
    def carve(cls, flat: torch.Tensor, chunk: int, m: int, n: int) -> NSScratch:
        """Views of a 1-D buffer of at least :meth:`numel` elements (its dtype: the iteration's)."""
        k, big = min(m, n), max(m, n)
        sizes = [chunk * k * big] * 2 + [chunk * k * k] * 4
        views, pos = [], 0
        for size in sizes:
            views.append(flat[pos : pos + size])
            pos += size
        return cls(
            views[0].view(chunk, k, big), views[1].view(chunk, k, big),
            *(v.view(chunk, k, k) for v in views[2:]),
        )  # fmt: skip

    @classmethod
    def allocate(
        cls, chunk: int, m: int, n: int, dtype: torch.dtype, device: torch.device | str
    ) -> NSScratch:
        flat = torch.empty(cls.numel(chunk, m, n), dtype=dtype, device=device)
        return cls.carve(flat, chunk, m, n)

    @property
    def chunk(self) -> int:
        return self.x.shape[0]


def newton_schulz_(
    u: torch.Tensor,
    coefficients: Sequence[Coefficients],
    scratch: NSScratch,
    *,
    use_gram: bool = False,
    restarts: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    kernel: str | None = None,
) -> None:
    """:func:`newton_schulz` with every intermediate in ``scratch``: no allocation beyond a
    (c, 1, 1) norm per chunk.

    ``u`` (B, m, n) is read chunk by chunk (``scratch.chunk`` matrices each); the polar factors
    are written into ``out`` (B, m, n, any floating dtype), or over ``u`` itself when ``out`` is
    None (a chunk's input is consumed before its result is written; ``u`` is then also used to
    scale the input, which saves a temporary when it is in another dtype than the iteration).
    The iteration runs in the dtype of ``scratch``. ``kernel`` is one of :data:`KERNELS`
    (None: ``"gram"`` if ``use_gram`` else ``"standard"``); ``"gram"`` runs
    :func:`newton_schulz_gram`'s iteration (restarts: its ``restarts`` argument, None for the
    default of the iteration dtype). Every kernel gives the same map; results differ by
    rounding only, and a given kernel and chunk give the same bits on every call.
    """
    if kernel is None:
        kernel = "gram" if use_gram else "standard"
    elif kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    elif use_gram and kernel != "gram":
        raise ValueError(f"use_gram=True contradicts kernel={kernel!r}")
    use_gram = kernel == "gram"
    overwrite = out is None
    out = u if out is None else out
    if u.ndim != 3 or out.shape != u.shape:
        raise ValueError(
            f"newton_schulz_ expects (B, m, n) u and out of the same shape, got "
            f"{tuple(u.shape)} and {tuple(out.shape)}"
        )
    work = scratch.x.dtype
    restart_at = (
        _check_restarts(gram_restarts(len(coefficients), work) if restarts is None else restarts,
                        len(coefficients))
        if use_gram else frozenset()
    )  # fmt: skip
    m, n = u.shape[-2], u.shape[-1]
    # Tall matrices iterate as they are, multiplied from the right (X <- X P(X^T X)): a
    # transposed copy into the wide orientation and back costs 4-5x a plain cast.
    tall = m > n
    for start in range(0, u.shape[0], scratch.chunk):
        stop = min(start + scratch.chunk, u.shape[0])
        c = stop - start
        part = u[start:stop]
        x = _ns_normalize_into(part, _as_shape(scratch.x, c, m, n), overwrite)
        if use_gram:
            x = _gram_iterate(x, coefficients, restart_at, scratch, c, tall)
        elif kernel == "loop":
            x = _loop_iterate(coefficients, scratch, c, m, n, tall)
        else:
            x = _standard_iterate(x, coefficients, scratch, c, tall)
        out[start:stop].copy_(x)


def _as_shape(buffer: torch.Tensor, c: int, m: int, n: int) -> torch.Tensor:
    """The first ``c`` matrices of a (chunk, k, N) scratch buffer viewed as (c, m, n)."""
    return buffer[:c].view(c, m, n)


def _times_poly(x: torch.Tensor, poly: torch.Tensor, tall: bool, **out) -> torch.Tensor:
    """P X (wide) or X P (tall): the k x k factor on the short side of X."""
    return torch.bmm(x, poly, **out) if tall else torch.bmm(poly, x, **out)


def _gram_of(x: torch.Tensor, tall: bool, out: torch.Tensor) -> torch.Tensor:
    """A = X^T X (tall) or X X^T (wide): (c, k, k), k the short side."""
    return torch.bmm(x.mT, x, out=out) if tall else torch.bmm(x, x.mT, out=out)


def _standard_iterate(x, coefficients, scratch: NSScratch, c: int, tall: bool) -> torch.Tensor:
    """The plain loop from ``x`` (c, m, n) in ``scratch.x``; returns the buffer holding the
    result."""
    spare = _as_shape(scratch.x_next, c, *x.shape[1:])
    gram, poly = scratch.gram[:c], scratch.poly[:c]
    for a, b, c_ in coefficients:
        _gram_of(x, tall, gram)  # A, (c, k, k)
        _gram_polynomial_into(gram, b, c_, poly)  # b A + c A A
        if tall:  # a X + X (b A + c A A)
            torch.baddbmm(x, x, poly, beta=a, alpha=1.0, out=spare)
        else:  # a X + (b A + c A A) X
            torch.baddbmm(x, poly, x, beta=a, alpha=1.0, out=spare)
        x, spare = spare, x
    return x


def _loop_iterate(coefficients, scratch: NSScratch, c: int, m: int, n: int,
                  tall: bool) -> torch.Tensor:  # fmt: skip
    """The plain loop as 2-D products (``mm``/``addmm``), one matrix at a time through all its
    steps (its (m, n) iterate and (k, k) Gram matrix stay in the cache meanwhile), from
    ``scratch.x``; returns the buffer holding the result (every matrix ends in the same
    one: they all take the same number of steps)."""
    xs, spares = _as_shape(scratch.x, c, m, n), _as_shape(scratch.x_next, c, m, n)
    for i in range(c):
        x, spare = xs[i], spares[i]  # (m, n)
        gram, poly = scratch.gram[i], scratch.poly[i]  # (k, k)
        for a, b, c_ in coefficients:
            torch.mm(x.T, x, out=gram) if tall else torch.mm(x, x.T, out=gram)  # A
            _gram_polynomial_into(gram, b, c_, poly)  # b A + c A A
            if tall:
                torch.addmm(x, x, poly, beta=a, alpha=1.0, out=spare)  # a X + X P
            else:
                torch.addmm(x, poly, x, beta=a, alpha=1.0, out=spare)  # a X + P X
            x, spare = spare, x
    return xs if len(coefficients) % 2 == 0 else spares


def _gram_iterate(x, coefficients, restart_at, scratch: NSScratch, c: int,
                  tall: bool) -> torch.Tensor:  # fmt: skip
    """:func:`newton_schulz_gram`'s loop in the scratch buffers (see there for the algebra),
    from ``x`` (c, m, n) in ``scratch.x``; returns the buffer holding the result. A tall X is
    multiplied from the right (X_t = X_r Q_t^T, the mirror image of the wide case)."""
    k = min(x.shape[-2], x.shape[-1])
    spare_x = _as_shape(scratch.x_next, c, *x.shape[1:])
    gram, poly, q, spare = scratch.gram[:c], scratch.poly[:c], scratch.q[:c], scratch.spare[:c]
    _gram_of(x, tall, gram)  # A_0
    have_q = False  # Q_t = P_{t-1} ... P_r since the last (re)start r, in q (tall: Q_t^T)
    steps = len(coefficients)
    for t, (a, b, c_) in enumerate(coefficients):
        if t in restart_at:
            # X_t = Q_t X_r exactly; the Gram matrix recomputed from it drops the drift of A.
            if have_q:
                _times_poly(x, q, tall, out=spare_x)
                x, spare_x = spare_x, x
                have_q = False
            _gram_of(x, tall, gram)
        _gram_polynomial_into(gram, b, c_, poly)  # b A + c A A
        poly.diagonal(dim1=-2, dim2=-1).add_(a)  # P = a I + b A + c A A
        if have_q:
            torch.bmm(q, poly, out=spare) if tall else torch.bmm(poly, q, out=spare)
            q, spare = spare, q
        else:
            q.copy_(poly)
            have_q = True
        if t + 1 < steps and t + 1 not in restart_at:
            torch.bmm(poly, gram, out=spare)  # P A
            pap = spare_x.view(-1)[: c * k * k].view(c, k, k)  # free until the next restart
            torch.bmm(spare, poly, out=pap)  # A <- P A P
            torch.add(pap, pap.mT, out=gram).mul_(0.5)
    if have_q:
        _times_poly(x, q, tall, out=spare_x)
        x = spare_x
    return x


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
        u: as for :func:`newton_schulz`.
        coefficients: as for :func:`newton_schulz`.
        dtype: as for :func:`newton_schulz`.
        compute_dtype: as for :func:`newton_schulz`.
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
    out = torch.empty(u.shape, dtype=dtype, device=u.device)
    scratch = NSScratch.allocate(u.shape[0], u.shape[-2], u.shape[-1], work, u.device)
    newton_schulz_(u, coefficients, scratch, use_gram=True, restarts=restarts, out=out)
    return out


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


def _gram_polynomial_into(gram: torch.Tensor, b: float, c: float, out: torch.Tensor) -> None:
    """out = b A + c A A for a (B, k, k) stack or one (k, k) matrix.

    A cubic step (c = 0) is computed without a GEMM: oneDNN's bfloat16 ``baddbmm`` ignores
    ``beta`` when ``alpha`` is 0 and returns A unscaled (seen with torch 2.13 on CPUs with
    AVX512-BF16), so a degenerate BLAS parameter is never passed to a half-precision GEMM.
    """
    if c == 0:
        torch.mul(gram, b, out=out)
    elif gram.ndim == 2:
        torch.addmm(gram, gram, gram, beta=b, alpha=c, out=out)
    else:
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=out)


def _ns_normalize_into(x: torch.Tensor, out: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """out = X / (||X||_F + 1e-7) in out's dtype; ``out`` is contiguous (a transposed operand
    slows baddbmm ~20%). Returns ``out``.

    ``overwrite``: X may be scaled in place first. A division whose output is in another dtype
    than its inputs computes into a temporary of the inputs' dtype and casts that (a fresh
    allocation of X's size every call); scaling X in place, then casting it into ``out``, gives
    the same values without it.
    """
    # The norm is taken in at least float32 so a bf16 input is not scaled by a rounded norm.
    norm_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else None
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
    norm.add_(NS_NORM_EPS)
    if overwrite and norm.dtype == x.dtype and x.dtype != out.dtype:
        out.copy_(x.div_(norm))
    else:
        torch.div(x, norm, out=out)
    return out


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

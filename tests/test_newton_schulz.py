"""Newton-Schulz orthogonalization and its coefficient schedules (normuon.functional).

The central property: NS_k maps U = P diag(sigma) Q^T to P diag(phi(sigma / (||U||_F + 1e-7))) Q^T,
where phi is ``scalar_ns_map`` (the composed odd quintics). Everything is checked against
``torch.linalg.svd`` in float64; bands are derived from ``scalar_ns_map`` over the interval the
normalized singular values can occupy, never copied from a run of the code.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import normuon.newton_schulz as NS
from normuon.newton_schulz import (
    CPU_CHUNK_BYTES,
    FAST_NS_LOWER,
    FAST_NS_STEPS,
    MUON_COEFFICIENTS,
    NS_NORM_EPS,
    cpu_chunk_size,
    default_orthogonalizer,
    fast_ns_coefficients,
    gram_restarts,
    newton_schulz,
    newton_schulz_gram,
    ns_compute_dtype,
    polar_express_coefficients,
    resolve_ns_coefficients,
    scalar_ns_map,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small tensors: intra-op threads only add contention (100x slower under pytest -n 2)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


HYP = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Classical, provably convergent Newton-Schulz iterations for the polar factor on (0, 1].
CUBIC_NS = (1.5, -0.5, 0.0)
QUINTIC_NS = (15 / 8, -10 / 8, 3 / 8)

# (label, ns_coefficients option, ns_steps)
COEFFICIENT_SETS = [
    ("muon5", "muon", 5),
    ("muon3", "muon", 3),
    ("pe3", "polar_express", 3),
    ("pe5", "polar_express", 5),
    ("pe6", "polar_express", 6),
    ("pe8", "polar_express", 8),
    ("cubic", CUBIC_NS, 6),
    ("quintic", QUINTIC_NS, 5),
    ("mixed", [MUON_COEFFICIENTS] * 3 + [QUINTIC_NS] * 2, 5),
]
SET_IDS = [c[0] for c in COEFFICIENT_SETS]


def _coeffs(spec, steps):
    return resolve_ns_coefficients(spec, steps)


@st.composite
def matrices(draw, max_dim=20, max_batch=3):
    """(B, m, n) float64 stacks: 1xN, Nx1, tall, wide, square, rank-deficient, any scale."""
    kind = draw(st.sampled_from(["row", "col", "tall", "wide", "square", "any"]))
    if kind == "row":
        m, n = 1, draw(st.integers(1, max_dim))
    elif kind == "col":
        m, n = draw(st.integers(1, max_dim)), 1
    elif kind == "tall":
        n = draw(st.integers(1, max_dim // 2))
        m = draw(st.integers(n + 1, max_dim))
    elif kind == "wide":
        m = draw(st.integers(1, max_dim // 2))
        n = draw(st.integers(m + 1, max_dim))
    elif kind == "square":
        m = n = draw(st.integers(1, max_dim))
    else:
        m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    batch = draw(st.integers(1, max_batch))
    rank = draw(st.integers(1, min(m, n)))
    seed = draw(st.integers(0, 2**31 - 1))
    log_scale = draw(st.floats(-3.0, 3.0))
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(batch, m, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(batch, rank, n, generator=gen, dtype=torch.float64)
    return (left @ right) * 10.0**log_scale


def _expected_ns(u: torch.Tensor, coeffs) -> torch.Tensor:
    """P diag(phi(sigma / (||U||_F + 1e-7))) Q^T from an SVD, in float64."""
    p, s, qh = torch.linalg.svd(u, full_matrices=False)
    norm = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True).squeeze(-1)
    mapped = scalar_ns_map(s / (norm + NS_NORM_EPS), coeffs)
    return p @ torch.diag_embed(mapped) @ qh, mapped


# ------------------------------------------------------------------ generic properties


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@HYP
@given(u=matrices())
def test_shape_dtype_finite_and_input_untouched(label, spec, steps, u):
    coeffs = _coeffs(spec, steps)
    before = u.clone()
    for dtype, compute in [
        (torch.float64, None),
        (torch.float32, None),
        (torch.bfloat16, None),
        (torch.bfloat16, torch.bfloat16),  # the half-precision iteration itself
    ]:
        out = newton_schulz(u, coeffs, dtype, compute_dtype=compute)
        assert out.shape == u.shape
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
    assert torch.equal(u, before), "newton_schulz modified its input"


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 7), (1, 7, 1), (2, 5, 3), (3, 4, 9)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_zero_input_gives_zero_output(label, spec, steps, shape, dtype):
    out = newton_schulz(
        torch.zeros(shape, dtype=dtype), _coeffs(spec, steps), dtype, compute_dtype=dtype
    )
    assert out.shape == shape
    assert torch.equal(out, torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("fn", [newton_schulz, newton_schulz_gram], ids=["plain", "gram"])
@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@HYP
@given(u=matrices())
def test_float64_matches_scalar_map_on_singular_values(fn, label, spec, steps, u):
    """Singular values are mapped by scalar_ns_map, singular vectors are kept."""
    coeffs = _coeffs(spec, steps)
    out = fn(u, coeffs, torch.float64)
    expected, mapped = _expected_ns(u, coeffs)
    # Whole-matrix comparison checks values and vectors at once (robust to sign/degeneracy).
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)
    # And the singular values alone (phi need not be monotone: compare sorted).
    got = torch.linalg.svdvals(out).sort(dim=-1).values
    want = mapped.sort(dim=-1).values
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


@HYP
@given(
    u=matrices(max_dim=12),
    a=st.floats(0.5, 4.0),
    b=st.floats(-6.0, 1.0),
    c=st.floats(-1.0, 3.0),
    steps=st.integers(1, 6),
)
def test_random_custom_triple_matches_scalar_map(u, a, b, c, steps):
    coeffs = ((a, b, c),) * steps
    # Only triples whose composed map stays bounded on [0, 1] (where the normalized singular
    # values live); the others legitimately blow up.
    grid = torch.linspace(0.0, 1.0, 4001, dtype=torch.float64)
    assume(scalar_ns_map(grid, coeffs).abs().max().item() < 4.0)
    out = newton_schulz(u, coeffs, torch.float64)
    assert torch.isfinite(out).all()
    expected, _ = _expected_ns(u, coeffs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(4, 6, 6), (3, 9, 4), (5, 2, 11), (3, 1, 8), (2, 8, 1)])
def test_batched_equals_per_matrix(label, spec, steps, dtype, shape):
    coeffs = _coeffs(spec, steps)
    gen = torch.Generator().manual_seed(7)
    # Very different scales per matrix: each must be normalized by its own norm.
    scales = torch.logspace(-2, 2, shape[0], dtype=torch.float64).view(-1, 1, 1)
    u = (torch.randn(shape, generator=gen, dtype=torch.float64) * scales).to(dtype)
    batched = newton_schulz(u, coeffs, dtype)
    single = torch.cat([newton_schulz(u[i : i + 1], coeffs, dtype) for i in range(shape[0])])
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(batched, single, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(5, 3), (4,), (1, 2, 3, 4)])
def test_rejects_non_3d_input(shape):
    with pytest.raises(ValueError, match=r"expects a \(B, m, n\) stack"):
        newton_schulz(torch.randn(shape), _coeffs("muon", 5), torch.float32)


# ------------------------------------------------------------------ bands


@functools.lru_cache(maxsize=512)
def _band(coeffs, lo: float, hi: float = 1.0) -> tuple[float, float]:
    """[min, max] of scalar_ns_map over [lo, hi], from a dense grid plus the end points."""
    grid = torch.cat(
        [
            torch.logspace(math.log10(lo), math.log10(hi), 20001, dtype=torch.float64),
            torch.linspace(lo, hi, 20001, dtype=torch.float64),
        ]
    )
    values = scalar_ns_map(grid, coeffs)
    return values.min().item(), values.max().item()


def _with_singular_values(sigma: torch.Tensor, m: int, n: int, gen) -> torch.Tensor:
    k = sigma.shape[-1]
    p, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return (p * sigma) @ q.T


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@pytest.mark.parametrize("dtype,slack", [(torch.float64, 1e-4), (torch.float32, 3e-3)])
@HYP
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    log_ratios=st.lists(st.floats(-3.0, 0.0), min_size=24, max_size=24),
    log_scale=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_singular_values_inside_promised_band(
    label, spec, steps, dtype, slack, m, n, log_ratios, log_scale, seed
):
    """Condition number <= 1e3 means normalized singular values lie in [1e-3/sqrt(k), 1];
    the output singular values must lie in phi's image of that interval."""
    coeffs = _coeffs(spec, steps)
    k = min(m, n)
    ratios = torch.tensor(log_ratios[:k], dtype=torch.float64)
    ratios[0] = 0.0  # sigma_max is the reference, sigma_min / sigma_max >= 1e-3
    sigma = 10.0 ** (ratios + log_scale)
    gen = torch.Generator().manual_seed(seed)
    u = _with_singular_values(sigma, m, n, gen).unsqueeze(0)
    lo, hi = _band(tuple(coeffs), 1e-3 / math.sqrt(k) * 0.999, 1.0)
    out = newton_schulz(u.to(dtype), coeffs, dtype).double()
    sv = torch.linalg.svdvals(out)
    assert sv.min().item() >= lo - slack, (sv, lo)
    assert sv.max().item() <= hi + slack, (sv, hi)


def test_muon_quintic_band_from_scalar_map():
    """The Muon quintic does not converge: once singular values are past the steep start,
    iterates keep oscillating in a fixed band (module docstring: roughly [0.7, 1.2])."""
    coeffs = _coeffs("muon", 5)
    lo, hi = _band(coeffs, 0.05, 1.0)
    assert 0.6 < lo < 0.8 and 1.1 < hi < 1.3
    # The fixed quintic leaves a worst-case error that more steps do not remove.
    err5 = max(1 - lo, hi - 1)
    lo10, hi10 = _band(_coeffs("muon", 10), 0.05, 1.0)
    assert max(1 - lo10, hi10 - 1) > 0.5 * err5


# ------------------------------------------------------------------ Polar Express schedule


def _worst_error(coeffs, lo=1e-3, hi=1.0) -> float:
    band_lo, band_hi = _band(coeffs, lo, hi)
    return max(1.0 - band_lo, band_hi - 1.0)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 7, 8])
def test_polar_express_schedule_well_formed(steps):
    sched = polar_express_coefficients(steps)
    assert len(sched) == steps
    assert all(len(t) == 3 and all(math.isfinite(v) for v in t) for t in sched)
    assert resolve_ns_coefficients("polar_express", steps) == sched
    # Odd quintics with positive slope at 0: small singular values grow.
    assert all(a > 0 for a, _, _ in sched)


def test_polar_express_eight_steps_tight_around_one():
    err = _worst_error(polar_express_coefficients(8))
    assert err < 1e-6, err


@pytest.mark.parametrize("steps", [3, 4, 5, 6, 7, 8])
def test_polar_express_beats_muon_worst_case(steps):
    pe = _worst_error(polar_express_coefficients(steps))
    muon = _worst_error(_coeffs("muon", steps))
    assert pe < muon, (pe, muon)


def test_polar_express_error_decreases_with_steps():
    errors = [_worst_error(polar_express_coefficients(s)) for s in range(1, 9)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("steps", [9, 10, 12])
def test_polar_express_many_steps(steps):
    """More steps than needed to converge must still give a valid (converged) schedule."""
    sched = polar_express_coefficients(steps)
    assert len(sched) == steps
    assert _worst_error(sched) < 1e-6


@pytest.mark.parametrize("m,n", [(16, 16), (24, 8), (8, 24), (1, 12), (12, 1)])
def test_polar_express_8_is_polar_factor(m, n):
    """Well-conditioned input (normalized singular values >= 1e-3): 8 Polar Express steps in
    float64 give the polar factor P Q^T of the SVD."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    k = min(m, n)
    sigma = torch.logspace(0, -2, k, dtype=torch.float64)
    u = _with_singular_values(sigma, m, n, gen).unsqueeze(0)
    p, s, qh = torch.linalg.svd(u, full_matrices=False)
    assert (s / torch.linalg.vector_norm(u)).min() > 1e-3
    out = newton_schulz(u, polar_express_coefficients(8), torch.float64)
    torch.testing.assert_close(out, p @ qh, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [0, -1, 2.0, "5"])
def test_polar_express_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be a positive int"):
        polar_express_coefficients(steps)


# ------------------------------------------------------------------ low precision


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@pytest.mark.parametrize(
    "shape", [(1, 1, 32), (1, 32, 1), (2, 16, 16), (1, 48, 12), (1, 12, 48), (3, 8, 40)]
)
@pytest.mark.parametrize("input_bf16", [False, True])
@pytest.mark.parametrize("compute", [None, torch.bfloat16], ids=["auto", "bf16_iter"])
def test_bf16_close_to_float64(label, spec, steps, shape, input_bf16, compute):
    """bf16 has a unit roundoff of 2**-8 ~ 0.0039; 3-8 chained bf16 matmul steps may amplify it
    by a small factor (Polar Express's first step has slope ~20 at sigma = 1), so allow 20 ulps
    in relative Frobenius norm."""
    coeffs = _coeffs(spec, steps)
    gen = torch.Generator().manual_seed(sum(shape))
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    exact = newton_schulz(u, coeffs, torch.float64)
    low = newton_schulz(
        u.bfloat16() if input_bf16 else u, coeffs, torch.bfloat16, compute_dtype=compute
    )
    assert low.dtype == torch.bfloat16
    low = low.double()
    if input_bf16:  # bf16 rounding of the input is part of the error: compare on the same input
        exact = newton_schulz(u.bfloat16().double(), coeffs, torch.float64)
    unit = 2.0**-8
    rel = ((low - exact).norm() / exact.norm()).item()
    assert rel < 20 * unit, rel


@pytest.mark.parametrize("gram", [False, True], ids=["standard", "gram"])
@pytest.mark.parametrize("b, c", [(-0.5, 0.0), (0.0, 0.0), (-1.25, 0.375)])
def test_half_precision_polynomial_step_matches_float64(gram, b, c):
    """One step (a, b, c) in bfloat16 against float64, whatever GEMM backend this machine has.

    Regression: oneDNN's bfloat16 baddbmm ignores beta when alpha == 0 (cubic steps, c = 0),
    so b A was dropped on CPUs with native bf16 GEMMs.
    """
    torch.manual_seed(3)
    u = torch.randn(3, 24, 40, dtype=torch.float64)
    coefficients = [(1.5, b, c)]
    expected = newton_schulz(u, coefficients, torch.float64)
    fn = newton_schulz_gram if gram else newton_schulz
    got = fn(u.to(torch.bfloat16), coefficients, torch.bfloat16, compute_dtype=torch.bfloat16)
    err = (got.double() - expected).norm() / expected.norm()
    assert err < 2e-2, f"relative error {float(err):.3g} for (a, b, c) = (1.5, {b}, {c})"


# ------------------------------------------------------------------ Gram iteration with restarts


@st.composite
def restart_sets(draw, steps: int):
    """Any subset of the admissible restart steps 1 .. steps - 1, in any order."""
    chosen = draw(st.sets(st.integers(1, steps - 1), max_size=steps - 1)) if steps > 1 else set()
    return draw(st.permutations(sorted(chosen)))


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@HYP
@given(u=matrices(), data=st.data())
def test_gram_restarts_float64_match_scalar_map(label, spec, steps, u, data):
    """Restarting (X <- Q X, A <- X X^T, Q <- I) changes nothing in exact arithmetic: in float64
    every restart set gives P diag(phi(sigma)) Q^T."""
    coeffs = _coeffs(spec, steps)
    restarts = data.draw(restart_sets(steps))
    out = newton_schulz_gram(u, coeffs, torch.float64, restarts=restarts)
    expected, _ = _expected_ns(u, coeffs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("steps", range(1, 11))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_gram_default_restarts_are_valid(steps, dtype):
    restarts = gram_restarts(steps, dtype)
    assert all(0 < t < steps for t in restarts) and len(set(restarts)) == len(restarts)
    if dtype in (torch.float32, torch.float64):
        assert restarts == ()
    elif steps >= 3:
        # Half precision: the first segment is two steps long and no segment is longer than
        # three (bfloat16: two), the measured limits of docs/performance.md.
        bounds = [0, *restarts, steps]
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        assert restarts[0] == 2 and longest <= (2 if dtype == torch.bfloat16 else 3)


def _gradient_like(batch: int, m: int, n: int, seed: int) -> torch.Tensor:
    """Low-rank signal with singular values over two decades plus a noise floor: the spectrum
    of momentum matrices, where half-precision Gram iterations without restarts drift."""
    gen = torch.Generator().manual_seed(seed)
    rank = min(m, n) // 2
    decay = torch.logspace(0, -2, rank, dtype=torch.float64)
    left = torch.randn(batch, m, rank, generator=gen, dtype=torch.float64)
    right = torch.randn(batch, rank, n, generator=gen, dtype=torch.float64)
    signal = left * decay @ right
    return signal + 0.05 * signal.std() * torch.randn(batch, m, n, generator=gen,
                                                      dtype=torch.float64)  # fmt: skip


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest relative Frobenius distance over the batch."""
    got, want = got.double(), want.double()
    dist = torch.linalg.vector_norm(got - want, dim=(-2, -1))
    return (dist / torch.linalg.vector_norm(want, dim=(-2, -1))).max().item()


HALF = [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)]


@pytest.mark.parametrize("label,spec,steps", COEFFICIENT_SETS, ids=SET_IDS)
@pytest.mark.parametrize("shape", [(2, 16, 64), (2, 64, 16), (1, 24, 48), (2, 32, 32)])
@pytest.mark.parametrize("half,unit", HALF, ids=["bf16", "fp16"])
def test_gram_half_precision_as_close_as_standard(label, spec, steps, shape, half, unit):
    """With its default restarts, the half-precision Gram iteration stays as close to the
    float64 iteration (same coefficients) as the standard half-precision loop up to a small
    factor: the standard loop re-reads X every step and lands within ~15 units of roundoff here,
    the Gram loop carries the rounding of Q and A for two steps between restarts (up to ~2.5x
    that), so: within 32 units and within 3x the standard loop's error plus 2 units."""
    coeffs = _coeffs(spec, steps)
    u = _gradient_like(*shape, seed=sum(shape) + steps)
    exact = newton_schulz(u, coeffs, torch.float64)
    gram = newton_schulz_gram(u, coeffs, half, compute_dtype=half)
    standard = newton_schulz(u, coeffs, half, compute_dtype=half)
    assert gram.dtype == half and gram.shape == u.shape
    err_gram, err_std = _relative_error(gram, exact), _relative_error(standard, exact)
    assert err_gram < 32 * unit, (err_gram, err_std)
    assert err_gram < 3 * err_std + 2 * unit, (err_gram, err_std)


@pytest.mark.parametrize("spec", ["muon", "polar_express"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gram_half_precision_polar_quality(spec, half):
    """Against the float64 SVD polar factor P Q^T (the target, not the float64 iteration): the
    restarted half-precision Gram iteration moves every significant singular value (s_i /
    ||U||_F >= 1e-2) as far from 1 as the standard loop at the same dtype, within 0.02."""
    coeffs = _coeffs(spec, 5)
    u = _gradient_like(3, 32, 128, seed=11)
    p, s, qh = torch.linalg.svd(u, full_matrices=False)
    keep = s / torch.linalg.vector_norm(u, dim=(-2, -1)).unsqueeze(-1) >= 1e-2

    def sigma_error(out: torch.Tensor) -> float:
        mapped = torch.einsum("bik,bij,bkj->bk", p, out.double(), qh)  # p_i^T O q_i
        return (mapped - 1).abs()[keep].max().item()

    err_gram = sigma_error(newton_schulz_gram(u, coeffs, half, compute_dtype=half))
    err_std = sigma_error(newton_schulz(u, coeffs, half, compute_dtype=half))
    assert err_gram < err_std + 0.02, (err_gram, err_std)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,gram", [((2, 8, 32), True), ((2, 32, 8), True), ((2, 16, 32), True),
                   ((2, 20, 32), False), ((2, 16, 16), False)],
)  # fmt: skip
def test_auto_and_default_orthogonalizer_pick_gram_for_rectangular(shape, gram, dtype):
    """method='auto' (the optimizers' default) is the Gram iteration from aspect
    GRAM_MIN_ASPECT on, with its default restarts, and the standard loop below."""
    coeffs = _coeffs("muon", 5)
    u = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    expected_fn = newton_schulz_gram if gram else newton_schulz
    expected = expected_fn(u, coeffs, dtype, compute_dtype=dtype)
    assert torch.equal(newton_schulz(u, coeffs, dtype, compute_dtype=dtype, method="auto"),
                       expected)  # fmt: skip
    if ns_compute_dtype(dtype, "cpu") == dtype:
        assert torch.equal(default_orthogonalizer(u, coeffs, dtype), expected)


@pytest.mark.parametrize(
    "restarts,error",
    [((0,), ValueError), ((5,), ValueError), ((2, 7), ValueError), ((1.0,), ValueError),
     ((True,), ValueError), (2, TypeError), ("2", TypeError)],
)  # fmt: skip
def test_gram_rejects_bad_restarts(restarts, error):
    with pytest.raises(error, match="restarts"):
        newton_schulz_gram(torch.randn(1, 4, 8), _coeffs("muon", 5), torch.float32,
                           restarts=restarts)  # fmt: skip


def test_standard_method_rejects_restarts():
    with pytest.raises(ValueError, match="restarts"):
        newton_schulz(torch.randn(1, 4, 8), _coeffs("muon", 5), torch.float32, restarts=(2,))


def test_gram_restarts_leave_input_untouched_and_zero_stays_zero():
    coeffs = _coeffs("polar_express", 5)
    u = torch.randn(2, 6, 18, dtype=torch.bfloat16)
    before = u.clone()
    out = newton_schulz_gram(u, coeffs, torch.bfloat16, compute_dtype=torch.bfloat16)
    assert torch.equal(u, before) and torch.isfinite(out).all()
    zero = newton_schulz_gram(torch.zeros(2, 6, 18, dtype=torch.bfloat16), coeffs, torch.bfloat16,
                              compute_dtype=torch.bfloat16)  # fmt: skip
    assert torch.equal(zero, torch.zeros_like(zero))


# ------------------------------------------------------------------ fast mode


def test_fast_schedule_band_from_scalar_map():
    """The fast schedule's promise, from its scalar map: normalized singular values in
    [FAST_NS_LOWER, 1] land within 0.03 of 1 (the default Muon quintic: only within ~0.32)."""
    fast = fast_ns_coefficients()
    assert len(fast) == FAST_NS_STEPS < 5
    assert resolve_ns_coefficients(list(fast), FAST_NS_STEPS) == fast
    lo, hi = _band(fast, FAST_NS_LOWER)
    assert 1 - lo < 0.03 and hi - 1 < 0.03, (lo, hi)
    muon_lo, muon_hi = _band(_coeffs("muon", 5), FAST_NS_LOWER)
    assert max(1 - muon_lo, muon_hi - 1) > 0.25


@pytest.mark.parametrize(
    "dtype,compute", [(torch.float32, None), (torch.bfloat16, torch.bfloat16),
                      (torch.float16, torch.float16)], ids=["fp32", "bf16", "fp16"],
)  # fmt: skip
@pytest.mark.parametrize("shape", [(2, 32, 128), (2, 128, 32), (2, 48, 48)])
def test_fast_mode_significant_directions_against_polar_factor(dtype, compute, shape):
    """Against the float64 SVD polar factor, through the default orthogonalizer's method:
    every direction with s_i / ||U||_F >= FAST_NS_LOWER is within the schedule's band plus
    the dtype's rounding, and closer to 1 than the default (Muon, 5 steps) puts it."""
    u = _gradient_like(*shape, seed=sum(shape))
    p, s, qh = torch.linalg.svd(u, full_matrices=False)
    keep = s / torch.linalg.vector_norm(u, dim=(-2, -1)).unsqueeze(-1) >= FAST_NS_LOWER
    assert keep.sum() >= 4

    def sigma_error(coeffs) -> float:
        out = newton_schulz(u, coeffs, dtype, compute_dtype=compute, method="auto")
        mapped = torch.einsum("bik,bij,bkj->bk", p, out.double(), qh)  # p_i^T O q_i
        return (mapped - 1).abs()[keep].max().item()

    fast = sigma_error(fast_ns_coefficients())
    default = sigma_error(_coeffs("muon", 5))
    rounding = {torch.float32: 1e-4, torch.bfloat16: 0.03, torch.float16: 0.01}[dtype]
    assert fast < 0.03 + rounding, (fast, default)
    assert fast < default, (fast, default)


# ------------------------------------------------------------------ chunked batches


@pytest.mark.parametrize("method", ["standard", "gram", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 100])
def test_chunked_equals_whole_batch(method, dtype, chunk_size):
    """Chunks of any size (uneven last chunk included) give the whole batch's result, each
    matrix normalized by its own norm."""
    coeffs = _coeffs("polar_express", 5)
    gen = torch.Generator().manual_seed(chunk_size)
    scales = torch.logspace(-2, 2, 7, dtype=torch.float64).view(-1, 1, 1)
    u = (torch.randn(7, 12, 30, generator=gen, dtype=torch.float64) * scales).to(dtype)
    whole = newton_schulz(u, coeffs, dtype, compute_dtype=dtype, method=method,
                          chunk_size=u.shape[0])  # fmt: skip
    chunked = newton_schulz(u, coeffs, dtype, compute_dtype=dtype, method=method,
                            chunk_size=chunk_size)  # fmt: skip
    assert chunked.dtype == dtype and chunked.shape == u.shape
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(chunked, whole, rtol=tol, atol=tol)


def test_cpu_chunk_size_fits_budget():
    assert cpu_chunk_size(384, 384, torch.bfloat16) == CPU_CHUNK_BYTES // (384 * 384 * 2)
    assert cpu_chunk_size(4096, 4096, torch.float32) == 1  # larger than the budget: one at a time
    assert cpu_chunk_size(8, 8, torch.float32) * 8 * 8 * 4 <= CPU_CHUNK_BYTES


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True, "2"])
def test_rejects_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        newton_schulz(torch.randn(2, 4, 8), _coeffs("muon", 5), torch.float32,
                      chunk_size=chunk_size)  # fmt: skip


# ---------------------------------------------------------------- the CPU half-precision decision


@pytest.fixture
def _no_half_env(monkeypatch):
    """No override, and a throwaway record of decisions (what these tests make the CPU decide
    must not reach later tests' traces)."""
    monkeypatch.delenv(NS.CPU_HALF_MATMUL_ENV, raising=False)
    monkeypatch.setattr(NS, "_CPU_HALF_DECIDED", {})


@pytest.mark.parametrize("speedup,expected", [(0.25, False), (1.0, False), (1.49, False),
                                              (1.5, True), (4.2, True)])  # fmt: skip
def test_cpu_half_newton_schulz_follows_the_measured_speedup(monkeypatch, _no_half_env, speedup,
                                                             expected):  # fmt: skip
    """oneDNN's support is not speed (on AVX512 CPUs without BF16 instructions it emulates bf16
    at ~0.25x float32's rate): where it supports the dtype, the measured speedup decides."""
    monkeypatch.setattr(NS, "_onednn_half_support", lambda dtype: True)
    monkeypatch.setattr(NS, "half_matmul_speedup", lambda dtype: speedup)
    assert NS.native_half_matmul("cpu", torch.bfloat16) is expected
    expected_dtype = torch.bfloat16 if expected else torch.float32
    assert ns_compute_dtype(torch.bfloat16, "cpu") == expected_dtype


def test_cpu_half_newton_schulz_is_not_measured_without_onednn_support(monkeypatch, _no_half_env):
    """Without oneDNN the products are a scalar loop: float32, and nothing is timed."""
    monkeypatch.setattr(NS, "_onednn_half_support", lambda dtype: False)

    def not_called(dtype):
        raise AssertionError("measured a scalar fallback")

    monkeypatch.setattr(NS, "half_matmul_speedup", not_called)
    assert ns_compute_dtype(torch.bfloat16, "cpu") == torch.float32
    assert ns_compute_dtype(torch.float16, "cpu") == torch.float32


@pytest.mark.parametrize("value,supported,expected", [
    ("float32", True, torch.float32), ("half", True, torch.bfloat16),
    ("half", False, torch.float32), (" HALF ", True, torch.bfloat16),
])  # fmt: skip
def test_the_environment_fixes_the_cpu_decision(monkeypatch, value, supported, expected):
    """``half`` cannot force a scalar fallback; ``float32`` overrides a fast measurement."""
    monkeypatch.setenv(NS.CPU_HALF_MATMUL_ENV, value)
    monkeypatch.setattr(NS, "_onednn_half_support", lambda dtype: supported)
    monkeypatch.setattr(NS, "half_matmul_speedup", lambda dtype: 0.25 if value == "half" else 9.0)
    assert ns_compute_dtype(torch.bfloat16, "cpu") == expected


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(NS.CPU_HALF_MATMUL_ENV, "bf16")
    with pytest.raises(ValueError, match=r"NORMUON_CPU_HALF_MATMUL.*'bf16'"):
        ns_compute_dtype(torch.bfloat16, "cpu")


def test_float32_and_accelerators_are_never_measured(monkeypatch, _no_half_env):
    monkeypatch.setattr(NS, "half_matmul_speedup", lambda dtype: pytest.fail("measured"))
    assert ns_compute_dtype(torch.float32, "cpu") == torch.float32
    assert ns_compute_dtype(torch.float64, "cpu") == torch.float64
    assert ns_compute_dtype(torch.bfloat16, "meta") == torch.bfloat16
    assert ns_compute_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16


def test_the_speedup_is_measured_on_the_cpu_in_float32_whatever_the_defaults():
    """Neither a meta default device (which would time nothing) nor a float64 default dtype
    changes what is timed: a CPU float32 product against a CPU bf16 one."""
    measure = NS.half_matmul_speedup.__wrapped__  # uncached: measured here, small and quick
    old_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            seen = []
            real_mm = torch.mm

            def recording_mm(a, b):
                seen.append((a.device.type, a.dtype))
                return real_mm(a, b)

            NS.torch.mm = recording_mm
            try:
                ratio = measure(torch.bfloat16, size=32, reps=1)
            finally:
                NS.torch.mm = real_mm
    finally:
        torch.set_default_dtype(old_dtype)
    assert math.isfinite(ratio) and ratio > 0
    assert set(seen) == {("cpu", torch.float32), ("cpu", torch.bfloat16)}


def test_a_trace_uses_the_measured_answer_or_float32(monkeypatch, _no_half_env):
    """Nothing is timed inside torch.compile: a trace reuses what eager measured, and before
    any measurement iterates in float32 (never the emulated bf16 that oneDNN reports)."""
    monkeypatch.setattr(NS, "_onednn_half_support", lambda dtype: True)
    monkeypatch.setattr(NS, "_CPU_HALF_DECIDED", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(NS, "half_matmul_speedup", lambda dtype: pytest.fail("timed in a trace"))
    assert ns_compute_dtype(torch.bfloat16, "cpu") == torch.float32
    NS._CPU_HALF_DECIDED[torch.bfloat16] = True  # what an eager call measured on an AMX CPU
    assert ns_compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(NS, "half_matmul_speedup", lambda dtype: 0.25)
    assert ns_compute_dtype(torch.bfloat16, "cpu") == torch.float32  # measured again: emulated
    assert NS._CPU_HALF_DECIDED[torch.bfloat16] is False

"""The Newton-Schulz kernels and the per-bucket choice between them (normuon.ns_kernels).

Every kernel against the float64 reference of tests/reference.py (one matrix at a time, written
from docs/algorithm.md), on random and gradient-like inputs; the multiply-adds each kernel
really performs (counted by torch's flop counter) against ``ns_multiply_adds``; the chooser's
cache, its fixed choices and its refusals; and the optimizer's step, with each choice forced,
against the float64 reference optimizer, without host reads and without new allocations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from reference import ReferenceMatrixOptimizer, ns_reference
from torch.utils.flop_counter import FlopCounterMode

from normuon import Muon, NorMuon, ns_kernels
from normuon import newton_schulz as NS
from normuon.host_reads import NoHostReads

MODES = list(ns_kernels.NS_KERNEL_MODES)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts with nothing measured (and leaves nothing behind)."""
    ns_kernels.clear_cache()
    yield
    ns_kernels.clear_cache()


@pytest.fixture
def measured(monkeypatch):
    """The buckets ns_kernels.measure was called for, in order (the real measurement runs)."""
    calls = []
    real = ns_kernels.measure

    def counting(m, n, count, *args, **kwargs):
        calls.append((m, n, count))
        return real(m, n, count, *args, **kwargs)

    monkeypatch.setattr(ns_kernels, "measure", counting)
    return calls


def _gradient_like(batch: int, m: int, n: int, seed: int) -> torch.Tensor:
    """Low rank with singular values over two decades, plus a noise floor (momentum-like)."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, min(m, n) // 2)
    decay = torch.logspace(0, -2, rank, dtype=torch.float64)
    signal = (
        torch.randn(batch, m, rank, generator=gen, dtype=torch.float64)
        * decay
        @ torch.randn(batch, rank, n, generator=gen, dtype=torch.float64)
    )
    noise = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    return signal + 0.05 * signal.std() * noise


def _random(batch: int, m: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 2, batch, dtype=torch.float64).view(-1, 1, 1)
    return torch.randn(batch, m, n, generator=gen, dtype=torch.float64) * scales


def _run_kernel(u: torch.Tensor, kernel: str, dtype: torch.dtype, chunk: int,
                coefficients) -> torch.Tensor:  # fmt: skip
    """newton_schulz_ as the optimizer runs it: in place over a copy of ``u`` in its buffer
    dtype, iterating in ``dtype`` in kept scratch of ``chunk`` matrices."""
    buffer = u.to(torch.float32 if dtype != torch.float64 else torch.float64).clone()
    scratch = NS.NSScratch.allocate(chunk, u.shape[-2], u.shape[-1], dtype, "cpu")
    NS.newton_schulz_(buffer, coefficients, scratch, kernel=kernel)
    return buffer


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    dist = torch.linalg.vector_norm(got.double() - want, dim=(-2, -1))
    return (dist / torch.linalg.vector_norm(want, dim=(-2, -1))).max().item()


SHAPES = [(3, 16, 48), (3, 48, 16), (4, 24, 24), (2, 20, 32), (1, 1, 9), (2, 9, 1)]
INPUTS = {"random": _random, "gradient_like": _gradient_like}
BF16_UNIT = 2.0**-8


# ------------------------------------------------------------------ every kernel, every bound


@pytest.mark.parametrize("kernel", NS.KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("spec", ["muon", "polar_express"])
@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_kernel_matches_float64_reference(kernel, shape, inputs, spec, chunk):
    """In float64 every kernel is the reference's map (to rounding). In float32 the standard
    loop and its 2-D form are within 1e-4 (seen: <= 4e-5, Polar Express's steep first step
    amplifies rounding); the Gram iteration, which float32 runs without restarts, carries the
    rounding of A and Q through all steps and is within 1e-3 (seen: <= 5.3e-4 on
    gradient-like inputs; the fp32 singular-value slack of tests/test_newton_schulz.py is
    3e-3)."""
    coefficients = NS.resolve_ns_coefficients(spec, 5)
    u = INPUTS[inputs](*shape, seed=sum(shape))
    want = torch.stack([ns_reference(matrix, coefficients) for matrix in u])
    got64 = _run_kernel(u, kernel, torch.float64, chunk, coefficients)
    assert _relative_error(got64, want) < 1e-10
    got32 = _run_kernel(u, kernel, torch.float32, chunk, coefficients)
    assert _relative_error(got32, want) < (1e-3 if kernel == "gram" else 1e-4)


@pytest.mark.parametrize("kernel", NS.KERNELS)
@pytest.mark.parametrize("shape", [(3, 16, 48), (3, 48, 16), (2, 32, 32), (2, 20, 32)], ids=str)
@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("spec", ["muon", "polar_express"])
def test_kernel_bf16_within_its_bound(kernel, shape, inputs, spec):
    """bfloat16 iterations against the float64 reference: the standard loop and its 2-D form
    within 20 units of roundoff (tests/test_newton_schulz.py's bound), the Gram iteration with
    its default restarts within 32 units (seen: <= 21), and on gradient-like inputs within 3x
    the standard loop's error plus 2 units (tests/test_newton_schulz.py's bound; on random,
    well-conditioned inputs the standard loop is unusually accurate, 3-6 units, and the Gram
    iteration's error was up to 4.5x it with Polar Express coefficients)."""
    coefficients = NS.resolve_ns_coefficients(spec, 5)
    u = INPUTS[inputs](*shape, seed=sum(shape) + 1)
    want = torch.stack([ns_reference(matrix, coefficients) for matrix in u])
    got = _run_kernel(u, kernel, torch.bfloat16, shape[0], coefficients)
    err = _relative_error(got, want)
    standard = _relative_error(_run_kernel(u, "standard", torch.bfloat16, shape[0],
                                           coefficients), want)  # fmt: skip
    if kernel == "gram":
        assert err < 32 * BF16_UNIT, (err, standard)
        if inputs == "gradient_like":
            assert err < 3 * standard + 2 * BF16_UNIT, (err, standard)
    else:
        assert err < 20 * BF16_UNIT, err


@pytest.mark.parametrize("kernel", NS.KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_deterministic(kernel, dtype):
    """A kernel and chunk give the same bits on every call (the choice is the only freedom)."""
    coefficients = NS.resolve_ns_coefficients("muon", 5)
    u = _gradient_like(5, 24, 64, seed=3)
    first = _run_kernel(u, kernel, dtype, 2, coefficients)
    assert torch.equal(first, _run_kernel(u, kernel, dtype, 2, coefficients))


def test_loop_is_the_standard_map_in_float64():
    coefficients = NS.resolve_ns_coefficients("polar_express", 5)
    u = _random(4, 12, 30, seed=5)
    standard = _run_kernel(u, "standard", torch.float64, 4, coefficients)
    loop = _run_kernel(u, "loop", torch.float64, 3, coefficients)
    torch.testing.assert_close(loop, standard, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", NS.KERNELS)
@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 48, 16), (2, 24, 24)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_multiply_adds_are_what_the_kernel_runs(kernel, shape, dtype):
    """The floor counts what runs: torch's flop counter over newton_schulz_ (quintic steps)
    gives 2 x count x ns_multiply_adds, with the Gram iteration's default restarts of the
    dtype (bfloat16 two, float16 one, float32 none)."""
    coefficients = NS.resolve_ns_coefficients("muon", 5)
    u = torch.randn(shape)
    scratch = NS.NSScratch.allocate(shape[0], shape[1], shape[2], torch.float64, "cpu")
    with FlopCounterMode(display=False) as counter:  # float64: the count is dtype-blind
        NS.newton_schulz_(
            u.double(),
            coefficients,
            scratch,
            kernel=kernel,
            restarts=NS.gram_restarts(5, dtype) if kernel == "gram" else None,
        )
    restarts = NS.gram_restarts(5, dtype) if kernel == "gram" else ()
    expected = shape[0] * NS.ns_multiply_adds(shape[1], shape[2], 5, kernel, restarts)
    assert counter.get_total_flops() == 2 * expected


def test_multiply_adds_formulas():
    k, big = 384, 1536
    assert NS.ns_multiply_adds(k, big, 5) == 5 * (2 * k * k * big + k**3)
    assert NS.ns_multiply_adds(big, k, 5, "loop") == NS.ns_multiply_adds(k, big, 5)
    assert NS.ns_multiply_adds(k, big, 5, "gram") == 2 * k * k * big + 17 * k**3
    assert NS.ns_multiply_adds(k, big, 5, "gram", (2, 3)) == 6 * k * k * big + 11 * k**3
    with pytest.raises(ValueError, match="'fast'"):
        NS.ns_multiply_adds(k, big, 5, "fast")
    with pytest.raises(ValueError, match="restarts"):
        NS.ns_multiply_adds(k, big, 5, "gram", (5,))


def test_bad_kernel_arguments_raise():
    u, coefficients = torch.randn(2, 4, 8), NS.resolve_ns_coefficients("muon", 5)
    scratch = NS.NSScratch.allocate(2, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="'fastest'"):
        NS.newton_schulz_(u, coefficients, scratch, kernel="fastest")
    with pytest.raises(ValueError, match="contradicts"):
        NS.newton_schulz_(u, coefficients, scratch, kernel="loop", use_gram=True)
    with pytest.raises(ValueError, match="'fastest'"):
        NS.newton_schulz(u, coefficients, torch.float32, method="fastest")
    with pytest.raises(ValueError, match="restarts"):
        NS.newton_schulz(u, coefficients, torch.float32, method="loop", restarts=(2,))


# ------------------------------------------------------------------ the chooser


def _params(shapes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


SHAPES_OPT = [(16, 48), (16, 48), (24, 24), (24, 24), (24, 24), (40, 8)]


def test_auto_measures_each_bucket_once_per_process(measured):
    """Plan time (construction) times every new bucket once; a second optimizer with the same
    buckets (Muon or NorMuon) measures nothing and gets the same choices; steps never time."""
    first = NorMuon(_params(SHAPES_OPT), ns_dtype="float32")
    # buckets: 2 x (16, 48), 3 x (24, 24), 1 x (40, 8) (one matrix, two kernels: gram, standard)
    assert sorted(measured) == sorted([(16, 48, 2), (24, 24, 3), (40, 8, 1)])
    choices = first.ns_kernel_choices()  # one per planned batch, here one per bucket
    assert [(c.m, c.n, c.count) for c in choices] == [(16, 48, 2), (24, 24, 3), (40, 8, 1)]
    assert all(c.source == "measured" and len(c.timings) >= 2 for c in choices)
    params = _params(SHAPES_OPT, seed=1)
    second = Muon(params, ns_dtype="float32")
    for t in range(2):
        _set_grads(params, t)
        second.step()
    assert len(measured) == 3
    assert [c.candidate for c in second.ns_kernel_choices()] == [c.candidate for c in choices]
    # Another dtype or step count is another bucket.
    NorMuon(_params(SHAPES_OPT[:1]), ns_dtype="float32", ns_steps=4)
    assert measured[-1] == (16, 48, 1) and len(measured) == 4


def test_candidates_offer_gram_only_where_it_pays():
    square = ns_kernels.candidates(24, 24, 3, torch.float32, "cpu")
    assert {c.kernel for c in square} == {"standard", "loop"}
    wide = ns_kernels.candidates(16, 48, 3, torch.float32, "cpu")
    assert {c.kernel for c in wide} == {"standard", "loop", "gram"}
    assert ns_kernels.shape_rule(16, 48, 3, torch.float32, "cpu") in wide
    assert ns_kernels.shape_rule(24, 24, 3, torch.float32, "cpu") in square
    assert {c.kernel for c in ns_kernels.candidates(16, 48, 1, torch.float32, "cpu")} == {
        "standard", "gram"}  # fmt: skip
    # CPU: a smaller chunk too where the default chunk holds more than a quarter budget.
    k = 256
    many = ns_kernels.candidates(k, k, 64, torch.float32, "cpu")
    chunks = {c.chunk for c in many if c.kernel == "standard"}
    assert chunks == {NS.cpu_chunk_size(k, k, torch.float32),
                      NS.CPU_CHUNK_BYTES // 4 // (k * k * 4)}  # fmt: skip
    # Elsewhere: the whole batch in one chunk.
    assert {c.chunk for c in ns_kernels.candidates(k, k, 64, torch.float32, "cuda")} == {64}


@pytest.mark.parametrize("mode", ["shape", *NS.KERNELS])
def test_fixed_choice_skips_measuring(mode, measured):
    params = _params(SHAPES_OPT)
    opt = NorMuon(params, ns_dtype="float32", ns_kernel=mode)
    _set_grads(params, 0)
    opt.step()
    assert measured == []
    choices = opt.ns_kernel_choices()
    for c in choices:
        if mode == "shape":
            assert c.source == "shape" and c.kernel == ("gram" if NS.prefers_gram(c.m, c.n)
                                                        else "standard")  # fmt: skip
        else:
            assert c.source == "fixed" and c.kernel == mode


@pytest.mark.parametrize("bad", ["fastest", "Gram", "", None, 1])
def test_invalid_fixed_choice_raises_naming_it(bad):
    with pytest.raises(ValueError, match=f"ns_kernel must be one of .*got {bad!r}"):
        NorMuon(_params([(8, 8)]), ns_kernel=bad)
    with pytest.raises(ValueError, match=repr(bad)):
        ns_kernels.choose(bad, 8, 8, 1, torch.float32, torch.device("cpu"),
                          NS.resolve_ns_coefficients("muon", 5), torch.float32)  # fmt: skip


@pytest.mark.parametrize(
    "loop_seconds,expected", [(0.5, "loop"), (0.96, "standard"), (1.0, "standard")]
)
def test_another_kernel_must_be_clearly_faster_than_the_rule(monkeypatch, loop_seconds, expected):
    """The shape rule's kernel (here the batched standard loop, 1 s) stays unless another
    candidate times SWITCH_MARGIN (5%) faster: a choice on noise would only move rounding."""

    def fake_measure(m, n, count, dtype, device, coefficients, input_dtype, options, reps=3):
        return tuple((c, loop_seconds if c.kernel == "loop" else 1.0) for c in options)

    monkeypatch.setattr(ns_kernels, "measure", fake_measure)
    choice = ns_kernels.choose("auto", 24, 24, 3, torch.float32, torch.device("cpu"),
                               NS.resolve_ns_coefficients("muon", 5), torch.float32)  # fmt: skip
    assert choice.kernel == expected and choice.source == "measured"


def _record_kernels(monkeypatch) -> list[str]:
    """The kernel of every newton_schulz_ call from now on (the calls still run)."""
    ran = []
    real = NS.newton_schulz_

    def recording(*args, kernel=None, **kwargs):
        ran.append(kernel)
        return real(*args, kernel=kernel, **kwargs)

    monkeypatch.setattr(NS, "newton_schulz_", recording)
    return ran


def test_the_fastest_candidate_is_chosen_and_run(monkeypatch):
    """With timings where the 2-D loop wins, the step runs the loop (seen at newton_schulz_)."""

    def fake_measure(m, n, count, dtype, device, coefficients, input_dtype, options, reps=3):
        return tuple((c, 1.0 if c.kernel == "loop" else 2.0) for c in options)

    monkeypatch.setattr(ns_kernels, "measure", fake_measure)
    ran = _record_kernels(monkeypatch)
    params = _params([(24, 24)] * 3)
    opt = NorMuon(params, ns_dtype="float32")
    _set_grads(params, 0)
    opt.step()
    assert ran == ["loop"]
    (choice,) = opt.ns_kernel_choices()
    assert choice.kernel == "loop" and "loop" in choice.describe() and "ms" in choice.describe()


def test_nothing_is_timed_inside_a_traced_step(monkeypatch, measured):
    """A bucket first met while torch.compile traces (here: fewer matrices, one has no
    gradient) runs the shape rule there, untimed and uncached; the next eager step times it."""
    params = _params([(16, 48), (16, 48)])
    opt = NorMuon(params, ns_dtype="float32")
    assert measured == [(16, 48, 2)]
    _set_grads(params, 0)
    params[1].grad = None
    ran = _record_kernels(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    opt.step()
    assert measured == [(16, 48, 2)] and ran == ["gram"]  # the shape rule at aspect 3
    monkeypatch.undo()
    monkeypatch.setattr(ns_kernels, "measure", _counting_into(measured))
    opt.step()
    assert measured == [(16, 48, 2), (16, 48, 1)]


def _counting_into(calls):
    real = ns_kernels.measure

    def counting(m, n, count, *args, **kwargs):
        calls.append((m, n, count))
        return real(m, n, count, *args, **kwargs)

    return counting


def test_meta_parameters_are_not_timed_and_prepare_capture_decides(measured):
    """No data on the meta device: nothing timed, the shape rule reported; prepare_capture
    decides every planned bucket of real parameters before the capture."""
    opt = NorMuon(_params([(16, 48)], device="meta"), ns_dtype="float32")
    assert measured == []
    assert [c.source for c in opt.ns_kernel_choices()] == ["shape"]
    params = _params([(16, 48), (16, 48), (24, 24)])
    opt = NorMuon(params, ns_dtype="float32")
    opt._pipeline.kernels.clear()
    opt._pipeline.kernel_choices.clear()
    opt.prepare_capture()
    assert {key[1:4] for key in opt._pipeline.kernels} == {(16, 48, 2), (24, 24, 1)}
    assert ns_kernels.cached_choices()  # timed (before the capture), not left to a step


# ------------------------------------------------------------------ the step, whatever is chosen

STEP_SHAPES = [(24, 8), (8, 24), (24, 8), (16, 16), (6, 3, 3, 3)]


def _reference_run(cls, mode, ns_dtype, steps=6):
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s in STEP_SHAPES]
    params = [torch.nn.Parameter(t.float().clone()) for t in init]
    opt = cls(params, lr=0.02, ns_dtype=ns_dtype, ns_kernel=mode)
    ref = ReferenceMatrixOptimizer([p.detach() for p in params], neuron_norm=cls is NorMuon)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in STEP_SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    return init, params, ref


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_step_matches_float64_reference_whatever_the_kernel(cls, mode):
    """float32 iterations: parameters within 1e-5 of the float64 reference optimizer (the
    fp32 Gram iteration's ~1e-5 relative error of O, times lr); bfloat16: the total update
    within 0.03 (tests/test_against_reference.py's bf16 bound)."""
    _, params, ref = _reference_run(cls, mode, "float32")
    for p, r in zip(params, ref.params):
        err = ((p.detach().double() - r).abs().max() / r.abs().max()).item()
        assert err < 1e-5, err
    init, params, ref = _reference_run(cls, mode, "bfloat16")
    for p, r, p0 in zip(params, ref.params, init):
        moved, moved_ref = p.detach().double() - p0, r - p0
        assert ((moved - moved_ref).norm() / moved_ref.norm()).item() < 0.03


@pytest.mark.parametrize("mode", MODES)
def test_no_host_reads_whatever_the_kernel(mode):
    """host_reads='never' steps read nothing on the host for any choice, including a step
    that meets (and times, on the CPU) a bucket for the first time."""
    params = _params([(16, 48), (16, 48), (24, 24), (40, 8)])
    opt = NorMuon(params, ns_dtype="float32", ns_kernel=mode, host_reads="never")
    _set_grads(params, 0)
    params[1].grad = None  # a bucket of one (16, 48) matrix, new to this process
    with NoHostReads():
        opt.step()
        _set_grads(params, 1)
        params[0].grad[0, 0] = float("nan")
        opt.step()


@pytest.fixture(scope="module")
def step_allocations():
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        from _common import step_allocations

        yield step_allocations
    finally:
        sys.path.remove(str(bench))


@pytest.mark.parametrize("mode", MODES)
def test_steady_step_allocates_no_more_whatever_the_kernel(mode, step_allocations):
    """After the first steps, a float32 step allocates at most 0.05x the parameter bytes
    (per-neuron vectors and flags; float32 products allocate no scratch): every kernel runs in
    the workspace's scratch."""
    params = _params([(128, 512), (128, 512), (256, 256), (256, 256), (512, 64)])
    opt = NorMuon(params, ns_dtype="float32", ns_kernel=mode)
    for t in range(2):
        _set_grads(params, t)
        opt.step()
    _set_grads(params, 2)
    total, in_gemm = step_allocations(opt.step)
    param_bytes = sum(p.numel() * 4 for p in params)
    assert in_gemm == 0 and total <= 0.05 * param_bytes, (total, param_bytes)

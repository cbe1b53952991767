"""The optimizer against the float64 reference of tests/reference.py, option by option."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference import ABLATIONS, ReferenceMatrixOptimizer

from normuon import Muon, NorMuon
from normuon.newton_schulz import resolve_ns_coefficients

STEPS = 10

# name -> (shapes, extra options)
CASES = {
    "square": ([(16, 16)], {}),
    "tall_wide": ([(24, 8), (8, 24), (24, 8)], {}),  # two same-shape matrices share a batch
    "conv": ([(6, 3, 3, 3)], {}),
    "stacked3d": ([(3, 10, 6)], {}),
    "split": ([(24, 8)], {"split_sizes": (8, 4, 12)}),
    "conv1d": ([(12, 4, 3)], {"layout": "conv"}),
    # (in, out) weights (Hugging Face Conv1D): 8 inputs, 24 output neurons split as fused QKV.
    "transposed": ([(8, 24), (24, 8), (8, 24)], {"layout": "transposed"}),
    "transposed_split": ([(8, 24)], {"layout": "transposed", "split_sizes": (8, 8, 8)}),
}


def _grads(shapes, steps, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(cls, shapes, opts, dtype, ns_dtype, seed=0, steps=STEPS):
    gen = torch.Generator().manual_seed(seed + 1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s in shapes]
    params = [torch.nn.Parameter(t.to(dtype).clone()) for t in init]
    opt = cls(params, ns_dtype=ns_dtype, **opts)
    ref_opts = {k: v for k, v in opts.items() if k not in ("ns_coefficients", "ns_steps")}
    coeffs = resolve_ns_coefficients(opts.get("ns_coefficients", "muon"), opts.get("ns_steps", 5))
    ref = ReferenceMatrixOptimizer(
        [p.detach() for p in params], neuron_norm=cls is NorMuon, coefficients=coeffs, **ref_opts
    )
    for grads in _grads(shapes, steps, seed, dtype):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    return params, ref, opt


def _rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


OPTION_GRID = list(
    itertools.product(
        ["preserve_norm", "adam_rms"], ["rows", "larger_dim"], [True, False], [0.0, 0.1]
    )
)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("update_scale,normalize,nesterov,weight_decay", OPTION_GRID)
def test_normuon_matches_reference_fp32(case, update_scale, normalize, nesterov, weight_decay):
    shapes, extra = CASES[case]
    opts = dict(
        lr=0.02, update_scale=update_scale, normalize=normalize, nesterov=nesterov,
        weight_decay=weight_decay, **extra,
    )  # fmt: skip
    params, ref, _ = _run(NorMuon, shapes, opts, torch.float32, torch.float32)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 2e-6


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("update_scale,nesterov", [("preserve_norm", True), ("adam_rms", False)])
def test_muon_matches_reference_fp32(case, update_scale, nesterov):
    shapes, extra = CASES[case]
    opts = dict(lr=0.02, update_scale=update_scale, nesterov=nesterov, weight_decay=0.05, **extra)
    params, ref, _ = _run(Muon, shapes, opts, torch.float32, torch.float32)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 2e-6


@pytest.mark.parametrize("case", ["square", "tall_wide", "split", "stacked3d"])
def test_float64_pipeline_is_exact(case):
    """With float64 parameters and NS, only summation order separates us from the reference."""
    shapes, extra = CASES[case]
    opts = dict(lr=0.02, normalize="larger_dim", update_scale="adam_rms", weight_decay=0.1, **extra)
    params, ref, opt = _run(NorMuon, shapes, opts, torch.float64, torch.float64)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 1e-12
    # State holds what the reference holds.
    for p, m in zip(params, ref.momentum):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], m, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("coeffs", ["polar_express", (3.0, -3.2, 1.2)])
def test_coefficient_options_match_reference(coeffs):
    opts = dict(lr=0.02, ns_coefficients=coeffs, ns_steps=6)
    params, ref, _ = _run(NorMuon, [(20, 12), (12, 20)], opts, torch.float32, torch.float32)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 2e-6


@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_bf16_newton_schulz_close_to_reference(cls):
    """bf16 NS carries ~3 significant digits; the updates stay within that of the reference."""
    shapes = [(32, 32), (32, 64)]
    params, ref, _ = _run(cls, shapes, {"lr": 0.02}, torch.float32, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for s in shapes]
    for p, r, p0 in zip(params, ref.params, init):
        moved_ref = r - p0  # compare the total update, not the parameter (which is mostly p0)
        moved = p.detach().double() - p0
        err = (moved - moved_ref).norm() / moved_ref.norm()
        assert err < 0.03, err


def test_bf16_parameters_follow_fp32_run():
    """bf16 parameters with float32 momentum track the float32 run to bf16 resolution."""
    shapes = [(32, 48)]
    p32, _, _ = _run(NorMuon, shapes, {"lr": 0.02}, torch.float32, torch.float32)
    p16, _, opt = _run(NorMuon, shapes, {"lr": 0.02}, torch.bfloat16, torch.float32)
    assert p16[0].dtype == torch.bfloat16
    assert opt.state[p16[0]]["momentum_buffer"].dtype == torch.float32
    assert opt.state[p16[0]]["neuron_second_moment"].dtype == torch.float32
    err = (p16[0].double() - p32[0].double()).abs().max() / p32[0].double().abs().max()
    assert err < 2e-2


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_cautious_weight_decay_matches_reference(case, cls):
    """Decay only where D * W >= 0 (arXiv 2510.12402), every layout; a large weight decay so
    that the mask matters, and the result differs from plain decay."""
    shapes, extra = CASES[case]
    opts = dict(lr=0.02, weight_decay=2.0, cautious_weight_decay=True, **extra)
    params, ref, _ = _run(cls, shapes, opts, torch.float32, torch.float32)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 2e-6
    plain, _, _ = _run(cls, shapes, dict(opts, cautious_weight_decay=False), torch.float32,
                       torch.float32)  # fmt: skip
    assert max(_rel_err(p.detach(), q.detach().double()) for p, q in zip(params, plain)) > 1e-3


@pytest.mark.parametrize("host_reads", ["auto", "never"])
def test_cautious_weight_decay_skips_a_nonfinite_matrix(host_reads):
    """A NaN gradient leaves the matrix untouched, its cautious decay included (device masks
    and host flags), while the other matrix decays cautiously."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in range(2)]
    opt = NorMuon(params, lr=0.1, weight_decay=1.0, cautious_weight_decay=True,
                  ns_dtype="float32", host_reads=host_reads)  # fmt: skip
    before = [p.detach().clone() for p in params]
    params[0].grad = torch.full((8, 6), float("nan"))
    params[1].grad = torch.randn(8, 6, generator=gen)
    opt.step()
    assert torch.equal(params[0].detach(), before[0])
    assert not torch.equal(params[1].detach(), before[1])
    assert opt.nonfinite_skips == 1


def test_adamw_groups_cautious_weight_decay_match_reference():
    from reference import adamw_reference

    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(7,), (4, 5)]]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = NorMuon([{"params": params, "algorithm": "adamw", "cautious_weight_decay": True}],
                  adamw_lr=1e-2, adamw_weight_decay=3.0)  # fmt: skip
    grads = _grads([(7,), (4, 5)], STEPS, seed=7, dtype=torch.float64)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    expected = adamw_reference(init, grads, 1e-2, (0.9, 0.95), 1e-8, 3.0, cautious=True)
    plain = adamw_reference(init, grads, 1e-2, (0.9, 0.95), 1e-8, 3.0)
    for p, r, q in zip(params, expected, plain):
        torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
        assert (r - q).abs().max() > 1e-3  # the mask changed something


# The paper's ablations (arXiv 2510.05491, Sec. 4.1.3 and App. A.2) as NorMuon options.
VARIANTS = {**ABLATIONS, "front_larger_dim": {"normalize_input": True, "normalize": "larger_dim"}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("update_scale", ["preserve_norm", "adam_rms"])
def test_ablation_variants_match_reference(case, variant, update_scale):
    shapes, extra = CASES[case]
    opts = dict(lr=0.02, update_scale=update_scale, weight_decay=0.1, **VARIANTS[variant],
                **extra)  # fmt: skip
    params, ref, _ = _run(NorMuon, shapes, opts, torch.float32, torch.float32)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 2e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ablation_variants_float64_exact(variant):
    # (in, out) weights split in three, tall and wide ones among them
    opts = dict(lr=0.02, layout="transposed", split_sizes=(4, 8, 12), **VARIANTS[variant])
    shapes = [(8, 24), (3, 24), (30, 24)]
    params, ref, _ = _run(NorMuon, shapes, opts, torch.float64, torch.float64)
    for p, r in zip(params, ref.params):
        assert _rel_err(p.detach(), r) < 1e-12


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ablation_variants_differ_from_normuon_and_muon(variant):
    """On tall and wide matrices every variant is its own algorithm (so the reference tests
    above can fail): its updates differ from NorMuon's and from Muon's."""
    shapes = [(24, 8), (8, 24)]
    ours, _, _ = _run(NorMuon, shapes, dict(lr=0.02, **VARIANTS[variant]), torch.float32,
                      torch.float32)  # fmt: skip
    for cls in (NorMuon, Muon):
        other, _, _ = _run(cls, shapes, {"lr": 0.02}, torch.float32, torch.float32)
        assert max(_rel_err(p.detach(), q.detach().double()) for p, q in zip(ours, other)) > 1e-3


def test_tall_only_is_normuon_on_tall_and_muon_on_wide():
    tall_wide = [(24, 8), (8, 24)]
    ours, _, _ = _run(NorMuon, tall_wide, {"normalize_matrices": "tall"}, torch.float64,
                      torch.float64)  # fmt: skip
    normuon, _, _ = _run(NorMuon, tall_wide, {}, torch.float64, torch.float64)
    muon, _, _ = _run(Muon, tall_wide, {}, torch.float64, torch.float64)
    torch.testing.assert_close(ours[0], normuon[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[1], muon[1], rtol=1e-12, atol=0)


def test_ablation_state_sizes():
    """Muon+Adam keeps a second moment shaped like each parameter (2mn with the momentum);
    the others NorMuon's m entries per matrix."""
    shapes = [(24, 8), (4, 6, 5), (8, 24)]
    for opts, key, expected in [
        ({"normalize": "elements"}, "element_second_moment", shapes),
        ({"normalize_input": True}, "neuron_second_moment", [(24,), (4, 6), (8,)]),
        ({"normalize_matrices": "tall"}, "neuron_second_moment", [(24,), (4, 6), (8,)]),
        ({"beta2": 0.0}, "neuron_second_moment", [(24,), (4, 6), (8,)]),
    ]:
        params, _, opt = _run(NorMuon, shapes, opts, torch.float32, torch.float32, steps=1)
        for p, shape in zip(params, expected):
            assert sorted(opt.state[p]) == sorted(["momentum_buffer", key])
            assert tuple(opt.state[p][key].shape) == tuple(shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("host_reads", ["auto", "never"])
def test_ablation_variants_skip_a_nonfinite_matrix(variant, host_reads):
    """A NaN gradient leaves its matrix and its state untouched under every variant."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(8, 6, generator=gen)) for _ in range(2)]
    opt = NorMuon(params, lr=0.1, ns_dtype="float32", host_reads=host_reads, **VARIANTS[variant])
    for p in params:
        p.grad = torch.randn(8, 6, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    params[0].grad = torch.full((8, 6), float("nan"))
    params[1].grad = torch.randn(8, 6, generator=gen)
    opt.step()
    assert torch.equal(params[0].detach(), before[0])
    for k, v in state.items():
        assert torch.equal(opt.state[params[0]][k], v), k
    assert not torch.equal(params[1].detach(), before[1])
    assert opt.nonfinite_skips == 1

"""``algorithm="adamw"`` groups: the same numbers as torch.optim.AdamW, float32 state for bf16."""

from __future__ import annotations

import pytest
import torch

from normuon import Muon, NorMuon

BOTH = [NorMuon, Muon]
STEPS = 10
SHAPES = [(), (7,), (5, 3), (2, 3, 4), (4, 2, 3, 3)]
HYPER = [
    dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
    dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
    dict(lr=5e-3, betas=(0.0, 0.5), eps=1e-10, weight_decay=1.0),
]


def _params(shapes, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


def _grads(shapes, seed, steps=STEPS):
    gen = torch.Generator().manual_seed(seed + 1000)
    # Gradients of very different scales per step, as a real run has.
    return [
        [torch.randn(s, generator=gen) * 10.0 ** (k % 3 - 1) for s in shapes] for k in range(steps)
    ]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("hyper", HYPER, ids=[f"h{i}" for i in range(len(HYPER))])
@pytest.mark.parametrize("how", ["group_options", "class_defaults"])
def test_matches_torch_adamw(cls, hyper, how):
    init = _params(SHAPES, seed=3)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    matrix = torch.nn.Parameter(torch.randn(6, 6))
    if how == "group_options":
        opt = cls([{"params": [matrix]}, {"params": ours, "algorithm": "adamw", **hyper}])
    else:
        opt = cls(
            [{"params": [matrix]}, {"params": ours, "algorithm": "adamw"}],
            **{f"adamw_{k}": v for k, v in hyper.items()},
        )
    ref = torch.optim.AdamW(theirs, foreach=False, **hyper)
    for grads in _grads(SHAPES, seed=3):
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.clone()
            q.grad = g.clone()
        matrix.grad = torch.randn(6, 6)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert p.shape == q.shape
        assert _rel(p, q) < 1e-6, (p.shape, _rel(p, q))
        s, t = opt.state[p], ref.state[q]
        assert _rel(s["exp_avg"], t["exp_avg"]) < 1e-6
        assert _rel(s["exp_avg_sq"], t["exp_avg_sq"]) < 1e-6
        assert float(s["step"]) == STEPS


@pytest.mark.parametrize("cls", BOTH)
def test_adamw_only_group_and_group_order(cls):
    """The AdamW group may come first; a group's options are its own."""
    a, b = _params([(4, 4), (4,)], seed=5), _params([(3,)], seed=6)
    ours_a = [torch.nn.Parameter(t.clone()) for t in a]
    ours_b = [torch.nn.Parameter(t.clone()) for t in b]
    ref_a = [torch.nn.Parameter(t.clone()) for t in a]
    ref_b = [torch.nn.Parameter(t.clone()) for t in b]
    matrix = torch.nn.Parameter(torch.randn(5, 5))
    opt = cls(
        [
            {"params": ours_a, "algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.1},
            {"params": [matrix]},
            {"params": ours_b, "algorithm": "adamw", "lr": 1e-3, "betas": (0.5, 0.9)},
        ]
    )
    ref = torch.optim.AdamW(
        [
            {"params": ref_a, "lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.95)},
            {"params": ref_b, "lr": 1e-3, "betas": (0.5, 0.9), "weight_decay": 0.0},
        ],
        eps=1e-8,
    )
    gens = _grads([(4, 4), (4,), (3,)], seed=5)
    for g in gens:
        for p, q, gg in zip(ours_a + ours_b, ref_a + ref_b, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours_a + ours_b, ref_a + ref_b):
        assert _rel(p, q) < 1e-6


@pytest.mark.parametrize("cls", BOTH)
def test_adamw_defaults_documented(cls):
    """Class defaults of AdamW groups: betas (0.9, 0.95) (docs/algorithm.md), no weight decay."""
    opt = cls([{"params": [torch.nn.Parameter(torch.randn(3, 3))]},
               {"params": [torch.nn.Parameter(torch.randn(3))], "algorithm": "adamw"}])
    group = opt.param_groups[1]
    assert group["betas"] == (0.9, 0.95)
    assert group["weight_decay"] == 0.0
    assert set(group) >= {"lr", "betas", "eps", "weight_decay", "params", "algorithm"}
    # matrix options do not leak into the AdamW group
    assert "momentum" not in group and "ns_steps" not in group


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_float32_state(cls, dtype):
    shapes = [(7,), (5, 3)]
    params = [torch.nn.Parameter(t) for t in _params(shapes, seed=9, dtype=dtype)]
    opt = cls([{"params": [torch.nn.Parameter(torch.randn(4, 4))]},
               {"params": params, "algorithm": "adamw", "lr": 1e-2, "weight_decay": 0.1}])
    beta1, beta2 = opt.param_groups[1]["betas"]
    # float32 master copies updated with torch's AdamW: the bf16 run follows them closely.
    masters = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    ref = torch.optim.AdamW(masters, lr=1e-2, betas=(beta1, beta2), eps=1e-8, weight_decay=0.1)
    exp_avg = [torch.zeros(s) for s in shapes]
    for grads in _grads(shapes, seed=9, steps=5):
        for p, q, g, m in zip(params, masters, grads, exp_avg):
            p.grad = g.to(dtype)
            q.grad = g.to(dtype).float()
            m.lerp_(g.to(dtype).float(), 1 - beta1)
        opt.step()
        ref.step()
    for p, q, m in zip(params, masters, exp_avg):
        state = opt.state[p]
        assert p.dtype == dtype
        assert state["exp_avg"].dtype == torch.float32
        assert state["exp_avg_sq"].dtype == torch.float32
        # The moments are float32 EMAs of the (exactly representable) low-precision gradients.
        torch.testing.assert_close(state["exp_avg"], m, rtol=0, atol=0)
        # Parameter: within a few low-precision roundings of the float32 trajectory.
        unit = torch.finfo(dtype).eps
        assert (p.float() - q).abs().max() <= 8 * unit * q.abs().max() + 1e-6


@pytest.mark.parametrize("cls", BOTH)
def test_float64_params_keep_float64_state(cls):
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = cls([{"params": [torch.nn.Parameter(torch.randn(3, 3))]},
               {"params": [p], "algorithm": "adamw"}])
    p.grad = torch.randn(5, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64
    assert opt.state[p]["exp_avg_sq"].dtype == torch.float64
    assert opt.state[p]["step"].dtype == torch.float32


@pytest.mark.parametrize("cls", BOTH)
def test_adamw_state_keys(cls):
    p = torch.nn.Parameter(torch.randn(5))
    opt = cls([{"params": [torch.nn.Parameter(torch.randn(3, 3))]},
               {"params": [p], "algorithm": "adamw"}])
    assert len(opt.state) == 0
    p.grad = torch.randn(5)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[p]["step"].ndim == 0 and float(opt.state[p]["step"]) == 1.0


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("shape", [(16, 8), (3, 4, 5), (6, 2, 3, 3)])
def test_matrices_in_adamw_group_are_plain_adamw(cls, shape):
    """A 2-D+ parameter routed to AdamW (embedding, head) gets AdamW, no orthogonalization."""
    init = torch.randn(shape)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = cls([{"params": [ours], "algorithm": "adamw", "lr": 1e-3}])
    ref = torch.optim.AdamW([theirs], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for (g,) in _grads([shape], seed=11):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert _rel(ours, theirs) < 1e-6
    assert "momentum_buffer" not in opt.state[ours]


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_second_moment_is_float32_ema_of_squares(cls, dtype):
    """float32 state is only worth having if g*g is formed in float32: squaring a bf16 gradient
    in bf16 rounds every term of the EMA to 8 bits (relative error up to 2**-9)."""
    shape = (64,)
    p = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = cls([{"params": [torch.nn.Parameter(torch.randn(4, 4))]},
               {"params": [p], "algorithm": "adamw"}])
    beta2 = opt.param_groups[1]["betas"][1]
    v = torch.zeros(shape)
    for (g,) in _grads([shape], seed=12, steps=4):
        p.grad = g.to(dtype)
        v.mul_(beta2).addcmul_(p.grad.float(), p.grad.float(), value=1 - beta2)
        opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-5, atol=0)

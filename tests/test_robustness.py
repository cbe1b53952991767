"""Robustness: missing grads, NaN/Inf gradients, low precision, resume, LR schedulers, compile."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from normuon import Muon, NorMuon, param_groups

BOTH = [NorMuon, Muon]


@pytest.fixture(params=["host_flags", "device_masks"])
def flag_path(request, monkeypatch):
    """Both ways a skipped parameter is left alone: flags read on the host (CPU tensors) and
    dropped parameters, or flags kept on the device and every tensor masked (accelerators,
    ``host_reads="never"``): every optimizer the test builds gets that ``host_reads``."""
    reads = "auto" if request.param == "host_flags" else "never"
    for cls in BOTH:
        original = cls.__init__

        def init(self, params, *args, _original=original, **kwargs):
            kwargs.setdefault("host_reads", reads)
            _original(self, params, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", init)
    return request.param


# ------------------------------------------------------------------ helpers

# (name, shape, group) -- w1/w2 share a Newton-Schulz bucket; conv is 4-D; b* are AdamW.
LAYOUT = [
    ("w1", (8, 4), "matrix"),
    ("w2", (8, 4), "matrix"),
    ("w3", (6, 6), "matrix"),
    ("conv", (4, 2, 3, 3), "matrix"),
    ("b1", (5,), "adamw"),
    ("b2", (3, 4), "adamw"),
]
NAMES = [n for n, _, _ in LAYOUT]


def _make(cls, dtype=torch.float32, seed=0, adamw_first=False, **opts):
    gen = torch.Generator().manual_seed(seed)
    params = {n: nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for n, s, _ in LAYOUT}
    groups = [
        {"params": [params[n] for n, _, g in LAYOUT if g == "matrix"], "weight_decay": 0.1},
        {"params": [params[n] for n, _, g in LAYOUT if g == "adamw"], "algorithm": "adamw",
         "weight_decay": 0.1, "lr": 1e-2},
    ]  # fmt: skip
    if adamw_first:
        groups.reverse()
    opts.setdefault("ns_dtype", torch.float32)
    return params, cls(groups, **opts)


def _grad(step, name, shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + NAMES.index(name))
    return torch.randn(shape, generator=gen).to(dtype)


def _set_grads(params, step, dtype=torch.float32, skip=(), override=None):
    for n, s, _ in LAYOUT:
        if n in skip:
            params[n].grad = None
        else:
            params[n].grad = _grad(step, n, s, dtype)
    if override:
        for n, g in override.items():
            params[n].grad = g


def _snapshot(opt, params):
    snap = {}
    for n, p in params.items():
        snap[n] = p.detach().clone()
        for k, v in opt.state.get(p, {}).items():
            snap[(n, k)] = v.clone() if isinstance(v, torch.Tensor) else v
    return snap


def _state_of(opt, p):
    return {k: v.clone() for k, v in opt.state.get(p, {}).items()}


# ------------------------------------------------------------------ parameters without grad


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("missing", [("w1",), ("w3", "b1"), ("conv", "b2", "w2")])
def test_params_without_grad_are_skipped(cls, missing):
    params, opt = _make(cls)
    before = {n: p.detach().clone() for n, p in params.items()}
    for step in range(3):
        _set_grads(params, step, skip=missing)
        opt.step()
    for n, p in params.items():
        if n in missing:
            assert torch.equal(p, before[n]), f"{n} changed (weight decay applied?)"
            assert p not in opt.state or not opt.state[p], f"{n} got state"
        else:
            assert not torch.equal(p, before[n])
    assert opt.nonfinite_skips == 0


@pytest.mark.parametrize("cls", BOTH)
def test_frozen_param_in_group(cls):
    """requires_grad=False parameters in a group never get a grad: untouched, no state."""
    frozen = nn.Parameter(torch.randn(5, 5), requires_grad=False)
    live = nn.Parameter(torch.randn(5, 5))
    opt = cls([frozen, live], weight_decay=0.5)
    ref = frozen.detach().clone()
    live.grad = torch.randn(5, 5)
    opt.step()
    assert torch.equal(frozen, ref) and frozen not in opt.state


@pytest.mark.parametrize("cls", BOTH)
def test_step_without_any_grad_is_noop(cls):
    params, opt = _make(cls)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert len(opt.state) == 0


# ------------------------------------------------------------------ non-finite gradients


def _poison(shape, value, whole):
    g = _grad(99, "w1", shape)
    if whole:
        return torch.full(shape, value)
    g.view(-1)[g.numel() // 2] = value
    return g


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("target", ["w1", "w3", "conv", "b1", "b2"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("bad_step", [0, 2])
def test_nonfinite_grad_skips_only_that_param(flag_path, cls, target, value, bad_step):
    """The poisoned parameter and its state stay bitwise unchanged for that step; the other
    parameters update exactly as in a run where the poisoned parameter had no gradient."""
    shape = dict((n, s) for n, s, _ in LAYOUT)[target]
    params, opt = _make(cls, nesterov=True)
    ref_params, ref = _make(cls, nesterov=True)
    for step in range(4):
        if step == bad_step:
            snap = _snapshot(opt, params)
            bad = _poison(shape, value, whole=step == 0)
            _set_grads(params, step, override={target: bad})
            _set_grads(ref_params, step, skip=(target,))
        else:
            _set_grads(params, step)
            _set_grads(ref_params, step)
        opt.step()
        ref.step()
        if step == bad_step:
            assert torch.equal(params[target], snap[target])
            state = _state_of(opt, params[target])
            if bad_step == 0:
                # State created on the skipped step must still be the initial (zero) state.
                assert all(v.abs().max() == 0 for v in state.values()), state
            else:
                for k, v in state.items():
                    assert torch.equal(v, snap[(target, k)]), k
            assert opt.nonfinite_skips == 1
        for n in NAMES:
            torch.testing.assert_close(params[n], ref_params[n], rtol=1e-6, atol=1e-7)
    for n in NAMES:
        assert torch.isfinite(params[n]).all()
        for v in opt.state[params[n]].values():
            assert torch.isfinite(v).all()
    assert opt.nonfinite_skips == 1
    assert ref.nonfinite_skips == 0


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("target", ["w2", "b2"])
def test_first_step_skipped_then_normal_step_equals_fresh_first_step(flag_path, cls, target):
    """After a skipped first step, the next finite step is an ordinary first step (AdamW's
    bias correction counts only real steps; momentum and second moment start from zero)."""
    params, opt = _make(cls)
    fresh_params, fresh = _make(cls)
    shape = dict((n, s) for n, s, _ in LAYOUT)[target]
    _set_grads(params, 0, override={target: torch.full(shape, math.nan)})
    opt.step()
    _set_grads(params, 1)
    opt.step()
    _set_grads(fresh_params, 1, skip=[n for n in NAMES if n != target])
    fresh.step()
    assert torch.equal(params[target], fresh_params[target])
    for k, v in opt.state[params[target]].items():
        assert torch.equal(v, fresh.state[fresh_params[target]][k]), k


@pytest.mark.parametrize("cls", BOTH)
def test_nonfinite_skips_counts_every_skipped_param_step(flag_path, cls):
    params, opt = _make(cls)
    _set_grads(params, 0, override={"w1": torch.full((8, 4), math.nan),
                                    "b1": torch.full((5,), math.inf)})  # fmt: skip
    opt.step()
    assert opt.nonfinite_skips == 2
    _set_grads(params, 1)
    opt.step()
    assert opt.nonfinite_skips == 2
    _set_grads(params, 2, override={"conv": torch.full((4, 2, 3, 3), -math.inf)})
    opt.step()
    assert opt.nonfinite_skips == 3


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_skip_low_precision(flag_path, cls, dtype):
    params, opt = _make(cls, dtype=dtype)
    _set_grads(params, 0, dtype=dtype)
    opt.step()
    snap = _snapshot(opt, params)
    bad = _grad(1, "w1", (8, 4), dtype)
    bad[0, 0] = math.inf
    _set_grads(params, 1, dtype=dtype, override={"w1": bad})
    opt.step()
    assert torch.equal(params["w1"], snap["w1"])
    for k, v in opt.state[params["w1"]].items():
        assert torch.equal(v, snap[("w1", k)])
    assert not torch.equal(params["w2"], snap["w2"])
    assert opt.nonfinite_skips == 1


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("target", ["w1", "w3", "conv"])
def test_nonfinite_raise_within_matrix_group(cls, target):
    params, opt = _make(cls, nonfinite_grads="raise")
    _set_grads(params, 0)
    opt.step()
    snap = _snapshot(opt, params)
    shape = dict((n, s) for n, s, _ in LAYOUT)[target]
    _set_grads(params, 1, override={target: _poison(shape, math.nan, whole=False)})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in param_groups\[0\]"):
        opt.step()
    after = _snapshot(opt, params)
    assert snap.keys() == after.keys()
    for k in snap:
        assert torch.equal(snap[k], after[k]), k


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("target", ["w1", "b2"])
def test_nonfinite_raise_before_anything_changes(cls, target):
    """A NaN anywhere raises before *any* parameter or state changes, whichever group it is in
    and whichever group comes first."""
    # AdamW group first for a NaN in a matrix: either way, the bad group comes second.
    params, opt = _make(cls, nonfinite_grads="raise", adamw_first=target == "w1")
    _set_grads(params, 0)
    opt.step()
    snap = _snapshot(opt, params)
    shape = dict((n, s) for n, s, _ in LAYOUT)[target]
    _set_grads(params, 1, override={target: _poison(shape, math.inf, whole=False)})
    with pytest.raises(FloatingPointError, match=r"non-finite gradient"):
        opt.step()
    after = _snapshot(opt, params)
    changed = [k for k in snap if not torch.equal(snap[k], after[k])]
    assert not changed, f"changed before raising: {changed}"


# ------------------------------------------------------------------ low precision


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_bf16_momentum_is_exact_float32_ema(cls, nesterov, ns_dtype):
    """bf16 params keep float32 momentum equal to the EMA of the gradients, bit for bit: the
    Newton-Schulz input never aliases the buffer (torch.optim.Muon 2.13 normalizes it in place
    for bf16 parameters with nesterov=False)."""
    params, opt = _make(cls, dtype=torch.bfloat16, nesterov=nesterov, ns_dtype=ns_dtype)
    beta1 = opt.param_groups[0]["momentum"]
    matrices = [n for n, _, g in LAYOUT if g == "matrix"]
    ema = {n: torch.zeros(params[n].shape) for n in matrices}
    for step in range(4):
        _set_grads(params, step, dtype=torch.bfloat16)
        grads_before = {n: params[n].grad.clone() for n in NAMES}
        for n in matrices:
            ema[n].lerp_(params[n].grad.float(), 1 - beta1)
        opt.step()
        for n in NAMES:
            assert torch.equal(params[n].grad, grads_before[n]), f"grad of {n} modified"
        for n in matrices:
            state = opt.state[params[n]]
            buf = state["momentum_buffer"]
            assert buf.dtype == torch.float32 and params[n].dtype == torch.bfloat16
            assert torch.equal(buf, ema[n]), f"momentum of {n} is not the EMA of its grads"
            assert buf.data_ptr() != params[n].data_ptr()
            if cls is NorMuon:
                assert state["neuron_second_moment"].dtype == torch.float32
    for p in params.values():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("nesterov", [False, True])
def test_float32_momentum_is_exact_ema(cls, nesterov):
    params, opt = _make(cls, nesterov=nesterov)
    beta1 = opt.param_groups[0]["momentum"]
    ema = torch.zeros(8, 4)
    for step in range(3):
        _set_grads(params, step)
        ema.lerp_(params["w1"].grad, 1 - beta1)
        opt.step()
    assert torch.equal(opt.state[params["w1"]]["momentum_buffer"], ema)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_track_float32_run(cls, dtype):
    params, opt = _make(cls, dtype=dtype, ns_dtype=torch.float32)
    ref_params, ref = _make(cls, dtype=torch.float32, ns_dtype=torch.float32)
    for n in NAMES:  # same starting point
        with torch.no_grad():
            ref_params[n].copy_(params[n].float())
    for step in range(3):
        _set_grads(params, step, dtype=dtype)
        for n in NAMES:
            ref_params[n].grad = params[n].grad.float()
        opt.step()
        ref.step()
    for n in NAMES:
        assert params[n].dtype == dtype
        diff = (params[n].float() - ref_params[n]).abs().max().item()
        # each step rounds the parameter once to the low-precision grid (and the updates are
        # computed from slightly different parameters for weight decay): a few ulps of the max
        scale = ref_params[n].abs().max().item()
        assert diff <= 6 * torch.finfo(dtype).eps * scale, (n, diff, scale)


# ------------------------------------------------------------------ resume


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 13)

    def forward(self, idx):
        h = self.emb(idx)  # (B, T, 8)
        h = self.fc2(torch.relu(self.norm(self.fc1(h))))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


def _loss(model, step):
    gen = torch.Generator().manual_seed(step)
    idx = torch.randint(0, 13, (3, 5), generator=gen)
    target = torch.randint(0, 13, (3, 5), generator=gen)
    logits = model(idx).float()
    return nn.functional.cross_entropy(logits.reshape(-1, 13), target.reshape(-1))


def _build(cls, dtype, sched_kind, seed):
    torch.manual_seed(seed)
    model = Tiny().to(dtype)
    opt = cls(param_groups(model, weight_decay=0.05, adamw_weight_decay=0.01, adamw_lr=3e-3),
              lr=0.03, ns_dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16)
    if sched_kind == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + s))
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=1e-4)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for step in steps:
        opt.zero_grad(set_to_none=True)
        _loss(model, step).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sched_kind", ["lambda", "cosine"])
@pytest.mark.parametrize("through_bytes", [False, True])
def test_resume_is_bit_identical(cls, dtype, sched_kind, through_bytes):
    k, total = 3, 6
    model, opt, sched = _build(cls, dtype, sched_kind, seed=0)
    _train(model, opt, sched, range(total))  # uninterrupted

    model_a, opt_a, sched_a = _build(cls, dtype, sched_kind, seed=0)
    _train(model_a, opt_a, sched_a, range(k))
    checkpoint = {
        "model": model_a.state_dict(),
        "opt": opt_a.state_dict(),
        "sched": sched_a.state_dict(),
    }
    if through_bytes:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        buf.seek(0)
        checkpoint = torch.load(buf, weights_only=True)
    else:
        checkpoint = copy.deepcopy(checkpoint)
    del model_a, opt_a, sched_a

    model_b, opt_b, sched_b = _build(cls, dtype, sched_kind, seed=123)  # other init
    model_b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    sched_b.load_state_dict(checkpoint["sched"])
    for p in model_b.parameters():
        st = opt_b.state[p]
        for key in ("momentum_buffer", "neuron_second_moment", "exp_avg", "exp_avg_sq"):
            if key in st:
                expected = torch.float32 if dtype == torch.bfloat16 else dtype
                assert st[key].dtype == expected, (key, st[key].dtype)
    _train(model_b, opt_b, sched_b, range(k, total))

    for (name, p), q in zip(model.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), f"{name} differs after resume"
    for g1, g2 in zip(opt.param_groups, opt_b.param_groups):
        assert g1["lr"] == g2["lr"]
    for p, q in zip(model.parameters(), model_b.parameters()):
        s1, s2 = opt.state[p], opt_b.state[q]
        assert s1.keys() == s2.keys()
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key


@pytest.mark.parametrize("cls", BOTH)
def test_state_dict_contents(cls):
    model, opt, sched = _build(cls, torch.float32, "lambda", seed=0)
    _train(model, opt, sched, range(1))
    sd = opt.state_dict()
    fc1 = [i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])
           if p is model.fc1.weight][0]  # fmt: skip
    keys = set(sd["state"][fc1])
    assert keys == ({"momentum_buffer", "neuron_second_moment"} if cls is NorMuon
                    else {"momentum_buffer"})  # fmt: skip
    if cls is NorMuon:
        assert sd["state"][fc1]["neuron_second_moment"].shape == (16,)
    algorithms = [g["algorithm"] for g in sd["param_groups"]]
    assert "adamw" in algorithms and cls.__name__.lower() in algorithms


# ------------------------------------------------------------------ LR schedulers


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("factor", [0.25, 0.0])
def test_scheduler_lr_is_used_by_step(cls, factor):
    """First step with weight_decay=0: the update is -lr * D with D independent of lr, so a
    scheduler factor scales the parameter change exactly (float64 to leave no rounding)."""
    deltas = []
    for use_sched in (False, True):
        params, opt = _make(cls, dtype=torch.float64, ns_dtype=torch.float64)
        for g in opt.param_groups:
            g["weight_decay"] = 0.0
        if use_sched:
            torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * factor)
            assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 * factor)
        before = {n: p.detach().clone() for n, p in params.items()}
        _set_grads(params, 0, dtype=torch.float64)
        opt.step()
        deltas.append({n: params[n].detach() - before[n] for n in NAMES})
    for n in NAMES:
        assert deltas[0][n].abs().max() > 0
        torch.testing.assert_close(deltas[1][n], factor * deltas[0][n], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("cls", BOTH)
def test_cosine_schedule_equals_manual_lr(cls):
    t_max, eta_min = 4, 1e-4
    params, opt = _make(cls)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
    manual_params, manual = _make(cls)
    bases = [g["lr"] for g in manual.param_groups]
    for step in range(6):
        for g, base in zip(manual.param_groups, bases):
            g["lr"] = eta_min + (base - eta_min) * (1 + math.cos(math.pi * step / t_max)) / 2
        for g, m in zip(opt.param_groups, manual.param_groups):
            assert g["lr"] == pytest.approx(m["lr"], rel=1e-12)
        _set_grads(params, step)
        _set_grads(manual_params, step)
        opt.step()
        manual.step()
        sched.step()
        for n in NAMES:
            torch.testing.assert_close(params[n], manual_params[n], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ torch.compile


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("cls", [NorMuon])
def test_torch_compile_training_step(cls):
    torch.manual_seed(0)
    eager_model = MLP()
    compiled_model = copy.deepcopy(eager_model)
    x = torch.randn(4, 6)
    y = torch.randn(4, 3)

    def make_step(model):
        opt = cls(param_groups(model, weight_decay=0.01), ns_dtype=torch.float32)

        def train_step():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return opt, train_step

    eager_opt, eager_step = make_step(eager_model)
    compiled_opt, raw_step = make_step(compiled_model)
    # One eager step first creates the optimizer state, so the compiled function is traced
    # once (state creation would otherwise force a second compilation: too slow on CPU).
    eager_step()
    raw_step()
    compiled_step = torch.compile(raw_step)
    for _ in range(3):
        eager_step()
        compiled_step()
    for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5, msg=name)
    assert compiled_opt.nonfinite_skips == eager_opt.nonfinite_skips == 0


# ------------------------------------------------------------------ an all-zero update


@pytest.mark.parametrize("cls", [Muon, NorMuon])
@pytest.mark.parametrize("update_scale", ["preserve_norm", "adam_rms"])
def test_exactly_zero_gradient_leaves_the_matrix_unchanged(cls, update_scale):
    """A matrix behind a zero-initialised projection gets an exactly zero gradient at step 0:
    its update is zero, not NaN (Muon's adam_rms scale divided by a zero norm gave inf * 0), and
    it trains normally once its gradient is not zero."""
    torch.manual_seed(0)
    # (64, 16): 0.2 sqrt(64 * 16) / float32's tiny overflows to inf (a small matrix did not).
    w = nn.Parameter(torch.randn(64, 16))
    other = nn.Parameter(torch.randn(4, 4))
    opt = cls([w, other], lr=0.02, update_scale=update_scale)
    before = w.detach().clone()
    w.grad, other.grad = torch.zeros(64, 16), torch.randn(4, 4)
    opt.step()
    assert torch.equal(w, before) and torch.isfinite(other).all()
    w.grad, other.grad = torch.randn(64, 16), torch.randn(4, 4)
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w, before)


# ------------------------------------------------------------------ eps = 0 (valid option)


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_normuon_eps_zero_with_dead_neuron_stays_finite(ns_dtype):
    """eps=0 passes validation ("eps must be >= 0"), so a neuron whose gradient rows have always
    been zero (a dead ReLU unit) must not turn the whole matrix into NaN."""
    w = nn.Parameter(torch.randn(6, 4))
    opt = NorMuon([w], eps=0.0, ns_dtype=ns_dtype)
    for step in range(2):
        g = _grad(step, "w1", (6, 4))
        g[2] = 0.0
        w.grad = g
        opt.step()
    assert torch.isfinite(w).all()


def test_adamw_eps_zero_first_step_skip_leaves_param_unchanged(flag_path):
    """With eps=0 (valid), a parameter whose first gradient is NaN must still be left bitwise
    unchanged, as nonfinite_grads='skip' promises."""
    w = nn.Parameter(torch.randn(4, 4))
    b = nn.Parameter(torch.randn(3))
    opt = NorMuon([{"params": [w]}, {"params": [b], "algorithm": "adamw", "eps": 0.0}])
    before = b.detach().clone()
    w.grad = torch.randn(4, 4)
    b.grad = torch.full((3,), math.nan)
    opt.step()
    assert opt.nonfinite_skips == 1
    assert torch.equal(b, before), b


@pytest.mark.parametrize("normalize", ["rows", "elements"])
def test_state_loaded_in_another_memory_format_is_still_updated(normalize):
    """Matrix state saved channels_last (a conv kernel's momentum, Muon+Adam's per-weight
    second moment) is loaded contiguous: a step reads it through (B, m, n) views, and a
    reshape of a non-contiguous tensor would be a copy whose update is lost."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 3, 3, 3, generator=gen))
    opt = NorMuon([p], normalize=normalize, ns_dtype="float32")
    grads = [torch.randn(6, 3, 3, 3, generator=gen) for _ in range(4)]
    for g in grads[:2]:
        p.grad = g.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict() shares the live state's dicts
    for key, value in saved["state"][0].items():
        if value.ndim == 4:
            saved["state"][0][key] = value.to(memory_format=torch.channels_last)
    q = torch.nn.Parameter(p.detach().clone())
    other = NorMuon([q], normalize=normalize, ns_dtype="float32")
    other.load_state_dict(saved)
    for g in grads[2:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    torch.testing.assert_close(q, p, rtol=0, atol=0)
    for key, value in opt.state[p].items():
        torch.testing.assert_close(other.state[q][key], value, rtol=0, atol=0)

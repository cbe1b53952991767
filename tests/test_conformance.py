"""torch.optim conformance: the properties torch's generic optimizer tests check, for NorMuon
and Muon with matrix and AdamW groups, plus safe ``load_state_dict`` and AdamW under overflow.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from reference import ReferenceMatrixOptimizer, adamw_reference

from normuon import Muon, NorMuon
from normuon.newton_schulz import default_orthogonalizer

CLASSES = [NorMuon, Muon]
# (8, 6) matrix, (4, 2, 3, 3) conv kernel: matrix groups; (5, 4) embedding and (6,) bias: AdamW.
MATRIX_SHAPES = [(8, 6), (4, 2, 3, 3)]
ADAMW_SHAPES = [(5, 4), (6,)]


def _tensors(shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _params(dtype=torch.float32, seed=0):
    return [torch.nn.Parameter(t) for t in _tensors(MATRIX_SHAPES + ADAMW_SHAPES, dtype, seed)]


def _groups(params, **adamw):
    return [
        {"params": params[:2]},
        {"params": params[2:], "algorithm": "adamw", **adamw},
    ]


def _make(cls, params, **options):
    return cls(_groups(params), **{"ns_dtype": "float32", **options})


def _set_grads(params, step, scale=1.0):
    grads = _tensors([tuple(p.shape) for p in params], torch.float64, seed=100 + step)
    for p, g in zip(params, grads):
        p.grad = (g * scale).to(p.dtype)


def _run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        _set_grads(params, t)
        opt.step()


def _assert_all_equal(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), **(tol or {"rtol": 0, "atol": 0}))


def _snapshot(opt):
    """Everything load_state_dict could change: state tensors and group entries (by position)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in params
        if p in opt.state
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, copy.deepcopy(groups), [[id(p) for p in g["params"]] for g in opt.param_groups]


def _assert_snapshot_equal(before, after):
    (s0, g0, ids0), (s1, g1, ids1) = before, after
    assert g0 == g1 and ids0 == ids1
    assert len(s0) == len(s1)
    for a, b in zip(s0, s1):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------ hyperparameters


@pytest.mark.parametrize("cls", CLASSES)
def test_tensor_lr_equals_float_lr(cls):
    params_f, params_t = _params(), _params()
    opt_f = cls(_groups(params_f, lr=1e-3), lr=0.02, ns_dtype="float32")
    opt_t = cls(
        _groups(params_t, lr=torch.tensor(1e-3)), lr=torch.tensor(0.02), ns_dtype="float32"
    )
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)
    _run(opt_f, params_f, 3)
    _run(opt_t, params_t, 3)
    # A Tensor lr is never read on the host: it scales the small per-neuron factors on the
    # device instead of entering addcmul as a number, so rounding may differ in the last bit.
    _assert_all_equal(params_f, params_t, rtol=1e-6, atol=1e-9)


TENSOR_LR_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"nesterov": False, "momentum": 0.9},
    {"weight_decay": 0.1, "cautious_weight_decay": True},
    {"update_scale": "adam_rms"},
]


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@pytest.mark.parametrize("options", TENSOR_LR_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("cls", CLASSES)
def test_tensor_lr_of_any_one_element_shape(cls, options, num_dim):
    """torch's test_optim.py::test_tensor_lr: a (10, 5) weight stepped 5 times with
    ``lr=torch.tensor(1e-3).reshape([1] * num_dim)`` equals the run with the float lr
    (torch.testing's float32 tolerance), here with an AdamW group holding the bias."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 5))
    bias = torch.nn.Parameter(torch.randn(10))
    weight_c = weight.detach().clone().requires_grad_(True)
    bias_c = bias.detach().clone().requires_grad_(True)
    inpt = torch.randn(5)

    def make(w, b, lr):
        groups = [{"params": [w]}, {"params": [b], "algorithm": "adamw", "lr": lr}]
        return cls(groups, lr=lr, ns_dtype="float32", **options)

    def closure(opt, w, b):
        opt.zero_grad()
        loss = (w.mv(inpt) + b).pow(2).sum()
        loss.backward()
        return loss

    lr = torch.tensor(1e-3).reshape([1] * num_dim)
    opt_r, opt = make(weight, bias, 1e-3), make(weight_c, bias_c, lr)
    for _ in range(5):
        opt_r.step(lambda: closure(opt_r, weight, bias))
        opt.step(lambda: closure(opt, weight_c, bias_c))
        torch.testing.assert_close(weight, weight_c)
        torch.testing.assert_close(bias, bias_c)


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("cls", CLASSES)
def test_every_tensor_hyperparameter_of_one_element_steps(cls, shape):
    """momentum, beta2, eps, weight_decay and AdamW's betas as (1,) / (1, 1) Tensors equal their
    float values."""
    t = lambda v: torch.tensor(v).reshape(shape)  # noqa: E731
    matrix = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.1}
    if cls is NorMuon:
        matrix.update(beta2=0.9, eps=1e-8)
    adamw = {"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}

    def run(as_tensor):
        conv = (lambda v: t(v)) if as_tensor else (lambda v: v)
        params = _params()
        groups = [
            {"params": params[:2], **{k: conv(v) for k, v in matrix.items()}},
            {"params": params[2:], "algorithm": "adamw", "lr": conv(adamw["lr"]),
             "betas": tuple(conv(b) for b in adamw["betas"]), "eps": conv(adamw["eps"]),
             "weight_decay": conv(adamw["weight_decay"])},
        ]  # fmt: skip
        opt = cls(groups, ns_dtype="float32")
        _run(opt, params, 3)
        return params

    _assert_all_equal(run(False), run(True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("cls", CLASSES)
def test_tensor_hyperparameter_of_several_elements_is_named(cls, key):
    with pytest.raises(ValueError, match=rf"{key} must be .* tensor of shape \(2,\)"):
        cls(_groups(_params()), **{key: torch.tensor([0.1, 0.2])})


@pytest.mark.parametrize("cautious", [False, True], ids=["plain", "cautious"])
@pytest.mark.parametrize("cls", CLASSES)
def test_non_contiguous_params_equal_contiguous_twin(cls, cautious):
    contiguous = _params()
    # Same values, stored transposed: p.t() of a contiguous (n, m) tensor is an (m, n) leaf.
    strided = [
        torch.nn.Parameter(p.detach().t().contiguous().t()) if p.ndim == 2 else
        torch.nn.Parameter(p.detach().clone())
        for p in contiguous
    ]  # fmt: skip
    assert not strided[0].is_contiguous() and not strided[2].is_contiguous()
    opts = dict(weight_decay=1.0, cautious_weight_decay=True) if cautious else {}
    opt_c, opt_s = _make(cls, contiguous, **opts), _make(cls, strided, **opts)
    _run(opt_c, contiguous, 3)
    _run(opt_s, strided, 3)
    _assert_all_equal(contiguous, strided, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ copies


def _custom_orthogonalizer(u, coefficients, dtype):
    """A picklable (module-level) orthogonalizer: the default one."""
    return default_orthogonalizer(u, coefficients, dtype)


WIDE_OPTIONS = {
    "nonfinite_grads": "raise",
    "comm_dtype": torch.float64,
    "ns_memory_budget": 12345,
    "orthogonalizer": _custom_orthogonalizer,
    "process_group": None,
}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_every_option_and_step_identically(cls, how):
    params = _params()
    opt = cls(_groups(params, betas=(0.8, 0.9)), lr=0.01, momentum=0.9, ns_dtype="float32",
              **WIDE_OPTIONS)  # fmt: skip
    _run(opt, params, 2)
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        twin = pickle.loads(pickle.dumps(opt))
    for name, value in WIDE_OPTIONS.items():
        got = getattr(twin, name)
        assert got == value or (callable(value) and got.__name__ == value.__name__), name
    for g0, g1 in zip(opt.param_groups, twin.param_groups, strict=True):
        assert {k: v for k, v in g0.items() if k != "params"} == {
            k: v for k, v in g1.items() if k != "params"
        }
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    _assert_all_equal(params, twin_params)
    _run(opt, params, 2, first=2)
    _run(twin, twin_params, 2, first=2)
    _assert_all_equal(params, twin_params)
    for p, q in zip(params, twin_params):
        assert opt.state[p].keys() == twin.state[q].keys()
        for key in opt.state[p]:
            torch.testing.assert_close(opt.state[p][key], twin.state[q][key], rtol=0, atol=0)
    # The optimizer-wide "raise" mode survived: a NaN gradient raises in the copy too.
    twin_params[0].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        twin.step()


# ------------------------------------------------------------------------------ hooks, names


@pytest.mark.parametrize("cls", CLASSES)
def test_step_state_dict_and_load_hooks_fire(cls):
    params = _params()
    opt = _make(cls, params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        calls.append("sd_post")
        sd["extra"] = 1  # a post hook may return or edit the dict
        return sd

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append("load_pre")
        sd = dict(sd)
        sd.pop("extra", None)
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _run(opt, params, 1)
    assert calls == ["step_pre", "step_post"]
    sd = opt.state_dict()
    assert sd["extra"] == 1 and calls[2:] == ["sd_pre", "sd_post"]
    opt.load_state_dict(sd)
    assert calls[4:] == ["load_pre", "load_post"]


@pytest.mark.parametrize("cls", CLASSES)
def test_named_parameters_keep_their_names(cls):
    names = ["w", "conv", "emb", "bias"]
    params = _params()
    named = list(zip(names, params))
    opt = cls(
        [{"params": named[:2]}, {"params": named[2:], "algorithm": "adamw"}], ns_dtype="float32"
    )
    assert opt.param_groups[0]["param_names"] == names[:2]
    _run(opt, params, 2)
    sd = opt.state_dict()
    assert [g["param_names"] for g in sd["param_groups"]] == [names[:2], names[2:]]
    plain_params = _params()
    plain = _make(cls, plain_params)
    _run(plain, plain_params, 2)
    _assert_all_equal(params, plain_params)
    # A named state dict loads into a named twin and resumes identically.
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin_named = list(zip(names, twin_params))
    twin = cls(
        [{"params": twin_named[:2]}, {"params": twin_named[2:], "algorithm": "adamw"}],
        ns_dtype="float32",
    )
    twin.load_state_dict(sd)
    assert twin.param_groups[1]["param_names"] == names[2:]
    _run(opt, params, 1, first=2)
    _run(twin, twin_params, 1, first=2)
    _assert_all_equal(params, twin_params)


# ------------------------------------------------------------------------------ dtypes, shapes


@pytest.mark.parametrize("cls", CLASSES)
def test_float64_params_match_float64_reference(cls):
    params = _params(torch.float64)
    init = [p.detach().clone() for p in params]
    opt = cls(_groups(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
              lr=0.02, weight_decay=0.1, ns_dtype="float64")  # fmt: skip
    ref = ReferenceMatrixOptimizer(init[:2], neuron_norm=cls is NorMuon, lr=0.02,
                                   weight_decay=0.1)  # fmt: skip
    grads_per_step = []
    for t in range(3):
        _set_grads(params, t)
        grads_per_step.append([p.grad.clone() for p in params[2:]])
        ref.step([p.grad for p in params[:2]])
        opt.step()
    adamw_ref = adamw_reference(init[2:], grads_per_step, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    for p, r in zip(params, ref.params + adamw_ref):
        assert p.dtype == torch.float64
        err = (p.detach() - r).norm() / r.norm()
        assert err < 1e-10, err


@pytest.mark.parametrize("cls", CLASSES)
def test_empty_and_zero_column_params(cls):
    params = _params()
    empty = [torch.nn.Parameter(torch.zeros(5, 0)), torch.nn.Parameter(torch.zeros(0, 4)),
             torch.nn.Parameter(torch.zeros(0, 3, 3, 3))]  # fmt: skip
    empty_vec = torch.nn.Parameter(torch.zeros(0))
    opt = cls(
        [{"params": params[:2] + empty},
         {"params": params[2:] + [empty_vec], "algorithm": "adamw"}],
        ns_dtype="float32",
    )  # fmt: skip
    twin_params = _params()
    twin = _make(cls, twin_params)
    for t in range(2):
        _set_grads(params + empty + [empty_vec], t)
        _set_grads(twin_params, t)
        opt.step()
        twin.step()
    _assert_all_equal(params, twin_params)
    for p in empty + [empty_vec]:
        assert p.numel() == 0 and p in opt.state


@pytest.mark.parametrize("cls", CLASSES)
def test_grad_none_mid_run_leaves_param_and_state(cls):
    params = _params()
    opt = _make(cls, params)
    _run(opt, params, 2)
    _set_grads(params, 2)
    frozen = [0, 2]  # one matrix, one AdamW parameter
    for i in frozen:
        params[i].grad = None
    before = [p.detach().clone() for p in params]
    state_before = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    opt.step()
    for i, p in enumerate(params):
        changed = not torch.equal(p.detach(), before[i])
        assert changed == (i not in frozen), i
        if i in frozen:
            for key, value in state_before[i].items():
                assert torch.equal(opt.state[p][key], value), (i, key)


@pytest.mark.parametrize("cls", CLASSES)
def test_step_closure_returns_loss_and_runs_under_grad(cls):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    matrices = [model[0].weight, model[2].weight]
    others = [model[0].bias, model[2].bias]
    opt = cls([{"params": matrices}, {"params": others, "algorithm": "adamw"}])
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    grad_enabled = []

    def closure():
        grad_enabled.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert grad_enabled == [True] * 5
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    assert final < losses[0]


# ------------------------------------------------------------------------------ schedulers


def _cyclic(opt):
    return torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=1e-4, max_lr=1e-3, step_size_up=2, cycle_momentum=True,
        base_momentum=0.8, max_momentum=0.9,
    )  # fmt: skip


def _one_cycle(opt):
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-3, total_steps=8, cycle_momentum=True, base_momentum=0.8,
        max_momentum=0.9,
    )  # fmt: skip


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("make_scheduler", [_cyclic, _one_cycle], ids=["cyclic", "one_cycle"])
def test_cycle_momentum_drives_matrix_momentum_and_adamw_beta1(cls, make_scheduler):
    params = _params()
    opt = _make(cls, params)
    scheduler = make_scheduler(opt)
    # torch.optim.AdamW on the AdamW parameters with the same scheduler (it cycles betas[0]).
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params[2:]]
    torch_opt = torch.optim.AdamW(torch_params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    torch_scheduler = make_scheduler(torch_opt)
    # A scheduler-free twin whose matrix group is given the same lr and momentum by hand.
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params[:2]]
    twin = cls([{"params": twin_params}], ns_dtype="float32")
    momenta, betas = [], []
    for t in range(6):
        matrix_group, adamw_group = opt.param_groups
        momenta.append(matrix_group["momentum"])
        betas.append(torch_opt.param_groups[0]["betas"][0])
        twin.param_groups[0]["lr"] = matrix_group["lr"]
        twin.param_groups[0]["momentum"] = matrix_group["momentum"]
        _set_grads(params, t)
        for p, q in zip(torch_params + twin_params, params[2:] + params[:2]):
            p.grad = q.grad.clone()
        opt.step()
        torch_opt.step()
        twin.step()
        # The beta1 AdamW used this step is the cycled one, and it is recorded in betas.
        assert adamw_group["betas"][0] == torch_opt.param_groups[0]["betas"][0]
        scheduler.step()
        torch_scheduler.step()
    assert len(set(momenta)) > 2 and len(set(betas)) > 2  # they really cycle
    assert momenta == pytest.approx(betas)
    _assert_all_equal(params[2:], torch_params, rtol=1e-6, atol=1e-7)
    _assert_all_equal(params[:2], twin_params)


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: torch.optim.lr_scheduler.MultiplicativeLR(o, lambda t: 0.9),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [1, 3], gamma=0.5),
    "ConstantLR": lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=9),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.25, 1.0, total_iters=3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=9),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
        ]
    ),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, 0.5, 1.0, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),
        ],
        milestones=[2],
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0),
    "CyclicLR": _cyclic,
    "OneCycleLR": _one_cycle,
    "CosineAnnealingWarmRestarts": lambda o: (
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10)
    ),
}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_lr_scheduler_runs(cls, name):
    params = _params()
    opt = _make(cls, params)
    initial = [g["lr"] for g in opt.param_groups]
    scheduler = SCHEDULERS[name](opt)
    for t in range(4):
        _set_grads(params, t)
        opt.step()
        if name == "ReduceLROnPlateau":
            scheduler.step(1.0)  # a constant metric: the lr drops every step (patience 0)
        else:
            scheduler.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs != initial, name
    assert all(isinstance(lr, float) and lr >= 0 for lr in lrs)
    assert all(torch.isfinite(p).all() for p in params)
    if name != "ReduceLROnPlateau":
        assert scheduler.get_last_lr() == pytest.approx(lrs)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("cls", CLASSES)
def test_compiled_step_fullgraph_matches_eager(cls):
    torch._dynamo.reset()
    params, eager_params = _params(), _params()
    opt = cls(_groups(params))  # default options: ns_dtype bfloat16
    eager = cls(_groups(eager_params))
    # fullgraph=True fails on any graph break, which Dynamo's tracing finds whatever the
    # backend; "eager" skips code generation (inductor on CPU takes ~30 s here and is run by
    # test_robustness.py's compiled training step).
    compiled_step = torch.compile(opt.step, fullgraph=True, backend="eager")
    for t in range(2):
        _set_grads(params, t)
        _set_grads(eager_params, t)
        compiled_step()
        eager.step()
    _assert_all_equal(params, eager_params, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ load_state_dict


def _stepped(cls, params=None, **options):
    params = params if params is not None else _params()
    opt = _make(cls, params, **options)
    _run(opt, params, 2)
    return opt, params


def _expect_rejected(opt, state_dict, *fragments):
    before = _snapshot(opt)
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(state_dict)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    _assert_snapshot_equal(before, _snapshot(opt))


@pytest.mark.parametrize("cls", CLASSES)
def test_load_state_dict_of_another_shape_is_rejected(cls):
    source, _ = _stepped(cls)
    other = [torch.nn.Parameter(torch.randn(8, 5))] + _params()[1:]
    target, _ = _stepped(cls, other)
    _expect_rejected(target, source.state_dict(), "param_groups[0]['params'][0]", "(8, 6)",
                     "(8, 5)")  # fmt: skip


@pytest.mark.parametrize("cls", CLASSES)
def test_load_torch_adamw_state_dict_is_rejected(cls):
    params = _params()
    torch_opt = torch.optim.AdamW(_groups(params)[:1] + [{"params": params[2:]}])
    _set_grads(params, 0)
    torch_opt.step()
    target, _ = _stepped(cls)
    _expect_rejected(target, torch_opt.state_dict(), "param_groups[0]", "algorithm")


def test_normuon_state_dict_into_muon_is_rejected():
    source, _ = _stepped(NorMuon)
    target, _ = _stepped(Muon)
    _expect_rejected(target, source.state_dict(), "param_groups[0]", "'normuon'", "'muon'")


@pytest.mark.parametrize("cls", CLASSES)
def test_adamw_group_state_into_matrix_group_is_rejected(cls):
    params = _params()
    source = cls([{"params": params[:2], "algorithm": "adamw"}, {"params": params[2:],
                  "algorithm": "adamw"}])  # fmt: skip
    _run(source, params, 1)
    target, _ = _stepped(cls)
    _expect_rejected(target, source.state_dict(), "param_groups[0]", "'adamw'")


@pytest.mark.parametrize("cls", CLASSES)
def test_wrong_number_of_groups_or_params_is_rejected(cls):
    target, _ = _stepped(cls)
    params = _params()
    one_group = cls([{"params": params[:2]}])
    _expect_rejected(target, one_group.state_dict(), "1 parameter groups", "2")
    fewer = cls([{"params": params[:1]}, {"params": params[2:], "algorithm": "adamw"}])
    _expect_rejected(target, fewer.state_dict(), "param_groups[0]", "1 parameters", "2")


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "group_index, key, value",
    [
        (0, "lr", -5.0),
        (0, "momentum", 2.0),
        (1, "lr", -5.0),
        (1, "betas", (2.0, 0.9)),
        (1, "momentum", 2.0),  # the beta1 alias that cycle_momentum schedulers write
    ],
)
def test_invalid_hyperparameters_in_state_dict_are_rejected(cls, group_index, key, value):
    source, _ = _stepped(cls)
    state_dict = source.state_dict()
    state_dict["param_groups"][group_index][key] = value
    target, _ = _stepped(cls)
    shown = str(value[0]) if isinstance(value, tuple) else str(value)  # betas[0] is named
    _expect_rejected(target, state_dict, f"param_groups[{group_index}]", key, shown)


@pytest.mark.parametrize("cls", CLASSES)
def test_adamw_momentum_alias_is_validated_when_added(cls):
    params = _params()
    opt = cls([{"params": params[:2]}])
    with pytest.raises(ValueError, match="momentum must be >= 0.0 and < 1.0, got 2.0"):
        opt.add_param_group({"params": params[2:], "algorithm": "adamw", "momentum": 2.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:], "algorithm": "adamw", "momentum": 0.8})
    _run(opt, params, 1)
    assert opt.param_groups[1]["betas"][0] == 0.8


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_resumes_identically(cls):
    source, params = _stepped(cls)
    state_dict = copy.deepcopy(source.state_dict())
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = _make(cls, twin_params)
    twin.load_state_dict(state_dict)
    _run(source, params, 2, first=2)
    _run(twin, twin_params, 2, first=2)
    _assert_all_equal(params, twin_params)
    assert twin.state_dict()["param_groups"] == source.state_dict()["param_groups"]


@pytest.mark.parametrize("cls", CLASSES)
def test_older_and_json_read_state_dicts_load_normalized(cls):
    """A torch.dtype ns_dtype (0.1.0 betas), lists where tuples were saved (a JSON round trip)
    and a missing newer option load, resume identically and save in today's form."""
    source, params = _stepped(cls)
    state_dict = copy.deepcopy(source.state_dict())
    matrix_group, adamw_group = state_dict["param_groups"]
    matrix_group["ns_dtype"] = torch.float32
    del matrix_group["layout"]
    adamw_group["betas"] = list(adamw_group["betas"])
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = _make(cls, twin_params)
    twin.load_state_dict(state_dict)
    assert twin.param_groups[0]["ns_dtype"] == "float32"
    assert twin.param_groups[0]["layout"] == "auto"
    assert twin.param_groups[1]["betas"] == (0.9, 0.95)
    _run(source, params, 2, first=2)
    _run(twin, twin_params, 2, first=2)
    _assert_all_equal(params, twin_params)
    assert twin.state_dict()["param_groups"] == source.state_dict()["param_groups"]


# ------------------------------------------------------------------------------ AdamW groups


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("scale", [1.0, 1e20], ids=["ordinary", "overflowing_squares"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_equal_torch_adamw(cls, scale, weight_decay):
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": weight_decay}
    params = _params()
    opt = cls(_groups(params, **hyper), ns_dtype="float32")
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params[2:]]
    torch_opt = torch.optim.AdamW(torch_params, **hyper)
    for t in range(4):
        # Overflowing squares on steps 1 and 2 only: the second moment stays inf afterwards.
        _set_grads(params, t, scale if t in (1, 2) else 1.0)
        for p, q in zip(torch_params, params[2:]):
            p.grad = q.grad.clone()
        opt.step()
        torch_opt.step()
        _assert_all_equal(params[2:], torch_params, rtol=1e-6, atol=1e-7)
        for p, q in zip(params[2:], torch_params):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], torch_opt.state[q][key],
                                           rtol=1e-6, atol=0)  # fmt: skip
    assert opt.nonfinite_skips == 0
    assert all(torch.isfinite(p).all() for p in params)
    if scale > 1:
        assert all(torch.isinf(opt.state[p]["exp_avg_sq"]).any() for p in params[2:])


@pytest.mark.parametrize("scale", [1.0, 1e20], ids=["ordinary", "overflowing_squares"])
def test_bf16_adamw_group_equals_torch_adamw_on_rounded_float32(scale):
    """bf16 parameters keep float32 state: equal to torch.optim.AdamW on a float32 copy whose
    parameters are rounded to bf16 after every step (what a bf16 store of the result does)."""
    hyper = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    params = _params(torch.bfloat16)
    opt = NorMuon(_groups(params, **hyper))
    torch_params = [torch.nn.Parameter(p.detach().float()) for p in params[2:]]
    torch_opt = torch.optim.AdamW(torch_params, **hyper)
    for t in range(4):
        _set_grads(params, t, scale if t in (1, 2) else 1.0)
        for p, q in zip(torch_params, params[2:]):
            p.grad = q.grad.float()
        opt.step()
        torch_opt.step()
        with torch.no_grad():
            for p in torch_params:
                p.copy_(p.bfloat16().float())
        for p, q in zip(params[2:], torch_params):
            assert p.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(p.detach().float(), q.detach(), rtol=8e-3, atol=1e-5)
    assert all(torch.isfinite(p).all() for p in params)

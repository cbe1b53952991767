"""load_state_dict hooks run in torch.optim's order around our checks and load, and parameter
groups either all carry parameter names or none do (as torch.optim requires)."""

from __future__ import annotations

import copy

import pytest
import torch

from normuon import Muon, NorMuon

CLASSES = [NorMuon, Muon]
# Two matrix parameters (a linear weight and a conv kernel), then two AdamW ones.
SHAPES = [(8, 6), (4, 2, 3, 3), (5, 4), (6,)]
NAMES = ["w", "conv", "emb", "bias"]


def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "algorithm": "adamw"}]


def _run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        gen = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _source_and_target(cls, dtype=torch.float32, **target_options):
    """A stepped optimizer to save, and a differently configured one (other lr, other state)
    to load into, so that a load that ignores the dict it should use shows."""
    params = _params(dtype)
    source = cls(_groups(params), lr=0.02, ns_dtype="float32")
    _run(source, params, 2)
    target_params = _params(dtype, seed=1)
    target = cls(_groups(target_params), **{"lr": 0.05, "ns_dtype": "float32", **target_options})
    _run(target, target_params, 1, first=7)
    return source, target, target_params


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        for p in params
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, copy.deepcopy(groups)


def _assert_snapshot_equal(before, after):
    (s0, g0), (s1, g1) = before, after
    assert g0 == g1
    for a, b in zip(s0, s1, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ------------------------------------------------------------------------------ pre-hooks


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("how", ["in_place", "returned"])
def test_pre_hook_lr_is_the_one_loaded(cls, how):
    source, target, _ = _source_and_target(cls)

    def pre_hook(opt, sd):
        if how == "in_place":  # edits the (shared) group dicts and returns nothing
            for group in sd["param_groups"]:
                group["lr"] = 0.002
            return None
        sd = copy.deepcopy(sd)
        for group in sd["param_groups"]:
            group["lr"] = 0.002
        return sd

    target.register_load_state_dict_pre_hook(pre_hook)
    target.load_state_dict(source.state_dict())
    assert [g["lr"] for g in target.param_groups] == [0.002, 0.002]


@pytest.mark.parametrize("cls", CLASSES)
def test_pre_hook_momentum_buffer_is_the_one_loaded(cls):
    source, target, target_params = _source_and_target(cls)
    sd = source.state_dict()
    saved_momentum = sd["state"][0]["momentum_buffer"].clone()
    saved_exp_avg = sd["state"][2]["exp_avg"].clone()

    def pre_hook(opt, sd):
        sd = dict(sd)
        sd["state"] = {pid: dict(entry) for pid, entry in sd["state"].items()}
        sd["state"][0]["momentum_buffer"] = torch.full(SHAPES[0], 7.0)
        sd["state"][2]["exp_avg"] = torch.full(SHAPES[2], -3.0)
        return sd

    target.register_load_state_dict_pre_hook(pre_hook)
    target.load_state_dict(sd)
    loaded = target.state
    assert torch.equal(loaded[target_params[0]]["momentum_buffer"], torch.full(SHAPES[0], 7.0))
    assert torch.equal(loaded[target_params[2]]["exp_avg"], torch.full(SHAPES[2], -3.0))
    # The hook replaced top-level entries of the copy it was given, not the caller's dict.
    assert torch.equal(sd["state"][0]["momentum_buffer"], saved_momentum)
    assert torch.equal(sd["state"][2]["exp_avg"], saved_exp_avg)


@pytest.mark.parametrize("cls", CLASSES)
def test_pre_hook_runs_before_the_checks(cls):
    """A pre-hook may repair a dict that would not pass the checks as saved."""
    source, target, _ = _source_and_target(cls)
    sd = copy.deepcopy(source.state_dict())
    sd["param_groups"][0]["lr"] = -5.0
    sd["param_groups"][1]["betas"] = [0.9, 0.95]  # a list, as read back from JSON

    def repair(opt, sd):
        sd["param_groups"][0]["lr"] = 0.003

    target.register_load_state_dict_pre_hook(repair)
    target.load_state_dict(sd)
    assert target.param_groups[0]["lr"] == 0.003
    assert target.param_groups[1]["betas"] == (0.9, 0.95)  # still normalized


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(
    "breakage, fragments",
    [
        ("lr", ["param_groups[0]", "lr", "-1.0"]),
        ("momentum_shape", ["param_groups[0]['params'][0]", "momentum_buffer", "(8, 5)"]),
    ],
)
def test_failing_check_after_pre_hook_changes_nothing(cls, breakage, fragments):
    source, target, _ = _source_and_target(cls)
    calls = []

    def pre_hook(opt, sd):
        calls.append("pre")
        sd = copy.deepcopy(sd)
        if breakage == "lr":
            sd["param_groups"][0]["lr"] = -1.0
        else:
            sd["state"][0]["momentum_buffer"] = torch.zeros(8, 5)
        return sd

    target.register_load_state_dict_pre_hook(pre_hook)
    target.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    before = _snapshot(target)
    with pytest.raises(ValueError) as info:
        target.load_state_dict(source.state_dict())
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    _assert_snapshot_equal(before, _snapshot(target))
    assert calls == ["pre"]  # no post-hook for a load that did not happen


# ------------------------------------------------------------------------------ post-hooks


@pytest.mark.parametrize("cls", CLASSES)
def test_post_hook_sees_the_final_state(cls):
    # bf16 parameters keep float32 state: the post-hook must see it after our dtype-preserving
    # copy, and the options after normalization (the saved list of betas becomes a pair).
    source, target, target_params = _source_and_target(cls, dtype=torch.bfloat16)
    sd = copy.deepcopy(source.state_dict())
    sd["param_groups"][1]["betas"] = list(sd["param_groups"][1]["betas"])
    seen = {}

    def post_hook(opt):
        seen["lr"] = [g["lr"] for g in opt.param_groups]
        seen["betas"] = opt.param_groups[1]["betas"]
        seen["momentum"] = opt.state[target_params[0]]["momentum_buffer"].clone()

    target.register_load_state_dict_post_hook(post_hook)
    target.load_state_dict(sd)
    assert seen["lr"] == [g["lr"] for g in sd["param_groups"]]  # the saved ones
    assert seen["betas"] == (0.9, 0.95) and isinstance(seen["betas"], tuple)
    assert seen["momentum"].dtype == torch.float32
    torch.testing.assert_close(seen["momentum"], sd["state"][0]["momentum_buffer"], rtol=0, atol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_post_hook_changes_persist(cls):
    source, target, target_params = _source_and_target(cls)

    def post_hook(opt):
        opt.param_groups[0]["lr"] = 0.005
        opt.param_groups[1]["weight_decay"] = 0.25
        opt.state[target_params[0]]["momentum_buffer"].fill_(4.0)  # in place
        opt.state[target_params[2]]["exp_avg"] = torch.full(SHAPES[2], 2.0)  # replaced

    target.register_load_state_dict_post_hook(post_hook)
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["lr"] == 0.005
    assert target.param_groups[1]["weight_decay"] == 0.25
    loaded = target.state
    assert torch.equal(loaded[target_params[0]]["momentum_buffer"], torch.full(SHAPES[0], 4.0))
    assert torch.equal(loaded[target_params[2]]["exp_avg"], torch.full(SHAPES[2], 2.0))


# ------------------------------------------------------------------------------ order, count


@pytest.mark.parametrize("cls", CLASSES)
def test_hooks_run_once_in_order_and_chain(cls):
    source, target, _ = _source_and_target(cls)
    calls = []

    def first(opt, sd):
        calls.append("pre1")
        sd = dict(sd)
        sd["marker"] = "from pre1"
        return sd

    def second(opt, sd):
        calls.append("pre2")
        assert sd["marker"] == "from pre1"  # gets the dict the first hook returned
        sd = dict(sd)
        del sd["marker"]
        return sd

    target.register_load_state_dict_pre_hook(second)
    target.register_load_state_dict_pre_hook(first, prepend=True)
    target.register_load_state_dict_post_hook(lambda opt: calls.append("post2"))
    target.register_load_state_dict_post_hook(lambda opt: calls.append("post1"), prepend=True)
    # DCP passes the dict by keyword.
    target.load_state_dict(state_dict=source.state_dict())
    assert calls == ["pre1", "pre2", "post1", "post2"]


@pytest.mark.parametrize("cls", CLASSES)
def test_loaded_state_still_resumes_identically(cls):
    """With hooks that change nothing, a load resumes exactly like the saved optimizer."""
    params = _params()
    source = cls(_groups(params), ns_dtype="float32")
    _run(source, params, 2)
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = cls(_groups(twin_params), lr=0.05, ns_dtype="float32")
    twin.register_load_state_dict_pre_hook(lambda opt, sd: None)
    twin.register_load_state_dict_post_hook(lambda opt: None)
    twin.load_state_dict(source.state_dict())
    _run(source, params, 2, first=2)
    _run(twin, twin_params, 2, first=2)
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# ------------------------------------------------------------------------------ names


def _named(params):
    return list(zip(NAMES, params))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("first_named", [True, False])
def test_mixing_named_and_unnamed_groups_is_rejected_by_add_param_group(cls, first_named):
    params = _params()
    named = _named(params)
    first = named[:2] if first_named else params[:2]
    second = params[2:] if first_named else named[2:]
    opt = cls([{"params": first}])
    with pytest.raises(ValueError) as info:
        opt.add_param_group({"params": second, "algorithm": "adamw"})
    message = str(info.value)
    expected = "param_groups[0] names" if first_named else "param_groups[1] names"
    assert expected in message, message
    other = "param_groups[1]" if first_named else "param_groups[0]"
    assert f"but {other} does not" in message, message
    assert len(opt.param_groups) == 1 and len(opt._plans()) == 1
    # The optimizer is still usable with its one group.
    _run(opt, params[:2], 1)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("first_named", [True, False])
def test_mixing_named_and_unnamed_groups_is_rejected_by_the_constructor(cls, first_named):
    params = _params()
    named = _named(params)
    groups = [
        {"params": named[:2] if first_named else params[:2]},
        {"params": params[2:] if first_named else named[2:], "algorithm": "adamw"},
    ]
    with pytest.raises(ValueError, match=r"names its parameters .* does not"):
        cls(groups)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("named", [True, False])
def test_all_named_or_all_unnamed_groups_round_trip(cls, named):
    def build(params, **options):
        entries = _named(params) if named else params
        opt = cls([{"params": entries[:2]}], ns_dtype="float32", **options)
        opt.add_param_group({"params": entries[2:], "algorithm": "adamw"})
        return opt

    params = _params()
    source = build(params)
    _run(source, params, 2)
    sd = source.state_dict()
    if named:
        assert [g["param_names"] for g in source.param_groups] == [NAMES[:2], NAMES[2:]]
        assert [g["param_names"] for g in sd["param_groups"]] == [NAMES[:2], NAMES[2:]]
    else:
        assert all("param_names" not in g for g in sd["param_groups"])
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = build(twin_params, lr=0.05)
    twin.load_state_dict(sd)
    if named:
        assert [g["param_names"] for g in twin.param_groups] == [NAMES[:2], NAMES[2:]]
    assert twin.state_dict()["param_groups"] == source.state_dict()["param_groups"]
    _run(source, params, 2, first=2)
    _run(twin, twin_params, 2, first=2)
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

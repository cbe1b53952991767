"""Every ValueError / TypeError the optimizers raise, with the message checked."""

from __future__ import annotations

import math

import pytest
import torch

from normuon import Muon, NorMuon

BOTH = [NorMuon, Muon]


def _w(*shape):
    return torch.nn.Parameter(torch.randn(shape))


# ------------------------------------------------------------------ routing and group keys


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("algorithm", ["adam", "sgd", "", None, 3])
def test_unknown_algorithm(cls, algorithm):
    with pytest.raises(ValueError, match=r"algorithm must be '(normuon|muon)' or 'adamw'"):
        cls([{"params": [_w(4, 4)], "algorithm": algorithm}])


def test_algorithm_of_the_other_class_is_rejected():
    with pytest.raises(ValueError, match=r"algorithm must be 'muon' or 'adamw' for Muon"):
        Muon([{"params": [_w(4, 4)], "algorithm": "normuon"}])
    with pytest.raises(ValueError, match=r"algorithm must be 'normuon' or 'adamw' for NorMuon"):
        NorMuon([{"params": [_w(4, 4)], "algorithm": "muon"}])


@pytest.mark.parametrize(
    "cls,group,bad",
    [
        (NorMuon, {"lrr": 0.1}, "lrr"),
        (NorMuon, {"betas": (0.9, 0.95)}, "betas"),  # AdamW key in a matrix group
        (NorMuon, {"amsgrad": True}, "amsgrad"),
        (Muon, {"beta2": 0.95}, "beta2"),  # NorMuon-only keys are unknown to Muon
        (Muon, {"eps": 1e-8}, "eps"),
        (Muon, {"normalize": "rows"}, "normalize"),
        (NorMuon, {"algorithm": "adamw", "ns_steps": 5}, "ns_steps"),
        (Muon, {"algorithm": "adamw", "amsgrad": True}, "amsgrad"),
    ],
)
def test_unknown_group_key(cls, group, bad):
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{bad}'\]"):
        cls([{"params": [_w(4, 4)], **group}])


def test_common_keys_are_accepted():
    w, b = _w(4, 4), _w(4)
    opt = NorMuon(
        [
            {"params": [w], "name": "hidden", "initial_lr": 0.02},
            {"params": [b], "algorithm": "adamw", "name": "vectors"},
        ]
    )
    assert opt.param_groups[0]["name"] == "hidden"
    named = NorMuon([{"params": [("w", _w(4, 4))]}])
    assert named.param_groups[0]["param_names"] == ["w"]


@pytest.mark.parametrize("cls", BOTH)
def test_fused_and_foreach_are_accepted_ignored_and_kept(cls):
    """torch.optim's implementation switches (torchtitan's OptimizersContainer puts both into
    every group): accepted in matrix and AdamW groups, kept, saved and loaded, and ignored:
    the step is the same with any of their values or without them."""
    torch.manual_seed(0)
    w0, b0, g_w, g_b = torch.randn(6, 4), torch.randn(6), torch.randn(6, 4), torch.randn(6)
    results = []
    for keys in ({}, {"fused": True, "foreach": False}, {"fused": None, "foreach": True}):
        w, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())
        opt = cls([{"params": [w], **keys}, {"params": [b], "algorithm": "adamw", **keys}],
                  ns_dtype="float32")  # fmt: skip
        for group in opt.param_groups:
            assert {k: group[k] for k in keys} == keys
            assert ("fused" in group) == ("fused" in keys)  # absent stays absent
        w.grad, b.grad = g_w.clone(), g_b.clone()
        opt.step()
        results.append((w.detach().clone(), b.detach().clone()))
        saved = opt.state_dict()
        assert {k: saved["param_groups"][0][k] for k in keys} == keys
        opt.load_state_dict(saved)
    for w, b in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(b, results[0][1])


@pytest.mark.parametrize("key", ["fused", "foreach"])
@pytest.mark.parametrize("value", [1, 0, "yes", "True"])
@pytest.mark.parametrize("algorithm", ["normuon", "adamw"])
def test_fused_and_foreach_must_be_bool_or_none(key, value, algorithm):
    with pytest.raises(ValueError, match=rf"^{key} must be True, False or None, got {value!r}"):
        NorMuon([{"params": [_w(4, 4)], "algorithm": algorithm, key: value}])
    opt = NorMuon([{"params": [_w(4, 4)], "algorithm": algorithm, key: True}])
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {key} must be True, False or None"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0][key] is True  # nothing loaded


def test_fused_and_foreach_are_not_constructor_options():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['foreach'\]"):
        NorMuon([_w(4, 4)], foreach=True)


# ------------------------------------------------------------------ numeric options

_BAD_NUMBERS = [-1e-3, math.nan, math.inf, "0.1", None, True]


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", _BAD_NUMBERS)
def test_bad_lr(cls, value):
    with pytest.raises(ValueError, match=r"^lr must be"):
        cls([_w(4, 4)], lr=value)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, "0.9"])
def test_bad_momentum(cls, value):
    with pytest.raises(ValueError, match=r"^momentum must be"):
        cls([_w(4, 4)], momentum=value)


@pytest.mark.parametrize("value", [-0.1, 1.0, 2.0, math.inf])
def test_bad_beta2(value):
    with pytest.raises(ValueError, match=r"^beta2 must be"):
        NorMuon([_w(4, 4)], beta2=value)


@pytest.mark.parametrize("value", [-1e-10, math.nan, math.inf])
def test_bad_eps(value):
    with pytest.raises(ValueError, match=r"^eps must be"):
        NorMuon([_w(4, 4)], eps=value)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [-0.01, math.nan, math.inf])
def test_bad_weight_decay(cls, value):
    with pytest.raises(ValueError, match=r"^weight_decay must be"):
        cls([_w(4, 4)], weight_decay=value)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_bad_nesterov(cls, value):
    with pytest.raises(ValueError, match=r"nesterov must be True or False"):
        cls([_w(4, 4)], nesterov=value)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "group,pattern",
    [
        ({"lr": -1.0}, r"^lr must be >= 0"),
        ({"lr": math.nan}, r"^lr must be a finite number"),
        ({"betas": (0.9,)}, r"^betas must be a pair"),
        ({"betas": 0.9}, r"^betas must be a pair"),
        ({"betas": (1.0, 0.95)}, r"^betas\[0\] must be"),
        ({"betas": (0.9, 1.0)}, r"^betas\[1\] must be"),
        ({"betas": (-0.1, 0.95)}, r"^betas\[0\] must be"),
        ({"betas": (0.9, math.nan)}, r"^betas\[1\] must be a finite number"),
        ({"eps": -1e-8}, r"^eps must be"),
        ({"weight_decay": -0.1}, r"^weight_decay must be"),
    ],
)
def test_bad_adamw_group(cls, group, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls([{"params": [_w(4, 4)]}, {"params": [_w(4)], "algorithm": "adamw", **group}])


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"adamw_lr": -1.0}, r"^adamw_lr must be"),
        ({"adamw_betas": (0.9, 1.5)}, r"^adamw_betas\[1\] must be"),
        ({"adamw_eps": -1.0}, r"^adamw_eps must be"),
        ({"adamw_weight_decay": math.inf}, r"^adamw_weight_decay must be"),
    ],
)
def test_bad_adamw_defaults_reach_adamw_groups(cls, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls([{"params": [_w(4, 4)]}, {"params": [_w(4)], "algorithm": "adamw"}], **kwargs)


# ------------------------------------------------------------------ Newton-Schulz options


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "5", None])
def test_bad_ns_steps(cls, steps):
    with pytest.raises(ValueError, match=r"ns_steps must be a positive int"):
        cls([_w(4, 4)], ns_steps=steps)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "coeffs,steps,pattern",
    [
        ("jordan", 5, r"ns_coefficients must be 'muon', 'polar_express'"),
        ("", 5, r"ns_coefficients must be 'muon', 'polar_express'"),
        (42, 5, r"ns_coefficients must be 'muon', 'polar_express'"),
        ([(3.4445, -4.775, 2.0315)] * 4, 5, r"lists 4 steps but ns_steps=5"),
        ([(3.4445, -4.775, 2.0315)] * 6, 5, r"lists 6 steps but ns_steps=5"),
        ((3.4445, math.nan, 2.0315), 5, r"entry must be three finite numbers"),
        ((math.inf, -4.775, 2.0315), 5, r"entry must be three finite numbers"),
        ([(1.5, -0.5, 0.0), (1.5, -0.5)], 2, r"entry must be three finite numbers"),
        ([(1.5, -0.5, 0.0), (1.5, -0.5, math.nan)], 2, r"entry must be three finite numbers"),
        ((1.5, -0.5), 5, r"entry must be three finite numbers"),
    ],
)
def test_bad_ns_coefficients(cls, coeffs, steps, pattern):
    with pytest.raises(ValueError, match=pattern):
        cls([_w(4, 4)], ns_coefficients=coeffs, ns_steps=steps)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", ["bf16", "int32", torch.int32, torch.complex64, None, torch.bool])
def test_bad_ns_dtype(cls, dtype):
    with pytest.raises(ValueError, match=r"ns_dtype must be one of"):
        cls([_w(4, 4)], ns_dtype=dtype)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", torch.float32, "float32"])
def test_ns_dtype_is_kept_by_name(cls, dtype):
    """Groups store the dtype's name (DCP full state dicts take only plain values)."""
    opt = cls([_w(4, 4)], ns_dtype=dtype)
    assert opt.param_groups[0]["ns_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", ["rms", "preserve-norm", None])
def test_bad_update_scale(cls, value):
    pattern = r"update_scale must be one of \('preserve_norm', 'adam_rms'\)"
    with pytest.raises(ValueError, match=pattern):
        cls([_w(4, 4)], update_scale=value)


@pytest.mark.parametrize("value", ["columns", "larger", None])
def test_bad_normalize(value):
    pattern = r"normalize must be one of \('rows', 'larger_dim', 'elements'\)"
    with pytest.raises(ValueError, match=pattern):
        NorMuon([_w(4, 4)], normalize=value)


@pytest.mark.parametrize(
    "option,value,pattern",
    [
        ("normalize_input", 1, "normalize_input must be True or False, got 1"),
        ("normalize_input", "yes", "normalize_input must be True or False"),
        ("normalize_matrices", "wide", r"normalize_matrices must be one of \('all', 'tall'\)"),
        ("normalize_matrices", None, "normalize_matrices must be one of"),
    ],
)
def test_bad_ablation_options(option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        NorMuon([_w(4, 4)], **{option: value})
    with pytest.raises(ValueError, match=pattern):
        NorMuon([{"params": [_w(4, 4)], option: value}])


def test_ablation_options_are_normuon_only():
    for option, value in (("normalize_input", True), ("normalize_matrices", "tall")):
        with pytest.raises(TypeError, match=option):
            Muon([_w(4, 4)], **{option: value})


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", ["flat", "Conv", None])
def test_bad_layout(cls, value):
    pattern = r"layout must be one of \('auto', 'conv', 'stacked', 'transposed'\)"
    with pytest.raises(ValueError, match=pattern):
        cls([_w(4, 4)], layout=value)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("split", [[4.0, 4.0], [8, 0], [], [True, 7], "44", [-2, 10], 8])
def test_split_sizes_not_positive_ints(cls, split):
    with pytest.raises(ValueError, match=r"split_sizes must be None or a list of positive ints"):
        cls([_w(8, 4)], split_sizes=split)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize(
    "shape,split,rows",
    [((12, 4), (4, 4), 12), ((12, 4), (4, 4, 8), 12), ((3, 6, 5), (2, 2), 6)],
)
def test_split_sizes_sum_mismatch_names_shape(cls, shape, split, rows):
    pattern = (
        rf"split_sizes {tuple(split)} sum to {sum(split)} but the parameter of shape "
        rf"{tuple(shape)} has {rows} output rows".replace("(", r"\(").replace(")", r"\)")
    )
    with pytest.raises(ValueError, match=pattern):
        cls([_w(*shape)], split_sizes=split)


@pytest.mark.parametrize("cls", BOTH)
def test_split_sizes_valid_is_accepted(cls):
    opt = cls([_w(12, 4)], split_sizes=[4, 4, 4])
    assert opt.param_groups[0]["split_sizes"] == (4, 4, 4)


# ------------------------------------------------------------------ parameters


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("shape", [(), (7,), (1,)])
def test_vector_or_scalar_in_matrix_group(cls, shape):
    pattern = (
        rf"a parameter of shape {tuple(shape)} is not a matrix".replace("(", r"\(")
        .replace(")", r"\)")
        + r".*algorithm='adamw'.*param_groups"
    )
    with pytest.raises(ValueError, match=pattern):
        cls([_w(4, 4), _w(*shape)])


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_param_is_type_error(cls, dtype):
    p = torch.nn.Parameter(torch.randn(4, 4, dtype=dtype))
    with pytest.raises(TypeError, match=r"is complex .*real floating-point parameters only"):
        cls([p])
    with pytest.raises(TypeError, match=r"is complex"):
        cls([{"params": [_w(4, 4)]}, {"params": [p], "algorithm": "adamw"}])


@pytest.mark.parametrize("cls", BOTH)
def test_integer_param_is_type_error(cls):
    p = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"has dtype torch.int64; a floating dtype is needed"):
        cls([p])


@pytest.mark.parametrize("cls", BOTH)
def test_non_tensor_param_is_type_error(cls):
    with pytest.raises(TypeError, match=r"params\[1\] is a list, not a torch.Tensor"):
        cls([{"params": [_w(4, 4), [1.0, 2.0]]}])


@pytest.mark.parametrize("cls", BOTH)
def test_non_leaf_param(cls):
    base = torch.randn(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"is not a leaf tensor"):
        cls([base * 2])


@pytest.mark.parametrize("cls", BOTH)
def test_params_as_set_is_type_error(cls):
    with pytest.raises(TypeError, match=r"not a set"):
        cls([{"params": {_w(4, 4)}}])


@pytest.mark.parametrize("cls", BOTH)
def test_sparse_gradient_is_type_error(cls):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    w = _w(4, 4)
    opt = cls([{"params": [w]}, {"params": [emb.weight], "algorithm": "adamw"}])
    emb(torch.tensor([1, 2, 3])).sum().backward()
    w.grad = torch.randn(4, 4)
    assert emb.weight.grad.is_sparse
    with pytest.raises(TypeError, match=r"has a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("cls", BOTH)
def test_sparse_gradient_in_matrix_group(cls):
    w = _w(4, 4)
    opt = cls([w])
    w.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(TypeError, match=r"has a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("cls", BOTH)
def test_gradient_shape_mismatch(cls):
    # A gradient of another shape can only be forced by swapping .data after backward.
    w = _w(4, 4)
    opt = cls([w])
    w.grad = torch.randn(4, 4)
    w.data = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"gradient shape \(4, 4\) != \(2, 8\)"):
        opt.step()


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("where", ["same_group", "across_groups", "matrix_and_adamw"])
def test_duplicate_parameters(cls, where):
    w, b = _w(4, 4), _w(4)
    groups = {
        "same_group": [{"params": [w, w]}],
        "across_groups": [{"params": [w]}, {"params": [_w(3, 3), w]}],
        "matrix_and_adamw": [{"params": [w]}, {"params": [b, w], "algorithm": "adamw"}],
    }[where]
    with pytest.raises(ValueError, match=r"appears more than once"):
        cls(groups)


@pytest.mark.parametrize("cls", BOTH)
def test_duplicate_parameter_via_add_param_group(cls):
    w = _w(4, 4)
    opt = cls([w])
    with pytest.raises(ValueError, match=r"appears more than once"):
        opt.add_param_group({"params": [w], "algorithm": "adamw"})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", BOTH)
def test_non_contiguous_matrix_param_matches_contiguous_twin(cls):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4).t())
    twin = torch.nn.Parameter(p.detach().contiguous().clone())
    assert not p.is_contiguous()
    opts = [cls([x], ns_dtype=torch.float32, weight_decay=0.1) for x in (p, twin)]
    for _ in range(3):
        g = torch.randn(4, 6)
        for x, opt in zip((p, twin), opts):
            x.grad = g.clone()
            opt.step()
    assert not p.is_contiguous()  # updated in place, not replaced
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", BOTH)
def test_non_contiguous_adamw_param_is_fine(cls):
    p = torch.nn.Parameter(torch.randn(6, 4).t())
    opt = cls([{"params": [_w(3, 3)]}, {"params": [p], "algorithm": "adamw"}])
    before = p.detach().clone()
    p.grad = torch.ones(4, 6)
    opt.step()
    assert not torch.equal(p, before)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("value", ["ignore", "Skip", None, True])
def test_bad_nonfinite_grads(cls, value):
    with pytest.raises(ValueError, match=r"nonfinite_grads must be one of \('skip', 'raise'\)"):
        cls([_w(4, 4)], nonfinite_grads=value)


@pytest.mark.parametrize("cls", BOTH)
def test_param_group_not_a_dict(cls):
    opt = cls([_w(4, 4)])
    with pytest.raises(TypeError, match=r"param_group must be a dict, got list"):
        opt.add_param_group([_w(3, 3)])


@pytest.mark.parametrize("cls", BOTH)
def test_param_group_without_params(cls):
    opt = cls([_w(4, 4)])
    with pytest.raises(ValueError, match=r"param_group has no 'params' entry"):
        opt.add_param_group({"lr": 0.1})


@pytest.mark.parametrize("cls", BOTH)
def test_names_for_some_params_only(cls):
    with pytest.raises(ValueError, match=r"either every parameter comes with a name or none"):
        cls([{"params": [("a", _w(4, 4)), _w(3, 3)]}])


@pytest.mark.parametrize("cls", BOTH)
def test_failed_group_leaves_optimizer_unchanged(cls):
    opt = cls([_w(4, 4)])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [_w(5, 5)], "lr": -1.0})
    assert len(opt.param_groups) == 1

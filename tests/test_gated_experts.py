"""Values of the split of stacked gated experts (``param_groups(split_gate_up=True)``).

Stacked experts come in two layouts:

- Mixtral's (E, 2 ff, d): expert e is a (2 ff, d) matrix used as ``x @ W[e].T``; its output
  neurons are its rows, the gate half is ``W[e][:ff]`` and the up half ``W[e][ff:]``;
- Aria's (E, d, 2 ff): expert e is a (d, 2 ff) matrix used as ``x @ W[e]``; its output neurons
  are its COLUMNS, the gate half is ``W[e][:, :ff]`` and the up half ``W[e][:, ff:]``, each an
  (ff, d) matrix (rows = output neurons) once transposed.

By the algorithm's definition each half of each expert is its own matrix: orthogonalized alone,
with its own per-neuron second moment and its own update scale. The float64 reference of
tests/reference.py is run here on those 2 E separate (ff, d) matrices, one at a time, and the
optimizer (float32 Newton-Schulz) on the stacked parameter with the groups ``param_groups``
makes; they must agree to float32 accuracy. The same reference without the split, or with the
split along the wrong axis, must differ, so that the comparison can fail.
"""

from __future__ import annotations

import pytest
import torch
from reference import ReferenceMatrixOptimizer
from torch import nn

from normuon import Muon, NorMuon, param_groups

STEPS = 5
LR, WEIGHT_DECAY = 0.02, 0.1

#: (E, d, ff): halves wider than tall (6 x 8: ``normalize="larger_dim"`` keeps per-column
#: statistics) and taller than wide (10 x 6).
SHAPES = {"wide_halves": (3, 8, 6), "tall_halves": (2, 6, 10)}

#: (optimizer, group options)
CASES = {
    "normuon_rows": (NorMuon, dict(update_scale="preserve_norm", normalize="rows")),
    "normuon_larger_dim": (NorMuon, dict(update_scale="adam_rms", normalize="larger_dim")),
    "muon_preserve_norm": (Muon, dict(update_scale="preserve_norm")),
    "muon_adam_rms": (Muon, dict(update_scale="adam_rms", nesterov=False)),
}


class Experts(nn.Module):
    """Stacked gated experts: ``gate_up_proj`` and its sibling ``down_proj`` (which tells
    ``param_groups`` the layout)."""

    def __init__(self, experts: int, d: int, ff: int, aria: bool, gen: torch.Generator) -> None:
        super().__init__()
        if aria:  # (E, d, 2 ff) and (E, ff, d): y = x @ W[e]
            gate_up, down = (experts, d, 2 * ff), (experts, ff, d)
        else:  # Mixtral: (E, 2 ff, d) and (E, d, ff): y = x @ W[e].T
            gate_up, down = (experts, 2 * ff, d), (experts, d, ff)
        self.gate_up_proj = nn.Parameter(0.1 * torch.randn(gate_up, generator=gen))
        self.down_proj = nn.Parameter(0.1 * torch.randn(down, generator=gen))


class MoE(nn.Module):
    def __init__(self, experts: int, d: int, ff: int, aria: bool) -> None:
        super().__init__()
        self.experts = Experts(experts, d, ff, aria, torch.Generator().manual_seed(0))


def halves(w: torch.Tensor, ff: int, aria: bool) -> list[torch.Tensor]:
    """Per expert, the gate then the up matrix, each (ff, d) with rows = output neurons
    (float64 copies), from the definition of each layout."""
    out = []
    for e in range(w.shape[0]):
        for h in range(2):
            block = w[e][:, h * ff : (h + 1) * ff].T if aria else w[e][h * ff : (h + 1) * ff]
            out.append(block.double().contiguous())
    return out


def whole_experts(w: torch.Tensor, aria: bool) -> list[torch.Tensor]:
    """Per expert, the fused (2 ff, d) matrix (rows = output neurons): the split ignored."""
    return [(w[e].T if aria else w[e]).double().contiguous() for e in range(w.shape[0])]


def _grads(shape, steps: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def _reference(cls, matrices, opts, grads, **layout):
    """The float64 reference on ``matrices`` (a list of tensors), stepped on ``grads`` (per
    step, a list shaped like ``matrices``)."""
    ref = ReferenceMatrixOptimizer(
        matrices, neuron_norm=cls is NorMuon, lr=LR, weight_decay=WEIGHT_DECAY, **opts, **layout
    )
    for step_grads in grads:
        ref.step(step_grads)
    return ref


def _train(cls, shape_key: str, opts: dict, aria: bool):
    """The optimizer on the groups of ``param_groups(split_gate_up=True)``; returns (model,
    optimizer, initial gate_up weight, its gradients)."""
    experts, d, ff = SHAPES[shape_key]
    model = MoE(experts, d, ff, aria)
    w = model.experts.gate_up_proj
    w0 = w.detach().clone()
    groups = param_groups(model, split_gate_up=True, lr=LR, weight_decay=WEIGHT_DECAY, **opts)
    opt = cls(groups, ns_dtype=torch.float32)
    grads = _grads(w.shape, STEPS)
    for g in grads:
        w.grad = g.clone()  # down_proj gets no gradient: only gate_up_proj moves
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, w0, grads


@pytest.mark.parametrize("aria", [True, False], ids=["E-d-2ff", "E-2ff-d"])
def test_param_groups_read_the_fused_experts_as_gate_and_up(aria):
    """The groups the value tests below run on: Aria's layout read as (in, out), both split."""
    experts, d, ff = SHAPES["wide_halves"]
    model = MoE(experts, d, ff, aria)
    groups = param_groups(model, split_gate_up=True)
    (group,) = [g for g in groups if any(p is model.experts.gate_up_proj for p in g["params"])]
    assert group["split_sizes"] == (ff, ff)
    assert group.get("layout", "auto") == ("transposed" if aria else "auto")


@pytest.mark.parametrize("shape_key", list(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("aria", [True, False], ids=["E-d-2ff", "E-2ff-d"])
def test_each_half_of_each_expert_matches_the_reference(aria, case, shape_key):
    cls, opts = CASES[case]
    experts, d, ff = SHAPES[shape_key]
    model, opt, w0, grads = _train(cls, shape_key, opts, aria)
    w = model.experts.gate_up_proj.detach()
    assert not torch.equal(w, w0)
    ref = _reference(cls, halves(w0, ff, aria), opts, [halves(g, ff, aria) for g in grads])

    got, start = halves(w, ff, aria), halves(w0, ff, aria)
    for k, (a, r, s) in enumerate(zip(got, ref.params, start)):
        where = f"expert {k // 2} {'gate' if k % 2 == 0 else 'up'}"
        assert _rel_err(a, r) < 2e-6, (where, _rel_err(a, r))
        # The movement too (the parameter is mostly its initial value).
        assert _rel_err(a - s, r - s) < 2e-5, (where, _rel_err(a - s, r - s))

    if cls is NorMuon:  # the second moment: per expert, the gate's entries then the up's
        v = opt.state[model.experts.gate_up_proj]["neuron_second_moment"]
        expected = torch.stack(
            [torch.cat([ref.v[2 * e][0].reshape(-1), ref.v[2 * e + 1][0].reshape(-1)])
             for e in range(experts)]
        )  # fmt: skip
        assert v.shape == expected.shape, (tuple(v.shape), tuple(expected.shape))
        assert _rel_err(v, expected) < 1e-5

    # The whole-tensor reference with the group's own layout options agrees (both float64).
    layout = dict(layout="transposed") if aria else {}
    whole = _reference(cls, [w0.double()], opts, [[g] for g in grads],
                       split_sizes=(ff, ff), **layout)  # fmt: skip
    for a, r in zip(halves(whole.params[0], ff, aria), ref.params):
        assert _rel_err(a, r) < 1e-12

    # The comparison can fail: the fused experts (split ignored) move differently, and so does
    # the Aria layout split along the wrong axis (its input dim d, read as rows).
    unsplit = _reference(cls, whole_experts(w0, aria), opts,
                         [whole_experts(g, aria) for g in grads])  # fmt: skip
    for e, r in enumerate(unsplit.params):
        assert _rel_err(whole_experts(w, aria)[e], r) > 1e-3
    if aria:
        wrong = _reference(cls, [w0.double()], opts, [[g] for g in grads],
                           split_sizes=(d // 2, d // 2))  # fmt: skip
        assert _rel_err(w, wrong.params[0]) > 1e-3


@pytest.mark.parametrize("case", ["normuon_rows", "muon_preserve_norm"])
def test_aria_down_proj_is_read_with_its_outputs_as_neurons(case):
    """Aria's down_proj (E, ff, d) is used as ``h @ W[e]``: its output neurons are its d
    columns, so by the definition expert e is the (d, ff) matrix ``W[e].T``."""
    cls, opts = CASES[case]
    experts, d, ff = SHAPES["tall_halves"]  # ff > d: the two readings scale differently
    model = MoE(experts, d, ff, aria=True)
    down = model.experts.down_proj
    d0 = down.detach().clone()
    groups = param_groups(model, split_gate_up=True, lr=LR, weight_decay=WEIGHT_DECAY, **opts)
    opt = cls(groups, ns_dtype=torch.float32)
    grads = _grads(down.shape, STEPS, seed=2)
    for g in grads:
        down.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    as_outputs = lambda t: [t[e].T.double().contiguous() for e in range(experts)]  # noqa: E731
    ref = _reference(cls, as_outputs(d0), opts, [as_outputs(g) for g in grads])
    for e, (a, r) in enumerate(zip(as_outputs(down.detach()), ref.params)):
        assert _rel_err(a, r) < 2e-6, (e, _rel_err(a, r))

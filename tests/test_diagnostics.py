"""normuon.diagnostics: per-neuron update statistics on updates whose values are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import normuon
from normuon.diagnostics import (
    NeuronDiagnostics,
    hidden_matrices,
    layer_type,
    neuron_norms,
    spectrum_stats,
    spread,
    update_stats,
)


def _rows_with_norms(norms: list[float], fan_in: int, seed: int = 0) -> torch.Tensor:
    # (out, in) = diag(norms) @ Q with orthonormal rows Q: row i has norm norms[i] and the
    # singular values are exactly the norms.
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(fan_in, len(norms), generator=g, dtype=torch.float64))
    return torch.tensor(norms, dtype=torch.float64)[:, None] * q.T


def test_known_row_norms_give_known_statistics():
    u = _rows_with_norms([1.0, 2.0, 3.0, 4.0], fan_in=6)
    assert torch.allclose(neuron_norms(u), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    stats = update_stats(u)
    assert stats["neuron_cv"] == pytest.approx(math.sqrt(1.25) / 2.5)
    assert stats["neuron_max_min"] == pytest.approx(4.0)
    p = torch.tensor([4.0, 3.0, 2.0, 1.0]) / 10
    assert stats["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert stats["condition"] == pytest.approx(4.0)
    assert stats["update_norm"] == pytest.approx(math.sqrt(30.0))


def test_balanced_and_degenerate_updates():
    even = update_stats(_rows_with_norms([2.0] * 5, fan_in=5))
    assert even["neuron_cv"] == pytest.approx(0.0, abs=1e-12)
    assert even["neuron_max_min"] == pytest.approx(1.0)
    assert even["effective_rank"] == pytest.approx(5.0)
    # Rank one: one singular value, a dead row.
    rank1 = torch.outer(torch.tensor([1.0, 0.0, 2.0]), torch.ones(4))
    s = spectrum_stats(rank1)
    assert s["effective_rank"] == pytest.approx(1.0)
    assert s["condition"] == math.inf
    assert spread(neuron_norms(rank1))["max_min"] == math.inf


def test_conv_kernels_and_stacks_are_viewed_as_rows():
    conv = torch.zeros(3, 2, 2, 2)  # (out, in, kh, kw): neuron = output channel
    conv[0] += 1.0  # norm sqrt(8)
    conv[1, 0, 0, 0] = 2.0
    conv[2, 1, 1, 1] = -4.0
    assert neuron_norms(conv).tolist() == pytest.approx([math.sqrt(8.0), 2.0, 4.0])
    stack = torch.ones(2, 3, 4)  # (E, out, in): 6 neurons of norm 2
    assert neuron_norms(stack).tolist() == pytest.approx([2.0] * 6)
    with pytest.raises(ValueError, match="2 dims"):
        neuron_norms(torch.ones(4))


def test_layer_types():
    assert layer_type("blocks.3.attn.qkv.weight") == "blocks.*.attn.qkv.weight"
    assert layer_type("0.weight") == "*.weight"
    assert layer_type("lm_head.weight") == "lm_head.weight"


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_hooks_measure_the_parameter_change_of_the_step(tmp_path):
    # SGD with lr 1: the update is exactly -grad, so the recorded statistics are the known ones.
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Linear(4, 4, bias=True))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    writer = _FakeWriter()
    diag = NeuronDiagnostics(model.named_parameters(), every=2, jsonl=tmp_path / "d.jsonl",
                             writer=writer).attach(opt)  # fmt: skip
    grad0 = _rows_with_norms([1.0, 2.0, 3.0, 4.0], fan_in=6).float()
    grad1 = _rows_with_norms([1.0, 1.0, 1.0, 1.0], fan_in=4).float()
    for _ in range(4):
        model[0].weight.grad, model[1].weight.grad = grad0.clone(), grad1.clone()
        model[1].bias.grad = torch.ones(4)
        opt.step()
    assert [r["step"] for r in diag.records] == [2, 4]  # every 2nd step
    rec = diag.records[-1]
    assert set(rec["matrices"]) == {"0.weight", "1.weight"}  # vectors are not tracked
    assert rec["matrices"]["0.weight"]["neuron_cv"] == pytest.approx(math.sqrt(1.25) / 2.5,
                                                                     rel=1e-5)  # fmt: skip
    assert rec["matrices"]["0.weight"]["neuron_max_min"] == pytest.approx(4.0, rel=1e-5)
    assert rec["matrices"]["1.weight"]["neuron_cv"] == pytest.approx(0.0, abs=1e-5)
    # Layer types "*.weight": the mean of the two matrices.
    assert rec["layer_types"]["*.weight"]["neuron_cv"] == pytest.approx(
        (math.sqrt(1.25) / 2.5) / 2, rel=1e-5)  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    assert ("neurons/overall/neuron_cv", rec["overall"]["neuron_cv"], 4) in writer.scalars
    diag.detach()
    opt.step()
    assert len(diag.records) == 2


@pytest.mark.parametrize("name", ["adamw", "muon", "normuon"])
def test_works_with_the_three_optimizers(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 32, bias=False),
                          nn.Linear(32, 8, bias=False))  # fmt: skip
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        cls = normuon.Muon if name == "muon" else normuon.NorMuon
        opt = cls(normuon.param_groups(model, lr=0.02), ns_dtype=torch.float32)
    diag = NeuronDiagnostics(hidden_matrices(model), every=1).attach(opt)
    assert set(diag.params) == {"1.weight", "2.weight"}  # the embedding is not hidden
    for _ in range(3):
        model(torch.randint(0, 16, (4,))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert len(diag.records) == 3
    last = diag.records[-1]["matrices"]["1.weight"]
    assert last["neuron_cv"] >= 0 and last["effective_rank"] >= 1
    assert ("second_moment_cv" in last) == (name == "normuon")


def test_normuon_evens_out_the_neurons_muon_leaves_uneven():
    # A tall matrix (out > in) with very different row scales in its gradient: Muon's
    # orthogonalized update keeps uneven row norms, NorMuon's per-neuron normalization evens
    # them (the paper's observation, on a constructed gradient).
    scales = torch.logspace(-2, 0, 32)
    cvs = {}
    for cls in (normuon.Muon, normuon.NorMuon):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(32, 8))
        opt = cls([{"params": [w], "lr": 0.02}], ns_dtype=torch.float32)
        diag = NeuronDiagnostics([("w", w)], every=1).attach(opt)
        for _ in range(10):
            w.grad = scales[:, None] * torch.randn(32, 8)
            opt.step()
        cvs[cls.__name__] = diag.records[-1]["overall"]["neuron_cv"]
    assert cvs["NorMuon"] < 0.5 * cvs["Muon"], cvs


def test_bad_arguments():
    w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="every"):
        NeuronDiagnostics([("w", w)], every=0)
    with pytest.raises(ValueError, match="no matrix parameter"):
        NeuronDiagnostics([("b", nn.Parameter(torch.ones(3)))])
    with pytest.raises(TypeError, match="pairs"):
        NeuronDiagnostics([w])

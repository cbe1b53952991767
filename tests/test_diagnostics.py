"""normuon.diagnostics: per-neuron update statistics on updates whose values are known."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import normuon
from normuon.diagnostics import (
    DEAD_FRACTION,
    NeuronDiagnostics,
    hidden_matrices,
    layer_type,
    neuron_norms,
    neuron_spread,
    spectrum_stats,
    spread,
    update_stats,
)
from normuon.geometry import matrix_geometry, neuron_rows


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


def _percentile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation between the two closest ranks (numpy's default), written out.
    pos = q * (len(sorted_values) - 1)
    below = math.floor(pos)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (pos - below) * (sorted_values[above] - sorted_values[below])


def _reference_robust_spread(update: torch.Tensor) -> dict[str, float]:
    """p95/p5 of the live neurons and the dead count of a 2-D update, one row at a time."""
    rows = update.double().tolist()
    norms = sorted(math.sqrt(sum(x * x for x in row)) for row in rows)
    median = _percentile(norms, 0.5)
    dead = [n for n in norms if n <= DEAD_FRACTION * median]
    live = [n for n in norms if n > DEAD_FRACTION * median]
    return {"p95_p5": _percentile(live, 0.95) / _percentile(live, 0.05), "dead": len(dead),
            "dead_frac": len(dead) / len(norms)}  # fmt: skip


@pytest.mark.parametrize(
    "shape,dead_rows",
    [((7, 5), []), ((64, 16), [3]), ((256, 32), [0, 9, 200]), ((40, 8), [1, 2, 3, 4, 5, 6])],
)
def test_robust_spread_matches_a_float64_reference(shape, dead_rows):
    g = torch.Generator().manual_seed(shape[0])
    # Log-normal row scales: a wide spread whose percentiles differ from the max and min.
    scales = torch.exp(1.5 * torch.randn(shape[0], 1, generator=g, dtype=torch.float64))
    u = (torch.randn(shape, generator=g, dtype=torch.float64) * scales).float()
    for i, row in enumerate(dead_rows):
        u[row] *= 1e-5 if i % 2 else 0.0  # near-dead and exactly dead rows
    expected = _reference_robust_spread(u)
    stats = update_stats(u, spectrum=False)
    assert stats["neuron_p95_p5"] == pytest.approx(expected["p95_p5"], rel=1e-9)
    assert stats["neuron_dead"] == expected["dead"] == len(dead_rows)
    assert stats["neuron_dead_frac"] == pytest.approx(expected["dead_frac"], rel=1e-12)
    assert stats["neurons"] == shape[0]


def test_a_near_dead_neuron_is_counted_apart_from_the_spread():
    # 100 neurons with norms spread evenly over [1, 2], and one that has almost stopped moving:
    # the max/min explodes, the percentile ratio of the others stays that of [1, 2].
    norms = [1.0 + i / 99 for i in range(100)] + [1e-7]
    u = _rows_with_norms(norms, fan_in=128)
    stats = update_stats(u, spectrum=False)
    assert stats["neuron_max_min"] > 1e7
    assert stats["neuron_p95_p5"] == pytest.approx(1.95 / 1.05, rel=1e-9)
    assert stats["neuron_dead"] == 1 and stats["neuron_dead_frac"] == pytest.approx(1 / 101)
    # Just above the threshold a neuron is live and pulls p5 down only by its rank.
    alive = neuron_spread(torch.tensor(norms[:100] + [2e-3 * 1.5]))
    assert alive["dead"] == 0 and alive["p95_p5"] < 2.0
    # Rows of zeros are dead even when they are the majority (the median is then 0).
    mostly_zero = neuron_spread(torch.tensor([0.0, 0.0, 0.0, 2.0, 4.0]))
    assert mostly_zero["dead"] == 3
    assert mostly_zero["p95_p5"] == pytest.approx((2.0 + 0.95 * 2.0) / (2.0 + 0.05 * 2.0))
    assert math.isnan(neuron_spread(torch.zeros(3))["p95_p5"])


def test_dead_counts_add_up_over_matrices():
    sizes = {"a.0.w": 4, "a.1.w": 6}  # one layer type "a.*.w"
    tracked = [(name, torch.zeros(n, 3, requires_grad=True)) for name, n in sizes.items()]
    diag = NeuronDiagnostics(tracked, every=1)

    def rows(norms: list[float]) -> torch.Tensor:  # (len(norms), 3), row i of norm norms[i]
        r = torch.randn(len(norms), 3, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)  # fmt: skip
        return r / torch.linalg.vector_norm(r, dim=1, keepdim=True) * torch.tensor(norms)[:, None]

    a0 = rows([1.0, 1.0, 1.0, 0.0])  # one dead of 4
    a1 = rows([1.0, 2.0, 1e-9, 1.0, 0.0, 1.0])  # two dead of 6
    rec = diag.record(1, {"a.0.w": a0, "a.1.w": a1})
    assert rec["matrices"]["a.0.w"]["neuron_dead"] == 1
    assert rec["matrices"]["a.1.w"]["neuron_dead"] == 2
    for scope in (rec["overall"], rec["layer_types"]["a.*.w"]):
        assert scope["neuron_dead"] == 3 and scope["neurons"] == 10
        assert scope["neuron_dead_frac"] == pytest.approx(0.3)  # 3 of 10, not mean(1/4, 2/6)
        assert scope["neuron_cv"] == pytest.approx((rec["matrices"]["a.0.w"]["neuron_cv"]
                                                    + rec["matrices"]["a.1.w"]["neuron_cv"]) / 2)


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


# ------------------------------------------------- neurons as the optimizer's geometry sees them


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 ``Conv1D``: weight stored (nx, nf) = (in, out), used as ``x @ W``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Experts(nn.Module):
    """A stack of E expert matrices (E, out, in) in one parameter."""

    def __init__(self, experts: int, out: int, fan_in: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(experts, out, fan_in) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("eoi,bi->beo", self.w, x).sum(1)


def _optimizer_view_norms(update: torch.Tensor, layout: str) -> torch.Tensor:
    # Independent of diagnostics: the rows of the (B, m, n) stack the optimizer works on.
    stack = matrix_geometry(update.shape, layout).as_matrices(update).double()
    return torch.linalg.vector_norm(stack, dim=-1).flatten()


def _sgd_step(model: nn.Module, grads: dict[str, torch.Tensor], diag: NeuronDiagnostics):
    # SGD with lr 1: the recorded update is exactly -grad.
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    diag.attach(opt)
    named = dict(model.named_parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for name, g in grads.items():
        named[name].grad = g.clone()
    opt.step()
    diag.detach()
    return diag.records[-1]["matrices"]


def test_hf_conv1d_neurons_are_the_columns_of_the_stored_weight():
    # Conv1D(nf=4, nx=6): weight (6, 4). Output neuron j is column j; its norms are 1, 2, 3, 4
    # while the 6 stored rows (input features) have other, unequal norms.
    model = nn.Sequential(Conv1D(4, 6), nn.ReLU(), nn.Linear(4, 3))
    grad = _rows_with_norms([1.0, 2.0, 3.0, 4.0], fan_in=6).T.float().contiguous()
    assert grad.shape == model[0].weight.shape == (6, 4)
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(_optimizer_view_norms(grad, "transposed"), expected, atol=1e-6)
    assert not torch.allclose(neuron_norms(grad)[:4], expected, atol=1e-3)  # rows differ

    got = neuron_norms(grad, layout="transposed")
    assert got.shape == (4,)
    assert torch.allclose(got, expected, atol=1e-6)
    assert neuron_rows(grad, "transposed").shape == (4, 6)

    diag = NeuronDiagnostics(model, every=1)  # layouts learnt from the modules
    assert diag.layouts == {"0.weight": "transposed", "2.weight": "auto"}
    stats = _sgd_step(model, {"0.weight": grad}, diag)["0.weight"]
    assert stats["neuron_cv"] == pytest.approx(math.sqrt(1.25) / 2.5, rel=1e-5)
    assert stats["neuron_max_min"] == pytest.approx(4.0, rel=1e-5)
    assert stats["condition"] == pytest.approx(4.0, rel=1e-5)


def test_hf_conv1d_with_hidden_matrices_and_normuon():
    model = nn.Sequential(nn.Embedding(16, 6), Conv1D(8, 6), nn.ReLU(), Conv1D(6, 8))
    tracked = hidden_matrices(model)
    assert [n for n, _ in tracked] == ["1.weight", "3.weight"]
    # Without the model the pairs are read by shape; model= gives the optimizer's layouts.
    assert set(NeuronDiagnostics(tracked).layouts.values()) == {"auto"}
    diag = NeuronDiagnostics(tracked, model=model, every=1)
    assert diag.layouts == {"1.weight": "transposed", "3.weight": "transposed"}
    opt = normuon.NorMuon(normuon.param_groups(model, lr=0.02), ns_dtype=torch.float32)
    diag.attach(opt)
    before = model[1].weight.detach().clone()
    model(torch.randint(0, 16, (5,))).square().mean().backward()
    opt.step()
    update = model[1].weight.detach() - before
    stats = diag.records[-1]["matrices"]["1.weight"]
    expected = spread(_optimizer_view_norms(update, "transposed"))  # 8 neurons, per column
    assert stats["neuron_cv"] == pytest.approx(expected["cv"], rel=1e-6)
    assert stats["neuron_max_min"] == pytest.approx(expected["max_min"], rel=1e-6)
    assert opt.state[model[1].weight]["neuron_second_moment"].numel() == 8


def test_conv1d_kernel_has_one_neuron_per_output_channel():
    conv = nn.Conv1d(4, 6, 3, bias=False)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(6, 4, 3, generator=g)
    grad[:, 1:] = 0.0  # the stack view would see dead (in, k) rows: max/min inf
    grad = grad / torch.linalg.vector_norm(grad.flatten(1), dim=1)[:, None, None]
    grad = grad * torch.arange(1.0, 7.0)[:, None, None]  # channel c has norm c + 1
    expected = torch.arange(1.0, 7.0, dtype=torch.float64)

    assert neuron_rows(grad, "conv").shape == (6, 12)
    assert torch.allclose(neuron_norms(grad, layout="conv"), expected, atol=1e-6)
    assert torch.allclose(_optimizer_view_norms(grad, "conv"), expected, atol=1e-6)
    assert neuron_norms(grad).shape == (24,)  # auto: a 3-D tensor is a stack, as before

    model = nn.Sequential(conv)
    diag = NeuronDiagnostics(model, every=1)
    assert diag.layouts == {"0.weight": "conv"}
    stats = _sgd_step(model, {"0.weight": grad}, diag)["0.weight"]
    assert stats["neuron_max_min"] == pytest.approx(6.0, rel=1e-5)
    assert stats["neuron_cv"] == pytest.approx(float(expected.std(unbiased=False) / 3.5),
                                               rel=1e-5)  # fmt: skip
    assert stats["effective_rank"] <= 6.0 + 1e-9  # of a (6, 12) matrix, not (24, 3)


def test_stacked_parameter_has_e_times_m_neurons():
    model = Experts(experts=2, out=3, fan_in=5)
    norms = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    grad = _rows_with_norms(norms, fan_in=6)[:, :5].float()  # 6 rows; truncate to fan_in 5
    row_norms = torch.linalg.vector_norm(grad.double(), dim=1)
    grad = grad.reshape(2, 3, 5)
    for layout in ("auto", "stacked"):
        got = neuron_norms(grad, layout=layout)
        assert got.shape == (6,)
        assert torch.allclose(got, row_norms, atol=1e-6)
        assert torch.allclose(got, _optimizer_view_norms(grad, layout), atol=1e-6)
    diag = NeuronDiagnostics(model, every=1)
    assert diag.layouts == {"w": "auto"}
    stats = _sgd_step(model, {"w": grad}, diag)["w"]
    assert stats["neuron_cv"] == pytest.approx(float(spread(row_norms)["cv"]), rel=1e-5)
    assert stats["neuron_max_min"] == pytest.approx(float(spread(row_norms)["max_min"]),
                                                    rel=1e-5)  # fmt: skip


def test_linear_is_unchanged():
    u = _rows_with_norms([1.0, 2.0, 3.0], fan_in=5)
    expected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(neuron_norms(u), expected)
    assert torch.allclose(neuron_norms(u, layout="auto"), expected)
    assert torch.allclose(_optimizer_view_norms(u, "auto"), expected)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    diag = NeuronDiagnostics(model, every=1)
    assert diag.layouts == {"0.weight": "auto"}
    stats = _sgd_step(model, {"0.weight": u.float()}, diag)["0.weight"]
    assert stats["neuron_max_min"] == pytest.approx(3.0, rel=1e-5)


def test_optimizer_group_layout_wins_while_attached():
    # A weight declared (in, out) only through its group: the diagnostics read it that way
    # while attached to that optimizer, and by shape again after detach.
    w = nn.Parameter(torch.randn(6, 4))
    opt = normuon.NorMuon([{"params": [w], "lr": 0.02, "layout": "transposed"}],
                          ns_dtype=torch.float32)  # fmt: skip
    diag = NeuronDiagnostics([("w", w)], every=1)
    assert diag.layouts == {"w": "auto"}
    diag.attach(opt)
    assert diag.layouts == {"w": "transposed"}
    before = w.detach().clone()
    w.grad = _rows_with_norms([1.0, 2.0, 3.0, 4.0], fan_in=6).T.float().contiguous()
    opt.step()
    stats = diag.records[-1]["matrices"]["w"]
    expected = spread(_optimizer_view_norms(w.detach() - before, "transposed"))
    assert stats["neuron_cv"] == pytest.approx(expected["cv"], rel=1e-6)
    assert opt.state[w]["neuron_second_moment"].numel() == 4  # one per neuron measured
    diag.detach()
    assert diag.layouts == {"w": "auto"}
    # Explicit layouts= for loops without such an optimizer.
    assert NeuronDiagnostics([("w", w)], layouts={"w": "transposed"}).layouts == {
        "w": "transposed"}  # fmt: skip


def test_bad_layouts():
    w = nn.Parameter(torch.ones(3, 2))
    with pytest.raises(ValueError, match="'bogus'"):
        neuron_norms(torch.ones(3, 2), layout="bogus")
    with pytest.raises(ValueError, match="'bogus'"):
        NeuronDiagnostics([("w", w)], layouts={"w": "bogus"})
    with pytest.raises(ValueError, match=r"\['v'\]"):
        NeuronDiagnostics([("w", w)], layouts={"v": "auto"})
    with pytest.raises(TypeError, match="list"):
        NeuronDiagnostics([("w", w)], layouts=[("w", "auto")])
    with pytest.raises(TypeError, match="str"):
        NeuronDiagnostics([("w", w)], model="model")
    with pytest.raises(ValueError, match="not a parameter of the model Linear"):
        NeuronDiagnostics([("w", w)], model=nn.Linear(2, 3))

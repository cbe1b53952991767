"""Routing and updates on real transformers models (GPT-2 with its Conv1D layers, Llama), tiny
random-weight configs, nothing downloaded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import linear_twin, tiny_gpt2, tiny_llama, token_batches  # noqa: E402

from normuon import Muon, NorMuon, param_groups  # noqa: E402
from normuon.grouping import describe_groups  # noqa: E402


def _by_name(model, groups):
    return {row.name: row for row in describe_groups(model, groups).rows}


def test_gpt2_routing():
    model = tiny_gpt2()
    rows = _by_name(model, param_groups(model))
    # lm_head is tied to wte: one row under both names, AdamW.
    assert rows["transformer.wte.weight=lm_head.weight"].algorithm == "adamw"
    assert rows["transformer.wpe.weight"].algorithm == "adamw"
    for i in range(2):
        attn, mlp = f"transformer.h.{i}.attn", f"transformer.h.{i}.mlp"
        expected = {f"{attn}.c_attn.weight": 48, f"{attn}.c_proj.weight": 16,
                    f"{mlp}.c_fc.weight": 64, f"{mlp}.c_proj.weight": 16}  # fmt: skip
        for name, neurons in expected.items():
            row = rows[name]
            assert (row.algorithm, row.layout, row.neurons) == ("matrix", "transposed", neurons)
            assert row.split_sizes is None
        for name in [f"{attn}.c_attn.bias", f"transformer.h.{i}.ln_1.weight"]:
            assert rows[name].algorithm == "adamw"
    assert len(rows) == len(list(model.parameters()))

    split_rows = _by_name(model, param_groups(model, split_qkv=True))
    assert split_rows["transformer.h.0.attn.c_attn.weight"].split_sizes == (16, 16, 16)
    assert split_rows["transformer.h.0.mlp.c_fc.weight"].split_sizes is None


@pytest.mark.parametrize("tied", [False, True])
def test_llama_routing(tied):
    model = tiny_llama(tied=tied)
    groups = param_groups(model)
    assert len(groups) == 2 and "layout" not in groups[0] and groups[1]["algorithm"] == "adamw"
    rows = _by_name(model, groups)
    head = "model.embed_tokens.weight=lm_head.weight" if tied else "lm_head.weight"
    assert rows[head].algorithm == "adamw"
    assert rows["model.embed_tokens.weight" if not tied else head].algorithm == "adamw"
    neurons = {"self_attn.q_proj": 16, "self_attn.k_proj": 8, "self_attn.v_proj": 8,
               "self_attn.o_proj": 16, "mlp.gate_proj": 32, "mlp.up_proj": 32,
               "mlp.down_proj": 16}  # fmt: skip
    for i in range(2):
        for layer, count in neurons.items():
            row = rows[f"model.layers.{i}.{layer}.weight"]
            assert (row.algorithm, row.layout, row.neurons) == ("matrix", "auto", count)
        assert rows[f"model.layers.{i}.input_layernorm.weight"].algorithm == "adamw"
    assert rows["model.norm.weight"].algorithm == "adamw"


def test_describe_groups_table_and_optimizer():
    model = tiny_llama()
    opt = Muon(param_groups(model))
    summary = describe_groups(model, opt)
    text = str(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["group", "name", "shape", "algorithm", "layout", "neurons", "split"]
    q_line = next(line for line in lines if "layers.0.self_attn.q_proj.weight" in line)
    assert q_line.split() == ["0", "model.layers.0.self_attn.q_proj.weight", "16x16", "muon",
                              "auto", "16", "-"]  # fmt: skip
    matrix_elements = sum(p.numel() for g in opt.param_groups if g["algorithm"] == "muon"
                          for p in g["params"])  # fmt: skip
    assert summary.counts()["muon"] == matrix_elements
    assert f"muon {matrix_elements:,}" in lines[-1] and lines[-1].startswith("elements: ")
    assert summary.as_dicts()[0]["name"] == "model.embed_tokens.weight"


def test_describe_groups_marks_parameters_in_no_group():
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    rows = _by_name(model, param_groups(model))
    assert rows["model.norm.weight"].algorithm == "not optimized"
    assert rows["model.norm.weight"].group is None


def _train(model, opt, batches) -> list[float]:
    losses = []
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_twin_params_close(model, twin, **tolerance):
    """Conv1D weights (in, out) against the twin's Linear weights (out, in) transposed."""
    conv1d_weights = {f"{name}.weight" for name, m in model.named_modules()
                      if type(m).__name__ == "Conv1D"}  # fmt: skip
    assert len(conv1d_weights) == 4 * len(model.transformer.h)
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        twin_p = twin_params[name].detach()
        expected = twin_p.t() if name in conv1d_weights else twin_p
        torch.testing.assert_close(p.detach(), expected, msg=name, **tolerance)


def test_linear_twin_is_the_same_network():
    """The comparison below is fair: same function, and an elementwise optimizer (AdamW, blind
    to the layout) keeps both in step."""
    model = tiny_gpt2(n_layer=1)
    twin = linear_twin(model)
    assert type(twin.transformer.h[0].mlp.c_fc).__name__ == "Linear"
    assert twin.transformer.h[0].mlp.c_fc.weight.shape == (64, 16)
    batches = token_batches(3)
    losses = _train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches)
    twin_losses = _train(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), batches)
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    _assert_twin_params_close(model, twin, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split_qkv", [False, True], ids=["fused_qkv", "split_qkv"])
@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_gpt2_conv1d_updates_equal_linear_twin(cls, split_qkv):
    """GPT-2's Conv1D weights (in, out) follow the same network written with nn.Linear."""
    model = tiny_gpt2(n_layer=1)
    twin = linear_twin(model)
    batches = token_batches(4)
    options = dict(lr=0.02, weight_decay=0.01, adamw_lr=1e-3, split_qkv=split_qkv)
    opt = cls(param_groups(model, **options), ns_dtype=torch.float32)
    twin_opt = cls(param_groups(twin, **options), ns_dtype=torch.float32)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model, opt, batches)
    twin_losses = _train(twin, twin_opt, batches)
    for name, p in model.named_parameters():
        assert not torch.equal(p, start[name]), f"{name} did not move"
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    _assert_twin_params_close(model, twin, rtol=1e-4, atol=1e-5)
    if cls is NorMuon:  # one second-moment entry per output neuron, as for the Linear twin
        weight = model.transformer.h[0].mlp.c_fc.weight  # (16, 64): 64 neurons
        assert opt.state[weight]["neuron_second_moment"].shape == (64,)


def test_normuon_first_update_is_even_across_gpt2_output_neurons():
    """NorMuon normalizes per output neuron: a Conv1D weight (in, out) has one neuron per column,
    so the first update's RMS is the same in every column (coefficient of variation ~0)."""
    model = tiny_gpt2(n_layer=1)
    opt = NorMuon(param_groups(model, weight_decay=0.0), ns_dtype=torch.float32)
    block = model.transformer.h[0]
    weights = {"c_attn": block.attn.c_attn.weight, "c_proj": block.attn.c_proj.weight,
               "c_fc": block.mlp.c_fc.weight, "mlp.c_proj": block.mlp.c_proj.weight}  # fmt: skip
    before = {name: w.detach().clone() for name, w in weights.items()}
    tokens = token_batches(1)[0]
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    for name, w in weights.items():
        update = w.detach() - before[name]  # (in, out)
        column_rms = update.square().mean(dim=0).sqrt()  # (out,): one per output neuron
        spread = (column_rms.std() / column_rms.mean()).item()
        assert spread < 1e-3, (name, spread)

"""A run's length given in tokens per parameter: resolved once, by resolve_spec, into steps
(``ceil(tokens_per_param * params / (batch_size * seq_len))``), with the parameters counted
in either convention, never together with an explicit step count, and written once."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from normuon.cli import _config, _parser, main
from normuon.harness.compare import stretched
from normuon.harness.config import LADDER_SHAPES, PRESETS, ModelConfig, get_preset
from normuon.harness.data import load_data
from normuon.harness.model import GPT, count_parameters
from normuon.harness.spec import resolve_spec, steps_for_tokens_per_param, tokens_per_step

SMOKE = ["--preset", "cpu-smoke", "--no-progress", "--diagnostics-every", "0"]


@pytest.fixture(scope="module")
def data():
    return load_data()


def _budgeted(preset: str, tpp: float, param_count: str = "all"):
    cfg = get_preset(preset)
    cfg.train.steps, cfg.train.tokens_per_param, cfg.train.param_count = 0, tpp, param_count
    return cfg


def _manual_counts(model: GPT) -> dict[str, int]:
    """Every parameter by name, and those that are not the token embedding or the head."""
    named = dict(model.named_parameters())
    vocab = ("embed.weight", "lm_head.weight")
    return {"all": sum(p.numel() for p in named.values()),
            "non_embedding": sum(p.numel() for n, p in named.items() if n not in vocab)}


# ---------------------------------------------------------------- the conversion


def test_steps_are_the_budget_rounded_up_to_whole_steps():
    assert steps_for_tokens_per_param(20, 14_336, 1024) == 280  # exactly 280 steps: no +1
    assert steps_for_tokens_per_param(20, 14_337, 1024) == 281  # a token short: one more
    assert steps_for_tokens_per_param(0.1, 10_240, 1024) == 1  # 1/10 exactly, not 0.1000...06
    assert steps_for_tokens_per_param(1.7, 180_224, 1024) == math.ceil(1.7 * 180_224 / 1024)
    assert steps_for_tokens_per_param(1e-9, 10, 1024) == 1  # at least one step
    for tpp, params, per_step in ((20, 180_224, 1024), (45, 910_495_744, 2_097_152),
                                  (3.3, 12_345, 256), (0.37, 40_960, 256)):
        steps = steps_for_tokens_per_param(tpp, params, per_step)
        assert steps * per_step >= tpp * params > (steps - 1) * per_step


def test_tokens_per_step_is_the_global_batch_times_the_sequence(data):
    # batch_size is the batch of all ranks and micro-batches: they divide it, never multiply.
    cfg = _budgeted("ladder-m", 20)
    single, _ = resolve_spec(cfg, data, optimizers=["muon"])
    cfg.train.grad_accum = 2
    split, _ = resolve_spec(cfg, data, optimizers=["muon"], world_size=2)
    for spec in (single, split):
        assert spec.budget.tokens_per_step == tokens_per_step(spec.train) == 16 * 64
        assert spec.train.steps == spec.budget.steps == 3520  # 20 * 180,224 / 1,024


# ---------------------------------------------------------------- which parameters count


@pytest.mark.parametrize(
    "shape",
    [dict(n_layer=2, d_model=16, n_head=2, n_kv_head=2),  # the xs rung
     dict(n_layer=4, d_model=96, n_head=3, n_kv_head=3),  # the l rung
     dict(n_layer=3, d_model=64, n_head=4, n_kv_head=2, mlp_ratio=3, vocab_size=300)],  # GQA
    ids=["xs", "l", "gqa"],
)  # fmt: skip
def test_both_conventions_match_a_sum_over_the_named_parameters(shape):
    cfg = ModelConfig(max_seq_len=64, **shape)
    counts = count_parameters(cfg)
    assert counts == _manual_counts(GPT(cfg))
    d, v = cfg.d_model, cfg.vocab_size
    assert counts["all"] - counts["non_embedding"] == 2 * v * d  # embedding + untied head


def test_the_budget_counts_in_the_chosen_convention(data):
    for size in LADDER_SHAPES:
        model = GPT(get_preset(f"ladder-{size}").model)
        manual = _manual_counts(model)
        for convention in ("all", "non_embedding"):
            spec, _ = resolve_spec(_budgeted(f"ladder-{size}", 20, convention), data,
                                   optimizers=["normuon"])  # fmt: skip
            b = spec.budget
            assert (b.param_count, b.params) == (convention, manual[convention])
            assert (b.params_all, b.params_non_embedding) == (manual["all"],
                                                              manual["non_embedding"])
            assert b.steps == math.ceil(20 * manual[convention] / 1024) == spec.train.steps
            assert b.tokens == b.steps * 1024 and b.achieved_tokens_per_param >= 20
    with pytest.raises(ValueError, match="param_count must be one of"):
        resolve_spec(_budgeted("ladder-xs", 20, "embedding"), data, optimizers=["adamw"])


def test_the_vocabulary_counted_is_the_datas(data):
    cfg = _budgeted("ladder-xs", 20)
    cfg.model.vocab_size = 50257  # the data (bytes) decides: 256
    spec, _ = resolve_spec(cfg, data, optimizers=["adamw"])
    assert spec.budget.params_all == 14_336 != count_parameters(cfg.model)["all"]


# ---------------------------------------------------------------- steps or tokens, not both


@pytest.mark.parametrize(
    "argv, message",
    [(["--steps", "10", "--tokens-per-param", "20"],
      "--steps 10 and --tokens-per-param 20 both set the run's length"),
     (["--set", "train.steps=10", "--tokens-per-param", "20"],
      "--set train.steps and --tokens-per-param 20 both set the run's length"),
     (["--set", "train.tokens_per_param=20", "--steps", "10"],
      "--steps 10 and train.tokens_per_param=20 (preset cpu-smoke, --config or --set) both"),
     (["--set", "train.tokens_per_param=20", "--set", "train.steps=10"],
      "train.steps=10 and train.tokens_per_param=20 both set the run's length (20 tokens per "
      "parameter is 3200 steps)"),
     (["--tokens-per-param", "0.001", "--set", "train.warmup_steps=5"],
      "warmup_steps=5 exceeds steps=1, the length of tokens_per_param=0.001"),
     (["--set", "train.tokens_per_param=-1"], "tokens_per_param must be a finite number >= 0"),
     (["--set", "train.param_count=embedding"], "param_count must be one of")],
    ids=["cli-both", "set-steps", "preset-tpp", "config-both", "warmup", "negative", "count"],
)  # fmt: skip
def test_steps_and_tokens_per_param_together_are_an_error_naming_both(tmp_path, capsys, argv,
                                                                      message):  # fmt: skip
    out = tmp_path / "out"
    assert main(["train", *SMOKE, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normuon train: error: ") and message in err, err
    assert "\n" not in err and not out.exists()


def test_a_tokens_per_param_preset_refuses_steps(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--preset", "ladder-xs-20tpp", "--steps", "5", "--out", str(out)]) == 2
    assert "--steps 5 and train.tokens_per_param=20 (preset ladder-xs-20tpp" in (
        capsys.readouterr().err)  # fmt: skip
    assert not out.exists()


def test_python_callers_get_the_same_error(data):
    cfg = _budgeted("cpu-smoke", 20)
    cfg.train.steps = 10
    with pytest.raises(ValueError, match="train.steps=10 and train.tokens_per_param=20 both"):
        resolve_spec(cfg, data, optimizers=["muon"])
    cfg.train.steps = 3200  # the count it derives: a resolved config given back
    assert resolve_spec(cfg, data, optimizers=["muon"])[0].train.steps == 3200


# ---------------------------------------------------------------- resolved and written once


def test_the_spec_holds_the_resolved_length_once(data):
    spec, _ = resolve_spec(_budgeted("ladder-m", 20), data, optimizers=["muon"], stretch=[1.5])
    assert spec.train.steps == spec.budget.steps == 3520 and spec.train.tokens_per_param == 20
    # Written once: the budget in JSON leaves out what the train section already says.
    written = json.dumps(spec.to_json())
    for key in ("steps", "param_count", "tokens_per_param", "achieved_tokens_per_param",
                "params", "tokens", "tokens_per_step"):  # fmt: skip
        assert written.count(f'"{key}"') == 1, key
    assert spec.to_json()["budget"] == {
        "params": 180_224, "params_all": 180_224, "params_non_embedding": 147_456,
        "tokens_per_step": 1024, "tokens": 3_604_480, "achieved_tokens_per_param": 20.0}
    # Consumers read it: to_config and a stretched schedule resolve nothing again.
    assert resolve_spec(spec.to_config(), data, optimizers=["muon"], stretch=[1.5])[0] == spec
    longer = spec.stretched(1.5)
    assert (longer.train.steps, longer.train.tokens_per_param) == (5280, 0.0)
    assert longer.budget == dataclasses.replace(spec.budget, steps=5280, tokens=5280 * 1024,
                                                achieved_tokens_per_param=30.0)  # fmt: skip
    # A RunConfig stretched: that many times the tokens per parameter, the steps derived again.
    cfg = stretched(_budgeted("ladder-m", 20), 1.5)
    assert (cfg.train.steps, cfg.train.tokens_per_param) == (0, 30.0)
    assert resolve_spec(cfg, data, optimizers=["muon"])[0].train.steps == 5280
    # A length in steps has a budget too: the default's 300 steps are 1.70 tokens/param.
    default, _ = resolve_spec(get_preset("cpu-small"), data, optimizers=["muon"])
    assert default.budget.describe() == ("300 steps x 1,024 tokens = 307,200 tokens; 180,224 "
                                         "parameters (all) -> 1.70 tokens/param")  # fmt: skip


def test_a_budgeted_comparison_writes_and_shows_its_budget(tmp_path, capsys, data):
    # The one real run of this file: 4 steps (0.02 x 40,960 parameters / 256 tokens = 3.2).
    out = tmp_path / "cmp"
    assert main(["compare", *SMOKE, "--tokens-per-param", "0.02", "--optimizers", "adamw",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    header = ("cpu-smoke: 4 steps x 256 tokens = 1,024 tokens; 40,960 parameters (all) -> "
              "0.03 tokens/param")  # fmt: skip
    assert header in printed.splitlines()
    top = json.loads((out / "config.json").read_text())
    run = json.loads((out / "adamw" / "seed0" / "config.json").read_text())
    result = json.loads((out / "adamw" / "seed0" / "result.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert top["train"]["steps"] == run["config"]["train"]["steps"] == result["steps"] == 4
    assert top["train"]["tokens_per_param"] == 0.02
    assert top["budget"] == run["budget"] and top["budget"]["tokens"] == 1024
    assert top["budget"]["params_all"] == result["n_params"] == 40_960
    assert results["table"].splitlines()[0] == header
    # The folder's config gives the same spec back.
    again = ["compare", *SMOKE, "--config", str(out / "config.json"), "--optimizers", "adamw"]
    cfg = _config(_parser().parse_args(again))
    assert json.loads(json.dumps(resolve_spec(cfg, data, optimizers=["adamw"])[0].to_json())) == top


# ---------------------------------------------------------------- the 20-tpp presets


def test_every_20tpp_rung_resolves_to_at_least_20_tokens_per_parameter(data):
    rungs = [name for name in PRESETS if name.endswith("-20tpp")]
    assert rungs == [f"ladder-{s}-20tpp" for s in ("xs", "s", "m", "l")]
    steps = {}
    for name in rungs:
        short = get_preset(name.removesuffix("-20tpp"))
        cfg = get_preset(name)
        assert cfg.model == short.model and cfg.optimizers == short.optimizers
        same = ("batch_size", "seq_len", "schedule", "warmup_steps", "cooldown_frac", "grad_clip")
        assert all(getattr(cfg.train, f) == getattr(short.train, f) for f in same)
        spec, _ = resolve_spec(cfg, data, optimizers=["adamw", "muon", "normuon"])
        assert spec.budget.achieved_tokens_per_param >= 20 and spec.budget.param_count == "all"
        assert 14 <= math.ceil(spec.train.steps / spec.train.val_every) <= 17  # ~16 evaluations
        steps[name] = spec.train.steps
    assert steps == {"ladder-xs-20tpp": 280, "ladder-s-20tpp": 800, "ladder-m-20tpp": 3520,
                     "ladder-l-20tpp": 9600}  # fmt: skip

"""A command's settings are resolved and validated once into a frozen RunSpec, which every
consumer reads unchanged; what a run writes comes from it (``vocab_size`` once per file)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
import torch

from normuon.cli import main
from normuon.harness.compare import run_compare, stretched
from normuon.harness.config import RunConfig, apply_config_file, apply_overrides, get_preset
from normuon.harness.data import TokenData, load_data
from normuon.harness.spec import RunSpec, resolve_spec
from normuon.harness.train import CHECKPOINT_NAME, Trainer, train_run

SMOKE = ["--preset", "cpu-smoke", "--no-progress", "--diagnostics-every", "0"]
SWEEP_SMOKE = ["--preset", "cpu-smoke", "--no-progress"]  # (a sweep records no diagnostics)


@pytest.fixture(scope="module")
def data():
    return load_data()


@pytest.fixture
def validations(monkeypatch):
    """Counts calls of the validating function, RunConfig.validate, wherever they come from."""
    calls = []
    original = RunConfig.validate

    def counting(self):
        calls.append(self.preset)
        return original(self)

    monkeypatch.setattr(RunConfig, "validate", counting)
    return calls


# ---------------------------------------------------------------- validated exactly once


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--steps", "3", "--optimizers", "adamw,muon", "--seeds", "2",
         "--stretch", "1.5", "--set", "train.log_every=1"],
        ["train", "--steps", "3", "--optimizer", "normuon", "--seed", "4"],
        ["sweep", "--steps", "2", "--lrs", "muon=0.01,0.02", "--lrs", "adamw=1x"],
    ],
    ids=["compare", "train", "sweep"],
)  # fmt: skip
def test_a_command_validates_its_settings_once(tmp_path, capsys, validations, argv):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"train": {"val_every": 1}}))
    common = SWEEP_SMOKE if argv[0] == "sweep" else SMOKE
    argv = [*argv, *common, "--config", str(settings), "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    # Before: --config, --set, the CLI, run_compare and every training validated again (10
    # for this comparison: 4 + 2 optimizers x 2 seeds + the stretched muon x 2 seeds).
    assert validations == ["cpu-smoke"]


def test_resuming_a_comparison_validates_once(tmp_path, capsys, validations):
    argv = ["compare", *SMOKE, "--steps", "4", "--optimizers", "muon", "--checkpoint-every", "2",
            "--out", str(tmp_path / "cmp")]  # fmt: skip
    assert main(argv) == 0
    (tmp_path / "cmp" / "muon" / "seed0" / "result.json").unlink()  # as if interrupted
    assert main([*argv, "--resume"]) == 0
    assert validations == ["cpu-smoke", "cpu-smoke"]  # one per command


def test_python_callers_validate_once_and_specs_are_never_revalidated(tmp_path, data,
                                                                     validations):  # fmt: skip
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 2
    train_run(cfg, "adamw", data, out_dir=tmp_path / "cfg", progress=False)
    assert len(validations) == 1  # a RunConfig is resolved by the one call that trains it
    spec, _ = resolve_spec(cfg, data, optimizers=["adamw", "muon"], seeds=[0, 1])
    assert len(validations) == 2
    for name, seed in (("adamw", 0), ("muon", 1)):
        train_run(spec, name, data, seed=seed, out_dir=tmp_path / f"{name}{seed}", progress=False)
    assert len(validations) == 2  # the spec is used as it is


# ---------------------------------------------------------------- frozen


def test_the_spec_is_frozen_all_the_way_down(data):
    cfg = get_preset("cpu-smoke")
    spec, _ = resolve_spec(cfg, data, optimizers=["normuon"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.preset = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train.steps = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.model.vocab_size = 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.optimizers["normuon"].lr = 1.0
    with pytest.raises(TypeError):
        spec.optimizers["normuon"] = spec.optimizers["adamw"]
    # The spec is a copy: changing the config afterwards changes nothing in it.
    cfg.train.steps, cfg.optimizers["normuon"].lr = 7, 9.0
    assert spec.train.steps == 40 and spec.optimizers["normuon"].lr == 0.05
    # Hashable, and it travels to worker processes (--jobs) intact.
    assert pickle.loads(pickle.dumps(spec)) == spec and hash(spec) == hash(pickle.loads(
        pickle.dumps(spec)))  # fmt: skip
    # Derived specs are new objects; the original is untouched.
    assert spec.with_lr("normuon", 0.1).optimizers["normuon"].lr == 0.1
    assert spec.optimizers["normuon"].lr == 0.05
    # to_config gives an editable copy that resolves to the same spec.
    assert resolve_spec(spec.to_config(), data, optimizers=["normuon"])[0] == spec


def test_stretched_specs_keep_the_schedule_shape(data):
    cfg = get_preset("cpu-small")
    spec, _ = resolve_spec(cfg, data, optimizers=["muon"], stretch=[1.1])
    longer = stretched(spec, 1.1)
    assert isinstance(longer, RunSpec)
    assert (longer.train.steps, longer.train.warmup_steps) == (330, 22)
    assert longer.train.cooldown_frac == spec.train.cooldown_frac and spec.train.steps == 300
    with pytest.raises(ValueError, match="stretch factor 1.2 is not one of"):
        spec.stretched(1.2)


# ---------------------------------------------------------------- what a run writes


def test_vocab_size_is_the_datas_and_written_once_per_file(tmp_path, capsys):
    out = tmp_path / "cmp"
    # A vocab_size set by hand is the data's anyway (bytes: 256).
    assert main(["compare", *SMOKE, "--steps", "2", "--optimizers", "adamw,muon",
                 "--stretch", "1.5", "--set", "model.vocab_size=999", "--out", str(out)]) == 0
    written = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    configs = [p for p in written if p.name == "config.json"]
    # The comparison's config.json and one per training (2 optimizers + the stretched muon).
    assert len(configs) == 4
    for path in written:
        count = path.read_text().count('"vocab_size"')
        assert count == (1 if path.name == "config.json" else 0), path
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 256
    for path in set(configs) - {out / "config.json"}:
        assert json.loads(path.read_text())["config"]["model"]["vocab_size"] == 256
    ckpt = torch.load(out / "adamw" / "seed0" / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["run_json"].count('"vocab_size"') == 1


def test_written_config_comes_from_the_spec_in_the_old_format(tmp_path, data):
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 2
    spec, _ = resolve_spec(cfg, data, optimizers=["muon", "normuon"], stretch=[1.5])
    out = tmp_path / "cmp"
    run_compare(spec, data, out=out, progress=False, diagnostics_every=0, log=lambda *a: None)
    top = json.loads((out / "config.json").read_text())
    assert list(top) == ["data", "preset", "description", "model", "train", "optimizers",
                         "stretch", "budget"]  # fmt: skip
    assert top == json.loads(json.dumps(spec.to_json()))
    run = json.loads((out / "muon-x1.5" / "seed0" / "config.json").read_text())
    assert list(run) == ["optimizer", "seed", "data", "world_size", "config", "budget", "run_id"]
    assert run["config"]["train"]["steps"] == 3 and run["budget"]["tokens"] == 3 * 8 * 32
    assert {k: v for k, v in run.items() if k not in ("run_id", "budget")} == json.loads(
        json.dumps(spec.stretched(1.5).identity("muon", 0)))  # fmt: skip
    # Both kinds of config.json can be given back as --config.
    for path in (out / "config.json", out / "muon" / "seed0" / "config.json"):
        again = apply_config_file(get_preset("cpu-smoke"), path)
        assert resolve_spec(again, data, optimizers=["muon", "normuon"],
                            stretch=[1.5])[0] == spec  # fmt: skip


def test_resume_still_checks_the_saved_spec(tmp_path, capsys):
    base = ["compare", *SMOKE, "--steps", "2", "--optimizers", "muon", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main([*base, "--resume", "--set", "muon.lr=0.01"]) == 2
    assert "holds a comparison with another config" in capsys.readouterr().err
    run = ["train", *SMOKE, "--steps", "4", "--out", str(tmp_path / "run")]
    assert main([*run, "--stop-at-step", "2"]) == 0
    assert main([*run, "--resume", "--set", "train.grad_clip=1"]) == 2
    assert "was written by a different run" in capsys.readouterr().err


# ---------------------------------------------------------------- errors at resolve time


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "model.n_head=3"], "d_model=32 must be divisible by n_head=3"),
        (["--set", "train.seq_len=64"], "seq_len=64 exceeds the model's max_seq_len=32"),
        (["--set", "normuon.momentum=1.5"], "normuon.momentum must be in [0, 1), got 1.5"),
        (["--set", "train.grad_accum=3"], "batch_size=8 is not divisible by world size x "
                                          "grad_accum = 1 x 3"),
        (["--set", "train.schedule=step"], "schedule must be one of"),
        (["--set", "train.val_fraction=1.5"], "val_fraction must be in (0, 1), got 1.5"),
        (["--optimizers", "adamw,lion"], "unknown optimizer 'lion'"),
        (["--stretch", "1.01"], "--stretch 1.01 of 2 steps rounds to 2 steps"),
        (["--stretch", "0.5"], "--stretch factors must be numbers > 1, got 0.5"),
        (["--first-seed", str(2**32)], "--seed must be an integer in [0, 4294967295]"),
    ],
)  # fmt: skip
def test_invalid_settings_fail_at_resolve_time_naming_them(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["compare", *SMOKE, "--steps", "2", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normuon compare: error: ") and message in err, err
    assert "\n" not in err
    assert not out.exists()  # nothing was written: the spec never resolved


def test_data_too_short_for_the_sequence_fails_at_resolve_time(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("x" * 200)
    out = tmp_path / "out"
    assert main(["train", *SMOKE, "--data", str(text), "--out", str(out)]) == 2
    assert "the validation split has 10 tokens, fewer than seq_len + 2 = 34" in (
        capsys.readouterr().err)  # fmt: skip
    assert not out.exists()


def test_python_api_errors_name_the_key(tmp_path, data):
    for overrides, message in ((["muon.lr=0"], "muon.lr must be a number > 0, got 0.0"),
                               (["train.warmup_steps=99"], "warmup_steps must be in [0, steps=40]"),
                               (["model.n_kv_head=3"], "n_kv_head=3 must divide n_head=2")):
        cfg = apply_overrides(get_preset("cpu-smoke"), overrides)  # parses, does not validate
        with pytest.raises(ValueError) as info:
            resolve_spec(cfg, data, optimizers=["muon"])
        assert message in str(info.value)
    with pytest.raises(ValueError, match="--seed must be an integer"):
        train_run(get_preset("cpu-smoke"), "adamw", data, seed=-1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no optimizer given"):
        resolve_spec(get_preset("cpu-smoke"), data, optimizers=[])


def test_consumers_take_the_spec_and_check_only_that_it_fits(tmp_path, data):
    spec, _ = resolve_spec(get_preset("cpu-smoke"), data, optimizers=["muon"], seeds=[1])
    with pytest.raises(ValueError, match="'adamw' with seed 1 is not a training of this spec"):
        Trainer(spec, "adamw", data, seed=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="'muon' with seed 0 is not a training of this spec"):
        Trainer(spec, "muon", data, seed=0, out_dir=tmp_path)
    other = TokenData(data.train, data.val, 256, "other text")
    with pytest.raises(ValueError, match="not the data this spec was resolved with"):
        Trainer(spec, "muon", other, seed=1, out_dir=tmp_path)
    with pytest.raises(TypeError, match="run_compare takes a RunSpec"):
        run_compare(get_preset("cpu-smoke"), data, out=tmp_path)
    assert not any(tmp_path.iterdir())

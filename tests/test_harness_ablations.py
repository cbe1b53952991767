"""The paper's ablations and efficiency protocol in the harness: `compare` with the ablation
names, savings against Muon at Muon's own final loss, Muon on stretched schedules, and
`compare` under torchrun (fresh and resumed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from normuon import NorMuon
from normuon.cli import main
from normuon.harness.compare import merge_sweeps, stretched, write_sweep
from normuon.harness.config import (
    ABLATIONS,
    OPTIMIZERS,
    apply_config_file,
    apply_overrides,
    get_preset,
)
from normuon.harness.report import STRETCH_COLUMN, TABLE_COLUMNS, format_table, summarize
from normuon.harness.spec import resolve_spec
from normuon.harness.train import build_optimizer

ALL = "adamw,muon,normuon,muon-adam,normuon-front,normuon-tall-only,muon-rownorm"


def _rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_compare_runs_the_ablations_with_stretched_muon(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--preset", "cpu-smoke", "--steps", "10", "--optimizers", ALL,
                 "--seeds", "2", "--first-seed", "1", "--stretch", "1.2,1.5",
                 "--diagnostics-every", "0", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    table = _rows(capsys.readouterr().out)
    assert table[0] == [*TABLE_COLUMNS, STRETCH_COLUMN]
    assert [r[0] for r in table[2:]] == ALL.split(",")
    results = json.loads((out / "results.json").read_text())
    assert results["stretch"] == [1.2, 1.5]
    for name in ALL.split(","):
        assert [r["seed"] for r in results["runs"][name]] == [1, 2]
        saved = json.loads((out / name / "seed1" / "config.json").read_text())
        assert saved["optimizer"] == name
    # Muon trained 12 and 15 steps, same schedule shape, on the same seeds.
    for factor, steps in (("1.2", 12), ("1.5", 15)):
        runs = results["stretch_runs"][factor]
        assert [(r["optimizer"], r["seed"], r["steps"]) for r in runs] == [
            ("muon", 1, steps), ("muon", 2, steps)]  # fmt: skip
        assert (out / f"muon-x{factor}" / "seed2" / "result.json").is_file()
    rows = {r["optimizer"]: r for r in results["rows"]}
    assert rows["muon"]["saving_vs_muon"] == pytest.approx(0.0)
    assert rows["muon"]["muon_extra_steps"] == pytest.approx(0.0)
    # State sizes: Muon+Adam keeps a second moment per weight, the others NorMuon's per row.
    normuon_bytes = rows["normuon"]["optimizer_state_bytes"]
    muon_bytes = rows["muon"]["optimizer_state_bytes"]
    hidden = _hidden_matrix_numel(get_preset("cpu-smoke"))
    assert rows["muon-adam"]["optimizer_state_bytes"] == muon_bytes + 4 * hidden
    for name in ("normuon-front", "normuon-tall-only", "muon-rownorm"):
        assert rows[name]["optimizer_state_bytes"] == normuon_bytes > muon_bytes
    # The ablations really are different algorithms: their curves differ from NorMuon's.
    for name in ABLATIONS:
        assert results["runs"][name][0]["val_losses"] != results["runs"]["normuon"][0][
            "val_losses"], name  # fmt: skip


def _hidden_matrix_numel(cfg) -> int:
    from normuon import param_groups
    from normuon.harness.model import GPT

    groups = param_groups(GPT(cfg.model))
    return sum(p.numel() for g in groups if g.get("algorithm") != "adamw" for p in g["params"])


def _run(seed, losses, steps=None):
    return SimpleNamespace(seed=seed, val_steps=[0, 10, 20][: len(losses)], val_losses=losses,
                           val_times=[0.0, 1.0, 2.0][: len(losses)], train_time_s=2.0,
                           optimizer_share=0.1, optimizer_state_bytes=8,
                           steps=steps or 20)  # fmt: skip


def test_savings_against_muon_are_measured_at_muons_final_loss():
    results = {
        "adamw": [_run(0, [3.0, 2.5, 2.0])],
        "muon": [_run(0, [3.0, 2.0, 1.5])],
        "normuon": [_run(0, [3.0, 1.8, 1.4])],
        "worse": [_run(0, [3.0, 2.2, 1.6])],
    }
    stretch = {1.5: [SimpleNamespace(val_losses=[3.0, 1.3], steps=30)]}
    rows = {r.optimizer: r for r in summarize(results, stretch)}
    # NorMuon reaches Muon's 1.5 at 10 + 10 * 0.3 / 0.4 = 17.5 steps of Muon's 20.
    assert rows["normuon"].saving_vs_muon == pytest.approx(1 - 17.5 / 20)
    assert rows["worse"].saving_vs_muon is None
    # Against AdamW: its final 2.0 is reached by Muon at 10 steps, NorMuon at 10 * 1 / 1.2.
    assert rows["muon"].saving_vs_adamw == pytest.approx(0.5)
    assert rows["normuon"].saving_vs_adamw == pytest.approx(1 - (10 / 1.2) / 20)
    # Muon needs 25 steps (between its 20-step 1.5 and 30-step 1.3) to reach NorMuon's 1.4.
    assert rows["normuon"].muon_extra_steps == pytest.approx(0.25)
    # A worse optimizer's loss is reached within Muon's own run: 10 + 10 * 0.4 / 0.5 = 18.
    assert rows["worse"].muon_extra_steps == pytest.approx(18 / 20 - 1)
    table = _rows(format_table(list(rows.values())))
    assert table[0][-1] == STRETCH_COLUMN
    by_name = {r[0]: r for r in table[2:]}
    assert by_name["normuon"][-1] == "+25.0%" and by_name["worse"][4] == "not reached"
    assert by_name["normuon"][1] == "1.4000 (1 seed)"  # one seed: no interval


def test_a_loss_beyond_the_longest_stretch_says_so():
    results = {"muon": [_run(0, [3.0, 2.0, 1.5])], "normuon": [_run(0, [3.0, 1.5, 1.0])]}
    rows = summarize(results, {1.2: [SimpleNamespace(val_losses=[3.0, 1.45], steps=24)]})
    assert rows[1].muon_extra_steps is None
    assert _rows(format_table(rows))[3][-1] == "> +20%"


def test_several_seeds_get_a_confidence_interval():
    rows = summarize({"muon": [_run(0, [3.0, 2.0, 1.5]), _run(1, [3.0, 2.0, 1.7])]})
    # mean 1.6, sd 0.1414, t(0.975, 1) = 12.706: half-width 12.706 * 0.1414 / sqrt(2) = 1.2706
    assert _rows(format_table(rows))[2][1] == "1.6000 ± 1.2706"


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_names_build_normuon_with_their_options(name):
    from normuon.harness.model import GPT

    cfg = get_preset("cpu-smoke")
    model = GPT(cfg.model)
    opt = build_optimizer(name, model, cfg.optimizers[name], next(model.parameters()).device)
    assert type(opt) is NorMuon
    matrix = [g for g in opt.param_groups if g["algorithm"] == "normuon"]
    assert matrix
    for group in matrix:
        for key, value in ABLATIONS[name].items():
            assert group[key] == value, (name, key)
        assert group["lr"] == cfg.optimizers["normuon"].lr


def test_ablation_settings_are_validated_and_settable(tmp_path):
    cfg = apply_overrides(get_preset("cpu-smoke"), ["muon-adam.lr=0.01", "normuon-front.beta2=0.9"])
    assert cfg.optimizers["muon-adam"].lr == 0.01 and cfg.optimizers["normuon-front"].beta2 == 0.9
    # --set parses; the run's resolution validates (before the data is even loaded).
    cfg = apply_overrides(get_preset("cpu-smoke"), ["muon-rownorm.beta2=0.5"])
    with pytest.raises(ValueError, match=r"muon-rownorm.beta2 must be 0 .*got 0.5"):
        resolve_spec(cfg, tmp_path / "never-read.txt", optimizers=["muon-rownorm"])
    assert set(OPTIMIZERS) == {"adamw", "muon", "normuon", *ABLATIONS}
    path = tmp_path / "bad.json"
    for text, message in (('{"optimizers": {"muon": 3}}', "optimizers.muon must be an object"),
                          ('{"optimizers": {"lion": {}}}', "unknown optimizer 'lion'")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            apply_config_file(get_preset("cpu-smoke"), path)


def test_stretched_keeps_the_schedule_shape():
    cfg = get_preset("cpu-small")
    longer = stretched(cfg, 1.1)
    assert (longer.train.steps, longer.train.warmup_steps) == (330, 22)
    assert longer.train.cooldown_frac == cfg.train.cooldown_frac
    assert cfg.train.steps == 300  # the original is untouched


def test_stretch_needs_muon_and_numbers(tmp_path, capsys):
    base = ["compare", "--preset", "cpu-smoke", "--steps", "2", "--no-progress",
            "--out", str(tmp_path / "x")]  # fmt: skip
    assert main([*base, "--optimizers", "normuon", "--stretch", "1.1"]) == 2
    assert "add muon to --optimizers" in capsys.readouterr().err
    assert main([*base, "--stretch", "1.1,abc"]) == 2
    assert "--stretch: 'abc' is not a number" in capsys.readouterr().err


def test_sweep_json_is_strict_json_with_diverged_runs(tmp_path):
    points = {"muon": [{"lr": 0.01, "final_val_loss": 2.0},
                       {"lr": 1.0, "final_val_loss": math.inf}],
              "normuon": [{"lr": 0.01, "final_val_loss": -math.inf}]}  # fmt: skip
    write_sweep(points, tmp_path / "a", preset="cpu-smoke", seed=0)

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    data = json.loads((tmp_path / "a" / "sweep.json").read_text(), parse_constant=refuse)
    assert data["points"]["muon"][1]["final_val_loss"] is None
    assert data["points"]["normuon"][0]["final_val_loss"] is None
    merged = merge_sweeps([tmp_path / "a"], tmp_path / "b")
    assert merged["points"]["muon"][1]["final_val_loss"] == math.inf


def _torchrun(args, world=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(world), "-m", "normuon", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp2", "ddp"])
def test_compare_under_torchrun_fresh_and_resumed(tmp_path, parallel):
    """Rank 0 owns the new folder (rank 1 used to refuse it as not empty); a run interrupted
    at step 3 continues from its checkpoint under ``--resume`` to the same curve."""
    out = tmp_path / "cmp"
    common = ["--preset", "cpu-smoke", "--steps", "6", "--parallel", parallel, "--no-progress"]
    printed = _torchrun(["compare", *common, "--optimizers", "muon,normuon-front",
                         "--out", str(out)])  # fmt: skip
    assert printed.count("| normuon-front |") == 1  # rank 0 alone prints
    fresh = json.loads((out / "results.json").read_text())
    run = out / "normuon-front" / "seed0"
    _torchrun(["train", *common, "--optimizer", "normuon-front", "--stop-at-step", "3",
               "--overwrite", "--out", str(run)])  # fmt: skip
    assert json.loads((run / "result.json").read_text())["steps"] == 3
    _torchrun(["compare", *common, "--optimizers", "muon,normuon-front", "--resume",
               "--out", str(out)])  # fmt: skip
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["runs"]["normuon-front"][0]["steps"] == 6
    assert (resumed["runs"]["normuon-front"][0]["val_losses"]
            == fresh["runs"]["normuon-front"][0]["val_losses"])  # fmt: skip
    # State bytes are rank 0's: under FSDP2 its shards, about half of one process's.
    single = _single_process_state_bytes("muon")
    sharded = fresh["runs"]["muon"][0]["optimizer_state_bytes"]
    if parallel == "fsdp2":
        assert 0.4 * single < sharded < 0.6 * single, (sharded, single)


def _single_process_state_bytes(name: str) -> int:
    import torch

    from normuon.harness.model import GPT
    from normuon.harness.train import optimizer_state_bytes

    cfg = get_preset("cpu-smoke")
    model = GPT(cfg.model)
    opt = build_optimizer(name, model, cfg.optimizers[name], torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return optimizer_state_bytes(opt)


def test_overwrite_removes_ablation_and_stretched_runs(tmp_path, capsys):
    args = ["compare", "--preset", "cpu-smoke", "--steps", "3", "--optimizers", "muon,muon-adam",
            "--stretch", "1.5", "--diagnostics-every", "0", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not the harness's: kept
    assert (tmp_path / "muon-x1.5" / "seed0" / "result.json").is_file()


@pytest.mark.parametrize(
    "factors,message",
    [("1.04", "--stretch 1.04 of 10 steps rounds to 10 steps"),
     ("1.2,1.24", "give the same schedule")],
)  # fmt: skip
def test_stretch_factors_must_lengthen_and_differ(tmp_path, capsys, factors, message):
    args = ["compare", "--preset", "cpu-smoke", "--steps", "10", "--optimizers", "muon",
            "--stretch", factors, "--no-progress", "--out", str(tmp_path / "x")]  # fmt: skip
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_muon_extra_steps_counts_muons_own_curve_only_where_it_stays_at_the_target():
    """Muon's own curve answers when it reaches the target and stays there (the savings'
    rule); a curve that dips below and climbs back has not reached it, so the stretched
    schedules decide."""
    stretch = {1.5: [SimpleNamespace(val_losses=[3.0, 2.30], steps=15)]}
    # Muon ends at 2.50 after dipping to 2.40: 2.45 is reached only by the x1.5 schedule,
    # interpolated between (10, 2.50) and (15, 2.30): 10 + 5 * 0.05 / 0.20 = 11.25 steps.
    results = {"muon": [_run(0, [2.40, 2.50])], "other": [_run(0, [2.6, 2.45])]}
    rows = {r.optimizer: r for r in summarize(results, stretch)}
    assert rows["other"].muon_extra_steps == pytest.approx(11.25 / 10 - 1)
    # Muon stays below 2.45 from step 0: its own run gets there at step 0 (-100%).
    results = {"muon": [_run(0, [2.40, 2.35])], "other": [_run(0, [2.6, 2.45])]}
    rows = {r.optimizer: r for r in summarize(results, stretch)}
    assert rows["other"].muon_extra_steps == pytest.approx(0 / 10 - 1)

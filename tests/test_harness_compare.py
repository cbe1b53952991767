"""`normuon compare` / `sweep` / `train` end to end, the table, and the CLI's errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normuon.cli import main
from normuon.harness.compare import TABLE_COLUMNS, steps_to_reach


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "--preset", "cpu-smoke", "--seeds", "2", "--steps", "20",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    for name in ("results.json", "config.json", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    table, _, neurons = printed.partition("neuron balance")
    rows = _table_rows(table)
    assert rows[0] == list(TABLE_COLUMNS)
    body = rows[2:]
    assert [r[0] for r in body] == ["adamw", "muon", "normuon"]
    for r in body:
        assert len(r) == len(TABLE_COLUMNS) and all(r), r
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]["normuon"]) == 2
    adamw = next(r for r in results["rows"] if r["optimizer"] == "adamw")
    # AdamW reaches its own final loss at (or before) its last step; saving vs itself is 0.
    assert adamw["steps_to_target"] <= 20 and adamw["saving_vs_adamw"] == pytest.approx(0.0)
    assert adamw["final_val_min"] <= adamw["final_val_mean"] <= adamw["final_val_max"]
    assert adamw["final_val_min"] < adamw["final_val_max"]  # two seeds really differ
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "cpu-smoke" and config["train"]["steps"] == 20
    assert config["model"]["vocab_size"] == 256 and "Shakespeare" in config["data"]
    # Neuron diagnostics for all three optimizers (at every validation, 10 steps apart).
    assert (out / "neurons.png").read_bytes()[:4] == b"\x89PNG"
    neuron_rows = _table_rows(neurons)
    assert [r[0] for r in neuron_rows[2:]] == ["adamw", "muon", "normuon"]
    for name in ("adamw", "muon", "normuon"):
        lines = (out / name / "seed1" / "diagnostics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["step"] for r in records] == [10, 20]
        assert ("second_moment_cv" in records[-1]["overall"]) == (name == "normuon")
        assert records[-1]["overall"]["neuron_cv"] > 0


def test_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--preset", "cpu-smoke", "--steps", "10", "--lrs", "muon=0.01,0.05",
                 "--lrs", "adamw=0.5x,2x", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [p["lr"] for p in summary["points"]["muon"]] == [0.01, 0.05]
    assert [p["lr"] for p in summary["points"]["adamw"]] == pytest.approx([0.005, 0.02])
    assert summary["best_lr"]["muon"] in (0.01, 0.05)
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "**best**" in capsys.readouterr().out
    # A second sweep (more lrs) merges with the first into one table and plot.
    more = tmp_path / "more"
    assert main(["sweep", "--preset", "cpu-smoke", "--steps", "10", "--lrs", "muon=0.02",
                 "--out", str(more), "--no-progress"]) == 0  # fmt: skip
    merged = tmp_path / "merged"
    assert main(["sweep", "--merge", str(out), str(more), "--out", str(merged)]) == 0
    both = json.loads((merged / "sweep.json").read_text())
    assert [p["lr"] for p in both["points"]["muon"]] == [0.01, 0.02, 0.05]
    assert len(both["points"]["adamw"]) == 2 and (merged / "sweep.png").exists()
    assert main(["sweep", "--merge", str(tmp_path / "nothing"), "--out", str(merged)]) == 2
    # An interrupted sweep (no sweep.json) contributes its finished runs.
    (more / "sweep.json").unlink()
    assert main(["sweep", "--merge", str(out), str(more), "--out", str(merged)]) == 0
    again = json.loads((merged / "sweep.json").read_text())
    assert again["points"]["muon"] == both["points"]["muon"]


def test_train_command_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--preset", "cpu-smoke", "--optimizer", "muon", "--steps", "6",
            "--out", out, "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert main(args + ["--resume"]) == 0  # a finished run resumes as a no-op
    text = capsys.readouterr().out
    assert text.count("muon seed 0: 6 steps") == 2


def test_compare_in_worker_processes_matches_sequential(tmp_path):
    args = ["compare", "--preset", "cpu-smoke", "--steps", "6", "--optimizers", "muon,normuon",
            "--no-progress"]  # fmt: skip
    assert main(args + ["--out", str(tmp_path / "seq")]) == 0
    assert main(args + ["--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    seq = json.loads((tmp_path / "seq" / "results.json").read_text())
    par = json.loads((tmp_path / "par" / "results.json").read_text())
    for name in ("muon", "normuon"):
        assert seq["runs"][name][0]["val_losses"] == par["runs"][name][0]["val_losses"]


def test_steps_to_reach_interpolates():
    steps, losses = [0, 10, 20, 30], [5.0, 3.0, 2.0, 1.5]
    assert steps_to_reach(steps, losses, 2.5) == pytest.approx(15.0)
    assert steps_to_reach(steps, losses, 2.0) == pytest.approx(20.0)
    assert steps_to_reach(steps, losses, 1.0) is None


def test_steps_to_reach_needs_the_curve_to_stay_below():
    # Overfitting: below 2.0 from step 20 to 40, back above it at the end -> not reached.
    steps, losses = [0, 10, 20, 30, 40, 50], [5.0, 3.0, 1.9, 1.8, 1.95, 2.2]
    assert steps_to_reach(steps, losses, 2.0) is None
    # A bump above the target after the first crossing moves the step to the last crossing.
    losses = [5.0, 3.0, 1.9, 2.1, 1.9, 1.8]
    assert steps_to_reach(steps, losses, 2.0) == pytest.approx(35.0)
    # The reference curve ends exactly at the target (its own mean final loss).
    assert steps_to_reach([0, 10], [3.0, 2.0 + 1e-12], 2.0) == pytest.approx(10.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--preset", "cpu-smoke", "--data", "/nonexistent/x.txt"],
         "/nonexistent/x.txt: no such file or folder"),
        (["compare", "--preset", "cpu-smoke", "--optimizers", "adamw,sgd"],
         "unknown optimizer 'sgd'"),
        (["sweep", "--preset", "cpu-smoke", "--lrs", "muon=0.01,abc"], "'abc' is not a number"),
        (["sweep", "--preset", "cpu-smoke", "--lrs", "muon=-1"], "must be > 0"),
    ],
)  # fmt: skip
def test_cli_errors(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--preset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_python_m_normuon_and_lazy_imports():
    help_text = subprocess.run([sys.executable, "-m", "normuon", "--help"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
    for command in ("compare", "sweep", "train"):
        assert command in help_text
    # The library, the CLI module and the harness modules import with tqdm and matplotlib
    # absent (a None entry in sys.modules makes their import fail): both are imported lazily.
    code = (
        "import sys; sys.modules['tqdm'] = None; sys.modules['matplotlib'] = None\n"
        "import normuon, normuon.cli, normuon.harness.train, normuon.harness.compare\n"
        "print(normuon.NorMuon.__name__, 'normuon.harness' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NorMuon", "True"]
    code = "import sys, normuon; print('normuon.harness' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["False"], done.stderr  # the core never loads the harness

"""scripts/device_check.sh: its CPU dry run passes every stage and writes its summaries; a stage
that fails is recorded and makes the script exit 1; the torchtitan stage is skipped with its
reason when torchtitan cannot be imported; bad arguments exit 2 with the usage.
scripts/torchtitan_resume.py (what that stage runs) fails a run that did not resume or whose
losses differ."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
RESUME = ROOT / "scripts" / "torchtitan_resume.py"
STAGES = ["environment", "pytest-cuda", "check", "compare", "torchtitan"]
HAVE_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEVICE_CHECK_STAGES"}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def _run(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _summary(out: Path) -> dict[str, dict]:
    assert (out / "summary.md").is_file()
    entries = json.loads((out / "summary.json").read_text())
    assert [e["stage"] for e in entries] == STAGES
    for e in entries:
        assert set(e) == {"stage", "exit_code", "seconds", "limit_s", "command", "skipped_reason"}
    return {e["stage"]: e for e in entries}


@pytest.mark.slow
def test_cpu_dry_run_passes_every_stage_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    # The script's own worst case on the CPU is under 10 minutes; a normal run takes well under 1.
    proc = _run("--device", "cpu", str(out), env=_env(), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    stages = _summary(out)
    ran = STAGES if HAVE_TORCHTITAN else STAGES[:-1]
    for name in ran:
        assert stages[name]["exit_code"] == 0, (name, log)
        assert stages[name]["skipped_reason"] is None
        assert stages[name]["seconds"] <= stages[name]["limit_s"]
        assert (out / f"{name}.txt").is_file()
    if HAVE_TORCHTITAN:
        # torchtitan's trainer with NorMuon, resumed from its middle checkpoint to the same
        # losses (scripts/torchtitan_resume.py), through the CPU launcher.
        command = stages["torchtitan"]["command"]
        assert "tests/torchtitan_cpu.py" in command and "--nproc_per_node 1" in command
        assert "--override.imports normuon.integrations.torchtitan.normuon" in command
        tt_log = (out / "torchtitan.txt").read_text()
        assert "== resumed run: from step-3, steps 4-6" in tt_log
        assert "largest relative difference" in tt_log
        assert (out / "torchtitan" / "checkpoint" / "step-6").is_dir()
    else:
        assert "torchtitan is not importable" in stages["torchtitan"]["skipped_reason"]
    assert "--device cpu" in stages["check"]["command"]
    assert "--device cpu" in stages["compare"]["command"]

    summary = (out / "summary.md").read_text()
    assert sys.executable in summary and "torch " in summary
    assert "nvidia-smi" in (out / "environment.txt").read_text()
    # On a machine without CUDA the CUDA tests are collected and skip with their reason.
    pytest_log = (out / "pytest-cuda.txt").read_text()
    assert "skipped" in pytest_log or "passed" in pytest_log
    # `normuon check --out OUT` writes its report as OUT/check-cpu.md.
    report = (out / "check-cpu.md").read_text()
    assert report.startswith("# normuon check on cpu")
    assert "\n0 failed of " in report
    assert (out / "compare" / "results.json").is_file()


def test_a_failing_stage_is_recorded_and_the_script_exits_1(tmp_path):
    # An interpreter that fails `-m normuon check` and runs everything else.
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'case " $* " in *" normuon check "*) echo "check fails on purpose" >&2; exit 3;; esac\n'
        f'exec {shlex.quote(sys.executable)} "$@"\n'
    )
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    env = _env(PYTHON=str(wrapper), DEVICE_CHECK_STAGES="environment,check")
    proc = _run("--device", "cpu", str(out), env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    stages = _summary(out)
    assert stages["environment"]["exit_code"] == 0, log
    assert stages["check"]["exit_code"] == 3, log
    assert stages["check"]["skipped_reason"] is None
    for name in ("pytest-cuda", "compare", "torchtitan"):
        assert stages[name]["exit_code"] is None
        assert "DEVICE_CHECK_STAGES" in stages[name]["skipped_reason"]
    assert "check fails on purpose" in (out / "check.txt").read_text()
    assert "- check: exit 3 " in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    "args", [["--bogus"], ["--device", "gpu"], ["--device"], ["a", "b"]],
    ids=["unknown-option", "unknown-device", "missing-value", "two-outs"],
)  # fmt: skip
def test_bad_arguments_exit_2_with_the_usage(tmp_path, args):
    proc = _run(*args, env=_env(), timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "usage: bash scripts/device_check.sh" in proc.stderr


def test_an_unknown_stage_name_exits_2(tmp_path):
    proc = _run("--device", "cpu", str(tmp_path / "out"),
                env=_env(DEVICE_CHECK_STAGES="environment,nope"), timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_torchtitan_stage_is_skipped_with_its_reason_without_torchtitan(tmp_path):
    # A torchtitan that fails to import, ahead of any installed one on the path.
    shadow = tmp_path / "shadow" / "torchtitan"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("no torchtitan here")\n')
    out = tmp_path / "out"
    env = _env(DEVICE_CHECK_STAGES="torchtitan", PYTHONPATH=str(shadow.parent))
    proc = _run("--device", "cpu", str(out), env=env, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log  # nothing ran, so nothing failed
    stage = _summary(out)["torchtitan"]
    assert stage["exit_code"] is None
    assert stage["skipped_reason"] == (
        f"torchtitan is not importable by {sys.executable}: ImportError: no torchtitan here"
    )
    assert "scripts/torchtitan_resume.py" in stage["command"]
    assert "- torchtitan: skipped (torchtitan is not importable" in (out / "summary.md").read_text()


# A stand-in for torchtitan's trainer: takes its folder, step and checkpoint options, logs the
# container's routing line and torchtitan's metrics lines (in colour), saves step-N folders and
# resumes from the latest, as torchtitan does. MODE breaks one of these.
FAKE_TRAINER = r"""
import sys
from pathlib import Path
mode, args = sys.argv[1], sys.argv[2:]
value = lambda name: args[args.index(name) + 1]
folder, steps = Path(value("--dump_folder")) / "checkpoint", int(value("--training.steps"))
every = int(value("--checkpoint.interval"))
saved = [int(p.name[5:]) for p in folder.glob("step-*")] if folder.is_dir() else []
start = 1 if mode == "ignores-checkpoints" or not saved else max(saved) + 1
drift = 1.1 if mode == "drifts" and saved else 1.0
print("[titan] INFO - NorMuon (model_part=0): 100 parameters")
for step in range(start, steps + 1):
    print(f"[titan] INFO - [31mstep: {step:2}  [32mloss: {8 - 0.1 * step * drift:8.5f}")
    if step % every == 0 or step == steps:
        (folder / f"step-{step}").mkdir(parents=True, exist_ok=True)
"""


@pytest.mark.parametrize(
    "mode,error",
    [("resumes", None), ("ignores-checkpoints", "did not start from the checkpoint"),
     ("drifts", "the resumed run's losses differ from the first run's")],
)  # fmt: skip
def test_torchtitan_resume_checks_the_resumed_losses(tmp_path, mode, error):
    trainer = tmp_path / "trainer.py"
    trainer.write_text(FAKE_TRAINER)
    cmd = [sys.executable, str(RESUME), str(tmp_path / "run"), "--steps", "6", "--resume-at",
           "3", "--rtol", "1e-3", "--", sys.executable, str(trainer), mode]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if error is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "step 6: loss 7.40000 first run, 7.40000 resumed" in proc.stdout
        assert "largest relative difference 0.0e+00" in proc.stdout
        assert (tmp_path / "run" / "resumed.log").is_file()
    else:
        assert proc.returncode == 1
        assert error in proc.stderr

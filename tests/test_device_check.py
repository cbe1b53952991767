"""scripts/device_check.sh: its CPU dry run passes every stage and writes its summaries; a stage
that fails is recorded and makes the script exit 1; bad arguments exit 2 with the usage."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device_check.sh"
STAGES = ["environment", "pytest-cuda", "check", "compare"]


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
    for name in STAGES:
        assert stages[name]["exit_code"] == 0, (name, log)
        assert stages[name]["skipped_reason"] is None
        assert stages[name]["seconds"] <= stages[name]["limit_s"]
        assert (out / f"{name}.txt").is_file()
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
    for name in ("pytest-cuda", "compare"):
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

"""Smoke runs of examples/fsdp2_train.py (one process, and 2 ranks under torchrun) and of
benchmarks/distributed_step.py (2 spawned ranks, tiny shapes). Subprocesses, gloo on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dist_workers as W
import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fsdp2_train.py"
BENCH = ROOT / "benchmarks" / "distributed_step.py"
SMALL = ["--data", "synthetic", "--steps", "6", "--ckpt-at", "3", "--d-model", "32",
         "--layers", "1", "--batch-size", "4", "--seq-len", "32"]  # fmt: skip


def run(cmd: list[str], timeout: float = 120) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_example(tmp: Path, launcher: list[str]) -> dict:
    log = tmp / "losses.json"
    out = run([*launcher, str(EXAMPLE), *SMALL, "--ckpt-dir", str(tmp / "ckpt"),
               "--log-json", str(log)])  # fmt: skip
    assert "resume check" in out, out
    return json.loads(log.read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return run_example(tmp_path_factory.mktemp("single"), [sys.executable])


def test_example_single_process(single_process):
    losses, resumed = single_process["losses"], single_process["resumed"]
    assert single_process["world"] == 1
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    # The run resumed from the DCP checkpoint repeats the uninterrupted one exactly.
    assert max(abs(a - b) for a, b in zip(losses[3:], resumed)) < 1e-6, single_process


def test_example_two_ranks_under_torchrun(tmp_path, single_process):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={W.free_port()}"]  # fmt: skip
    result = run_example(tmp_path, launcher)
    assert result["world"] == 2
    assert max(abs(a - b) for a, b in zip(result["losses"][3:], result["resumed"])) < 1e-6
    # Same global batches, fp32 Newton-Schulz: FSDP2 at 2 ranks follows the one-process run.
    gap = max(abs(a - b) for a, b in zip(result["losses"], single_process["losses"]))
    assert gap < 1e-4, (result, single_process)


def test_distributed_benchmark_smoke(tmp_path):
    out = run([sys.executable, str(BENCH), "--world", "2", "--shapes", "tiny", "--reps", "1",
               "--methods", "normuon,normuon-bf16wire,zero1,torch-muon-fp32ns",
               "--out", str(tmp_path)])  # fmt: skip
    files = list(tmp_path.glob("distributed_step-tiny-*.md"))
    assert len(files) == 1, out
    text = files[0].read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0] == "2":
            rows[cells[1]] = cells
    assert set(rows) == {"normuon", "normuon-bf16wire", "zero1", "torch-muon-fp32ns"}, text
    # The library's traffic is at the floor (plus gloo framing and the small all_reduces).
    assert 0.95 < float(rows["normuon"][10]) < 1.3, rows["normuon"]
    agreement = re.search(r"zero1 baseline vs normuon .* difference ([0-9.e+-]+)", text)
    assert agreement and float(agreement.group(1)) < 1e-5, text


def test_moe_router_experiment_quick(tmp_path):
    """examples/moe_router.py (the evidence behind routing MoE routers to AdamW) runs both
    arms and writes its table."""
    out = tmp_path / "router.md"
    run([sys.executable, str(ROOT / "examples" / "moe_router.py"), "--quick", "--threads", "1",
         "--out", str(out)])  # fmt: skip
    text = out.read_text()
    assert "| 0 |" in text and "| 1 |" in text and "Mean difference (AdamW - NorMuon)" in text


def test_ablation_report_reads_a_comparison(tmp_path):
    """examples/ablation_report.py (docs/results.md, "Ablations") on a tiny comparison of all
    seven optimizers with a stretched Muon: every row, the paired columns and the figure."""
    out = tmp_path / "cmp"
    run([sys.executable, "-m", "normuon", "compare", "--preset", "cpu-smoke", "--steps", "6",
         "--seeds", "2", "--stretch", "1.5", "--diagnostics-every", "0", "--no-progress",
         "--optimizers", "adamw,muon,normuon,muon-adam,normuon-front,normuon-tall-only,"
         "muon-rownorm", "--out", str(out)])  # fmt: skip
    text = run([sys.executable, str(ROOT / "examples" / "ablation_report.py"), str(out),
                "--names", "smoke", "--plot", str(tmp_path / "ablation.png")])  # fmt: skip
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines() if line.startswith("| smoke")]  # fmt: skip
    assert [r[1] for r in rows] == ["adamw", "muon", "normuon", "muon-adam", "normuon-front",
                                    "normuon-tall-only", "muon-rownorm"]  # fmt: skip
    for r in rows:
        assert len(r) == 13 and "±" in r[2], r  # two seeds: an interval
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"

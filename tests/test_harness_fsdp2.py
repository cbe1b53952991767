"""The harness under torchrun with FSDP2: same curve as one process, exact resume."""

import json
import os
import subprocess
import sys

import pytest


def _run(args, out, extra=(), world=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(world)] if world > 1 else [sys.executable]  # fmt: skip
    proc = subprocess.run([*launcher, *args, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None


@pytest.mark.distributed
def test_torchrun_fsdp2_matches_one_process_and_resumes(tmp_path):
    base = ["-m", "normuon", "train", "--preset", "cpu-smoke", "--optimizer", "normuon",
            "--steps", "10", "--no-progress"]  # fmt: skip
    sharded = _run(base, tmp_path / "fsdp", ["--parallel", "fsdp2"])
    single = _run(base, tmp_path / "one", world=1)
    # Same global batch, gradients averaged by FSDP2's reduce-scatter: float rounding only.
    assert sharded["val_losses"] == pytest.approx(single["val_losses"], abs=1e-4)
    assert sharded["final_val_loss"] < sharded["val_losses"][0] - 1.0
    # Interrupted at step 6 and resumed from the (gathered, whole-tensor) checkpoint.
    _run(base, tmp_path / "split", ["--parallel", "fsdp2", "--stop-at-step", "6"])
    resumed = _run(base, tmp_path / "split", ["--parallel", "fsdp2", "--resume"])
    assert resumed["val_losses"] == sharded["val_losses"]

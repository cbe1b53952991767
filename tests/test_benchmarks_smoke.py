"""The benchmark script runs end to end on tiny shapes and writes its markdown table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_quick_writes_table(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [env_path(), str(ROOT)])))
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--quick", "--reps", "2",
        "--threads", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    files = list(tmp_path.glob("step_time-*.md"))
    assert len(files) == 1, files
    text = files[0].read_text()
    assert "| implementation | median |" in text
    assert "| normuon.NorMuon (default) |" in text
    assert "| torch.optim.AdamW foreach |" in text
    assert "### Memory" in text and "### Newton-Schulz" in text
    # NorMuon's state is exactly one momentum matrix plus one number per row.
    rows = [line for line in text.splitlines() if line.startswith("| normuon.NorMuon (default) |")]
    assert any("| 1.0000 |" in line for line in rows), rows


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")

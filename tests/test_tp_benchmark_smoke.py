"""benchmarks/tp_step.py runs end to end on a tiny tensor-parallel config (2 gloo processes) and
its report shows normuon's traffic at the floor and Newton-Schulz once per matrix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("normuon", "normuon-bf16wire", "torch-muon", "every-rank")
#: d_model 32 x 1 block: q, k, v, o, up, down.
MATRICES = 6
#: Segments of the packed all_to_all are aligned to 8 bytes: per matrix at most two tensors
#: (momentum, second moment) each way, each padded by fewer than 8 bytes.
ALIGNMENT_MARGIN = 2 * 2 * 8 * MATRICES


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    """Rows of the markdown table under the heading that starts with ``section``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(section))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| implementation"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_tp_step_tiny_tp2_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH", ""), str(ROOT)]))
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "tp_step.py"), "--d-model", "32", "--layers",
        "1", "--reps", "1", "--configs", "tp2", "--out", str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    files = list(tmp_path.glob("tp_step-*.md"))
    assert len(files) == 1, files
    text = files[0].read_text()
    assert "native bf16 GEMMs" in text
    rows = table_rows(text, "### `tp2`")
    assert set(rows) == set(IMPLS), rows
    for impl in IMPLS:
        assert not rows[impl][1].startswith("error"), rows[impl]
        assert float(rows[impl][1]) >= 0, rows[impl]
    # Columns: impl, step, vs normuon, payload, floor, payload/floor, socket, collectives,
    # NS matrices per rank, NS GFLOP per rank.
    for impl in ("normuon", "normuon-bf16wire"):
        payload, floor = int(rows[impl][3]), int(rows[impl][4])
        assert floor > 0, rows[impl]
        assert floor <= payload <= floor + ALIGNMENT_MARGIN, (impl, payload, floor)
        # Newton-Schulz once per matrix in the whole mesh, shared by both ranks.
        per_rank = [int(x) for x in rows[impl][8].split(" / ")]
        assert sum(per_rank) == MATRICES and min(per_rank) > 0, rows[impl]
        assert int(rows[impl][7]) <= 4, rows[impl]  # a bounded number of collectives
    # The bf16 wire halves the matrix bytes (the float32 second moment stays).
    assert int(rows["normuon-bf16wire"][3]) < 0.6 * int(rows["normuon"][3])
    # The baseline orthogonalizes every matrix on every rank and computes the same update.
    assert [int(x) for x in rows["every-rank"][8].split(" / ")] == [MATRICES, MATRICES]
    agreement = re.search(r"max relative difference (\d\.\de[+-]\d+)", text)
    assert agreement is not None and float(agreement.group(1)) < 1e-5, text

"""The benchmark scripts run end to end on tiny shapes and write their markdown tables; the
ZeRO-1 baseline of distributed_step.py (its own few lines of NorMuon math) equals the library;
the allocation count of _common.py counts each allocation once and nothing else."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(args: list[str], timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


@pytest.mark.parametrize("ns_dtype", ["auto", "fp32"])
def test_step_time_quick_writes_table(tmp_path, ns_dtype):
    run_script([str(BENCH / "step_time.py"), "--quick", "--reps", "2", "--threads", "1",
                "--ns-dtype", ns_dtype, "--out", str(tmp_path)])  # fmt: skip
    stem = "step_time" if ns_dtype == "auto" else "step_time-fp32ns"
    files = list(tmp_path.glob(f"{stem}-*.md"))
    assert len(files) == 1, list(tmp_path.iterdir())
    text = files[0].read_text()
    assert "native bf16 GEMMs" in text
    assert "| implementation | median |" in text
    assert "### Memory" in text and "### Newton-Schulz" in text
    if ns_dtype == "fp32":
        assert "Newton-Schulz in fp32 for everyone" in text
    step_rows = [r for r in table_rows(text, "normuon.NorMuon (default)") if len(r) == 13]
    assert len(step_rows) == 1, text
    # NS time, non-NS share, transient memory and steady-state allocations are reported for
    # normuon and every peer.
    for label in ["normuon.NorMuon (default)", "torch.optim.Muon", "torch.optim.AdamW foreach"]:
        row = next(r for r in table_rows(text, label) if len(r) == 13)
        assert float(row[1]) > 0, row  # median ms
        assert row[8].endswith("%"), row  # non-NS share
        float(row[9])  # transient / params is a number
        float(row[10])  # alloc / params is a number
        # of which outside GEMMs (printed to 3 decimals, the total to 2: half a unit of slack)
        assert 0 <= float(row[11]) <= float(row[10]) + 5e-3, row
        mem_row = next(r for r in table_rows(text, label) if len(r) == 11)
        assert float(mem_row[3]) >= 0 and float(mem_row[4]) == float(row[10]), mem_row
        assert 0 <= float(mem_row[5]) <= float(mem_row[3]), mem_row  # in GEMM kernels
    assert table_rows(text, "torch.optim.AdamW foreach")[0][8] == "100%"
    # NorMuon's state is exactly one momentum matrix plus one number per row.
    mem_rows = [r for r in table_rows(text, "normuon.NorMuon (default)") if len(r) == 11]
    assert mem_rows and mem_rows[0][9] == "1.0000", mem_rows
    # Each bucket's kernel, chosen at plan time, with the candidates' times; then every
    # candidate against the floor of its own iteration, the chosen one marked.
    assert "### Newton-Schulz kernels chosen at plan time" in text
    plan = [r for r in table_rows(text, "8 x (32, 32)") if len(r) == 7]
    assert [r[2] for r in plan] == ["muon 5", "fast 4"], plan
    assert all(r[5] == "measured" and "standard/8" in r[6] and "loop/8" in r[6] for r in plan)
    timed = [r for r in table_rows(text, "8 x (32, 32)") if len(r) == 8]
    assert sorted(r[2] for r in timed if r[2].endswith("(chosen)")) == sorted(
        f"{r[4]} (chosen)" for r in plan)  # fmt: skip
    assert all(float(r[6]) > 0 and r[7].endswith("x") for r in timed), timed
    totals = table_rows(text, "all buckets of a step")
    assert [r[1] for r in totals] == ["muon 5", "fast 4"] and all(r[7].endswith("x")
                                                                 for r in totals)  # fmt: skip


def test_ns_quality_quick_writes_tables(tmp_path):
    run_script([str(BENCH / "ns_quality.py"), "--quick", "--reps", "1", "--threads", "1",
                "--out", str(tmp_path)], timeout=600)  # fmt: skip
    files = list(tmp_path.glob("ns_quality-*.md"))
    assert len(files) == 1, list(tmp_path.iterdir())
    text = files[0].read_text()
    assert "## Accuracy against the SVD polar factor" in text and "## Speed" in text
    assert "gram" in text and "native bf16 GEMMs" in text


def _bench_module(name: str):
    """A module of benchmarks/ (they import each other by plain name), imported with that
    folder on sys.path for the duration of the fixture."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def common():
    yield from _bench_module("_common")


def _allocate_and_free(n: int, times: int) -> None:
    for _ in range(times):
        torch.empty(n)  # freed at once; the allocator may hand out the same block again


def test_step_allocated_bytes_counts_each_allocation_once(common):
    a, b, c = torch.randn(64, 64), torch.randn(64, 64), torch.empty(64, 64)
    x = torch.randn(1 << 16)
    count = common.step_allocated_bytes
    assert count(lambda: None) == 0
    assert count(lambda: torch.empty(1 << 20)) == 4 << 20
    # Freed again inside the region: still handed out, three times (not the net, 0).
    assert count(lambda: _allocate_and_free(1 << 18, 3)) == 3 << 20
    # Nested ops (stack calls cat, which allocates the output) count it once.
    assert count(lambda: torch.stack([a, b])) == 2 * a.nbytes
    # A temporary freed within the region counts; the sum adds only a scalar.
    assert a.nbytes <= count(lambda: (a * 2).sum()) < a.nbytes + 64
    # In place, out= and views allocate no tensor data (a Python scalar operand is wrapped in
    # a 0-d tensor: a few bytes).
    assert count(lambda: x.mul_(2)) < 64
    assert count(lambda: x.add_(x)) == 0
    assert count(lambda: torch.mm(a, b, out=c)) == 0
    assert count(lambda: (a.view(-1), a.t(), a[1:], a.unsqueeze(0).expand(3, 64, 64))) == 0


@pytest.fixture(scope="module")
def dist_bench():
    yield from _bench_module("distributed_step")


@pytest.mark.parametrize("shape", [(12, 8), (8, 24), (16, 16)])
def test_zero1_math_equals_normuon_single_process(dist_bench, shape):
    """The baseline's momentum / Newton-Schulz / normuon_row_update chain, applied to a whole
    matrix, gives the library's NorMuon step (float32 Newton-Schulz, default settings)."""
    gen = torch.Generator().manual_seed(sum(shape))
    init = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(3)]
    p = torch.nn.Parameter(init.clone())
    opt = dist_bench.NorMuon([p], lr=dist_bench.LR, ns_dtype=torch.float32)
    w, buf, v = init.clone(), torch.zeros(shape), torch.zeros(shape[0])
    coeffs = dist_bench.NS.resolve_ns_coefficients("muon", 5)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf.lerp_(g, 1.0 - dist_bench.MOMENTUM)
        u = g.lerp(buf, dist_bench.MOMENTUM)
        o = dist_bench.NS.default_orthogonalizer(u.unsqueeze(0), coeffs, torch.float32)[0]
        w -= dist_bench.LR * dist_bench.normuon_row_update(o, v)
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[p]["neuron_second_moment"].flatten(), v,
                               rtol=1e-5, atol=1e-12)  # fmt: skip


@pytest.mark.distributed
def test_distributed_benchmark_zero1_equals_normuon_at_one_rank(tmp_path):
    out = run_script([str(BENCH / "distributed_step.py"), "--world", "1", "--shapes", "tiny",
                      "--reps", "1", "--methods", "normuon,zero1", "--out", str(tmp_path)])
    files = list(tmp_path.glob("distributed_step-tiny-*.md"))
    assert len(files) == 1, out
    text = files[0].read_text()
    assert "native bf16 GEMMs" in text
    agreement = re.search(r"W=1: zero1 baseline vs normuon .* difference ([0-9.e+-]+)", text)
    assert agreement and float(agreement.group(1)) < 1e-5, text


def test_step_allocations_splits_off_only_scratch_of_products_given_out(common):
    a = torch.randn(3, 64, 64)
    out = torch.empty(3, 64, 64)
    # A product allocating its own result: counted in the total, not as kernel scratch.
    assert common.step_allocations(lambda: torch.bmm(a, a)) == (a.nbytes, 0)
    # float32 products into a given buffer allocate nothing at all.
    assert common.step_allocations(lambda: torch.bmm(a, a, out=out)) == (0, 0)
    # Whatever a product given out= allocates is its kernel's scratch (bf16 oneDNN: a
    # scratchpad; elsewhere possibly nothing), and nothing outside it is counted there.
    b = a.bfloat16()
    total, in_gemm = common.step_allocations(
        lambda: (torch.bmm(b, b, out=out.bfloat16()), torch.empty(1000))
    )
    assert in_gemm == total - out.bfloat16().nbytes - 4000


@pytest.mark.distributed
def test_distributed_steps_allocate_from_the_workspace(tmp_path):
    """benchmarks/distributed_alloc.py at world size 2: a steady FSDP2 and DDP step allocates
    at most 0.05x the rank's parameter bytes outside GEMM scratch (bytes, not time: exact)."""
    run_script([str(BENCH / "distributed_alloc.py"), "--configs", "fsdp2,ddp", "--layers", "1",
                "--out", str(tmp_path)])  # fmt: skip
    text = next(tmp_path.glob("distributed_alloc-*.md")).read_text()
    rows = table_rows(text, "fsdp2") + table_rows(text, "ddp")
    assert len(rows) == 4, text
    assert all(float(row[5]) <= 0.05 for row in rows), text


@pytest.mark.slow
def test_torchtitan_curves_runs_three_optimizers_and_plots(tmp_path):
    """benchmarks/torchtitan_curves.py, 2 steps per optimizer: torchtitan's AdamW and normuon's
    Muon and NorMuon from the same seed (same first loss), a table and a PNG."""
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (scripts/install.sh "
                        "--dev installs it)")  # fmt: skip
    png = tmp_path / "curves.png"
    out = run_script([str(BENCH / "torchtitan_curves.py"), "--steps", "2", "--batch", "2",
                      "--seq-len", "32", "--png", str(png), "--out", str(tmp_path)])  # fmt: skip
    rows = {r[0]: r for r in table_rows(out, "AdamW") + table_rows(out, "Muon")
            + table_rows(out, "NorMuon")}  # fmt: skip
    assert set(rows) == {"AdamW", "Muon", "NorMuon"}
    assert len({r[1] for r in rows.values()}) == 1  # the same seed weights and first batch
    assert png.stat().st_size > 10_000
    assert list(tmp_path.glob("torchtitan_curves-*.md")) and list(tmp_path.glob("*.json"))


def test_step_versions_times_two_trees_alternately(tmp_path):
    """benchmarks/step_versions.py with this tree as both A and B: a table and a ratio."""
    out = run_script([str(BENCH / "step_versions.py"), str(ROOT), str(ROOT), "--shapes", "tiny",
                      "--reps", "1", "--steps", "1", "--out", str(tmp_path)])  # fmt: skip
    assert re.search(r"B / A = [0-9.]+", out), out
    assert len(table_rows(out, "A") + table_rows(out, "B")) == 2, out
    assert list(tmp_path.glob("step_versions-tiny-*.md"))


def test_harness_speed_times_eager_and_compiled(tmp_path):
    # --step-backend eager: dynamo's fullgraph trace of the optimizer step (a graph break fails
    # it) without inductor's minutes of code generation; the benchmark itself uses inductor.
    out = run_script([str(BENCH / "harness_speed.py"), "--rungs", "xs", "--optimizers", "normuon",
                      "--steps", "3", "--warmup", "2", "--reps", "1", "--measure",
                      "training,optimizer-step", "--step-backend", "eager", "--out",
                      str(tmp_path)],
                     timeout=600)  # fmt: skip
    rows = [r for r in table_rows(out, "xs") if len(r) == 9]
    assert len(rows) == 1 and rows[0][1] == "normuon" and rows[0][2] == "280"
    eager, compiled = (float(c.replace(",", "")) for c in rows[0][3:5])
    assert eager > 0 and compiled > 0
    assert "- `xs`: compiling saves" in out
    assert "Compile backend `eager`" in out
    step_rows = [r for r in table_rows(out, "xs") if len(r) == 7]
    assert len(step_rows) == 1 and step_rows[0][1] == "normuon"
    assert float(step_rows[0][2]) > 0 and float(step_rows[0][3]) > 0
    float(step_rows[0][6])  # the saving over a 280-step run, signed
    assert list(tmp_path.glob("harness_speed-*.md"))


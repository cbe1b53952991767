"""The default NorMuon step of two source trees, timed alternately on the same machine: does a
change keep the step's speed?

Each rep runs one subprocess per tree (``PYTHONPATH=<tree>/src``), alternating A, B, A, B, so
load from other processes hits both alike; a subprocess times ``--steps`` steps of NorMuon on
the layer shapes of ``--shapes`` (float32 parameters and gradients, the default options:
bfloat16 Newton-Schulz where this CPU multiplies it natively) after two warm-up steps and
reports its median. The table gives each tree's median over reps and B / A.

    python benchmarks/step_versions.py A_TREE B_TREE [--shapes gpt-small] [--reps 5]
        [--steps 7] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHAPE_SETS, layer_shapes, machine_lines, md_table, median, today, write_report  # noqa: E402

_PROBE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from normuon import NorMuon
d, layers, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
shapes = ([(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]) * layers
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
opt = NorMuon(params, lr=0.02)
for _ in range(2):
    opt.step()
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    opt.step()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2]}))
"""


def time_tree(tree: Path, d: int, layers: int, steps: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(d), str(layers), str(steps),
                          str(threads)], capture_output=True, text=True, env=env,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the baseline source tree (a checkout)")
    ap.add_argument("b", type=Path, help="the changed source tree")
    ap.add_argument("--shapes", default="gpt-small", choices=list(SHAPE_SETS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="", help="names the two trees in the report, 'A vs B'")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    for tree in (args.a, args.b):
        if not (tree / "src" / "normuon").is_dir():
            ap.error(f"{tree} has no src/normuon")
    d, layers = SHAPE_SETS[args.shapes]
    a_times, b_times = [], []
    for _ in range(args.reps):
        a_times.append(time_tree(args.a, d, layers, args.steps, args.threads))
        b_times.append(time_tree(args.b, d, layers, args.steps, args.threads))
    a, b = median(a_times), median(b_times)
    n = len(layer_shapes(d, layers))
    lines = [f"# NorMuon step, two source trees ({today()})", ""] + machine_lines() + [
        "", f"{args.label or 'A vs B'}: {args.shapes} ({n} matrices), {args.reps} alternating "
        f"reps of {args.steps} steps each, {args.threads} threads, default options.", "",
    ]  # fmt: skip
    lines += md_table(["tree", "median step ms", "per-rep medians ms"], [
        ["A", f"{a * 1e3:.1f}", " ".join(f"{t * 1e3:.1f}" for t in a_times)],
        ["B", f"{b * 1e3:.1f}", " ".join(f"{t * 1e3:.1f}" for t in b_times)],
    ])  # fmt: skip
    lines += ["", f"B / A = {b / a:.3f}"]
    print("\n".join(lines))
    return write_report(args.out, f"step_versions-{args.shapes}", lines)


if __name__ == "__main__":
    main()

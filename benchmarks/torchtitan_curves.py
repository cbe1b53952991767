"""torchtitan's Llama 3 debug model trained by torchtitan's trainer with AdamW, Muon and NorMuon.

Each optimizer is one run of ``tests/torchtitan_cpu.py`` (torchtitan 0.3.0's ``main()`` on CPU,
one process): the same seed weights (``--debug.seed``), the same batches of the embedded
Shakespeare corpus (byte tokens; every step draws fresh windows, so the training loss of a step
is measured on text the model has not been trained on yet), the same LR schedule (linear
warm-up, then linear decay), torchtitan's gradient clipping at 1.

- AdamW: torchtitan's own optimizer container, as its debug config sets it (lr 8e-4,
  betas (0.9, 0.95), weight decay 0.1, on every parameter);
- Muon / NorMuon: ``--override.imports normuon.integrations.torchtitan.muon`` / ``.normuon``:
  lr 0.02 on the hidden matrices, the embedding, norms and head keeping that AdamW.

Writes ``results/torchtitan_curves-DATE.md`` (machine, settings, final losses, step times) and
a PNG of the curves (``--png``, default ``docs/torchtitan-loss.png``)::

    python benchmarks/torchtitan_curves.py                 # 200 steps each, ~5 min on 1 core
    python benchmarks/torchtitan_curves.py --steps 3 --png /tmp/x.png --out /tmp   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_lines, md_table, version_of, write_report

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "tests" / "torchtitan_cpu.py"

OPTIMIZERS = {
    "AdamW": [],
    "Muon": ["--override.imports", "normuon.integrations.torchtitan.muon"],
    "NorMuon": ["--override.imports", "normuon.integrations.torchtitan.normuon"],
}


def run(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """One torchtitan run; its per-step metrics and wall time."""
    metrics = folder / f"{name}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NORMUON_TT_METRICS": str(metrics),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(LAUNCHER), "--module", "torchtitan_cpu", "--config", "llama3_debugmodel_cpu",
           "--dump_folder", str(folder / name), "--debug.seed", str(args.seed),
           "--training.steps", str(args.steps), "--training.local_batch_size", str(args.batch),
           "--training.seq_len", str(args.seq_len),
           "--lr_scheduler.warmup_steps", str(max(1, args.steps // 10)),
           *OPTIMIZERS[name]]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows], "wall": wall}


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (the per-step loss is of one small batch)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Left: every step (thin) and the trailing mean (thick); right: the same after the first
    fifth of the run, where the curves separate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, args.steps // 20)
    start = args.steps // 5
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, res in results.items():
        mean = smoothed(res["loss"], window)
        (line,) = axes[0].plot(res["steps"], mean, label=name)
        axes[0].plot(res["steps"], res["loss"], color=line.get_color(), alpha=0.2, linewidth=0.8)
        late = [i for i, s in enumerate(res["steps"]) if s >= start]
        axes[1].plot([res["steps"][i] for i in late], [mean[i] for i in late], label=name,
                     color=line.get_color())  # fmt: skip
    axes[0].set_ylabel(f"training loss, nats/byte (thick: mean of the last {window} steps)")
    axes[1].set_title(f"from step {start}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"torchtitan 0.3.0 trainer, Llama 3 debug model (6 layers, d=256), "
                 f"{args.batch}x{args.seq_len} bytes/step, seed {args.seed}")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--png", default=str(ROOT / "docs" / "torchtitan-loss.png"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--from-json", help="re-plot and re-tabulate the runs of a JSON this "
                        "script wrote (same --steps, --batch, --seq-len, --seed)")  # fmt: skip
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = {name: saved[name] for name in OPTIMIZERS}
        machine = saved.get("machine") or [
            *machine_lines(), "- (machine lines taken when re-plotting, not during the runs)"]
    else:
        machine = machine_lines()  # the load average as the runs start
        with tempfile.TemporaryDirectory() as tmp:
            results = {name: run(name, args, Path(tmp)) for name in OPTIMIZERS}
    plot(results, args, Path(args.png))
    last = max(1, args.steps // 10)
    rows = []
    for name, res in results.items():
        tail = res["loss"][-last:]
        rows.append([name, f"{res['loss'][0]:.4f}", f"{sum(tail) / len(tail):.4f}",
                     f"{res['wall']:.0f}"])  # fmt: skip
    lines = [
        "# torchtitan: AdamW, Muon and NorMuon on the Llama 3 debug model (CPU)", "",
        *machine, f"- torchtitan {version_of('torchtitan')}", "",
        f"`python benchmarks/torchtitan_curves.py --steps {args.steps} --batch {args.batch} "
        f"--seq-len {args.seq_len} --seed {args.seed} --threads {args.threads}`", "",
        f"One process each, seed {args.seed}, {args.steps} steps of {args.batch} x {args.seq_len} "
        f"bytes, warm-up {max(1, args.steps // 10)} steps then linear decay (torchtitan's "
        "schedule), gradient clipping at 1. Loss: the training batch's, before the step (fresh "
        "text every step).", "",
        *md_table(["optimizer", "loss at step 1", f"mean loss of the last {last} steps",
                   "wall s (start-up included)"], rows),
        "", f"Curves: `{Path(args.png).name}`.",
    ]  # fmt: skip
    path = write_report(args.out, "torchtitan_curves", lines)
    if not args.from_json:
        (Path(args.out) / f"{path.stem}.json").write_text(json.dumps({**results,
                                                                      "machine": machine}))
    print("\n".join(lines))
    print(f"\nwrote {path} and {args.png}")


if __name__ == "__main__":
    main()

"""Compare optimizers on the same model, data and seeds; sweep learning rates.

``run_compare`` trains every (optimizer, seed) with :func:`~normuon.harness.train.train_run`
and reports, per optimizer: the final validation loss (mean and spread over seeds), the steps
needed to reach AdamW's final validation loss (the paper's "training efficiency", linearly
interpolated between validation points) and the saving in percent versus AdamW and Muon, wall
time, the optimizer step's share of it and the optimizer state bytes. ``run_sweep`` trains each
optimizer at several learning rates and reports final validation loss versus lr.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import normuon

from .config import RunConfig
from .data import TokenData
from .train import RunResult, train_run

__all__ = [
    "OptimizerSummary",
    "run_compare",
    "run_sweep",
    "merge_sweeps",
    "summarize",
    "steps_to_reach",
    "format_table",
    "TABLE_COLUMNS",
]

TABLE_COLUMNS = (
    "optimizer",
    "final val loss",
    "steps to AdamW loss",
    "saving vs AdamW",
    "saving vs Muon",
    "time to AdamW loss (s)",
    "wall time (s)",
    "opt step share",
    "opt state (bytes)",
)


@dataclass
class OptimizerSummary:
    """One table row: an optimizer aggregated over its seeds."""

    optimizer: str
    seeds: list[int]
    final_val_mean: float
    final_val_min: float
    final_val_max: float
    steps_to_target: float | None
    """Steps for the seed-mean curve to reach the target (AdamW's mean final val loss)."""
    time_to_target: float | None
    saving_vs_adamw: float | None
    """1 - steps / AdamW's steps to the same target (fraction; positive = fewer steps)."""
    saving_vs_muon: float | None
    wall_time_s: float
    optimizer_share: float
    optimizer_state_bytes: int
    val_steps: list[int]
    val_mean: list[float]
    val_min: list[float]
    val_max: list[float]
    val_time_mean: list[float]


def steps_to_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """First x at which the piecewise-linear curve (xs, losses) reaches ``target`` (or None)."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(xs[0])
            x0, x1, l0 = xs[i - 1], xs[i], losses[i - 1]
            # Linear interpolation between the last point above and the first at/below target.
            return float(x0 + (x1 - x0) * (l0 - target) / (l0 - loss))
    return None


def summarize(results: dict[str, list[RunResult]]) -> list[OptimizerSummary]:
    """Aggregate runs per optimizer into table rows (target = AdamW's mean final val loss)."""
    rows: list[OptimizerSummary] = []
    for name, runs in results.items():
        if not runs:
            continue
        steps = runs[0].val_steps
        if any(r.val_steps != steps for r in runs):
            raise ValueError(f"{name}: seeds were validated at different steps; cannot average")
        curves = torch.tensor([r.val_losses for r in runs], dtype=torch.float64)  # (seeds, P)
        times = torch.tensor([r.val_times for r in runs], dtype=torch.float64)
        finals = curves[:, -1]
        rows.append(OptimizerSummary(
            optimizer=name,
            seeds=[r.seed for r in runs],
            final_val_mean=float(finals.mean()),
            final_val_min=float(finals.min()),
            final_val_max=float(finals.max()),
            steps_to_target=None, time_to_target=None, saving_vs_adamw=None, saving_vs_muon=None,
            wall_time_s=sum(r.train_time_s for r in runs) / len(runs),
            optimizer_share=sum(r.optimizer_share for r in runs) / len(runs),
            optimizer_state_bytes=runs[0].optimizer_state_bytes,
            val_steps=list(steps),
            val_mean=curves.mean(0).tolist(),
            val_min=curves.min(0).values.tolist(),
            val_max=curves.max(0).values.tolist(),
            val_time_mean=times.mean(0).tolist(),
        ))  # fmt: skip
    by_name = {r.optimizer: r for r in rows}
    if "adamw" in by_name:
        target = by_name["adamw"].final_val_mean
        for row in rows:
            row.steps_to_target = steps_to_reach(row.val_steps, row.val_mean, target)
            row.time_to_target = steps_to_reach(row.val_time_mean, row.val_mean, target)
        for ref_name, attr in (("adamw", "saving_vs_adamw"), ("muon", "saving_vs_muon")):
            ref = by_name.get(ref_name)
            if ref is None or not ref.steps_to_target:
                continue
            for row in rows:
                if row.steps_to_target is not None:
                    setattr(row, attr, 1.0 - row.steps_to_target / ref.steps_to_target)
    return rows


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def _fmt_steps(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def format_table(rows: Sequence[OptimizerSummary]) -> str:
    """Markdown table with :data:`TABLE_COLUMNS` (loss: mean ± half the min-max range)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        spread = (r.final_val_max - r.final_val_min) / 2
        cells = [
            r.optimizer,
            f"{r.final_val_mean:.4f} ± {spread:.4f}",
            _fmt_steps(r.steps_to_target),
            _fmt_pct(r.saving_vs_adamw),
            _fmt_pct(r.saving_vs_muon),
            "not reached" if r.time_to_target is None else f"{r.time_to_target:.1f}",
            f"{r.wall_time_s:.1f}",
            f"{100 * r.optimizer_share:.1f}%",
            f"{r.optimizer_state_bytes:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normuon": normuon.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _resolved(cfg: RunConfig, data: TokenData) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    cfg.model.vocab_size = data.vocab_size
    return {"data": data.source, **cfg.to_dict()}


def _pyplot():
    import matplotlib  # lazy: plotting is a harness extra, not a library dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(rows: Sequence[OptimizerSummary], path: Path, title: str) -> None:
    """Two panels: validation loss vs step and vs training wall time; seeds shaded min-max."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        for ax, xs in ((axes[0], r.val_steps), (axes[1], r.val_time_mean)):
            (line,) = ax.plot(xs, r.val_mean, label=f"{r.optimizer} ({len(r.seeds)} seeds)")
            ax.fill_between(xs, r.val_min, r.val_max, color=line.get_color(), alpha=0.25)
    finals = [v for r in rows for v in r.val_min[len(r.val_min) // 4 :]]
    highs = [v for r in rows for v in r.val_max[len(r.val_max) // 4 :]]
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        # Zoom on the last three quarters of training, where the optimizers differ.
        ax.set_ylim(min(finals) - 0.02, max(highs) + 0.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compare(
    cfg: RunConfig,
    data: TokenData,
    *,
    optimizers: Sequence[str],
    seeds: int,
    out: str | Path,
    device: str | None = None,
    progress: bool | None = None,
    jobs: int = 1,
    log=print,
) -> dict[str, Any]:
    """Train each optimizer for seeds 0..seeds-1; write results.json, config.json, loss.png.

    ``jobs > 1`` runs that many trainings at once in worker processes (one thread each).
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_optimizers(cfg, optimizers)
    (out / "config.json").write_text(json.dumps(_resolved(cfg, data), indent=2) + "\n")
    results: dict[str, list[RunResult]] = {name: [] for name in optimizers}
    jobs_list = [(seed, name) for seed in range(seeds) for name in optimizers]
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")

    def report(r: RunResult) -> None:
        log(f"{r.optimizer:8s} seed {r.seed}: final val loss {r.final_val_loss:.4f}, "
            f"{r.train_time_s:.1f}s, optimizer step {100 * r.optimizer_share:.1f}%")

    done: dict[tuple[int, str], RunResult] = {}
    if jobs == 1:
        for seed, name in jobs_list:
            done[seed, name] = train_run(cfg, name, data, seed=seed,
                                         out_dir=out / name / f"seed{seed}", device=device,
                                         progress=progress)  # fmt: skip
            report(done[seed, name])
    else:
        # Independent runs in worker processes, one torch thread each (CPU machines with
        # several cores). Each run's timings then include the other workers' contention.
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(_worker_run, cfg, name, data, seed, str(out / name / f"seed{seed}"),
                            device): (seed, name)
                for seed, name in jobs_list
            }  # fmt: skip
            for future in concurrent.futures.as_completed(futures):
                done[futures[future]] = future.result()
                report(done[futures[future]])
    for seed, name in jobs_list:
        results[name].append(done[seed, name])
    rows = summarize(results)
    table = format_table(rows)
    summary = {
        "preset": cfg.preset,
        "environment": {**_environment(), "jobs": jobs},
        "target": "AdamW mean final validation loss",
        "table": table,
        "rows": [dataclasses.asdict(r) for r in rows],
        "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_compare(rows, out / "loss.png", f"{cfg.preset}: {data.source}")
    return summary


def _worker_run(cfg, name, data, seed, out_dir, device) -> RunResult:
    torch.set_num_threads(1)
    return train_run(cfg, name, data, seed=seed, out_dir=out_dir, device=device, progress=False)


def _check_optimizers(cfg: RunConfig, optimizers: Sequence[str]) -> None:
    if not optimizers:
        raise ValueError("no optimizer given")
    for name in optimizers:
        if name not in cfg.optimizers:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(cfg.optimizers)}")


def run_sweep(
    cfg: RunConfig,
    data: TokenData,
    *,
    lrs: dict[str, list[float]],
    seed: int = 0,
    out: str | Path,
    device: str | None = None,
    progress: bool | None = None,
    log=print,
) -> dict[str, Any]:
    """Train each optimizer at each lr of ``lrs[name]`` (the matrix lr for Muon/NorMuon).

    Writes sweep.json, config.json and sweep.png (final validation loss vs lr). A diverged run
    counts as an infinite loss rather than aborting the sweep.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_optimizers(cfg, list(lrs))
    (out / "config.json").write_text(json.dumps(_resolved(cfg, data), indent=2) + "\n")
    points: dict[str, list[dict[str, float]]] = {}
    for name, values in lrs.items():
        points[name] = []
        for lr in values:
            if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rates must be positive numbers, got {lr!r}")
            run_cfg = copy.deepcopy(cfg)
            run_cfg.optimizers[name].lr = lr
            try:
                r = train_run(run_cfg, name, data, seed=seed, out_dir=out / name / f"lr{lr:g}",
                              device=device, progress=progress)  # fmt: skip
                loss = r.final_val_loss
            except FloatingPointError as exc:
                log(str(exc))
                loss = math.inf
            log(f"{name:8s} lr {lr:g}: final val loss {loss:.4f}")
            points[name].append({"lr": lr, "final_val_loss": loss})
    return write_sweep(points, out, preset=cfg.preset, seed=seed)


def write_sweep(
    points: dict[str, list[dict[str, float]]], out: str | Path, *, preset: str, seed: int
) -> dict[str, Any]:
    """Table, sweep.json and sweep.png for {optimizer: [{"lr", "final_val_loss"}, ...]}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| optimizer | lr | final val loss | best |", "|---|---|---|---|"]
    best: dict[str, float] = {}
    for name, pts in points.items():
        pts.sort(key=lambda p: p["lr"])
        top = min(pts, key=lambda p: p["final_val_loss"])
        best[name] = top["lr"]
        for p in pts:
            mark = "**best**" if p is top else ""
            lines.append(f"| {name} | {p['lr']:g} | {p['final_val_loss']:.4f} | {mark} |")
    table = "\n".join(lines)
    summary = {"preset": preset, "environment": _environment(), "seed": seed,
               "points": points, "best_lr": best, "table": table}  # fmt: skip
    # json cannot hold inf: a diverged run is written as null.
    safe = json.loads(json.dumps(summary).replace("Infinity", "null"))
    (out / "sweep.json").write_text(json.dumps(safe, indent=2) + "\n")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in points.items():
        ok = [p for p in pts if math.isfinite(p["final_val_loss"])]
        ax.plot([p["lr"] for p in ok], [p["final_val_loss"] for p in ok], "o-", label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on a log axis
    ax.set_xlabel("learning rate (AdamW: all params; Muon/NorMuon: hidden matrices)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"lr sweep, {preset}, seed {seed}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return summary


def merge_sweeps(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Combine several ``normuon sweep`` folders (same preset and seed) into one.

    A folder without sweep.json (an interrupted sweep) contributes its finished runs.
    """
    points: dict[str, list[dict[str, float]]] = {}
    meta: set[tuple[str, int]] = set()
    for folder in folders:
        path = Path(folder) / "sweep.json"
        if path.is_file():
            data = json.loads(path.read_text())
            meta.add((data["preset"], data["seed"]))
            found = data["points"]
        else:
            # An interrupted sweep has no sweep.json: read its finished runs instead.
            found = {}
            for result in sorted(Path(folder).glob("*/lr*/result.json")):
                run = json.loads(result.read_text())
                run_cfg = json.loads((result.parent / "config.json").read_text())
                if run["steps"] != run_cfg["config"]["train"]["steps"]:
                    continue  # stopped early: not comparable
                meta.add((run_cfg["config"]["preset"], run["seed"]))
                lr = run_cfg["config"]["optimizers"][run["optimizer"]]["lr"]
                found.setdefault(run["optimizer"], []).append(
                    {"lr": lr, "final_val_loss": run["final_val_loss"]}
                )
            if not found:
                raise ValueError(f"--merge: {folder} has neither sweep.json nor finished runs")
        for name, pts in found.items():
            for p in pts:
                loss = math.inf if p["final_val_loss"] is None else p["final_val_loss"]
                points.setdefault(name, []).append({"lr": p["lr"], "final_val_loss": loss})
    if len(meta) != 1:
        raise ValueError(f"--merge: the sweeps differ in (preset, seed): {sorted(meta)}")
    preset, seed = meta.pop()
    return write_sweep(points, out, preset=preset, seed=seed)

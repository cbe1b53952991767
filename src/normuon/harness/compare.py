"""Running comparisons: every optimizer on the same model, data and seeds; lr sweeps.

``run_compare`` trains every (optimizer, seed) of a :class:`~normuon.harness.spec.RunSpec`
with :func:`~normuon.harness.train.train_run` (recording the neuron diagnostics of
:mod:`normuon.diagnostics`) and writes ``results.json``;
``write_compare_plots`` then draws ``loss.png`` and ``neurons.png``. ``run_sweep`` trains each
optimizer at several learning rates. Tables, statistics and figures are in
:mod:`~normuon.harness.report`; nothing there trains.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import normuon

from .checkpoint import (
    CHECKPOINT_NAME,
    STRETCH_BASELINE,
    prepare_out_dir,
    same_json,
    stretch_folder,
    write_json,
)
from .config import RunConfig
from .data import TokenData
from .report import (
    TABLE_COLUMNS,
    OptimizerSummary,
    format_table,
    neuron_table,
    plot_compare,
    plot_neurons,
    plot_sweep,
    steps_to_reach,
    summarize,
    sweep_table,
)
from .runtime import launch_rank
from .spec import RunSpec, stretched_steps
from .train import RunInterrupted, RunResult, defer_stop_signals, train_run

#: The optimizer trained on stretched schedules (``stretch``): the paper's "Muon-rescale".
BASELINE = STRETCH_BASELINE

__all__ = [
    "BASELINE",
    "OptimizerSummary",
    "run_compare",
    "stretched",
    "write_compare_plots",
    "run_sweep",
    "write_sweep",
    "merge_sweeps",
    "summarize",
    "steps_to_reach",
    "format_table",
    "TABLE_COLUMNS",
]


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normuon": normuon.__version__,
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _need_spec(spec: Any, what: str) -> None:
    if not isinstance(spec, RunSpec):
        raise TypeError(f"{what} takes a RunSpec (normuon.harness.spec.resolve_spec), not "
                        f"{type(spec).__name__}")  # fmt: skip


def _claim_folder(out: Path, resolved: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
    """A fresh comparison needs an empty folder; ``resume`` needs the same config there.
    ``resolved``: the spec's :meth:`~normuon.harness.spec.RunSpec.to_json`, written here."""
    if resume:
        path = out / "config.json"
        if not path.is_file():
            raise ValueError(f"--resume: {out} holds no comparison (no config.json); start a "
                             f"fresh one without --resume")  # fmt: skip
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"--resume: {path} is not JSON (damaged)") from None
        if not same_json(saved, resolved):
            raise ValueError(f"--resume: {out} holds a comparison with another config or data; "
                             f"use the same options or another --out")  # fmt: skip
    prepare_out_dir(out, resume=resume, overwrite=overwrite)
    write_json(out / "config.json", resolved)


@dataclass(frozen=True)
class _Run:
    """One training of a comparison: an optimizer, a seed, its spec and folder; ``factor``
    > 1 for the baseline trained on a stretched schedule."""

    name: str
    seed: int
    spec: RunSpec = field(compare=False)  # (hashed by the other fields: one run, one folder)
    run_dir: Path = Path()
    factor: float = 1.0


def stretched(cfg: RunSpec | RunConfig, factor: float) -> RunSpec | RunConfig:
    """``cfg`` trained ``factor`` times longer on the same schedule shape: steps and warmup
    scaled (the decay is a fraction of the steps already), evaluation points unchanged.

    A :class:`~normuon.harness.spec.RunSpec` gives :meth:`RunSpec.stretched
    <normuon.harness.spec.RunSpec.stretched>` (``factor`` one of its stretch factors); a
    :class:`~normuon.harness.config.RunConfig` gives a changed copy (a length given in
    tokens per parameter: that many times more tokens per parameter).
    """
    if isinstance(cfg, RunSpec):
        return cfg.stretched(factor)
    cfg = copy.deepcopy(cfg)
    if cfg.train.tokens_per_param:
        cfg.train.tokens_per_param *= factor
        cfg.train.steps = 0  # resolved from the longer budget
    else:
        cfg.train.steps = stretched_steps(cfg.train.steps, factor)
    cfg.train.warmup_steps = stretched_steps(cfg.train.warmup_steps, factor)
    return cfg


def _finished(run_dir: Path, spec: RunSpec) -> RunResult | None:
    """The result of a finished run in ``run_dir``, if there is one for the full step count."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    result = RunResult(**json.loads(path.read_text()))
    return result if result.steps == spec.train.steps else None


def run_compare(
    spec: RunSpec,
    data: TokenData,
    *,
    out: str | Path,
    device: str | None = None,
    progress: bool | None = None,
    jobs: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    diagnostics_every: int | None = None,
    tensorboard: bool = False,
    dist_timeout_s: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Train each of ``spec``'s optimizers with each of its seeds; write results.json and
    config.json (the spec's :meth:`~normuon.harness.spec.RunSpec.to_json`).

    ``spec`` (:func:`~normuon.harness.spec.resolve_spec`, with ``data``) holds the validated
    settings, the optimizers, the seeds and the stretch factors: factors > 1 at which Muon
    (the baseline) is also trained, on the same schedule shape stretched (:func:`stretched`),
    to measure how many more steps it needs to match each optimizer's final loss (the paper's
    protocol against Muon); nothing of it is checked again here. ``jobs > 1`` runs
    that many trainings at once in worker processes (one thread each). ``resume``: reuse
    finished runs in ``out`` and continue interrupted ones from their checkpoints.
    ``diagnostics_every`` (default: the validation interval, off under FSDP2; 0 disables)
    records the neuron diagnostics. Under torchrun every rank calls this; rank 0 owns the
    folder and the summary. Figures: :func:`write_compare_plots`.
    """
    _need_spec(spec, "run_compare")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    rank, world = launch_rank()  # the process group comes later, with the first run
    if world > 1 and jobs > 1:
        raise ValueError("--jobs > 1 runs trainings in worker processes; under torchrun every "
                         "run already uses all ranks: leave --jobs at 1")  # fmt: skip
    out = Path(out)
    sharded = spec.world_size > 1 and spec.train.parallel == "fsdp2"
    if diagnostics_every is None:  # they need whole parameters: off by default under FSDP2
        diagnostics_every = 0 if sharded else spec.train.val_every
    elif diagnostics_every and sharded:
        raise ValueError("--diagnostics-every needs whole parameters: not available with "
                         "--parallel fsdp2 (use ddp, or --diagnostics-every 0)")  # fmt: skip
    if rank == 0:  # the other ranks write nothing (their runs' files are rank 0's too)
        _claim_folder(out, spec.to_json(), resume=resume, overwrite=overwrite)
    else:
        log = _quiet
    optimizers, seed_list, factors = spec.selected, spec.seeds, spec.stretch
    runs = [_Run(name, seed, spec, out / name / f"seed{seed}")
            for seed in seed_list for name in optimizers]  # fmt: skip
    runs += [_Run(BASELINE, seed, spec.stretched(f), out / stretch_folder(f) / f"seed{seed}", f)
             for f in factors for seed in seed_list]  # fmt: skip
    options = {"device": device, "diagnostics_every": diagnostics_every,
               "tensorboard": tensorboard, "dist_timeout_s": dist_timeout_s}  # fmt: skip
    done = _train_all(runs, data, options, jobs=jobs, resume=resume, progress=progress, log=log)
    results: dict[str, list[RunResult]] = {name: [] for name in optimizers}
    for run in runs:
        if run.factor == 1.0:
            results[run.name].append(done[run])
    stretch_runs = {f: [done[r] for r in runs if r.factor == f] for f in factors}
    rows = summarize(results, stretch_runs)
    diag_runs = {name: [_read_jsonl(out / name / f"seed{seed}" / "diagnostics.jsonl")
                        for seed in seed_list] for name in optimizers}  # fmt: skip
    has_diag = any(recs for runs_ in diag_runs.values() for recs in runs_)
    summary = {
        "preset": spec.preset,
        "data": spec.data,
        "environment": {**_environment(), "jobs": jobs, "world_size": spec.world_size},
        "target": "AdamW mean final validation loss; vs Muon: Muon's mean final validation loss",
        "stretch": list(factors),
        "table": format_table(rows, header=f"{spec.preset}: {spec.budget.describe()}"),
        "neuron_table": neuron_table(diag_runs) if has_diag else None,
        "rows": [dataclasses.asdict(r) for r in rows],
        "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()},
        "stretch_runs": {f"{f:g}": [dataclasses.asdict(r) for r in v]
                         for f, v in stretch_runs.items()},  # fmt: skip
    }
    if rank == 0:
        write_json(out / "results.json", summary)
    return summary


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of ranks other than 0 under torchrun."""


def _train_all(
    runs: Sequence[_Run],
    data: TokenData,
    options: dict[str, Any],
    *,
    jobs: int,
    resume: bool,
    progress: bool | None,
    log,
    diverged_ok: bool = False,
    on_result=None,
    held_out: str = "val",
) -> dict[_Run, RunResult | Diverged]:
    """Every run's result: finished ones read back (``resume``), the others trained here
    (``jobs == 1``) or in worker processes. ``diverged_ok``: a run that diverges gives a
    :class:`Diverged` result and the others go on (a tuning grid's high end); otherwise its
    FloatingPointError ends them all. ``on_result(run, result)`` is called as each one is
    done (read back or trained), before the rest finish. ``held_out`` names the split each
    final loss is read on in the log lines (``normuon tune``'s final trainings read test)."""

    def report(run: _Run, r: RunResult | Diverged) -> None:
        if on_result is not None:
            on_result(run, r)
        label = run.name if run.factor == 1.0 else f"{run.name} x{run.factor:g}"
        if isinstance(r, Diverged):
            log(f"{label:8s} seed {run.seed}: diverged ({r.message})")
            return
        log(f"{label:8s} seed {r.seed}: final {held_out} loss {r.final_val_loss:.4f}, "
            f"{r.train_time_s:.1f}s, optimizer step {100 * r.optimizer_share:.1f}%")

    done: dict[_Run, RunResult] = {}
    todo: list[tuple[_Run, bool]] = []
    for run in runs:
        finished = _finished(run.run_dir, run.spec) if resume else None
        if finished is not None:
            done[run] = finished
            report(run, finished)
        else:
            todo.append((run, resume and (run.run_dir / CHECKPOINT_NAME).is_file()))
    if jobs == 1:
        for run, cont in todo:
            done[run] = _worker_run(run.spec, run.name, data, run.seed, run.run_dir, cont,
                                    resume and not cont, options, diverged_ok,
                                    progress=progress)  # fmt: skip
            report(run, done[run])
    elif todo:
        _train_in_workers(todo, data, options, jobs, resume, done, report, diverged_ok)
    return done


@dataclass(frozen=True)
class Diverged:
    """The result of a run that diverged (non-finite validation loss), when that is allowed."""

    message: str


def _train_in_workers(todo, data, options, jobs, resume, done, report, diverged_ok) -> None:
    """Independent runs in worker processes, one torch thread each (CPU machines with several
    cores). Each run's timings then include the other workers' contention."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx,
                                                initializer=defer_stop_signals) as pool:
        # At most `jobs` runs submitted at a time, so that after an interrupt no queued run
        # starts (the running ones get the signal, checkpoint and stop).
        pending, running = list(todo), {}
        error: BaseException | None = None
        with _forward_sigterm():
            while running or (pending and error is None):
                while pending and error is None and len(running) < jobs:
                    run, cont = pending.pop(0)
                    future = pool.submit(_worker_run, run.spec, run.name, data, run.seed,
                                         str(run.run_dir), cont, resume and not cont,
                                         options, diverged_ok, threads=1)  # fmt: skip
                    running[future] = run
                try:
                    finished, _ = concurrent.futures.wait(
                        running, return_when=concurrent.futures.FIRST_COMPLETED)
                except KeyboardInterrupt as exc:  # Ctrl-C: the workers got it too
                    error = error or exc
                    continue
                for future in finished:
                    run = running.pop(future)
                    try:
                        done[run] = future.result()
                    except BaseException as exc:
                        error = error or exc
                        continue
                    report(run, done[run])
        if error is not None:
            if not isinstance(error, RunInterrupted) and isinstance(
                    error, concurrent.futures.process.BrokenProcessPool):
                # A worker killed while starting up (before it could defer signals).
                raise KeyboardInterrupt from error
            raise error


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_compare_plots(summary: dict[str, Any], out: str | Path) -> list[Path]:
    """``loss.png`` (and ``neurons.png`` when diagnostics were recorded) from a summary.

    Raises :class:`~normuon.harness.report.PlottingUnavailable` without matplotlib.
    """
    out = Path(out)
    rows = [OptimizerSummary(**r) for r in summary["rows"]]
    title = f"{summary['preset']}: {summary['data']}"
    plot_compare(rows, out / "loss.png", title)
    written = [out / "loss.png"]
    diag_runs = {name: [_read_jsonl(out / name / f"seed{r['seed']}" / "diagnostics.jsonl")
                        for r in runs] for name, runs in summary["runs"].items()}  # fmt: skip
    if any(recs for runs in diag_runs.values() for recs in runs):
        plot_neurons(diag_runs, out / "neurons.png", f"neuron balance of the updates, {title}")
        written.append(out / "neurons.png")
    return written


@contextlib.contextmanager
def _forward_sigterm():
    """Pass a SIGTERM of this process on to its worker processes (the pool's, the only
    children it has then), which checkpoint and stop.

    (Ctrl-C reaches the workers directly: they share the terminal's process group.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def forward(signum: int, frame: Any) -> None:
        for proc in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _worker_run(spec, name, data, seed, out_dir, resume, overwrite, options, diverged_ok,
                threads=None, progress=False) -> RunResult | Diverged:
    """One training (in this process or a worker: ``threads=1``)."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return train_run(spec, name, data, seed=seed, out_dir=out_dir, resume=resume,
                         overwrite=overwrite, progress=progress, **options)  # fmt: skip
    except FloatingPointError as exc:
        if not diverged_ok:
            raise
        return Diverged(str(exc))


def run_sweep(
    spec: RunSpec,
    data: TokenData,
    *,
    lrs: dict[str, list[float]],
    out: str | Path,
    device: str | None = None,
    progress: bool | None = None,
    overwrite: bool = False,
    log=print,
) -> dict[str, Any]:
    """Train each optimizer at each lr of ``lrs[name]`` (the matrix lr for Muon/NorMuon).

    ``spec`` (:func:`~normuon.harness.spec.resolve_spec`, with ``data``) has the optimizers of
    ``lrs`` and one seed; each point trains ``spec.with_lr(name, lr)``. Writes sweep.json and
    config.json (figure: :func:`write_sweep_plot`). A diverged run counts as an infinite loss
    rather than aborting the sweep.
    """
    _need_spec(spec, "run_sweep")
    out = Path(out)
    if len(spec.seeds) != 1:
        raise ValueError(f"a sweep trains one seed, the spec has {list(spec.seeds)}")
    seed = spec.seeds[0]
    for name, values in lrs.items():
        if name not in spec.selected:
            raise ValueError(f"--lrs: {name!r} is not one of the spec's optimizers "
                             f"{list(spec.selected)}")  # fmt: skip
        for lr in values:
            if not (isinstance(lr, float) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rates must be positive numbers, got {lr!r}")
    _claim_folder(out, spec.to_json(), resume=False, overwrite=overwrite)
    points: dict[str, list[dict[str, float]]] = {}
    for name, values in lrs.items():
        points[name] = []
        for lr in values:
            try:
                r = train_run(spec.with_lr(name, lr), name, data, seed=seed,
                              out_dir=out / name / f"lr{lr:g}", device=device,
                              progress=progress)  # fmt: skip
                loss = r.final_val_loss
            except FloatingPointError as exc:
                log(str(exc))
                loss = math.inf
            log(f"{name:8s} lr {lr:g}: final val loss {loss:.4f}")
            points[name].append({"lr": lr, "final_val_loss": loss})
    return write_sweep(points, out, preset=spec.preset, seed=seed)


def write_sweep(
    points: dict[str, list[dict[str, float]]], out: str | Path, *, preset: str, seed: int
) -> dict[str, Any]:
    """Table and sweep.json for {optimizer: [{"lr", "final_val_loss"}, ...]}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, best = sweep_table(points)
    summary = {"preset": preset, "environment": _environment(), "seed": seed,
               "points": points, "best_lr": best, "table": table}  # fmt: skip
    write_json(out / "sweep.json", _finite_or_null(summary))
    return summary


def _finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged run's loss) replaced by None: JSON has
    no infinities, and ``merge_sweeps`` reads null back as an infinite loss."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def write_sweep_plot(summary: dict[str, Any], out: str | Path) -> Path:
    """``sweep.png`` from :func:`write_sweep`'s summary (needs matplotlib)."""
    path = Path(out) / "sweep.png"
    plot_sweep(summary["points"], path, f"lr sweep, {summary['preset']}, seed {summary['seed']}")
    return path


def merge_sweeps(folders: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Combine several ``normuon sweep`` folders (same preset and seed) into one.

    A folder without sweep.json (an interrupted sweep) contributes its finished runs.
    """
    points: dict[str, list[dict[str, float]]] = {}
    meta: set[tuple[str, int]] = set()
    for folder in folders:
        if not Path(folder).is_dir():
            raise ValueError(f"--merge: {folder} is not a folder")
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

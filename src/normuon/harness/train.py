"""One training run: a GPT, one optimizer, one seed, metrics as JSON lines, resumable.

Layering: this module uses only the public API of the library (``NorMuon``, ``Muon``,
``param_groups``); the comparison (``compare.py``) calls :func:`train_run` once per
(optimizer, seed). The loop is a :class:`Trainer`: setup (model, optimizer, schedule),
checkpointing, evaluation and the step are separate methods; the process side (device,
process group, teardown) lives in :mod:`~normuon.harness.runtime` and the run folder and
checkpoint files in :mod:`~normuon.harness.checkpoint`.

Files written into the run directory (rank 0 only):

- ``config.json``: the run's identity (:meth:`~normuon.harness.spec.RunSpec.identity`: the
  resolved settings, with the data's ``vocab_size``, plus optimizer, seed, data and world size)
  and the run id;
- ``metrics.jsonl``: a header ``{"kind": "run", "run_id": ...}`` then one JSON object per line,
  ``{"kind": "train" | "val", "step": ...}``;
- ``checkpoint.pt``: model, optimizer, scheduler, RNG states and data position (atomic writes);
- ``result.json``: the summary (final validation loss, timings, optimizer state bytes);
- ``diagnostics.jsonl`` (``diagnostics_every > 0``): per-neuron update statistics
  (:mod:`normuon.diagnostics`); ``tensorboard/`` (``tensorboard=True``): the same as scalars.

SIGINT (Ctrl-C) and SIGTERM (what schedulers send before a kill) stop the run after the step in
progress: it writes a checkpoint and raises :class:`RunInterrupted`; ``resume=True`` then
finishes with exactly the result of an uninterrupted run.
"""

from __future__ import annotations

from typing import Any

from .checkpoint import CHECKPOINT_NAME
from .config import RunConfig
from .data import TokenData
from .optimizers import build_optimizer, optimizer_state_bytes
from .schedule import LRSchedule
from .signals import RunInterrupted, defer_stop_signals
from .spec import RunSpec
from .trainer import MAX_SEED, RunResult, Trainer

__all__ = [
    "RunResult",
    "RunInterrupted",
    "Trainer",
    "train_run",
    "build_optimizer",
    "LRSchedule",
    "optimizer_state_bytes",
    "defer_stop_signals",
    "CHECKPOINT_NAME",
    "MAX_SEED",
]


def train_run(
    spec: RunSpec | RunConfig,
    optimizer: str,
    data: TokenData,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_at_step: int | None = None,
    **options: Any,
) -> RunResult:
    """Train ``spec``'s GPT on ``data`` with ``optimizer`` and return the run's summary.

    ``spec``: a :class:`~normuon.harness.spec.RunSpec` resolved with ``data`` (used as it is),
    or a :class:`~normuon.harness.config.RunConfig`, resolved (validated) here once.
    ``options`` are :class:`Trainer`'s keyword arguments (``out_dir`` is required; ``seed``,
    ``device``, ``progress``, ``dist_timeout_s``, ``tensorboard``, ``diagnostics_every``).
    ``out_dir`` must be empty or new for a fresh run (``overwrite=True`` replaces the harness
    files there). ``resume=True`` continues from ``out_dir/checkpoint.pt`` and reproduces
    exactly the curve of an uninterrupted run. ``stop_at_step`` checkpoints and returns after
    that many steps. SIGINT/SIGTERM checkpoint and raise :class:`RunInterrupted`.
    ``diagnostics_every=k`` records :mod:`normuon.diagnostics` every k steps.
    """
    trainer = Trainer(spec, optimizer, data, **options)
    trainer.start(resume=resume, overwrite=overwrite)
    return trainer.fit(stop_at_step)

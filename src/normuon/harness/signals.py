"""SIGINT/SIGTERM during a harness run: finish the step in progress, checkpoint, stop.

:class:`StopSignals` turns the signals into a flag the training loop checks between steps;
:func:`defer_stop_signals` makes worker processes (``compare --jobs``) remember a signal that
arrives between runs; :class:`RunInterrupted` is what the loop raises after checkpointing.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["RunInterrupted", "StopSignals", "defer_stop_signals"]


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run; a checkpoint of the last finished step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step}, checkpoint saved to {checkpoint}; "
            f"continue with --resume"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with its own arguments (it crosses process boundaries from --jobs workers).
        return (RunInterrupted, (self.signum, self.step, self.checkpoint))


#: Signals a worker process received between runs (see :func:`defer_stop_signals`).
_early_signals: list[int] = []


def defer_stop_signals() -> None:
    """Remember SIGINT/SIGTERM that arrive outside a training loop instead of dying.

    For worker processes (``compare --jobs``): a signal that lands while a worker starts a run
    makes that run stop (with a checkpoint) after its first step rather than killing the
    worker and breaking the pool.
    """

    def remember(signum: int, frame: Any) -> None:
        _early_signals.append(signum)

    for sig in StopSignals.SIGNALS:
        signal.signal(sig, remember)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (main thread only).

    A second signal while the first is being handled raises KeyboardInterrupt at once, for a
    user who does not want to wait for the checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if _early_signals:
            self.received = _early_signals[0]
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        installed = bool(self._previous)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if installed and exc_type is None and self.received is not None:
            # The signal came after the last step's check (during the final checkpoint): the
            # run is complete and saved; hand the signal on so the caller stops too.
            signal.raise_signal(self.received)

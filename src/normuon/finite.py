"""Non-finite gradients: per-parameter flags and the skip counter. No optimizer math.

A NaN/Inf gradient must not poison optimizer state (``nonfinite_grads="skip"``): each parameter
gets a 0-d bool flag, True when every entry of its gradient is finite. Two ways to act on them:

- on the device (accelerators, and ``host_reads="never"`` anywhere): every update is masked by
  its flag, nothing is read back, so a step can be traced or captured;
- on the host (CPU tensors with ``host_reads="auto"``): the flags are read (free on a CPU) and the
  skipped parameters dropped, which saves the masking passes.

The flags of a parameter split over ranks are combined over its mesh by a ``combine`` function
that the distributed layer supplies, so every block of it is skipped together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import functional as F

__all__ = ["FiniteCheck", "NonfiniteGuard"]

#: ``combine(flags) -> flags``: the flags agreed over each parameter's ranks (identity in one
#: process).
Combine = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class FiniteCheck:
    """What the step does about non-finite gradients.

    Attributes:
        masks: one 0-d bool tensor per gradient to mask every update with (device path), or
            None (nothing to mask).
        keep: one bool per gradient, False for those to drop (host path), or None (keep all).
    """

    masks: list[torch.Tensor] | None = None
    keep: list[bool] | None = None


class NonfiniteGuard:
    """Flags gradients with a NaN/Inf and counts the skipped (parameter, step) updates.

    Holds only the counter; what to do (the ``nonfinite_grads`` and ``host_reads`` options) is
    the caller's, passed with each call.
    """

    def __init__(self) -> None:
        #: int64 0-d tensor on the gradients' device; None until the first check.
        self.counter: torch.Tensor | None = None

    @property
    def skips(self) -> int:
        """Skipped updates so far (reads the counter: a host sync on accelerators)."""
        return 0 if self.counter is None else int(self.counter.item())

    def restore(self, skips: int) -> None:
        """Set the counter (unpickling, deepcopy). It is created on the CPU and moves to the
        gradients' device at the next check, once."""
        self.counter = torch.tensor(skips, dtype=torch.int64) if skips else None

    def ensure_counter(self, device: torch.device) -> None:
        """The counter on ``device`` now (before a CUDA-graph capture: created or moved inside
        one, it would be re-created at every replay)."""
        if self.counter is None:
            self.counter = torch.zeros((), dtype=torch.int64, device=device)
        elif self.counter.device != device:
            self.counter = self.counter.to(device)

    def check(
        self,
        grads: Sequence[torch.Tensor],
        combine: Combine,
        host_reads: str,
        present: Sequence[torch.Tensor] | None = None,
    ) -> FiniteCheck:
        """Flags for one group's gradients (``"skip"`` mode), counted.

        ``host_reads``: ``"auto"`` reads the flags back where they live on the CPU (and the
        caller drops the skipped parameters); ``"never"`` keeps them on the device as masks.
        ``present``: one 0-d bool tensor per gradient, False for a parameter that has no
        gradient this step (a captured step's input): masked out like a non-finite one, but
        not counted as skipped.
        """
        if not grads:
            return FiniteCheck()
        flags = combine(F.finite_flags(grads))
        stacked = torch.stack(flags)
        if present is None:
            bad = (~stacked).sum()
        else:
            here = torch.stack(list(present))
            bad = (~stacked & here).sum()
            stacked = stacked & here
            flags = list(stacked.unbind())
        self.ensure_counter(bad.device)  # a no-op after the first step
        self.counter += bad
        on_host = host_reads == "auto" and stacked.device.type == "cpu"
        if on_host and not torch.compiler.is_compiling():
            return FiniteCheck(keep=stacked.tolist())
        return FiniteCheck(masks=flags)

    @staticmethod
    def raise_on_nonfinite(
        grads: Sequence[torch.Tensor], names: Sequence[str], combine: Combine
    ) -> None:
        """``"raise"`` mode: FloatingPointError naming every parameter with a NaN/Inf gradient
        (reads the flags: this mode syncs by design)."""
        if not grads:
            return
        flags = combine(F.finite_flags(grads))
        bad = [name for name, ok in zip(names, torch.stack(flags).tolist()) if not ok]
        if bad:
            raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}")

"""What a captured (CUDA-graph) step reads, as the optimizer's public capture hook returns it.

A graph replays recorded kernels on the tensors they were recorded with. For an optimizer step
that means: every hyperparameter must be a device tensor the graph reads (a Python number is
baked into the kernels), everything the step would create lazily must exist before the capture
(state, the non-finite skip counter, the random generator of bf16 state: a captured step draws
its stochastic-rounding bits from it, where a view of the rounding table chosen at capture would
be replayed unchanged), and which parameters have a gradient must be an input (a flag per
parameter) rather than a branch.

:meth:`normuon.NorMuon.prepare_capture` makes an optimizer so and returns a :class:`CaptureSpec`;
:meth:`CaptureSpec.refresh` runs before each replay: a value a scheduler or a user wrote into a
group as a Python number (OneCycleLR's ``momentum``, ``group["lr"] = 0.01``) is copied into the
captured tensor, which goes back into the group, and a change the graph cannot follow (an option
that selects kernels, new groups) is reported so that the caller captures again. No CUDA here:
the logic is tested on the CPU, the capture itself in :mod:`normuon.cuda_graphs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .options import ROUNDING_STEP

__all__ = ["HYPERPARAMETERS", "CaptureSpec", "CapturedValue"]

#: Group keys that become device tensors (AdamW groups: ``betas`` is a pair of them).
HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "beta2", "eps")

#: Group keys a step never reads (labels, and what schedulers keep for themselves).
_UNREAD_KEYS = frozenset({"params", "param_names", "name", "initial_lr"})


@dataclass(frozen=True)
class CapturedValue:
    """One hyperparameter a captured step reads.

    Attributes:
        group: index of the group in ``param_groups``.
        key: its key (``"betas"`` for either AdamW beta).
        position: index in the tuple for ``betas``, else None.
        tensor: the 0-d float32 tensor on the parameters' device that the graph reads.
    """

    group: int
    key: str
    position: int | None
    tensor: torch.Tensor


def device_hyperparameter(value: Any, device: torch.device) -> torch.Tensor:
    """``value`` as a capturable 0-d float32 tensor on ``device`` (the object itself when it
    already is one, so a tensor a scheduler updates in place stays the one read)."""
    if isinstance(value, torch.Tensor):
        if value.device == device and value.dtype == torch.float32 and value.ndim == 0:
            return value
        return value.detach().to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def _read(group: dict[str, Any], item: CapturedValue) -> Any:
    value = group.get(item.key)
    return value if item.position is None or value is None else value[item.position]


def _write(group: dict[str, Any], item: CapturedValue) -> None:
    if item.position is None:
        group[item.key] = item.tensor
    else:
        values = list(group[item.key])
        values[item.position] = item.tensor
        group[item.key] = tuple(values)


def make_capturable(param_groups: Sequence[dict[str, Any]], device: torch.device):
    """Turn every hyperparameter of ``param_groups`` into a device tensor, in place; returns the
    :class:`CapturedValue` list."""
    values = []
    for index, group in enumerate(param_groups):
        for key in HYPERPARAMETERS:
            if key in group:
                item = CapturedValue(index, key, None, device_hyperparameter(group[key], device))
                _write(group, item)
                values.append(item)
        if "betas" in group:
            for position, beta in enumerate(group["betas"]):
                item = CapturedValue(index, "betas", position,
                                     device_hyperparameter(beta, device))  # fmt: skip
                _write(group, item)
                values.append(item)
    return values


def structure(param_groups: Sequence[dict[str, Any]], extra: tuple = ()) -> tuple:
    """Everything but the hyperparameters that a step reads from the groups (options that select
    kernels, like ``nesterov`` or ``ns_steps``), with ``extra``: what a capture bakes in."""
    # rounding_step: a counter eager steps advance (a captured step draws its rounding bits
    # from a registered generator instead), not something a capture bakes in.
    skip = _UNREAD_KEYS | set(HYPERPARAMETERS) | {"betas", ROUNDING_STEP}
    return extra + tuple(
        (
            len(g["params"]),
            # Which hyperparameters a group has, not their values: a key that appears later
            # (a scheduler's "momentum" in an AdamW group drives beta1) changes what is read.
            tuple(k for k in HYPERPARAMETERS if k in g),
            tuple(sorted((k, repr(v)) for k, v in g.items() if k not in skip)),
        )
        for g in param_groups
    )


@dataclass
class CaptureSpec:
    """What a captured step of one optimizer reads (from ``prepare_capture``).

    Attributes:
        device: the parameters' device.
        values: the hyperparameter tensors the graph reads.
        generators: the random generators the step draws from (bf16 state's stochastic
            rounding): a CUDA graph must register each.
        has_grad: one 0-d bool tensor per parameter (``param_groups`` order): False masks the
            parameter out of the step as if its gradient were None (nothing changes, nothing is
            counted), so a graph captured with every parameter serves steps where some have none.
        structure: the options the capture baked in (:func:`structure`); a change needs a new
            capture.
        current_structure: recomputes it from the optimizer now.
    """

    device: torch.device
    values: list[CapturedValue]
    generators: list[torch.Generator]
    has_grad: list[torch.Tensor]
    structure: tuple
    current_structure: Callable[[], tuple] = field(repr=False)

    def refresh(self, param_groups: Sequence[dict[str, Any]]) -> bool:
        """Before a replay: copy any hyperparameter written into a group since the capture (a
        number, or another tensor) into the captured tensor and put that tensor back in the
        group. Returns False when something else changed (an option, the groups): the caller
        must capture again; the groups are left as they are then."""
        if self.current_structure() != self.structure:
            return False
        for item in self.values:
            group = param_groups[item.group]
            value = _read(group, item)
            if value is item.tensor:
                continue
            if isinstance(value, torch.Tensor):
                item.tensor.copy_(value.detach().reshape(()))
            else:
                item.tensor.fill_(float(value))
            _write(group, item)
        return True

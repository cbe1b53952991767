"""Checks a state dict against an optimizer before anything is loaded (no tensor math).

``load_state_dict`` must not leave an optimizer half loaded: every group, option and state
tensor is checked first, and a mismatch is one ValueError naming the group, the parameter index
and what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .geometry import matrix_geometry, second_moment_key
from .options import Option, validate_group

__all__ = ["check_state_dict"]


def check_state_dict(
    state_dict: Any,
    param_groups: Sequence[dict[str, Any]],
    cls: str,
    group_options: Callable[[Any, dict[str, Any]], tuple[Option, ...]],
    neuron_norm: bool,
) -> list[dict[str, Any]]:
    """Raise ValueError on anything that would not load into ``param_groups``; return each
    group's validated (normalized) options.

    ``group_options(algorithm, saved_group)`` lists the options a group of that algorithm
    carries; ``neuron_norm`` says whether matrix groups keep NorMuon's second moment.
    """
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(
            f"{cls}.load_state_dict: expected a dict with 'state' and 'param_groups', got "
            f"{type(state_dict).__name__}"
        )
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"{cls}.load_state_dict: the state dict has {len(saved_groups)} parameter "
            f"groups, this optimizer {len(param_groups)}"
        )
    checked: list[dict[str, Any]] = []
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        where = f"{cls}.load_state_dict: param_groups[{gi}]"
        if "algorithm" not in saved:
            raise ValueError(
                f"{where} has no 'algorithm' key: this state dict was not saved by "
                f"normuon's {cls} (e.g. torch.optim.AdamW's); it cannot be loaded"
            )
        if saved["algorithm"] != group["algorithm"]:
            raise ValueError(
                f"{where}: saved algorithm {saved['algorithm']!r}, this group's is "
                f"{group['algorithm']!r} (a state dict loads into the same optimizer class "
                f"with the same grouping)"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where} holds {len(saved['params'])} parameters, this group "
                f"{len(group['params'])}"
            )
        options = group_options(group["algorithm"], saved)
        candidate = {o.name: saved.get(o.name, group.get(o.name)) for o in options}
        validate_group(candidate, options, where)
        checked.append(candidate)
        loaded = {**group, **candidate}  # the group as it will be after loading
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            _check_saved_state(
                state_dict["state"].get(pid), p, loaded, neuron_norm,
                f"{where}['params'][{pi}] (shape {tuple(p.shape)})",
            )  # fmt: skip
    return checked


def _check_saved_state(
    saved: Any, p: torch.Tensor, group: dict, neuron_norm: bool, where: str
) -> None:
    if saved is None:
        return
    if group["algorithm"] == "adamw":
        expected = {"exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
    else:
        expected = {"momentum_buffer": tuple(p.shape)}
        if neuron_norm:
            geometry = matrix_geometry(
                p.shape, group["layout"], group["split_sizes"], group["normalize"]
            )
            expected[second_moment_key(group["normalize"])] = geometry.state_shape
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise ValueError(f"{where}: saved state lacks {missing} (has {sorted(saved)})")
    for key, shape in expected.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ValueError(f"{where}: saved {key!r} has shape {got}, expected {shape}")

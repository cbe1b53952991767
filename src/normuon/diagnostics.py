"""Neuron-balance diagnostics: how evenly an optimizer's update spreads over a layer's neurons.

The NorMuon paper's observation: Muon's orthogonalized updates have very uneven per-neuron
norms (a few output rows take most of the update), and NorMuon's per-neuron second moment evens
them out. :class:`NeuronDiagnostics` measures that in any training loop, for any
``torch.optim.Optimizer`` (AdamW, :class:`~normuon.Muon`, :class:`~normuon.NorMuon`), through
the optimizer's step hooks::

    diag = NeuronDiagnostics(model.named_parameters(), every=50, jsonl="diagnostics.jsonl")
    diag.attach(optimizer)          # register_step_pre_hook / register_step_post_hook
    ...                             # train as usual; every 50th step is recorded
    diag.detach()

What is measured, every ``every`` optimizer steps, per tracked matrix parameter:

- the update ``U = p_after - p_before`` of that step (learning rate, schedule and weight decay
  included), viewed as ``(out, in)`` (a conv kernel ``(out, in, kh, kw)`` flattened to
  ``(out, in*kh*kw)``; a 3-D stack ``(E, out, in)`` as ``(E*out, in)``): neurons are rows;
- ``neuron_cv``: coefficient of variation (std / mean) of the row norms ``||U[i, :]||``;
  ``neuron_max_min``: their max / min ratio (0 rows make it ``inf``);
- ``effective_rank``: ``exp(entropy(s / sum(s)))`` of the singular values ``s`` of ``U``
  (between 1 and min(out, in)); ``condition``: ``s_max / s_min`` (``inf`` if rank deficient);
- NorMuon only: ``second_moment_cv`` and ``second_moment_max_min`` of the optimizer state
  ``neuron_second_moment`` (one entry per neuron).

Each record is also aggregated per layer type (the parameter name with block indices replaced
by ``*``, e.g. ``blocks.*.attn.qkv.weight``: the mean over that type's matrices) and overall.
Records go to a JSONL file (one line per recorded step), to a TensorBoard ``SummaryWriter``
(scalars ``neurons/<layer type>/<metric>``) and to :attr:`NeuronDiagnostics.records`.

Cost: on a recorded step one copy of the tracked parameters (before the step) plus one SVD of
each update (``spectrum=False`` skips it); other steps cost nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "NeuronDiagnostics",
    "neuron_norms",
    "spread",
    "spectrum_stats",
    "update_stats",
    "layer_type",
    "hidden_matrices",
]


def _as_rows(update: torch.Tensor) -> torch.Tensor:
    """A parameter-shaped tensor as (neurons, fan_in): dim 0 (and a stack's leading dim) = rows."""
    if update.ndim < 2:
        raise ValueError(f"a matrix parameter has >= 2 dims, got shape {tuple(update.shape)}")
    if update.ndim == 3:  # (E, out, in): a stack of E matrices, E*out neurons
        return update.reshape(-1, update.shape[-1])
    return update.reshape(update.shape[0], -1)  # (out, in) or conv (out, in*kh*kw...)


def neuron_norms(update: torch.Tensor) -> torch.Tensor:
    """(neurons,) float64 L2 norms of the rows of ``update`` viewed as (out, in)."""
    return torch.linalg.vector_norm(_as_rows(update).double(), dim=1)


def spread(values: torch.Tensor) -> dict[str, float]:
    """Coefficient of variation (population std / mean) and max / min of positive values."""
    v = values.double().flatten()
    if v.numel() == 0:
        raise ValueError("spread of an empty tensor")
    mean = float(v.mean())
    cv = float(v.std(unbiased=False)) / mean if mean > 0 else math.nan
    lo, hi = float(v.min()), float(v.max())
    return {"cv": cv, "max_min": hi / lo if lo > 0 else math.inf}


def spectrum_stats(update: torch.Tensor) -> dict[str, float]:
    """Effective rank (entropy of the normalized singular values) and condition number."""
    s = torch.linalg.svdvals(_as_rows(update).double())  # (min(out, in),) descending
    total = float(s.sum())
    if total == 0:
        return {"effective_rank": 0.0, "condition": math.inf}
    p = s / total
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    smin = float(s[-1])
    # Singular values below float64 round-off of the largest count as 0 (rank deficient).
    tiny = float(s[0]) * max(s.numel(), 1) * torch.finfo(torch.float64).eps
    return {"effective_rank": math.exp(entropy),
            "condition": float(s[0]) / smin if smin > tiny else math.inf}  # fmt: skip


def update_stats(update: torch.Tensor, spectrum: bool = True) -> dict[str, float]:
    """All per-matrix statistics of one update (see the module docstring for the keys)."""
    rows = spread(neuron_norms(update))
    out = {"neuron_cv": rows["cv"], "neuron_max_min": rows["max_min"],
           "update_norm": float(torch.linalg.vector_norm(update.double()))}  # fmt: skip
    if spectrum:
        out.update(spectrum_stats(update))
    return out


def layer_type(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn.qkv.weight`` (indices become ``*``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters :func:`normuon.param_groups` gives to Muon/NorMuon, with their names.

    Tracking the same set for every optimizer (AdamW too) keeps the comparison like for like:
    hidden weight matrices, not embeddings, head or vectors.
    """
    from normuon import param_groups

    matrix_ids = {id(p) for g in param_groups(model) if g.get("algorithm") != "adamw"
                  for p in g["params"]}  # fmt: skip
    return [(n, p) for n, p in model.named_parameters() if id(p) in matrix_ids]


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.inf if values else math.nan
    return sum(finite) / len(finite)


class NeuronDiagnostics:
    """Records per-neuron update statistics every ``every`` optimizer steps (see module doc).

    Args:
        params: ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``) or a module;
            parameters with fewer than 2 dims or without ``requires_grad`` are ignored.
        every: record optimizer steps ``every, 2*every, ...`` (counted by this object from
            ``start_step``).
        jsonl: file to append one JSON line per recorded step to (None: no file).
        writer: a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar``), or None.
        spectrum: also compute the effective rank and condition number (one SVD per matrix).
        start_step: optimizer steps already taken (a resumed run).
        layer_type_fn: maps a parameter name to its layer type (default :func:`layer_type`).
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]] | nn.Module,
        *,
        every: int = 50,
        jsonl: str | Path | None = None,
        writer: Any = None,
        spectrum: bool = True,
        start_step: int = 0,
        layer_type_fn: Callable[[str], str] = layer_type,
    ) -> None:
        if isinstance(params, nn.Module):
            params = params.named_parameters()
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.params: dict[str, torch.Tensor] = {}
        for item in params:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)):  # fmt: skip
                raise TypeError(f"params must be (name, tensor) pairs, got {type(item).__name__}")
            name, p = item
            if p.ndim >= 2 and p.requires_grad:
                self.params[name] = p
        if not self.params:
            raise ValueError("no matrix parameter (>= 2 dims, requires_grad) to track")
        self.every = every
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.writer = writer
        self.spectrum = spectrum
        self.step = start_step
        self.layer_type_fn = layer_type_fn
        self.records: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] | None = None
        self._handles: list[Any] = []

    def attach(self, optimizer: torch.optim.Optimizer) -> NeuronDiagnostics:
        """Register the step hooks on ``optimizer``; returns self."""
        if self._handles:
            raise RuntimeError("already attached; call detach() first")
        self._optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]  # fmt: skip
        return self

    def detach(self) -> None:
        """Remove the hooks (the records stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = None

    # The hooks' signature is torch's: (optimizer, args, kwargs).
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (self.step + 1) % self.every == 0:
            self._before = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._before is None:
            return
        before, self._before = self._before, None
        self.record(
            self.step,
            {n: p.detach() - before[n] for n, p in self.params.items()},
            second_moments=self._second_moments(optimizer),
        )

    def _second_moments(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            v = optimizer.state.get(p, {}).get("neuron_second_moment")
            if isinstance(v, torch.Tensor) and v.numel() > 0:
                out[name] = v.detach()
        return out

    def record(
        self,
        step: int,
        updates: dict[str, torch.Tensor],
        second_moments: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Compute, store and write the record of ``step`` from explicit updates.

        The hooks call this; it is public for loops that compute updates themselves. A step
        whose updates are all zero (a skipped step) is not recorded; returns None then.
        """
        matrices: dict[str, dict[str, float]] = {}
        for name, update in updates.items():
            if not bool(update.any()):
                continue
            stats = update_stats(update, self.spectrum)
            v = (second_moments or {}).get(name)
            if v is not None:
                sm = spread(v.double().clamp_min(0))
                stats["second_moment_cv"] = sm["cv"]
                stats["second_moment_max_min"] = sm["max_min"]
            matrices[name] = stats
        if not matrices:
            return None
        by_type: dict[str, list[dict[str, float]]] = {}
        for name, stats in matrices.items():
            by_type.setdefault(self.layer_type_fn(name), []).append(stats)
        layer_types = {t: self._mean(rows) for t, rows in by_type.items()}
        record = {"step": step, "overall": self._mean(list(matrices.values())),
                  "layer_types": layer_types, "matrices": matrices}  # fmt: skip
        self.records.append(record)
        if self.jsonl is not None:
            with self.jsonl.open("a") as f:
                # JSON has no inf: max/min and condition of rank-deficient updates become null.
                f.write(json.dumps(_json_safe(record)) + "\n")
        if self.writer is not None:
            for scope, stats in (("overall", record["overall"]), *layer_types.items()):
                for key, value in stats.items():
                    if math.isfinite(value):
                        self.writer.add_scalar(f"neurons/{scope}/{key}", value, step)
        return record

    @staticmethod
    def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
        keys = sorted({k for r in rows for k in r})
        return {k: _finite_mean([r[k] for r in rows if k in r]) for k in keys}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj

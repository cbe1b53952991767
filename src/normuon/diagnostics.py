"""Neuron-balance diagnostics: how evenly an optimizer's update spreads over a layer's neurons.

The NorMuon paper's observation: Muon's orthogonalized updates have very uneven per-neuron
norms (a few output rows take most of the update), and NorMuon's per-neuron second moment evens
them out. :class:`NeuronDiagnostics` measures that in any training loop, for any
``torch.optim.Optimizer`` (AdamW, :class:`~normuon.Muon`, :class:`~normuon.NorMuon`), through
the optimizer's step hooks::

    diag = NeuronDiagnostics(hidden_matrices(model), model=model, every=50,
                             jsonl="diagnostics.jsonl")
    diag.attach(optimizer)          # register_step_pre_hook / register_step_post_hook
    ...                             # train as usual; every 50th step is recorded
    diag.detach()

Neurons are the optimizer's: :func:`normuon.geometry.neuron_rows` (the rows of
:meth:`~normuon.geometry.MatrixGeometry.as_matrices`, the view NorMuon normalizes) decides them
from each parameter's ``layout``. A conv kernel ``(out, in, *k)`` is ``(out, in*prod(k))``, one
neuron per output channel; a 3-D stack ``(E, m, n)`` is ``(E*m, n)``; a Hugging Face ``Conv1D``
weight, stored ``(in, out)``, is read as its transpose, one neuron per column. The layout of a
parameter comes from, first to last:

1. the optimizer's parameter group while attached, when the group has a ``layout`` (NorMuon
   and Muon matrix groups; their ``split_sizes`` are checked against the weight too): the
   neurons measured are then the ones the optimizer normalizes;
2. ``layouts={name: layout}`` given to :class:`NeuronDiagnostics`;
3. the model's modules, as :func:`normuon.param_groups` routes them
   (:func:`normuon.grouping.matrix_layouts`: ``"conv"`` for convolutions, ``"transposed"`` for
   ``Conv1D``), when a module is given as ``params`` or as ``model=``;
4. the shape (``layout="auto"``: 2-D is one matrix, 3-D a stack, 4-D and 5-D conv kernels).

Pass ``model=`` when tracking :func:`hidden_matrices` of a model with ``Conv1D`` or Conv1d
layers so that AdamW (whose groups carry no layout) is measured on the same neurons.

What is measured, every ``every`` optimizer steps, per tracked matrix parameter:

- the update ``U = p_after - p_before`` of that step (learning rate, schedule and weight decay
  included), viewed as ``(neurons, fan_in)`` as above;
- ``neuron_cv``: coefficient of variation (std / mean) of the row norms ``||U[i, :]||``;
- ``neuron_dead`` (a count) and ``neuron_dead_frac``: the neurons whose norm is at most
  :data:`DEAD_FRACTION` (1e-3) of the matrix's median neuron norm (``neurons``: how many
  there are);
- ``neuron_p95_p5``: the 95th over the 5th percentile of the norms of the other (live)
  neurons, the spread to read: one near-dead neuron cannot move it;
- ``neuron_max_min``: the raw max / min ratio over all neurons (0 rows make it ``inf``); kept
  for comparison with older records, but a single near-dead neuron in the denominator makes
  it explode on long runs;
- ``effective_rank``: ``exp(entropy(s / sum(s)))`` of the singular values ``s`` of that
  ``(neurons, fan_in)`` view (between 1 and min(neurons, fan_in)); ``condition``:
  ``s_max / s_min`` (``inf`` if rank deficient);
- NorMuon only: ``second_moment_cv`` and ``second_moment_max_min`` of the optimizer state
  ``neuron_second_moment`` (one entry per neuron).

Each record is also aggregated per layer type (the parameter name with block indices replaced
by ``*``, e.g. ``blocks.*.attn.qkv.weight``: the mean over that type's matrices) and overall;
the counts ``neurons`` and ``neuron_dead`` are summed instead, and ``neuron_dead_frac`` is
then their ratio (the share of all the type's neurons that are dead).
Records go to a JSONL file (one line per recorded step), to a TensorBoard ``SummaryWriter``
(scalars ``neurons/<layer type>/<metric>``) and to :attr:`NeuronDiagnostics.records`.

Cost: on a recorded step one copy of the tracked parameters (before the step) plus one SVD of
each update (``spectrum=False`` skips it); other steps cost nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .geometry import LAYOUTS, matrix_geometry, neuron_rows
from .grouping import matrix_layouts, param_groups

__all__ = [
    "NeuronDiagnostics",
    "neuron_norms",
    "spread",
    "neuron_spread",
    "DEAD_FRACTION",
    "spectrum_stats",
    "update_stats",
    "layer_type",
    "hidden_matrices",
]


def _as_rows(
    update: torch.Tensor, layout: str = "auto", split_sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """A parameter-shaped tensor as (neurons, fan_in), the optimizer's view of its neurons."""
    if not isinstance(update, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(update).__name__}")
    if update.ndim < 2:  # checked here: geometry's own message speaks of param groups
        raise ValueError(f"a matrix parameter has >= 2 dims, got shape {tuple(update.shape)}")
    return neuron_rows(update, layout, split_sizes)


def neuron_norms(update: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """(neurons,) float64 L2 norms of the neurons of ``update`` (see the module docstring).

    ``layout`` is the parameter's group layout (``"auto"``, ``"conv"``, ``"stacked"``,
    ``"transposed"``); for a plain 2-D ``(out, in)`` tensor the default gives its row norms.
    """
    return torch.linalg.vector_norm(_as_rows(update, layout).double(), dim=1)


def spread(values: torch.Tensor) -> dict[str, float]:
    """Coefficient of variation (population std / mean) and max / min of positive values."""
    v = values.double().flatten()
    if v.numel() == 0:
        raise ValueError("spread of an empty tensor")
    mean = float(v.mean())
    cv = float(v.std(unbiased=False)) / mean if mean > 0 else math.nan
    lo, hi = float(v.min()), float(v.max())
    return {"cv": cv, "max_min": hi / lo if lo > 0 else math.inf}


#: A neuron is dead when its update norm is at most this fraction of its matrix's median neuron
#: norm. Dead neurons (ReLU² units that stopped firing, rows with no gradient) are counted
#: apart: any ratio with them in the denominator measures how dead they are, not how evenly the
#: optimizer spreads its step over the neurons that learn.
DEAD_FRACTION = 1e-3


def neuron_spread(norms: torch.Tensor, dead_fraction: float = DEAD_FRACTION) -> dict[str, float]:
    """Robust spread of per-neuron norms: dead neurons counted apart, p95/p5 of the others.

    Returns ``neurons`` (how many), ``dead`` (how many have a norm at most ``dead_fraction``
    times the median norm; zero rows always count) and ``dead_frac``, and ``p95_p5``: the 95th
    over the 5th percentile (linear interpolation, as ``torch.quantile`` and ``numpy``'s
    default) of the live neurons' norms, ``nan`` when every neuron is dead.
    """
    v = norms.double().flatten()
    if v.numel() == 0:
        raise ValueError("neuron_spread of an empty tensor")
    median = torch.quantile(v, 0.5)
    dead = v <= dead_fraction * median
    live = v[~dead]
    if live.numel() > 0:
        # Live norms are > dead_fraction * median >= 0, so p5 > 0 and the ratio is finite.
        lo, hi = torch.quantile(live, torch.tensor([0.05, 0.95], dtype=v.dtype)).tolist()
        ratio = hi / lo
    else:
        ratio = math.nan
    n_dead = int(dead.sum())
    return {"neurons": float(v.numel()), "dead": float(n_dead),
            "dead_frac": n_dead / v.numel(), "p95_p5": ratio}  # fmt: skip


def spectrum_stats(update: torch.Tensor, layout: str = "auto") -> dict[str, float]:
    """Effective rank (entropy of the normalized singular values) and condition number of the
    ``(neurons, fan_in)`` view of ``update`` under ``layout``."""
    s = torch.linalg.svdvals(_as_rows(update, layout).double())  # (min(m, n),) descending
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


def update_stats(
    update: torch.Tensor, spectrum: bool = True, layout: str = "auto"
) -> dict[str, float]:
    """All per-matrix statistics of one update (see the module docstring for the keys)."""
    norms = neuron_norms(update, layout)
    rows, robust = spread(norms), neuron_spread(norms)
    out = {"neuron_cv": rows["cv"], "neuron_p95_p5": robust["p95_p5"],
           "neuron_dead": robust["dead"], "neuron_dead_frac": robust["dead_frac"],
           "neurons": robust["neurons"], "neuron_max_min": rows["max_min"],
           "update_norm": float(torch.linalg.vector_norm(update.double()))}  # fmt: skip
    if spectrum:
        out.update(spectrum_stats(update, layout))
    return out


def layer_type(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn.qkv.weight`` (indices become ``*``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", name)


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters :func:`normuon.param_groups` gives to Muon/NorMuon, with their names.

    Tracking the same set for every optimizer (AdamW too) keeps the comparison like for like:
    hidden weight matrices, not embeddings, head or vectors. Give the model to
    :class:`NeuronDiagnostics` as well (``model=``) so that each one is read with the layout
    :func:`normuon.param_groups` gives it (:func:`normuon.grouping.matrix_layouts`).
    """
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
        model: the module the parameters belong to (default: ``params`` when it is a module):
            each parameter's layout is learnt from its module as :func:`normuon.param_groups`
            does (convolutions ``"conv"``, Hugging Face ``Conv1D`` ``"transposed"``).
        layouts: ``{name: layout}`` for parameters whose layout the modules do not tell (your
            own weights stored (in, out): ``"transposed"``); overrides ``model``.

    :attr:`layouts` holds the layout each tracked parameter is read with; while attached, an
    optimizer group's own ``layout`` takes precedence (see the module docstring).
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
        model: nn.Module | None = None,
        layouts: Mapping[str, str] | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(params, nn.Module):
            model = params if model is None else model
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
        #: name -> layout the parameter's neurons are read with (see the module docstring).
        self.layouts: dict[str, str] = self._initial_layouts(model, layouts)
        self._base_layouts = dict(self.layouts)
        self.every = every
        self.jsonl = Path(jsonl) if jsonl is not None else None
        self.writer = writer
        self.spectrum = spectrum
        self.step = start_step
        self.layer_type_fn = layer_type_fn
        self.records: list[dict[str, Any]] = []
        self._before: dict[str, torch.Tensor] | None = None
        self._handles: list[Any] = []

    def _initial_layouts(
        self, model: nn.Module | None, layouts: Mapping[str, str] | None
    ) -> dict[str, str]:
        """Each tracked parameter's layout from ``layouts``, else its module, else the shape."""
        resolved = dict.fromkeys(self.params, "auto")
        if model is not None:
            # Matched by identity: the tracked names need not be the model's (a wrapper's
            # prefix, or names given by hand).
            named = dict(model.named_parameters(remove_duplicate=False))
            by_id = {id(named[n]): layout for n, layout in matrix_layouts(model).items()}
            for name, p in self.params.items():
                if id(p) not in by_id:
                    raise ValueError(
                        f"{name} (shape {tuple(p.shape)}) is not a parameter of the model "
                        f"{type(model).__name__} given as model="
                    )
                resolved[name] = by_id[id(p)]
        if layouts is not None:
            if not isinstance(layouts, Mapping):
                raise TypeError(f"layouts must map parameter names to layouts, got "
                                f"{type(layouts).__name__}")  # fmt: skip
            unknown = sorted(set(layouts) - set(self.params))
            if unknown:
                raise ValueError(f"layouts names parameters that are not tracked: {unknown}")
            for name, layout in layouts.items():
                if layout not in LAYOUTS:
                    raise ValueError(f"layouts[{name!r}] must be one of {LAYOUTS}, got "
                                     f"{layout!r}")  # fmt: skip
                resolved[name] = layout
        for name, layout in resolved.items():
            _check_geometry(name, self.params[name], layout, None)
        return resolved

    def attach(self, optimizer: torch.optim.Optimizer) -> NeuronDiagnostics:
        """Register the step hooks on ``optimizer``; returns self.

        A tracked parameter in a group with a ``layout`` (a NorMuon or Muon matrix group) is
        read with that layout and ``split_sizes`` while attached: the neurons measured are the
        ones the optimizer normalizes, whatever the model or ``layouts`` said.
        """
        if self._handles:
            raise RuntimeError("already attached; call detach() first")
        self.layouts = self._group_layouts(optimizer)
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
        self.layouts = dict(self._base_layouts)

    def _group_layouts(self, optimizer: torch.optim.Optimizer) -> dict[str, str]:
        """The current layouts, with those of ``optimizer``'s matrix groups taking precedence."""
        name_of = {id(p): name for name, p in self.params.items()}
        resolved = dict(self._base_layouts)
        for index, group in enumerate(optimizer.param_groups):
            # AdamW groups (and torch's own optimizers) have no layout: keep the model's.
            if group.get("algorithm") == "adamw" or "layout" not in group:
                continue
            for p in group["params"]:
                name = name_of.get(id(p))
                if name is None:
                    continue
                _check_geometry(f"param_groups[{index}] {name}", p, group["layout"],
                                group.get("split_sizes"))  # fmt: skip
                resolved[name] = group["layout"]
        return resolved

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
            stats = update_stats(update, self.spectrum, self.layouts.get(name, "auto"))
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
        layer_types = {t: _aggregate(rows) for t, rows in by_type.items()}
        record = {"step": step, "overall": _aggregate(list(matrices.values())),
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


# Counts add up over matrices: "3 dead neurons in the MLP input projections" is what one wants
# to read, where a mean over matrices would give a fraction of a neuron.
_SUMMED = ("neurons", "neuron_dead")


def _aggregate(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per layer type or overall: the mean of each key over the matrices that have it, the
    counts summed, and the dead fraction as the share of all those matrices' neurons."""
    keys = sorted({k for r in rows for k in r})
    out = {k: _finite_mean([r[k] for r in rows if k in r]) for k in keys}
    for key in _SUMMED:
        if key in out:
            out[key] = float(sum(r[key] for r in rows if key in r))
    if "neuron_dead" in out and "neurons" in out and out["neurons"] > 0:
        out["neuron_dead_frac"] = out["neuron_dead"] / out["neurons"]
    return out


def _check_geometry(
    where: str, p: torch.Tensor, layout: str, split_sizes: Sequence[int] | None
) -> None:
    """Raise ValueError naming ``where`` when ``layout`` does not fit ``p`` (early, not mid-run)."""
    try:
        matrix_geometry(p.shape, layout, split_sizes)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj

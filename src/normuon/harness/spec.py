"""The resolved, validated and frozen configuration of a harness command: :class:`RunSpec`.

A command's settings come from several places: the preset, ``--config``, ``--set``, the
shortcut options (``--steps``, ``--checkpoint-every``, ``--parallel``), the command's choices
(optimizers, seeds, stretch factors), the launch (torchrun's world size) and the data (its
vocabulary). :func:`resolve_spec` puts them together and validates them exactly once, before
anything is trained or written, and returns a :class:`RunSpec`. Everything downstream (the
comparison, the sweep, the :class:`~normuon.harness.trainer.Trainer`, the run folders and the
resume checks) reads the spec and checks nothing of it again; derived values (the vocabulary,
the stretched schedules, a sweep's learning rates) are new specs made from a valid one.

The spec is frozen all the way down: its model, train and optimizer sections are read-only
copies of :class:`~normuon.harness.config.ModelConfig`, :class:`~normuon.harness.config.TrainConfig`
and :class:`~normuon.harness.config.OptimizerConfig` (same fields, documented there), and its
optimizer table is a read-only mapping. :meth:`RunSpec.to_config` gives a mutable
:class:`~normuon.harness.config.RunConfig` back, to edit and resolve again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .checkpoint import STRETCH_BASELINE, stretch_folder
from .config import ModelConfig, OptimizerConfig, RunConfig, TrainConfig, config_from_dict
from .data import TokenData, check_length, load_data
from .model import count_parameters
from .runtime import launch_rank

__all__ = [
    "MAX_SEED",
    "ModelSpec",
    "TrainSpec",
    "OptimizerSpec",
    "FrozenMap",
    "Budget",
    "RunSpec",
    "resolve_spec",
    "stretched_steps",
    "tokens_per_step",
    "steps_for_tokens_per_param",
]

#: Largest seed: batch generators are seeded with seed * 1_000_003 + step (< 2**63).
MAX_SEED = 2**32 - 1


def _frozen_twin(cls: type, name: str) -> type:
    """A frozen dataclass with the fields of the config dataclass ``cls`` (no defaults: a
    spec section is always built from a complete config)."""
    twin = dataclasses.make_dataclass(
        name, [(f.name, f.type) for f in dataclasses.fields(cls)], frozen=True
    )
    twin.__module__ = __name__  # importable by name: specs travel to worker processes
    twin.__doc__ = (
        f"A read-only :class:`~normuon.harness.config.{cls.__name__}`: the same fields "
        f"(documented there); assigning one raises ``dataclasses.FrozenInstanceError``."
    )
    return twin


ModelSpec = _frozen_twin(ModelConfig, "ModelSpec")
TrainSpec = _frozen_twin(TrainConfig, "TrainSpec")
OptimizerSpec = _frozen_twin(OptimizerConfig, "OptimizerSpec")


class FrozenMap(Mapping):
    """A read-only, hashable and picklable ``dict`` (the optimizer table of a spec)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return FrozenMap, (self._items,)


def stretched_steps(steps: int, factor: float) -> int:
    """A step count ``factor`` times longer, rounded (stretched schedules)."""
    return int(round(steps * factor))


def tokens_per_step(train: TrainConfig | Any) -> int:
    """Training tokens of one optimizer step: ``batch_size * seq_len``.

    ``batch_size`` is already the global batch (every rank and micro-batch together: each rank
    takes ``batch_size / world_size`` sequences of it and splits them into ``grad_accum``
    micro-batches), so world size and gradient accumulation divide it and never multiply the
    tokens. The harness's ``tokens_per_s`` counts the same tokens.
    """
    return train.batch_size * train.seq_len


def steps_for_tokens_per_param(tokens_per_param: float, params: int, per_step: int) -> int:
    """The fewest steps of ``per_step`` tokens that give ``params`` parameters at least
    ``tokens_per_param`` tokens each: ``ceil(tokens_per_param * params / per_step)``, at least 1.

    Computed exactly on the decimal value of ``tokens_per_param`` (``0.1`` is 1/10, not the
    nearest binary float), so a budget that is a whole number of steps is not rounded up by
    one: 20 tokens per parameter of 14,336 parameters in steps of 1,024 tokens is 280 steps.
    """
    need = Fraction(repr(float(tokens_per_param))) * params / per_step
    return max(1, math.ceil(need))


@dataclass(frozen=True)
class Budget:
    """How long a run trains, in steps, tokens and tokens per parameter: resolved once by
    :func:`resolve_spec` (for every run, also one whose length is given in steps).

    ``config.json`` (the comparison's and each run's) holds it as ``budget``
    (:meth:`to_json`: the fields that its ``train`` section does not already hold), and the
    comparison table's first line shows it (:meth:`describe`)."""

    steps: int
    """The run's optimizer steps: the spec's ``train.steps`` (not repeated in the JSON)."""
    param_count: str
    """The convention of ``params``: the spec's ``train.param_count`` (not repeated in the
    JSON), ``all`` or ``non_embedding``."""
    params: int
    """The parameters counted, in ``param_count``'s convention (one of the next two)."""
    params_all: int
    """Every parameter of the model, token embedding and output head included, on the data's
    vocabulary (a run's ``n_params``)."""
    params_non_embedding: int
    """The parameters without the token embedding and the (untied) output head."""
    tokens_per_step: int
    """``batch_size * seq_len`` (:func:`tokens_per_step`)."""
    tokens: int
    """``steps * tokens_per_step``: the training tokens of the run."""
    achieved_tokens_per_param: float
    """``tokens / params``: at least ``train.tokens_per_param`` when that set the steps
    (rounded up to whole steps)."""

    @classmethod
    def of(cls, model: Any, train: Any, steps: int) -> Budget:
        """The budget of ``steps`` steps of ``train``'s batch on a GPT shaped ``model``."""
        counts = count_parameters(model)
        params = counts[train.param_count]
        per_step = tokens_per_step(train)
        return cls(steps=steps, param_count=train.param_count, params=params,
                   params_all=counts["all"], params_non_embedding=counts["non_embedding"],
                   tokens_per_step=per_step, tokens=steps * per_step,
                   achieved_tokens_per_param=steps * per_step / params)  # fmt: skip

    def with_steps(self, steps: int) -> Budget:
        """The same model and batch trained ``steps`` steps (a stretched schedule)."""
        tokens = steps * self.tokens_per_step
        return dataclasses.replace(self, steps=steps, tokens=tokens,
                                   achieved_tokens_per_param=tokens / self.params)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """What ``config.json`` holds as ``budget``: every field but ``steps`` and
        ``param_count``, which are its ``train`` section's (each value written once)."""
        out = dataclasses.asdict(self)
        del out["steps"], out["param_count"]
        return out

    def describe(self) -> str:
        """One line: ``3,520 steps x 1,024 tokens = 3,604,480 tokens; 180,224 parameters
        (all) -> 20.00 tokens/param``."""
        kind = "all" if self.param_count == "all" else "non-embedding"
        return (f"{self.steps:,} steps x {self.tokens_per_step:,} tokens = {self.tokens:,} "
                f"tokens; {self.params:,} parameters ({kind}) -> "
                f"{self.achieved_tokens_per_param:.2f} tokens/param")  # fmt: skip


@dataclass(frozen=True)
class RunSpec:
    """The resolved configuration of a harness command: settings, choices, launch and data.

    Made by :func:`resolve_spec` only (which validates it); read, never changed, by every
    consumer. Derived specs (:meth:`stretched`, :meth:`with_lr`) are made from a valid one.
    """

    preset: str
    """Name of the preset the settings started from."""
    description: str
    """What the preset is for."""
    model: ModelSpec
    """Model shape; ``vocab_size`` is the data's (256 for bytes, 50257 for GPT-2 shards)."""
    train: TrainSpec
    """Training recipe, with ``--steps``, ``--checkpoint-every`` and ``--parallel`` applied;
    ``steps`` is the resolved count also when ``tokens_per_param`` gave the length."""
    optimizers: Mapping[str, OptimizerSpec]
    """Settings of every optimizer the preset has (read-only mapping), ``--set`` applied."""
    data: str
    """Where the tokens came from (:attr:`~normuon.harness.data.TokenData.source`)."""
    world_size: int
    """Processes that share every step (torchrun's ``WORLD_SIZE``; 1 without torchrun);
    ``batch_size`` is divisible by ``world_size * grad_accum``."""
    selected: tuple[str, ...]
    """The optimizers the command trains, in order (``compare --optimizers``, ``train
    --optimizer``, the optimizers of a sweep's ``--lrs``); each has settings."""
    seeds: tuple[int, ...]
    """The seeds each selected optimizer is trained with, each in [0, :data:`MAX_SEED`]."""
    budget: Budget
    """The run's length in steps, tokens and tokens per parameter (``train.steps``, derived
    from ``train.tokens_per_param`` when that is set), resolved once."""
    stretch: tuple[float, ...] = ()
    """``compare --stretch``: factors > 1, sorted, at which the baseline (Muon) is also
    trained on a schedule that many times longer (:meth:`stretched`); empty otherwise."""

    def config_dict(self) -> dict[str, Any]:
        """The settings as :meth:`RunConfig.to_dict <normuon.harness.config.RunConfig>` writes
        them (the ``config`` of a run's ``config.json``)."""
        return {
            "preset": self.preset,
            "description": self.description,
            "model": dataclasses.asdict(self.model),
            "train": dataclasses.asdict(self.train),
            "optimizers": {k: dataclasses.asdict(v) for k, v in self.optimizers.items()},
        }

    def to_json(self) -> dict[str, Any]:
        """What a comparison's or sweep's folder keeps as ``config.json``: the data source, the
        settings, (``--stretch``) the stretch factors and the resolved budget; ``--resume``
        compares it."""
        out = {"data": self.data, **self.config_dict()}
        if self.stretch:
            out["stretch"] = list(self.stretch)
        out["budget"] = self.budget.to_json()
        return out

    def identity(self, optimizer: str, seed: int) -> dict[str, Any]:
        """What makes one training this training: written into its ``config.json`` (with the
        run id) and its checkpoint, and compared by ``--resume``."""
        return {"optimizer": optimizer, "seed": seed, "data": self.data,
                "world_size": self.world_size, "config": self.config_dict()}  # fmt: skip

    def to_config(self) -> RunConfig:
        """A mutable copy of the settings, to edit and :func:`resolve <resolve_spec>` again."""
        return config_from_dict(self.config_dict())

    def stretched(self, factor: float) -> RunSpec:
        """The baseline's schedule ``factor`` (one of :attr:`stretch`) times longer, same shape:
        steps and warmup scaled (the decay is a fraction of the steps already), evaluation
        points unchanged. Valid because this spec is: ``warmup_steps <= steps`` still holds.
        The stretched length is given in steps (``tokens_per_param`` 0); its budget says how
        many tokens per parameter they are."""
        if factor not in self.stretch:
            raise ValueError(f"stretch factor {factor!r} is not one of {list(self.stretch)}")
        t = self.train
        steps = stretched_steps(t.steps, factor)
        warmup = stretched_steps(t.warmup_steps, factor)
        train = dataclasses.replace(t, steps=steps, warmup_steps=warmup, tokens_per_param=0.0)
        return dataclasses.replace(self, train=train, budget=self.budget.with_steps(steps))

    def with_lr(self, optimizer: str, lr: float) -> RunSpec:
        """This spec with ``optimizer``'s (matrix) learning rate set to ``lr`` (a sweep point,
        which :func:`~normuon.harness.compare.run_sweep` has checked to be a number > 0)."""
        return self.with_options(optimizer, lr=lr)

    def with_options(self, optimizer: str, **changes: Any) -> RunSpec:
        """This spec with fields of ``optimizer``'s settings replaced (a tuning point: its
        ``lr`` and ``adamw_lr``, numbers > 0 that the tuner made from valid ones)."""
        table = dict(self.optimizers)
        table[optimizer] = dataclasses.replace(table[optimizer], **changes)
        return dataclasses.replace(self, optimizers=FrozenMap(table))

    def check_training(self, optimizer: str, seed: int, data: TokenData) -> None:
        """ValueError unless (``optimizer``, ``seed``, ``data``) is one of the trainings this
        spec was resolved for (a guard against mixing specs and data, not a validation)."""
        if optimizer not in self.selected or seed not in self.seeds:
            raise ValueError(
                f"optimizer {optimizer!r} with seed {seed!r} is not a training of this spec "
                f"(optimizers {list(self.selected)}, seeds {list(self.seeds)}): resolve a spec "
                f"for it with resolve_spec"
            )
        if data.source != self.data or data.vocab_size != self.model.vocab_size:
            raise ValueError(f"the data ({data.source}) is not the data this spec was resolved "
                             f"with ({self.data})")  # fmt: skip


def _check_selected(cfg: RunConfig, optimizers: Sequence[str]) -> tuple[str, ...]:
    if not optimizers:
        raise ValueError("no optimizer given")
    for name in optimizers:
        if name not in cfg.optimizers:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(cfg.optimizers)}")
    return tuple(optimizers)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    if not seeds:
        raise ValueError("no seed given")
    for seed in seeds:
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return tuple(seeds)


def _check_stretch(
    base: int, stretch: Sequence[float], optimizers: Sequence[str]
) -> tuple[float, ...]:
    """The factors, sorted; each must lengthen the schedule of ``base`` steps by at least one
    step, and no two may give the same steps or folder name."""
    factors = sorted(set(stretch))
    for factor in factors:
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
            raise ValueError(f"--stretch factors must be numbers > 1, got {factor!r}")
    if factors and STRETCH_BASELINE not in optimizers:
        raise ValueError(f"--stretch trains {STRETCH_BASELINE} longer: add {STRETCH_BASELINE} "
                         f"to --optimizers")  # fmt: skip
    longer = {f: stretched_steps(base, f) for f in factors}
    for factor in factors:
        if longer[factor] <= base:
            raise ValueError(f"--stretch {factor:g} of {base} steps rounds to {longer[factor]} "
                             f"steps: use a larger factor")  # fmt: skip
    for a, b in zip(factors, factors[1:]):  # sorted: equal results are neighbours
        if longer[a] == longer[b] or stretch_folder(a) == stretch_folder(b):
            raise ValueError(f"--stretch {a!r} and {b!r} give the same schedule "
                             f"({longer[b]} steps) or folder: drop one")  # fmt: skip
    return tuple(float(f) for f in factors)


def _resolve_budget(cfg: RunConfig, model: dict[str, Any]) -> Budget:
    """The run's :class:`Budget` on the data's vocabulary (in ``model``): the steps given, or
    derived from ``tokens_per_param``; ValueError when both are given and differ."""
    t = cfg.train
    if not t.tokens_per_param:
        return Budget.of(ModelSpec(**model), t, t.steps)
    budget = Budget.of(ModelSpec(**model), t, 1)
    steps = steps_for_tokens_per_param(t.tokens_per_param, budget.params, budget.tokens_per_step)
    if t.steps not in (0, steps):  # a resolved config given back keeps its own derived count
        raise ValueError(
            f"train.steps={t.steps} and train.tokens_per_param={t.tokens_per_param:g} both set "
            f"the run's length ({t.tokens_per_param:g} tokens per parameter is {steps} steps): "
            f"give one, train.steps=0 to keep tokens_per_param or train.tokens_per_param=0 to "
            f"keep steps"
        )
    if t.warmup_steps > steps:
        raise ValueError(f"warmup_steps={t.warmup_steps} exceeds steps={steps}, the length "
                         f"of tokens_per_param={t.tokens_per_param:g}: lower it")  # fmt: skip
    return budget.with_steps(steps)


def resolve_spec(
    cfg: RunConfig,
    data: TokenData | str | Path | None = None,
    *,
    optimizers: Sequence[str],
    seeds: Sequence[int] = (0,),
    stretch: Sequence[float] = (),
    world_size: int | None = None,
) -> tuple[RunSpec, TokenData]:
    """Validate ``cfg`` and the command's choices once and freeze them, with the data's
    vocabulary, into a :class:`RunSpec`; returns it and the data.

    ``cfg``: the preset with ``--config``, ``--set`` and the shortcut options applied
    (:func:`~normuon.harness.config.apply_config_file` and
    :func:`~normuon.harness.config.apply_overrides` parse and type-check, they do not
    validate; this does, with :meth:`RunConfig.validate
    <normuon.harness.config.RunConfig.validate>`). ``data``: loaded tokens, or a path (or None
    for the embedded corpus) loaded here after the settings are valid, with their
    ``val_fraction``. ``world_size``: default torchrun's ``WORLD_SIZE``. Every problem is a
    ValueError naming the key and the value, raised before anything is trained or written.
    ``cfg`` is copied: changing it later does not change the spec. A length given as
    ``train.tokens_per_param`` is turned into ``train.steps`` here, once, on the data's
    vocabulary (:class:`Budget`).
    """
    cfg.validate()  # the one validation of the settings
    selected = _check_selected(cfg, optimizers)
    seed_list = _check_seeds(seeds)
    world = launch_rank()[1] if world_size is None else world_size
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ValueError(f"world_size must be a positive int, got {world!r}")
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"batch_size={t.batch_size} is not divisible by world size x grad_accum "
                         f"= {world} x {t.grad_accum}")  # fmt: skip
    if not isinstance(data, TokenData):
        data = load_data(data, t.val_fraction)
    check_length(data.train, t.seq_len, "training")
    check_length(data.val, t.seq_len, "validation")
    model = {**dataclasses.asdict(cfg.model), "vocab_size": data.vocab_size}  # the data decides
    budget = _resolve_budget(cfg, model)
    factors = _check_stretch(budget.steps, stretch, selected)
    spec = RunSpec(
        preset=cfg.preset,
        description=cfg.description,
        model=ModelSpec(**model),
        train=TrainSpec(**{**dataclasses.asdict(cfg.train), "steps": budget.steps}),
        optimizers=FrozenMap({name: OptimizerSpec(**{**dataclasses.asdict(opt),
                                                     "betas": tuple(opt.betas)})
                              for name, opt in cfg.optimizers.items()}),  # fmt: skip
        data=data.source,
        world_size=world,
        selected=selected,
        seeds=seed_list,
        budget=budget,
        stretch=factors,
    )
    return spec, data

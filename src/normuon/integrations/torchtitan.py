"""NorMuon and Muon inside torchtitan's trainer (torchtitan 0.3.0).

torchtitan builds its optimizers through ``OptimizersContainer`` (one optimizer per model part,
so pipeline parallelism works), chosen by ``Trainer.Config.optimizer``. This module provides

- :class:`NorMuonOptimizersContainer`, a subclass of that container whose ``Config`` routes
  each model part's parameters with :func:`normuon.param_groups` (hidden matrices to
  NorMuon/Muon, stacked MoE experts as (E, m, n) stacks, embeddings, the output head, norms,
  biases and MoE routers to AdamW) and builds one :class:`~normuon.NorMuon` (or
  :class:`~normuon.Muon`) per model part;
- the overrides :func:`normuon` and :func:`muon`, registered with torchtitan's ``@override``
  mechanism, which swap any config's optimizer for that container from the command line::

      torchrun --nproc_per_node=8 -m torchtitan.train \\
          --module llama3 --config llama3_8b \\
          --override.imports 'normuon.integrations.torchtitan.normuon={"lr": 0.02}'

Everything else is torchtitan's: its LR schedulers scale every group's ``lr`` (the matrix
groups' and AdamW's alike), its gradient clipping runs before the step, and its DCP
checkpointer saves the optimizer state flattened and keyed by parameter FQN (NorMuon's state is
DTensors with the parameters' placements, so a checkpoint resumes at another world size).

``fused`` / ``foreach``, which the container puts into every group, are accepted and ignored by
NorMuon (``normuon.options.IGNORED_OPTIONS``). State is created when the container is built
(:meth:`~normuon.NorMuon.init_state`), so torchtitan's ``init_optim_state`` (a step with zero
gradients at lr 0, which a torch AdamW counts as its first step) never runs on it.

This module imports torchtitan (``pip install --no-deps torchtitan==0.3.0``, see
``docs/integrations.md``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

try:
    from torchtitan.components.checkpointer.utils import canonical_fqn
    from torchtitan.components.optimizer import OptimizersContainer
    from torchtitan.components.optimizer.utils import (
        get_flat_optim_state_dict,
        load_flat_optim_state_dict,
    )
    from torchtitan.config.override import override
    from torchtitan.tools.logging import logger
except ImportError as err:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "normuon.integrations.torchtitan needs torchtitan 0.3.0: "
        "pip install --no-deps torchtitan==0.3.0 (then its dependencies, docs/integrations.md)"
    ) from err

from ..grouping import describe_groups, param_groups
from ..optimizer import Muon, NorMuon
from ..options import ADAMW_OPTIONS

__all__ = ["NorMuonOptimizersContainer", "normuon", "muon", "torchtitan_param_groups"]

_CLASSES: dict[str, type[NorMuon] | type[Muon]] = {"normuon": NorMuon, "muon": Muon}
_ADAMW_DEFAULTS = {o.name: o.default for o in ADAMW_OPTIONS}
#: AdamW settings an override takes from the AdamW group of the config it replaces.
_ADAMW_FROM_CONFIG = ("lr", "betas", "eps", "weight_decay")


def _dtype_names_to_dtypes(options: dict[str, Any]) -> dict[str, Any]:
    """JSON (override kwargs) cannot hold a torch.dtype: ``comm_dtype`` may name one."""
    value = options.get("comm_dtype")
    if isinstance(value, str) and value != "auto":
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"comm_dtype must be 'auto', None or a dtype name, got {value!r}")
        options = {**options, "comm_dtype": dtype}
    return options


class NorMuonOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` holding one NorMuon (or Muon) per model part.

    Each model part's parameters are split by :func:`normuon.param_groups` (by module type and
    fully-qualified name, see ``docs/integrations.md``); every group carries ``param_names``
    (canonical FQNs, as torchtitan's checkpoint utilities need) and the container's
    ``fused``/``foreach`` keys (ignored by normuon). ``step``, ``zero_grad``, the step hooks
    (MoE load balancing) and the flattened FQN-keyed ``state_dict``/``load_state_dict`` are
    the base container's, except that state is created with ``init_state`` rather than
    torchtitan's zero-gradient step.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """The optimizer section of a ``Trainer.Config``.

        Routing is :func:`normuon.param_groups`: the inherited ``param_groups`` (regex routing
        to torch optimizers) and ``optimizer_factory_kwargs_by_name`` must stay empty.
        """

        algorithm: Literal["normuon", "muon"] = "normuon"
        """``"normuon"`` (:class:`~normuon.NorMuon`) or ``"muon"`` (:class:`~normuon.Muon`)."""

        lr: float = 0.02
        """Learning rate of the matrix groups (scaled by torchtitan's LR scheduler)."""

        weight_decay: float = 0.0
        """Decoupled weight decay of the matrix groups."""

        adamw_lr: float = _ADAMW_DEFAULTS["lr"]
        """Learning rate of the AdamW group (embeddings, head, norms, biases, routers)."""

        adamw_betas: tuple[float, float] = _ADAMW_DEFAULTS["betas"]
        adamw_eps: float = _ADAMW_DEFAULTS["eps"]
        adamw_weight_decay: float = _ADAMW_DEFAULTS["weight_decay"]

        extra_adamw: list[str] = field(default_factory=list)
        """Substrings of parameter FQNs also sent to AdamW (``param_groups(extra_adamw=)``)."""

        split_qkv: bool = False
        """Orthogonalize fused QKV projections per block (``param_groups(split_qkv=)``);
        refused for torchtitan's own fused ``wqkv``, whose rows interleave q, k and v."""

        split_gate_up: bool = False
        """Orthogonalize fused gate/up projections per half (``param_groups(split_gate_up=)``)."""

        options: dict[str, Any] = field(default_factory=dict)
        """Any other constructor option of NorMuon/Muon (``ns_steps``, ``update_scale``,
        ``ns_dtype``, ``comm_dtype`` (a dtype name), ``state_dtype``, ...). ``ns_kernel``
        defaults to ``"shape"`` here (resumed runs equal uninterrupted ones); ``"auto"``
        times the kernels in each process."""

        def __post_init__(self) -> None:
            # Fail when the config is made (command line, override), not after the model is
            # built and sharded: every value is checked by building the optimizer once.
            if self.param_groups:
                raise ValueError(
                    "NorMuonOptimizersContainer routes parameters with normuon.param_groups; "
                    f"param_groups must be empty, got {len(self.param_groups)} entries "
                    "(send more parameters to AdamW with extra_adamw=[...])"
                )
            if self.optimizer_factory_kwargs_by_name:
                raise ValueError(
                    "optimizer_factory_kwargs_by_name is not used by NorMuonOptimizersContainer, "
                    f"got {self.optimizer_factory_kwargs_by_name!r}; use options={{...}}"
                )
            if self.algorithm not in _CLASSES:
                raise ValueError(f"algorithm must be one of {sorted(_CLASSES)}, "
                                 f"got {self.algorithm!r}")  # fmt: skip
            if self.implementation == "fused_opt_states_bf16":
                raise ValueError(
                    "implementation='fused_opt_states_bf16' sets torch Adam's state dtype; for "
                    "NorMuon use options={'state_dtype': 'bfloat16'} (the momentum in bf16)"
                )
            if isinstance(self.extra_adamw, str):
                raise TypeError(
                    f"extra_adamw must be a list of FQN fragments, got the string "
                    f"{self.extra_adamw!r}"
                )
            for name in ("split_qkv", "split_gate_up"):
                if not isinstance(getattr(self, name), bool):
                    raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
            probe = nn.Parameter(torch.zeros(2, 2))
            _CLASSES[self.algorithm]([probe], **self.optimizer_options())

        def optimizer_options(self) -> dict[str, Any]:
            """The constructor options of the optimizer this config builds."""
            if not isinstance(self.options, dict):
                raise TypeError(f"options must be a dict, got {self.options!r}")
            named = {"lr", "weight_decay"} | {f"adamw_{o.name}" for o in ADAMW_OPTIONS}
            clash = sorted(named & set(self.options))
            if clash:
                raise ValueError(
                    f"options repeats {clash}, which are fields of the config: set them there"
                )
            return {
                "lr": self.lr,
                "weight_decay": self.weight_decay,
                "adamw_lr": self.adamw_lr,
                "adamw_betas": tuple(self.adamw_betas),
                "adamw_eps": self.adamw_eps,
                "adamw_weight_decay": self.adamw_weight_decay,
                # The shape rule's Newton-Schulz kernels unless the options say otherwise: a
                # torchtitan run resumes from DCP in new processes, and ns_kernel="auto" times
                # the kernels per process, so a resumed run could take another kernel and leave
                # the uninterrupted curve by rounding (seen: 4e-5 relative in the loss three
                # steps after a resume).
                "ns_kernel": "shape",
                **_dtype_names_to_dtypes(self.options),
            }

    optimizers: list[NorMuon | Muon]

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        # The base __init__ resolves torch optimizers by name from regex groups; this one
        # builds the same structure (self.optimizers, self.model_parts, the hooks of
        # Optimizer.__init__) from param_groups.
        impl_kwargs = self._build_impl_kwargs(config)
        cls = _CLASSES[config.algorithm]
        options = config.optimizer_options()
        self.optimizers = []
        self.model_parts = model_parts
        all_params: list[nn.Parameter] = []
        for part_index, model in enumerate(model_parts):
            groups = torchtitan_param_groups(
                model, extra_adamw=config.extra_adamw, split_qkv=config.split_qkv,
                split_gate_up=config.split_gate_up, impl_kwargs=impl_kwargs,
            )  # fmt: skip
            optimizer = cls(groups, **options)
            # All state now (zeros): torchtitan's init_optim_state then finds state and does
            # not run its zero-gradient step, and every rank holds the same keys for DCP.
            optimizer.init_state()
            self.optimizers.append(optimizer)
            self._log_routing(model, optimizer, part_index)
            all_params.extend(p for g in optimizer.param_groups for p in g["params"])
        self._validate_params(all_params)
        self._post_init(all_params)

    def _log_routing(self, model: nn.Module, optimizer, part_index: int) -> None:
        summary = describe_groups(model, optimizer)
        counts = ", ".join(f"{alg} {n:,}" for alg, n in summary.counts().items())
        logger.info(
            f"{type(optimizer).__name__} (model_part={part_index}): {len(summary.rows)} "
            f"parameters, elements per algorithm: {counts}"
        )
        for group in optimizer.param_groups:
            logger.info(
                f"  {group['algorithm']} group: lr {group['lr']}, weight_decay "
                f"{group['weight_decay']}, {len(group['params'])} parameters: "
                f"{', '.join(group['param_names'][:4])}{' ...' if len(group['params']) > 4 else ''}"
            )

    # torchtitan's versions run init_optim_state (a zero-gradient step at lr 0) first; the
    # state exists from construction here, and init_state() (idempotent, no step) keeps it so
    # should anything have removed it.
    def state_dict(self) -> dict[str, Any]:
        """Flat, FQN-keyed state of every optimizer (``state.{fqn}.{key}``,
        ``param_groups.{fqn}.{key}``), as torchtitan's DCP checkpointer saves it."""
        result: dict[str, Any] = {}
        for optimizer in self.optimizers:
            optimizer.init_state()
            result.update(get_flat_optim_state_dict(optimizer))
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a flat, FQN-keyed state dict (keys of other model parts are ignored)."""
        for optimizer in self.optimizers:
            optimizer.init_state()
            load_flat_optim_state_dict(optimizer, state_dict)


def torchtitan_param_groups(
    model: nn.Module,
    *,
    extra_adamw: Iterable[str] = (),
    split_qkv: bool = False,
    split_gate_up: bool = False,
    impl_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`normuon.param_groups` of one torchtitan model part, named as torchtitan names
    parameters.

    Every group carries ``param_names``: canonical FQNs (wrapper segments such as
    ``_checkpoint_wrapped_module`` removed), the names of torchtitan's checkpoints. Parameters
    whose FQN contains a string of ``extra_adamw`` move to the AdamW group (each string must
    match some parameter). ``impl_kwargs`` (``fused``, ``foreach``) are added to every group.
    A part without any hidden matrix (a pipeline stage holding only an embedding or the head)
    gets the AdamW group alone.

    Raises:
        ValueError: ``split_qkv=True`` on a model with torchtitan's fused ``wqkv`` (its rows
            interleave q, k and v per KV head, not three blocks), or an ``extra_adamw`` string
            that matches no parameter.
        TypeError: ``extra_adamw`` given as one string.
    """
    if isinstance(extra_adamw, str):
        raise TypeError(f"extra_adamw must be a list of FQN fragments, got the string "
                        f"{extra_adamw!r}")  # fmt: skip
    fragments = tuple(extra_adamw)
    names = {id(p): canonical_fqn(n) for n, p in model.named_parameters()}
    if split_qkv:
        _refuse_interleaved_qkv(model)
    groups = param_groups(model, split_qkv=split_qkv, split_gate_up=split_gate_up,
                          allow_no_matrix=True)  # fmt: skip
    if fragments:
        # Matched on canonical FQNs, as the user reads them in torchtitan's logs and
        # checkpoints (param_groups' own extra_adamw sees the wrapped module names).
        unmatched = [f for f in fragments if not any(f in n for n in names.values())]
        if unmatched:
            raise ValueError(f"extra_adamw: no parameter FQN contains {unmatched!r}")
        moved = []
        for group in groups:
            if group.get("algorithm") == "adamw":
                continue
            hit = [any(f in names[id(p)] for f in fragments) for p in group["params"]]
            moved += [p for p, h in zip(group["params"], hit) if h]
            group["params"] = [p for p, h in zip(group["params"], hit) if not h]
        groups = [g for g in groups if g["params"]]
        adamw = [g for g in groups if g.get("algorithm") == "adamw"]
        if not adamw:
            adamw = [{"params": [], "algorithm": "adamw"}]
            groups.append(adamw[0])
        adamw[0]["params"] = adamw[0]["params"] + moved
    for group in groups:
        group["param_names"] = [names[id(p)] for p in group["params"]]
        group.update(impl_kwargs or {})
    return groups


def _refuse_interleaved_qkv(model: nn.Module) -> None:
    from torchtitan.models.common.attention import FusedQKVLinear

    for name, module in model.named_modules():
        if isinstance(module, FusedQKVLinear):
            raise ValueError(
                f"split_qkv=True: {canonical_fqn(name)}.wqkv is torchtitan's fused QKV, whose "
                f"rows interleave q, k and v per KV head (not three blocks); NorMuon's "
                f"split_sizes splits contiguous row blocks. Leave split_qkv=False (the fused "
                f"matrix is orthogonalized as one, as in the paper) or build the model with "
                f"separate wq/wk/wv (fuse_qkv=False)"
            )


def _adamw_settings(config: OptimizersContainer.Config) -> dict[str, Any]:
    """The AdamW hyperparameters of the config being replaced: those of its AdamW groups
    when they all agree (torchtitan's configs have one catch-all AdamW group)."""
    found: list[dict[str, Any]] = []
    for group in config.param_groups:
        if group.optimizer_name == "AdamW":
            found.append({k: group.optimizer_kwargs[k] for k in _ADAMW_FROM_CONFIG
                          if k in group.optimizer_kwargs})  # fmt: skip
    if not found or any(f != found[0] for f in found):
        return {}
    settings = found[0]
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    return {f"adamw_{k}": v for k, v in settings.items()}


def from_config(
    config: OptimizersContainer.Config, algorithm: str = "normuon", **kwargs: Any
) -> NorMuonOptimizersContainer.Config:
    """A :class:`NorMuonOptimizersContainer.Config` replacing ``config``.

    Kept from ``config``: ``implementation`` (the ``fused``/``foreach`` group keys), and the
    AdamW group's ``lr``, ``betas``, ``eps`` and ``weight_decay`` as the AdamW settings of the
    embeddings, head, norms and biases (your AdamW baseline's values), unless ``kwargs`` sets
    them; every setting when ``config`` is already a :class:`NorMuonOptimizersContainer.Config`
    (``algorithm`` is the override's). ``kwargs``: fields of the config (``lr``,
    ``weight_decay``, ``adamw_lr``, ``extra_adamw``, ``split_qkv``, ...) and any other
    NorMuon/Muon option (``ns_steps``, ``update_scale``, ...), which go to ``options``.
    """
    fields = set(NorMuonOptimizersContainer.Config.__dataclass_fields__)
    own = {k: v for k, v in kwargs.items() if k in fields}
    extra = {k: v for k, v in kwargs.items() if k not in fields}
    if isinstance(config, NorMuonOptimizersContainer.Config):
        # Already normuon's (a config function set it): keep its settings, change the given.
        inherited = {f: getattr(config, f) for f in fields if not f.startswith("_")}
        inherited["options"] = dict(config.options)
    else:
        inherited = _adamw_settings(config)
    merged = {**inherited, **own}
    merged["options"] = {**merged.get("options", {}), **extra}
    merged.setdefault("implementation", config.implementation)
    merged["algorithm"] = algorithm
    return NorMuonOptimizersContainer.Config(**merged)


@override(
    target=OptimizersContainer.Config,
    description="normuon: NorMuon for hidden matrices, AdamW for embeddings, head, norms, biases",
)
def normuon(config: OptimizersContainer.Config, **kwargs: Any) -> NorMuonOptimizersContainer.Config:
    """``--override.imports normuon.integrations.torchtitan.normuon``: NorMuon in place of the
    config's optimizer. Keyword arguments (a JSON object after ``=`` on the command line) are
    those of :func:`from_config`."""
    return from_config(config, "normuon", **kwargs)


@override(
    target=OptimizersContainer.Config,
    description="normuon: Muon for hidden matrices, AdamW for embeddings, head, norms, biases",
)
def muon(config: OptimizersContainer.Config, **kwargs: Any) -> NorMuonOptimizersContainer.Config:
    """``--override.imports normuon.integrations.torchtitan.muon``: normuon's Muon (the same
    routing and distributed step, without the neuron normalization)."""
    return from_config(config, "muon", **kwargs)

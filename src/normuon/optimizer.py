"""The NorMuon and Muon optimizers: groups, state, checkpoints and the phases of a step.

The math lives in :mod:`normuon.functional` and :mod:`normuon.newton_schulz`; where each matrix
is updated (one process, DDP, FSDP2, tensor parallel) in :mod:`normuon.distributed`. One class
serves a whole model: groups with ``algorithm="adamw"`` (embeddings, output head, gains and
biases) get AdamW inside the same ``step()``. ``docs/algorithm.md`` and ``docs/distributed.md``
describe what happens; this module decides the order.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from . import newton_schulz as NS
from . import ns_kernels
from .capture import CaptureSpec, make_capturable, structure
from .checkpoint import check_state_dict
from .distributed.distributor import Distributor
from .distributed.plan import ParamPlan, build_plans, is_dtensor, local_tensor
from .finite import NonfiniteGuard
from .geometry import matrix_geometry, second_moment_key
from .options import (
    ADAMW_ALIAS_OPTIONS,
    ADAMW_OPTIONS,
    COMMON_KEYS,
    IGNORED_OPTIONS,
    MUON_OPTIONS,
    NORMUON_OPTIONS,
    OPTIMIZER_OPTIONS,
    ROUNDING_STEP,
    Option,
    check_rounding_step,
    group_ns_dtype,
    validate_group,
)
from .pipeline import StepPipeline
from .step_plan import BlockBatch, Workspace, plan_batches, state_dtype

__all__ = ["NorMuon", "Muon"]

#: AdamW groups also accept ``momentum``: an alias of ``betas[0]`` that wins when present, so
#: that OneCycleLR / CyclicLR with ``cycle_momentum`` (which write ``group["momentum"]`` into
#: every group of an optimizer whose defaults have no ``betas``) cycle AdamW's beta1 too.
_ADAMW_ALIASES = frozenset(o.name for o in ADAMW_ALIAS_OPTIONS)


def _present_aliases(group: dict[str, Any]) -> tuple[Option, ...]:
    """The alias options an AdamW group carries (validated like its options)."""
    return tuple(o for o in ADAMW_ALIAS_OPTIONS if o.name in group)


#: Keys any group may carry and step() never reads (``fused``, ``foreach``: see
#: ``options.IGNORED_OPTIONS``); validated when present.
_IGNORED_KEYS = frozenset(o.name for o in IGNORED_OPTIONS)


def _present_ignored(group: dict[str, Any]) -> tuple[Option, ...]:
    return tuple(o for o in IGNORED_OPTIONS if o.name in group)


#: State of matrix groups, updated by a step through (B, m, n) views (contiguous).
_MATRIX_STATE_KEYS = frozenset(
    {"momentum_buffer", second_moment_key("rows"), second_moment_key("elements")}
)


def _loaded_value(key: Any, value: Any, p: torch.Tensor) -> Any:
    """A private copy of one saved state entry for parameter ``p``, dtype kept."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    if key == "step":
        # Kept where it was saved (torch.optim keeps "step" on the CPU). A copy: the step is
        # incremented in place, so sharing the saved tensor would make two optimizers
        # loaded from one live state_dict double-count it.
        return value.detach().clone()
    loaded = value.to(device=p.device, copy=True)
    if key in _MATRIX_STATE_KEYS and not is_dtensor(loaded) and not loaded.is_contiguous():
        # A step views matrix state as (B, m, n) stacks; a reshape of a non-contiguous tensor
        # (e.g. saved channels_last) would be a copy, and the step's update of it lost.
        loaded = loaded.contiguous()
    return loaded


def _momentum_dtype(p: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
    """The ``state_dtype`` option: a dtype's name, or None for the default of ``p``."""
    name = group.get("state_dtype")
    return state_dtype(p.dtype) if name is None else getattr(torch, name)


def _set_rounding_step(group: dict[str, Any], where: str | None) -> None:
    """Check a matrix group's ``rounding_step``; give a bf16-momentum group one (0) when it has
    none, so that the key exists before a checkpoint is loaded into it (DCP loads only the keys
    it finds)."""
    if ROUNDING_STEP in group:
        group[ROUNDING_STEP] = check_rounding_step(group[ROUNDING_STEP], where)
    elif group.get("state_dtype") == "bfloat16":
        group[ROUNDING_STEP] = 0


class _MatrixOptimizer(torch.optim.Optimizer):
    """Shared machinery of :class:`NorMuon` and :class:`Muon` (one code path, one flag apart)."""

    _matrix_algorithm: str = ""
    _neuron_norm: bool = False
    _options: tuple[Option, ...] = ()

    def __init__(self, params: Iterable[Any], **options: Any) -> None:
        known = {o.name for o in self._options}
        adamw = {f"adamw_{o.name}" for o in ADAMW_OPTIONS}
        wide = {o.name for o in OPTIMIZER_OPTIONS}
        unknown = sorted(set(options) - known - adamw - wide)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unexpected keyword argument(s) {unknown}; "
                f"options: {sorted(known | adamw | wide)}"
            )
        for option in OPTIMIZER_OPTIONS:
            value = option.check(option.name, options.get(option.name, option.default))
            setattr(self, option.name, value)
        self._matrix_defaults = {o.name: options.get(o.name, o.default) for o in self._options}
        self._adamw_defaults = {
            o.name: options.get(f"adamw_{o.name}", o.default) for o in ADAMW_OPTIONS
        }
        # Validate the defaults now, even when no group of that algorithm exists yet.
        adamw_defaults = {f"adamw_{k}": v for k, v in self._adamw_defaults.items()}
        adamw_named = tuple(
            Option(f"adamw_{o.name}", o.default, o.check, o.doc) for o in ADAMW_OPTIONS
        )
        validate_group(adamw_defaults, adamw_named, None)
        validate_group(dict(self._matrix_defaults), self._options, None)
        self._init_runtime()
        defaults = dict(self._matrix_defaults)
        defaults.update({f"adamw_{k}": v for k, v in self._adamw_defaults.items()})
        super().__init__(params, defaults)

    def _init_runtime(self) -> None:
        """Attributes that are not saved: rebuilt after unpickling or deepcopy."""
        # The step itself, with what it uses and does not save: the workspace its batches run
        # in, the distributor, the non-finite guard (normuon.pipeline).
        self._pipeline = StepPipeline(self)
        self._plans_cache: list[list[ParamPlan]] | None = None
        # Per group, the batches of its matrix blocks (empty for AdamW groups); with the plans.
        self._batches_cache: list[tuple[BlockBatch, ...]] = []
        # ids of the parameters that have had a gradient (replicated mode: every rank knows
        # which ones have state somewhere).
        self._stepped: set[int] = set()
        # (device type, requested ns_dtype) -> dtype Newton-Schulz runs in. Filled for the
        # parameters' devices when groups are added: the CPU bf16 capability query is a
        # Python-side call that torch.compile(step, fullgraph=True) cannot trace.
        self._ns_dtype_cache: dict[tuple[str, torch.dtype], torch.dtype] = {}
        # Once prepare_capture ran: a has-grad flag per parameter id that masks the step (a
        # captured step's input). Empty: not prepared for capture.
        self._has_grad: dict[int, torch.Tensor] = {}

    @property
    def _guard(self) -> NonfiniteGuard:
        return self._pipeline.guard

    @property
    def _workspace(self) -> Workspace:
        return self._pipeline.workspace

    @property
    def _distributor(self) -> Distributor:
        return self._pipeline.distributor

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        for option in OPTIMIZER_OPTIONS:
            state[option.name] = getattr(self, option.name)
        state["_matrix_defaults"] = self._matrix_defaults
        state["_adamw_defaults"] = self._adamw_defaults
        state["_nonfinite_skips"] = self.nonfinite_skips
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        skips = state.pop("_nonfinite_skips", 0)
        for option in OPTIMIZER_OPTIONS:
            # Pickles of older versions lack newer options; torch.optim's load_state_dict calls
            # this with groups and state only, and the optimizer keeps its own options.
            if option.name not in state and not hasattr(self, option.name):
                state[option.name] = option.default
        super().__setstate__(state)
        self._init_runtime()
        self._after_new_groups_or_state()
        self._guard.restore(skips)

    def _after_new_groups_or_state(self) -> None:
        """What follows from the groups and the state: the plans (rebuilt at the next use),
        which parameters have state, the Newton-Schulz dtypes of their devices."""
        self._plans_cache = None
        self._stepped = {id(p) for p in self.state}
        for group in self.param_groups:
            self._resolve_ns_dtypes(group)

    # ---------------------------------------------------------------- groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a group, fill in its algorithm's defaults, and add it.

        The ``algorithm`` key routes the group: the class's matrix algorithm (the default) or
        ``"adamw"``. Keys that the algorithm does not know are a ValueError.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        group = dict(param_group)
        if "params" not in group:
            raise ValueError("param_group has no 'params' entry")
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("params must be an ordered collection (list, tuple), not a set")
        params = list(params)
        names = [p[0] for p in params if isinstance(p, tuple)]
        params = [p[1] if isinstance(p, tuple) else p for p in params]
        if names:
            if len(names) != len(params):
                raise ValueError("either every parameter comes with a name or none does")
            group["param_names"] = names
        group["params"] = params
        # torch.optim (state_dict, and hooks that match parameters by name) expects names in
        # every group or in none; a mix would only fail later, far from its cause.
        if self.param_groups and ("param_names" in group) != (
            "param_names" in self.param_groups[0]
        ):
            added, first = f"param_groups[{len(self.param_groups)}]", "param_groups[0]"
            named, unnamed = (added, first) if "param_names" in group else (first, added)
            raise ValueError(
                f"{named} names its parameters ((name, tensor) pairs) but {unnamed} does not: "
                f"give names in every parameter group or in none"
            )
        algorithm = group.setdefault("algorithm", self._matrix_algorithm)
        options = self._options_of(algorithm)
        allowed = {o.name for o in options} | (_ADAMW_ALIASES if algorithm == "adamw" else set())
        allowed |= _IGNORED_KEYS
        if algorithm != "adamw":
            allowed.add(ROUNDING_STEP)  # a copied group may carry its counter (see options.py)
        unknown = sorted(set(group) - allowed - COMMON_KEYS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for an algorithm={algorithm!r} group of "
                f"{type(self).__name__}; known options: {sorted(allowed)}"
            )
        defaults = self._adamw_defaults if algorithm == "adamw" else self._matrix_defaults
        for key, value in defaults.items():
            group.setdefault(key, value)
        for i, p in enumerate(params):
            self._check_param(i, p)
        where = f"param_groups[{len(self.param_groups)}]"
        validate_group(group, options + _present_ignored(group), None)
        if algorithm == "adamw":
            validate_group(group, _present_aliases(group), None)
        else:
            for i, p in enumerate(params):
                # Raises ValueError naming the shape for vectors, scalars and split misfits.
                try:
                    matrix_geometry(p.shape, group["layout"], group["split_sizes"])
                except ValueError as err:
                    raise ValueError(f"{where}['params'][{i}]: {err}") from None
            _set_rounding_step(group, where)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ValueError("a parameter appears more than once across the parameter groups")
        self.param_groups.append(group)
        self._plans_cache = None
        self._resolve_ns_dtypes(group)
        # Planned now, not in step(): unsupported placements fail here, and step() only runs
        # the plan (reading DTensor meshes while planning is no business of a step).
        self._plans()

    def _resolve_ns_dtypes(self, group: dict[str, Any]) -> None:
        """Answer the half-precision capability query of the group's ``ns_dtype`` for its
        parameters' devices now, outside any traced step (see ``_ns_dtype_cache``; on a CPU it
        is a measurement). Groups without a half ``ns_dtype`` ask nothing."""
        dtype = group_ns_dtype(group)
        if dtype not in (torch.bfloat16, torch.float16):
            return
        for device_type in {local_tensor(p).device.type for p in group["params"]}:
            if (device_type, dtype) not in self._ns_dtype_cache:
                self._ns_dtype_cache[(device_type, dtype)] = NS.ns_compute_dtype(dtype, device_type)

    def _ns_dtype(self, requested: torch.dtype, device: torch.device) -> torch.dtype:
        if requested not in (torch.bfloat16, torch.float16):
            return requested  # float32/float64 run as asked on every device
        cached = self._ns_dtype_cache.get((device.type, requested))
        if cached is None:  # a device the groups did not have when they were added
            cached = self._ns_dtype_cache[(device.type, requested)] = NS.ns_compute_dtype(
                requested, device
            )
        return cached

    def _group_options(self, algorithm: Any, group: dict[str, Any]) -> tuple[Option, ...]:
        """The options a group of ``algorithm`` carries, with the aliases ``group`` uses."""
        options = self._options_of(algorithm) + _present_ignored(group)
        return options + _present_aliases(group) if algorithm == "adamw" else options

    def _options_of(self, algorithm: Any) -> tuple[Option, ...]:
        if algorithm == "adamw":
            return ADAMW_OPTIONS
        if algorithm == self._matrix_algorithm:
            return self._options
        raise ValueError(
            f"algorithm must be {self._matrix_algorithm!r} or 'adamw' for "
            f"{type(self).__name__}, got {algorithm!r}"
        )

    def _check_param(self, i: int, p: Any) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a torch.Tensor")
        if not (p.is_leaf or p.retains_grad):
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a leaf tensor")
        if p.is_complex():
            raise TypeError(
                f"params[{i}] is complex ({p.dtype}); {type(self).__name__} supports real "
                f"floating-point parameters only (view complex ones with torch.view_as_real)"
            )
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; a floating dtype is needed")

    def _plans(self) -> list[list[ParamPlan]]:
        """Where every parameter is updated, and the batches of every matrix group; built once,
        rebuilt when the groups change (``add_param_group``, ``load_state_dict``)."""
        if self._plans_cache is None:
            plans = build_plans(
                self.param_groups, self._matrix_algorithm, self._neuron_norm, self.process_group
            )
            self._batches_cache = [
                ()
                if group["algorithm"] == "adamw"
                else plan_batches(
                    group_plans,
                    [local_tensor(group["params"][plan.index]) for plan in group_plans],
                    [_momentum_dtype(group["params"][plan.index], group) for plan in group_plans],
                    self.ns_memory_budget,
                )
                for group, group_plans in zip(self.param_groups, plans)
            ]
            self._workspace.clear()
            self._plans_cache = plans
            # Plan time: each bucket's Newton-Schulz kernel decided (timed once per process
            # with ns_kernel="auto") before any step, so a compiled or captured step finds it.
            self._pipeline.plan_kernels(self._batches_cache)
        return self._plans_cache

    # ---------------------------------------------------------------- state

    def _init_state(self, p: torch.Tensor, plan: ParamPlan, group: dict[str, Any]) -> dict:
        """Zero state of one parameter (DTensors with the parameter's mesh and placements)."""
        state = self.state[p]
        if state:
            return state
        dtype = state_dtype(p.dtype)
        if group["algorithm"] == "adamw":
            state["step"] = torch.zeros((), dtype=torch.float32, device=local_tensor(p).device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.preserve_format
            )
            return state
        state["momentum_buffer"] = torch.zeros_like(
            p, dtype=_momentum_dtype(p, group), memory_format=torch.contiguous_format
        )
        if self._neuron_norm:
            full_shape = matrix_geometry(
                p.shape, group["layout"], group["split_sizes"], group["normalize"]
            ).state_shape
            state[second_moment_key(group["normalize"])] = self._distributor.second_moment_state(
                p, plan, full_shape, dtype
            )
        return state

    def init_state(self) -> None:
        """Create every parameter's state now (zeros), as the first step would.

        Needed before loading a sharded checkpoint (every rank must hold the same keys) and done
        automatically for DTensor parameters. In replicated (DDP) mode only the owned
        parameters get state.
        """
        for group, plans in zip(self.param_groups, self._plans()):
            for plan in plans:
                if plan.updated_here:
                    self._init_state(group["params"][plan.index], plan, group)

    # ---------------------------------------------------------------- Newton-Schulz kernels

    def ns_kernel_choices(self) -> list[ns_kernels.KernelChoice]:
        """The Newton-Schulz kernel of every planned bucket, decided now where it is not yet.

        The plans decide them when they are built (construction, ``add_param_group``,
        ``load_state_dict``): with ``ns_kernel="auto"`` a bucket this process has not seen yet
        has its candidates timed then (:mod:`normuon.ns_kernels`), so compiled and captured
        steps find them decided (a traced step cannot time: a bucket it meets undecided runs
        the shape rule). This call decides what is still open (parameters that were on the
        meta device, a changed ``ns_kernel``); ``prepare_capture`` calls it.

        Returns the :class:`~normuon.ns_kernels.KernelChoice` of every planned batch, in plan
        order (batches of one bucket: shape, count, iteration dtype, device type and steps,
        share one), with what runs and the times measured; empty with a custom
        ``orthogonalizer``. Buckets of steps where some parameters have no gradient hold fewer
        matrices: they are decided when first seen.

        Examples:
            >>> import torch
            >>> from normuon import NorMuon
            >>> w = torch.nn.Parameter(torch.randn(8, 32))
            >>> opt = NorMuon([w], ns_dtype="float32", ns_kernel="loop")
            >>> [c.describe() for c in opt.ns_kernel_choices()]
            ['1 x (8, 32) float32 cpu, 5 steps: loop/1 (fixed)']
        """
        return self._pipeline.plan_kernels(self._batches_for_kernels())

    def _batches_for_kernels(self) -> list[tuple[BlockBatch, ...]]:
        self._plans()
        return self._batches_cache

    # ---------------------------------------------------------------- capture (CUDA graphs)

    def prepare_capture(self) -> CaptureSpec:
        """Make ``step()`` capturable in a CUDA graph and return what the graph reads.

        The hook behind :class:`normuon.cuda_graphs.GraphedStep` (``docs/performance.md``).
        After it, every hyperparameter is a 0-d float32 tensor on the parameters' device (a
        scheduler updates it in place; :meth:`~normuon.capture.CaptureSpec.refresh` copies a
        number written into a group), all state exists, the non-finite counter and bf16 state's
        random generators exist on the device, ``host_reads`` is ``"never"``, and each
        parameter has a has-grad flag (``CaptureSpec.has_grad``) that masks it out of the step
        while False. Calling it again returns a new spec over the same tensors.

        Raises ValueError for parameters on several devices, ``nonfinite_grads="raise"``
        (which reads the gradients' flags on the host) and a process group of several ranks
        (collectives inside a graph).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"a captured step needs every parameter on one device, got {devices}")
        if self.nonfinite_grads == "raise":
            raise ValueError(
                "nonfinite_grads='raise' reads the gradients' finite flags on the host, which a "
                "captured step cannot; use nonfinite_grads='skip'"
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "a captured step must run in one process: collectives captured in a CUDA graph "
                "can hang destroy_process_group"
            )
        device = devices.pop()
        values = make_capturable(self.param_groups, device)
        self.host_reads = "never"
        self.init_state()
        # Newton-Schulz kernels decided now: a capture (or a trace) cannot time candidates.
        self.ns_kernel_choices()
        self._guard.ensure_counter(device)
        matrix_groups = [g for g in self.param_groups if g["algorithm"] != "adamw"]
        if any(_momentum_dtype(p, g) == torch.bfloat16 for g in matrix_groups for p in g["params"]):
            self._workspace.generator(device)  # created now, so the graph can register it
        # Kept objects (a graph may read them), all True: no parameter starts masked.
        self._has_grad = {id(p): self._has_grad.get(id(p)) for p in params}
        for key, flag in self._has_grad.items():
            if flag is None or flag.device != device:
                self._has_grad[key] = torch.ones((), dtype=torch.bool, device=device)
            else:
                flag.fill_(True)
        return CaptureSpec(
            device=device, values=values, generators=self._workspace.generators(),
            has_grad=[self._has_grad[id(p)] for p in params],
            structure=self._capture_structure(), current_structure=self._capture_structure,
        )  # fmt: skip

    def _capture_structure(self) -> tuple:
        """What a capture bakes in besides hyperparameter values: the plans and options."""
        wide = tuple((o.name, repr(getattr(self, o.name))) for o in OPTIMIZER_OPTIONS)
        return structure(self.param_groups, (id(self._plans()), wide))

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, as torch.optim.Optimizer returns it.

        Replicated (DDP) mode keeps a matrix's state on its owner only; here every rank gathers
        the whole state (a collective: call it on all ranks), so the result does not depend on
        the world size and loads anywhere, with or without ``torch.distributed.checkpoint``.
        """
        plans = self._plans()
        replicated = [
            (group, plan)
            for group, group_plans in zip(self.param_groups, plans)
            for plan in group_plans
            if plan.placement.synced_after_step and id(group["params"][plan.index]) in self._stepped
        ]
        if not replicated:
            return super().state_dict()
        borrowed, tensors, owners = [], [], []
        for group, plan in replicated:
            p = group["params"][plan.index]
            if not plan.updated_here:
                borrowed.append(p)
                self._init_state(p, plan, group)
            for key in sorted(self.state[p]):
                tensors.append(self.state[p][key])
                owners.append(plan)
        self._distributor.sync_replicated(tensors, owners)
        result = super().state_dict()
        for p in borrowed:  # the returned dict keeps them; this rank does not
            del self.state[p]
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict after checking all of it; nothing changes when a check fails.

        Checked: the number of groups and of parameters per group, each group's algorithm
        (NorMuon's state does not load into Muon, nor AdamW groups into matrix groups), every
        hyperparameter (re-validated), and every state tensor's shape against its parameter.
        Saved state dtypes are kept (torch.optim would cast a bf16 parameter's float32 momentum
        to bf16 and break bit-exact resumption).

        The hooks run as in torch.optim: the load-state-dict pre-hooks first (each may edit the
        dict or return a new one), then the checks and the load of the dict they produced, then
        the post-hooks, which see the loaded optimizer and may change it.
        """
        # Shallow copy, as torch.optim makes: a pre-hook that replaces a top-level entry leaves
        # the caller's dict alone. (A non-dict is left to check_state_dict to reject.)
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        # torch.optim.Optimizer.load_state_dict is not called (it would run the hooks a second
        # time and cast state dtypes), so its hooks run here.
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checked_options = check_state_dict(
            state_dict, self.param_groups, type(self).__name__, self._group_options,
            self._neuron_norm,
        )  # fmt: skip
        # Build the new groups and state completely before assigning them, so that nothing
        # raising on the way leaves the optimizer half loaded.
        groups = []
        for saved, group, options in zip(
            state_dict["param_groups"], self.param_groups, checked_options
        ):
            # Every saved entry (e.g. a scheduler's initial_lr), then the validated, normalized
            # options (a JSON-read list of betas becomes a pair, a torch.dtype ns_dtype of 0.1.0
            # betas its name; an option an older state dict lacks takes this group's value).
            loaded = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            loaded.update(options)
            if loaded["algorithm"] != "adamw":
                _set_rounding_step(loaded, f"{type(self).__name__}.load_state_dict: "
                                           f"param_groups[{len(groups)}]")  # fmt: skip
            loaded["params"] = group["params"]
            # As torch.optim: saved names replace the current ones; without any, these stay.
            if "param_names" in group and "param_names" not in loaded:
                loaded["param_names"] = group["param_names"]
            groups.append(loaded)
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        state: defaultdict[Any, dict[Any, Any]] = defaultdict(dict)
        for pid, p in zip(saved_ids, current):
            if pid in saved_state:
                state[p] = {k: _loaded_value(k, v, p) for k, v in saved_state[pid].items()}
        # State under ids that name no parameter is kept as it is, as torch.optim does.
        known = set(saved_ids)
        for pid, value in saved_state.items():
            if pid not in known:
                state[pid] = value
        # torch.optim's __setstate__ (not this class's, which rebuilds every runtime attribute
        # after unpickling): the workspace, its random generators (a captured step registered
        # them), the non-finite counter and the distributor stay; the plans are rebuilt.
        torch.optim.Optimizer.__setstate__(self, {"state": state, "param_groups": groups})
        self._after_new_groups_or_state()
        # Replicated mode: keep only the state of the parameters this rank owns now.
        for group, plans in zip(self.param_groups, self._plans()):
            for plan in plans:
                p = group["params"][plan.index]
                if not plan.updated_here and p in self.state:
                    del self.state[p]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ---------------------------------------------------------------- non-finite gradients

    @property
    def nonfinite_skips(self) -> int:
        """How many (parameter, step) updates were skipped for a NaN/Inf gradient (host sync)."""
        return self._guard.skips

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one optimization step over every group. ``closure`` re-evaluates the loss.

        Runs the plans built when the groups were added through :mod:`normuon.pipeline`; reads
        no tensor value on the host (except ``nonfinite_grads="raise"``, and the finite flags
        of CPU tensors with ``host_reads="auto"``).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = self._plans()
        for group in self.param_groups:
            # Every replica sees the same gradients, so every rank knows which have state.
            self._stepped.update(id(p) for p in group["params"] if p.grad is not None)
        self._pipeline.step(plans, self._batches_cache, self._has_grad or None)
        return loss


def _signature(options: tuple[Option, ...]) -> inspect.Signature:
    """Constructor signature generated from the option tables (for help() and IDEs)."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    parameters += [
        inspect.Parameter(o.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=o.default)
        for o in options
    ]
    parameters += [
        inspect.Parameter(f"adamw_{o.name}", inspect.Parameter.KEYWORD_ONLY, default=o.default)
        for o in ADAMW_OPTIONS
    ]
    parameters += [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
        for o in OPTIMIZER_OPTIONS
    ]
    return inspect.Signature(parameters)


def _args_doc(options: tuple[Option, ...]) -> str:
    lines = ["    Args:", "        params: parameters or parameter groups (dicts)."]
    for o in options:
        lines.append(f"        {o.name}: {o.doc} (default {o.default!r}).")
    for o in ADAMW_OPTIONS:
        lines.append(f"        adamw_{o.name}: {o.doc} (default {o.default!r}).")
    for o in OPTIMIZER_OPTIONS:
        lines.append(f"        {o.name}: {o.doc} (default {o.default!r}).")
    return "\n".join(lines)


def _bind_positional(cls: type, args: tuple, kwargs: dict) -> dict:
    """Map positional constructor arguments onto option names, as the signature lists them."""
    names = [o.name for o in cls._options]
    if len(args) > len(names):
        raise TypeError(
            f"{cls.__name__}() takes at most {len(names) + 1} positional arguments "
            f"({len(args) + 1} given)"
        )
    for name, value in zip(names, args):
        if name in kwargs:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
        kwargs[name] = value
    return kwargs


class NorMuon(_MatrixOptimizer):
    r"""NorMuon: Muon with a per-neuron second moment (Li et al., arXiv 2510.05491).

    For each matrix W (m, n) with gradient G, one step is (``docs/algorithm.md``)::

        M  <- beta1 M + (1 - beta1) G                  # state "momentum_buffer"
        U  <- G.lerp(M, beta1) if nesterov else M
        O  <- NS_k(U)                                  # Newton-Schulz polar factor
        r  <- mean_j O_ij^2                            # one number per neuron (row)
        v  <- beta2 v + (1 - beta2) r                  # state "neuron_second_moment"
        Oh <- O / (sqrt(v) + eps)
        D  <- Oh * ||O|| / ||Oh|| * sqrt(max(1, m/n))  # update_scale="preserve_norm"
              Oh * 0.2 sqrt(m n) / ||Oh||              # update_scale="adam_rms"
        W  <- W (1 - lr weight_decay) - lr D

    Groups with ``algorithm="adamw"`` get bias-corrected AdamW (decoupled weight decay) with the
    ``lr``, ``betas``, ``eps`` and ``weight_decay`` of that group; missing values come from the
    ``adamw_*`` arguments. Use :func:`normuon.param_groups` to split a model. One class serves
    one process, DDP (replicated parameters), FSDP2 and tensor-parallel DTensors
    (``docs/distributed.md``).

    Examples:
        >>> import torch
        >>> from normuon import NorMuon
        >>> w = torch.nn.Parameter(torch.randn(8, 4))
        >>> opt = NorMuon([w], lr=0.02, weight_decay=0.01)
        >>> w.grad = torch.randn(8, 4)
        >>> opt.step()
        >>> sorted(opt.state[w])
        ['momentum_buffer', 'neuron_second_moment']
        >>> opt.state[w]["neuron_second_moment"].shape  # one entry per output neuron (row)
        torch.Size([8])

    ARGS
    """

    _matrix_algorithm = "normuon"
    _neuron_norm = True
    _options = NORMUON_OPTIONS

    def __init__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(params, **_bind_positional(type(self), args, kwargs))


class Muon(_MatrixOptimizer):
    r"""Muon (Jordan et al. 2024): momentum orthogonalized by Newton-Schulz; NorMuon's baseline.

    The same pipeline as :class:`NorMuon` without the per-neuron second moment::

        M <- beta1 M + (1 - beta1) G ;  U <- G.lerp(M, beta1) if nesterov else M
        O <- NS_k(U)
        D <- O * sqrt(max(1, m/n))       # update_scale="preserve_norm" (Keller Jordan's Muon)
             O * 0.2 sqrt(m n) / ||O||   # update_scale="adam_rms" (update RMS 0.2, Moonlight)
        W <- W (1 - lr weight_decay) - lr D

    Groups route with ``algorithm="muon"`` (default) or ``"adamw"``. State per matrix:
    ``momentum_buffer`` only.

    ARGS
    """

    _matrix_algorithm = "muon"
    _neuron_norm = False
    _options = MUON_OPTIONS

    def __init__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(params, **_bind_positional(type(self), args, kwargs))


for _cls in (NorMuon, Muon):
    _cls.__init__.__signature__ = _signature(_cls._options)  # type: ignore[attr-defined]
    _cls.__doc__ = _cls.__doc__.replace("    ARGS", _args_doc(_cls._options))

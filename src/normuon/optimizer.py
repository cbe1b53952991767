"""The NorMuon and Muon optimizers: validation, state and the order of the math.

The math itself lives in :mod:`normuon.functional`; this module decides which tensors it runs on.
One class serves a whole model: parameter groups whose ``algorithm`` is ``"adamw"`` (embeddings,
output head, gains and biases) get AdamW inside the same ``step()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import distributed as D
from . import functional as F
from . import newton_schulz as NS

try:  # DTensor parameters (FSDP2); absent from torch builds without distributed support
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover

    class DTensor:  # type: ignore[no-redef]
        """Stand-in so isinstance checks are False when torch has no DTensor."""

    Replicate = None  # type: ignore[assignment]

__all__ = ["NorMuon", "Muon"]

#: Group keys every group may carry, whatever its algorithm. ``initial_lr`` is added by
#: torch.optim.lr_scheduler; ``param_names`` by passing (name, tensor) pairs; ``name`` is a label.
_COMMON_KEYS = frozenset({"params", "algorithm", "initial_lr", "param_names", "name"})
_ADAMW_KEYS = frozenset({"lr", "betas", "eps", "weight_decay"})
_LAYOUTS = ("auto", "conv", "stacked")
_NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_NONFINITE_POLICIES = ("skip", "raise")


@dataclass(frozen=True)
class MatrixGeometry:
    """How a parameter is seen as a stack of matrices.

    ``batch``, ``rows``, ``cols``: the parameter viewed as (batch, rows, cols).
    ``row_blocks``: (start, stop) row ranges orthogonalized separately (``split_sizes``).
    ``neurons``: second-moment entries per stack element (sum over blocks).
    """

    batch: int
    rows: int
    cols: int
    row_blocks: tuple[tuple[int, int], ...]
    neurons: int
    state_shape: tuple[int, ...]


def matrix_geometry(
    shape: Sequence[int], layout: str, split_sizes: Sequence[int] | None, normalize: str
) -> MatrixGeometry:
    """Resolve a parameter shape to its (batch, rows, cols) view. Raises ValueError on misfit.

    ``layout="auto"``: 2-D is one matrix; 3-D is a stack (E, m, n) of E matrices (e.g. MoE
    experts); 4-D and 5-D are convolution kernels (out, in, *kernel) flattened to
    (out, in * prod(kernel)) so that one neuron is one output channel. ``"conv"`` forces the
    kernel flattening (Conv1d weights are 3-D); ``"stacked"`` forces leading dims to be a batch.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"a parameter of shape {shape} is not a matrix: NorMuon/Muon groups take 2-D and "
            f"larger "
            f"tensors; put scalars and vectors in an algorithm='adamw' group (normuon.param_groups "
            f"does this for a whole model)"
        )
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if layout == "conv" or (layout == "auto" and len(shape) >= 4):
        batch, rows, cols = 1, shape[0], math.prod(shape[1:])
        lead: tuple[int, ...] = ()
    elif len(shape) == 2:
        batch, rows, cols = 1, shape[0], shape[1]
        lead = ()
    else:
        batch, rows, cols = math.prod(shape[:-2]), shape[-2], shape[-1]
        lead = shape[:-2]
    if split_sizes is None:
        blocks = ((0, rows),)
    else:
        if sum(split_sizes) != rows:
            raise ValueError(
                f"split_sizes {tuple(split_sizes)} sum to {sum(split_sizes)} but the parameter of "
                f"shape {shape} has {rows} rows per matrix"
            )
        starts = [0]
        for size in split_sizes:
            starts.append(starts[-1] + size)
        blocks = tuple((starts[i], starts[i + 1]) for i in range(len(split_sizes)))
    neurons = 0
    for start, stop in blocks:
        m_block = stop - start
        neurons += m_block if F.reduce_dim(m_block, cols, normalize) == -1 else cols
    return MatrixGeometry(batch, rows, cols, blocks, neurons, lead + (neurons,))


def _check_number(name: str, value: Any, low: float, high: float | None = None, *, open_high=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and (value >= high if open_high else value > high)):
        upper = "" if high is None else (f" and < {high}" if open_high else f" and <= {high}")
        raise ValueError(f"{name} must be >= {low}{upper}, got {value!r}")


class _MatrixOptimizer(torch.optim.Optimizer):
    """Shared machinery of :class:`NorMuon` and :class:`Muon` (one code path, one flag apart)."""

    _matrix_algorithm: str = ""
    _neuron_norm: bool = False
    _matrix_keys: frozenset[str] = frozenset()

    def __init__(
        self,
        params: Iterable[Any],
        matrix_defaults: dict[str, Any],
        adamw_defaults: dict[str, Any],
        nonfinite_grads: str,
        process_group: Any = "auto",
        comm_dtype: Any = "auto",
        orthogonalizer: NS.Orthogonalizer | None = None,
    ) -> None:
        if orthogonalizer is not None and not callable(orthogonalizer):
            raise TypeError(f"orthogonalizer must be callable, got {orthogonalizer!r}")
        self.orthogonalizer = orthogonalizer or NS.default_orthogonalizer
        D.wire_dtype_for(torch.device("cpu"), comm_dtype)  # validates the option
        self.process_group = process_group
        self.comm_dtype = comm_dtype
        if nonfinite_grads not in _NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_grads must be one of {_NONFINITE_POLICIES}, got {nonfinite_grads!r}"
            )
        self.nonfinite_grads = nonfinite_grads
        self._matrix_defaults = matrix_defaults
        self._adamw_defaults = adamw_defaults
        self._skip_counter: torch.Tensor | None = None
        # ids of the parameters that have had a gradient (replicated mode: so that every rank
        # knows which ones have state somewhere).
        self._stepped: set[int] = set()
        # Validate the adamw_* defaults now, even if no AdamW group exists yet.
        self._validate_adamw_group({"params": [], **adamw_defaults})
        defaults = dict(matrix_defaults)
        defaults.update({f"adamw_{k}": v for k, v in adamw_defaults.items()})
        super().__init__(params, defaults)

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

        algorithm = group.setdefault("algorithm", self._matrix_algorithm)
        allowed = (
            {self._matrix_algorithm: self._matrix_keys, "adamw": _ADAMW_KEYS}.get(algorithm)
            if isinstance(algorithm, str)
            else None
        )
        if allowed is None:
            raise ValueError(
                f"algorithm must be {self._matrix_algorithm!r} or 'adamw' for "
                f"{type(self).__name__}, got {algorithm!r}"
            )
        unknown = sorted(set(group) - allowed - _COMMON_KEYS)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for an algorithm={algorithm!r} group of "
                f"{type(self).__name__}; known options: {sorted(allowed)}"
            )
        defaults = self._adamw_defaults if algorithm == "adamw" else self._matrix_defaults
        for key, value in defaults.items():
            group.setdefault(key, value)

        for i, p in enumerate(params):
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

        if algorithm == "adamw":
            self._validate_adamw_group(group)
        else:
            self._validate_matrix_group(group)
        for i, p in enumerate(params):
            if isinstance(p, DTensor):  # unsupported placements fail here, not at step()
                D.shard_info(p, f"params[{i}] (shape {tuple(p.shape)})")

        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ValueError("a parameter appears more than once across the parameter groups")
        self.param_groups.append(group)

    @staticmethod
    def _validate_adamw_group(group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], 0.0)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_number("betas[0]", betas[0], 0.0, 1.0, open_high=True)
        _check_number("betas[1]", betas[1], 0.0, 1.0, open_high=True)
        group["betas"] = (float(betas[0]), float(betas[1]))
        _check_number("eps", group["eps"], 0.0)
        _check_number("weight_decay", group["weight_decay"], 0.0)

    def _validate_matrix_group(self, group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], 0.0)
        _check_number("momentum", group["momentum"], 0.0, 1.0, open_high=True)
        _check_number("weight_decay", group["weight_decay"], 0.0)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be True or False, got {group['nesterov']!r}")
        # Resolving the coefficients validates ns_steps and ns_coefficients together.
        NS.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        # Stored by name ("bfloat16"): torch.distributed.checkpoint's full state dicts accept
        # only plain values in param_groups, and a name reads the same in JSON.
        dtype = group["ns_dtype"]
        if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
            dtype = getattr(torch, dtype)
        if dtype not in _NS_DTYPES:
            raise ValueError(
                f"ns_dtype must be one of {[str(d) for d in _NS_DTYPES]} (or their names), "
                f"got {group['ns_dtype']!r}"
            )
        group["ns_dtype"] = str(dtype).removeprefix("torch.")
        if group["update_scale"] not in ("preserve_norm", "adam_rms"):
            raise ValueError(
                f"update_scale must be 'preserve_norm' or 'adam_rms', got {group['update_scale']!r}"
            )
        if group["layout"] not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {group['layout']!r}")
        split = group["split_sizes"]
        if split is not None:
            if not (
                isinstance(split, (tuple, list))
                and len(split) >= 1
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in split)
            ):
                raise ValueError(f"split_sizes must be a list of positive ints, got {split!r}")
            group["split_sizes"] = tuple(split)
        if self._neuron_norm:
            _check_number("beta2", group["beta2"], 0.0, 1.0, open_high=True)
            _check_number("eps", group["eps"], 0.0)
            if group["normalize"] not in ("rows", "larger_dim"):
                raise ValueError(
                    f"normalize must be 'rows' or 'larger_dim', got {group['normalize']!r}"
                )
        normalize = group.get("normalize", "rows")
        for p in group["params"]:
            # Raises ValueError naming the shape for vectors, scalars and split misfits.
            matrix_geometry(p.shape, group["layout"], group["split_sizes"], normalize)
            if not p.is_contiguous():
                raise ValueError(
                    f"a matrix parameter of shape {tuple(p.shape)} is not contiguous; the update "
                    f"is applied through a view, so pass a contiguous parameter"
                )

    # ---------------------------------------------------------------- state

    def _geometry(self, p: torch.Tensor, group: dict[str, Any]) -> MatrixGeometry:
        return matrix_geometry(
            p.shape, group["layout"], group["split_sizes"], group.get("normalize", "rows")
        )

    @staticmethod
    def _state_dtype(p: torch.Tensor) -> torch.dtype:
        # Low-precision parameters keep float32 state: bf16 momentum loses the small updates.
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _init_matrix_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            dtype = self._state_dtype(p)
            state["momentum_buffer"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.contiguous_format
            )
            if self._neuron_norm:
                geo = self._geometry(p, group)
                state["neuron_second_moment"] = torch.zeros(
                    geo.state_shape, dtype=dtype, device=p.device
                )
        return state

    def _init_adamw_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            dtype = self._state_dtype(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(
                p, dtype=dtype, memory_format=torch.preserve_format
            )
        return state

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state, as torch.optim.Optimizer returns it.

        Replicated (DDP) mode keeps a matrix's state on its owner only; here every rank gathers
        the whole state (a collective: call it on all ranks), so the result does not depend on
        the world size and loads anywhere, with or without ``torch.distributed.checkpoint``.
        """
        rgroup = self._replication_group()
        dtensors = any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"])
        if rgroup is None or dtensors:
            return super().state_dict()
        rank = dist.get_rank(rgroup)
        borrowed = []
        for gi, group in enumerate(self.param_groups):
            owners = self._replicated_owners(gi, group, rgroup)
            idx = [i for i, p in enumerate(group["params"]) if id(p) in self._stepped]
            tensors, tensor_owners = [], []
            for i in idx:
                p = group["params"][i]
                if owners[i] != rank:
                    borrowed.append(p)
                    if group["algorithm"] == "adamw":
                        self._init_adamw_state(p)
                    else:
                        self._init_matrix_state(p, group)
                for key in sorted(self.state[p]):
                    tensors.append(self.state[p][key])
                    tensor_owners.append(owners[i])
            D.all_gather_owned(tensors, tensor_owners, rgroup, rank, dist.get_world_size(rgroup))
        result = super().state_dict()
        for p in borrowed:  # the returned dict keeps them; this rank does not
            del self.state[p]
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict, keeping every state tensor's saved dtype.

        torch.optim.Optimizer casts floating state to the parameter's dtype, which would round a
        bf16 parameter's float32 momentum to bf16 and break bit-exact resumption; the saved
        dtypes are restored here.
        """
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            for key, value in saved_state.get(pid, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    self.state[p][key] = value.to(device=p.device, copy=True)
            if pid in saved_state:
                self._stepped.add(id(p))
        rgroup = self._replication_group()
        if rgroup is not None and not any(isinstance(p, DTensor) for p in current):
            # Replicated mode: keep only the state of the parameters this rank owns now.
            rank = dist.get_rank(rgroup)
            for gi, group in enumerate(self.param_groups):
                owners = self._replicated_owners(gi, group, rgroup)
                for i, p in enumerate(group["params"]):
                    if owners[i] != rank and p in self.state:
                        del self.state[p]

    # ---------------------------------------------------------------- non-finite gradients

    @property
    def nonfinite_skips(self) -> int:
        """How many (parameter, step) updates were skipped for a NaN/Inf gradient (host sync)."""
        return 0 if self._skip_counter is None else int(self._skip_counter.item())

    def _finite_flags(self, grads: list[torch.Tensor], infos: list) -> list[torch.Tensor]:
        """One 0-d bool tensor per gradient, True when every entry is finite (no host sync).

        ``infos``: per gradient the ShardInfo of a DTensor parameter (or None); the flags of
        row-sharded ones are combined over the shard group so that all shards skip together.
        """
        # The max-abs norm is NaN/Inf exactly when some entry is (one fused reduction per list).
        nonempty = [i for i, g in enumerate(grads) if g.numel() > 0]  # empty shards are finite
        norms = torch._foreach_norm([grads[i] for i in nonempty], ord=math.inf) if nonempty else []
        flags = [torch.ones((), dtype=torch.bool, device=g.device) for g in grads]
        for i, norm in zip(nonempty, norms):
            flags[i] = norm.isfinite()
        shared = [i for i, info in enumerate(infos) if info is not None and info.world > 1]
        if shared:
            stacked = torch.stack([flags[i] for i in shared]).to(torch.float32)
            D.all_reduce_(stacked, infos[shared[0]].group, op=dist.ReduceOp.MIN)
            for k, i in enumerate(shared):
                flags[i] = stacked[k] > 0
        return flags

    def _step_flags(self, grads: list[torch.Tensor], infos: list) -> list[torch.Tensor]:
        """The finite flags a group's update is masked with.

        ``"raise"`` mode checked every gradient before the step began, so all are finite;
        ``"skip"`` mode computes them and counts the skipped parameters.
        """
        if not grads or self.nonfinite_grads == "raise":
            return [torch.ones((), dtype=torch.bool, device=g.device) for g in grads]
        flags = self._finite_flags(grads, infos)
        bad_count = torch.stack([~f for f in flags]).sum()
        if self._skip_counter is None:
            self._skip_counter = torch.zeros((), dtype=torch.int64, device=bad_count.device)
        self._skip_counter += bad_count.to(self._skip_counter.device)
        return flags

    def _raise_on_nonfinite(self) -> None:
        """``nonfinite_grads="raise"``: check every gradient of every group before any change."""
        grads, names, infos = [], [], []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
                grads.append(self._local(self._grad_of(p, name)))
                names.append(name)
                infos.append(D.shard_info(p, name) if isinstance(p, DTensor) else None)
        flags = self._finite_flags(grads, infos)
        bad = [name for name, ok in zip(names, flags) if not bool(ok)]
        if bad:
            raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}")

    @staticmethod
    def _grad_of(p: torch.Tensor, where: str) -> torch.Tensor:
        g = p.grad
        if g.is_sparse:
            raise TypeError(f"{where} has a sparse gradient; sparse gradients are not supported")
        if g.shape != p.shape:
            raise ValueError(f"{where}: gradient shape {tuple(g.shape)} != {tuple(p.shape)}")
        return g

    # ---------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Perform one optimization step over every group. ``closure`` re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.nonfinite_grads == "raise":
            self._raise_on_nonfinite()
        for gi, group in enumerate(self.param_groups):
            # Every replica sees the same gradients, so every rank knows which params have state.
            self._stepped.update(id(p) for p in group["params"] if p.grad is not None)
            if group["algorithm"] == "adamw":
                self._adamw_step(gi, group)
            else:
                self._matrix_step(gi, group)
            self._sync_replicated(gi, group)
        return loss

    def _adamw_step(self, gi: int, group: dict[str, Any]) -> None:
        params, grads, names, infos, states = [], [], [], [], []
        for pi, p, _ in self._owned_params(gi, group):
            if p.grad is None:
                continue
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            grads.append(self._local(self._grad_of(p, name)))
            params.append(self._local(p))
            names.append(name)
            infos.append(D.shard_info(p, name) if isinstance(p, DTensor) else None)
            states.append(self._init_adamw_state(p))
        if not params:
            return
        ok = self._step_flags(grads, infos)
        lr, (beta1, beta2), eps, wd = (
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        exp_avgs = [self._local(s["exp_avg"]) for s in states]
        exp_avg_sqs = [self._local(s["exp_avg_sq"]) for s in states]
        steps = [s["step"] for s in states]
        # A skipped parameter sees its own state as the "gradient": lerp then leaves it unchanged.
        g_safe = [torch.where(f, g, m) for f, g, m in zip(ok, grads, exp_avgs)]
        # Squares formed in the state dtype: a bf16 g*g would round every EMA term to 8 bits.
        g2_safe = [torch.where(f, g.square(), v) for f, g, v in zip(ok, g_safe, exp_avg_sqs)]
        okf = [f.to(F.accum_dtype(p.dtype)) for f, p in zip(ok, params)]
        torch._foreach_add_(steps, [f.to(torch.float32) for f in ok])
        if wd != 0:
            torch._foreach_mul_(params, [1.0 - lr * wd * f for f in okf])
        torch._foreach_lerp_(exp_avgs, g_safe, 1.0 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, g2_safe, 1.0 - beta2)
        # step is 0 only for a parameter skipped since its first step; clamp keeps 1 - beta^0
        # away from a division by zero (its update is multiplied by 0 anyway).
        safe_steps = [s.clamp_min(1.0) for s in steps]
        bias_correction1 = [1.0 - torch.pow(beta1, s) for s in safe_steps]
        bias_correction2_sqrt = [(1.0 - torch.pow(beta2, s)).sqrt() for s in safe_steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        if eps == 0:
            # A skipped parameter may hold exp_avg = exp_avg_sq = 0: keep 0 / 0 out of it.
            denom = [torch.where(f, d, 1.0) for f, d in zip(ok, denom)]
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, [-lr * f / bc for f, bc in zip(okf, bias_correction1)])
        torch._foreach_add_(params, update)

    # ---------------------------------------------------------------- distribution

    def _replication_group(self):
        """The process group of replicated (DDP-style) parameters, or None for one process."""
        option = self.process_group
        if option is None or not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if option == "auto" else option
        return group if dist.get_world_size(group) > 1 else None

    def _plan(self, p: torch.Tensor, group: dict[str, Any], name: str) -> _ParamPlan:
        """Decide how one matrix parameter is held: all rows here, or rows spread over ranks."""
        if isinstance(p, DTensor):
            info = D.shard_info(p, name)
            local = p.to_local()
            stacked = self._geometry(p, group).batch > 1 or (
                group["layout"] == "stacked" and p.ndim > 2
            )
            if info.shard_mesh_dim is None or info.world == 1 or stacked:
                # Dim 0 unsharded, or sharded over a stack of whole matrices: all local.
                geo = matrix_geometry(
                    local.shape,
                    group["layout"],
                    group["split_sizes"],
                    group.get("normalize", "rows"),
                )
                return _ParamPlan(p, local, geo, None, None, 0, geo.rows)
            geo = self._geometry(p, group)
            offsets = D.dim0_offsets(p.shape[0], info.world)
            lo, hi = offsets[info.rank], offsets[info.rank + 1]
            if self._neuron_norm:
                dims = {
                    F.reduce_dim(e - s, geo.cols, group["normalize"]) for s, e in geo.row_blocks
                }
                if -2 in dims and len(geo.row_blocks) > 1:
                    raise ValueError(
                        f"{name}: normalize='larger_dim' with split_sizes on a row-sharded "
                        f"parameter gives some blocks per-column statistics; use "
                        f"normalize='rows' or no split_sizes for sharded parameters"
                    )
            return _ParamPlan(p, local, geo, info, offsets, lo, hi)
        geo = self._geometry(p, group)
        return _ParamPlan(p, p, geo, None, None, 0, geo.rows)

    def _init_dtensor_state(self, plan: _ParamPlan, group: dict[str, Any]) -> None:
        """State of a DTensor parameter: DTensors with the parameter's mesh and placements."""
        p = plan.param
        state = self.state[p]
        if state:
            return
        dtype = self._state_dtype(p)
        state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
        if not self._neuron_norm:
            return
        geo = self._geometry(p, group)
        mesh, placements = p.device_mesh, p.placements
        if plan.info is not None and any(
            F.reduce_dim(e - s, geo.cols, group["normalize"]) == -2 for s, e in geo.row_blocks
        ):
            # Per-column statistics of a row-sharded matrix: every rank holds all n entries.
            placements = tuple(Replicate() for _ in placements)
            local_shape = geo.state_shape
        elif plan.info is not None:
            local_shape = (plan.hi - plan.lo,)  # rows of this shard
        else:
            local_shape = (*plan.local.shape[: len(geo.state_shape) - 1], geo.state_shape[-1])
        local = torch.zeros(local_shape, dtype=dtype, device=plan.local.device)
        shape = torch.Size(geo.state_shape)
        stride = torch.empty(shape, device="meta").stride()
        state["neuron_second_moment"] = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    def init_state(self) -> None:
        """Create every parameter's state now (zeros), as the first step would.

        Needed before loading a sharded checkpoint (every rank must hold the same keys) and done
        automatically for DTensor parameters. In replicated (DDP) mode only the owned
        parameters get state.
        """
        for gi, group in enumerate(self.param_groups):
            plans = self._owned_params(gi, group)
            for _, p, plan in plans:
                if group["algorithm"] == "adamw":
                    self._init_adamw_state(p)
                elif isinstance(p, DTensor):
                    self._init_dtensor_state(plan, group)
                else:
                    self._init_matrix_state(p, group)

    def _owned_params(self, gi: int, group: dict[str, Any]):
        """(index, param, plan) of the parameters this rank updates in ``group``, with or
        without a gradient.

        Replicated mode keeps only this rank's share (balanced by Newton-Schulz cost for
        matrices, by size for AdamW); every other setting keeps all of them.
        """
        out = []
        for pi, p in enumerate(group["params"]):
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            plan = None if group["algorithm"] == "adamw" else self._plan(p, group, name)
            out.append((pi, p, plan))
        rgroup = self._replication_group()
        if rgroup is None or any(isinstance(p, DTensor) for _, p, _ in out):
            return out
        owners = self._replicated_owners(gi, group, rgroup)
        rank = dist.get_rank(rgroup)
        return [(pi, p, plan) for pi, p, plan in out if owners[pi] == rank]

    def _replicated_owners(self, gi: int, group: dict[str, Any], rgroup) -> list[int]:
        world = dist.get_world_size(rgroup)
        if group["algorithm"] == "adamw":
            costs = [float(p.numel()) for p in group["params"]]
        else:
            costs = []
            for p in group["params"]:
                geo = self._geometry(p, group)
                costs.append(sum(D.ns_cost(e - s, geo.cols, geo.batch) for s, e in geo.row_blocks))
        # Offsetting by the group index spreads small groups over different ranks.
        owners = D.assign_owners(costs, world)
        return [(o + gi) % world for o in owners]

    def _sync_replicated(self, gi: int, group: dict[str, Any]) -> None:
        """Replicated mode: every rank receives the parameters the other ranks updated."""
        rgroup = self._replication_group()
        if rgroup is None or not group["params"]:
            return
        if any(isinstance(p, DTensor) for p in group["params"]):
            return
        params = list(group["params"])
        owners = self._replicated_owners(gi, group, rgroup)
        has_grad = [p.grad is not None for p in params]
        idx = [i for i, g in enumerate(has_grad) if g]
        D.all_gather_owned(
            [params[i] for i in idx],
            [owners[i] for i in idx],
            rgroup,
            dist.get_rank(rgroup),
            dist.get_world_size(rgroup),
        )

    # ---------------------------------------------------------------- the matrix step

    def _matrix_step(self, gi: int, group: dict[str, Any]) -> None:
        owned = self._owned_params(gi, group)
        if any(isinstance(p, DTensor) for p in group["params"]):
            # Every rank must hold the same state keys (DCP), whether or not a grad arrived.
            for _, _, plan in owned:
                self._init_dtensor_state(plan, group)
        entries = [e for e in owned if e[1].grad is not None]
        if not entries:
            return
        plans = [plan for _, _, plan in entries]
        names = [
            f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})" for pi, p, _ in entries
        ]
        grads = [self._local(self._grad_of(p, name)) for (_, p, _), name in zip(entries, names)]
        ok = self._step_flags(grads, [plan.info for plan in plans])
        states = []
        for plan in plans:
            if isinstance(plan.param, DTensor):
                states.append(self.state[plan.param])
            else:
                states.append(self._init_matrix_state(plan.param, group))
        bufs = [self._local(s["momentum_buffer"]) for s in states]
        params = [plan.local for plan in plans]
        beta1, lr, wd = group["momentum"], group["lr"], group["weight_decay"]

        # A skipped matrix uses its own momentum as the gradient: lerp leaves it unchanged and
        # the Newton-Schulz input stays finite. Shapes are the local shards' (== param's here).
        g_safe = [torch.where(f, g, b) for f, g, b in zip(ok, grads, bufs)]
        torch._foreach_lerp_(bufs, g_safe, 1.0 - beta1)  # M <- beta1 M + (1 - beta1) G
        if group["nesterov"]:
            torch._foreach_lerp_(g_safe, bufs, beta1)  # U = (1 - beta1) G + beta1 M, in place
            updates = g_safe
        else:
            updates = bufs  # read only from here on: Newton-Schulz never writes its input
        ortho = self._orthogonalize(group, plans, updates)  # per param (B, rows_local, n)

        if wd != 0:
            decay = [1.0 - (lr * wd) * f.to(F.accum_dtype(p.dtype)) for f, p in zip(ok, params)]
            torch._foreach_mul_(params, decay)
        if self._neuron_norm:
            self._apply_normuon(group, plans, states, ok, ortho)
        else:
            self._apply_muon(group, plans, ok, ortho)

    def _orthogonalize(self, group, plans: list[_ParamPlan], updates) -> list[torch.Tensor]:
        """Newton-Schulz of every row block; returns per param its local rows of O (B, r, n).

        Row-sharded matrices are first assembled on one owner rank each (balanced by cost),
        orthogonalized there, and their row blocks sent back.
        """
        coefficients = NS.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        device = plans[0].local.device
        # Where a bf16 request iterates in float32 (CPUs without bf16 GEMMs), keep the float32
        # result rather than rounding it to bf16 and converting it back for every use.
        requested = group["ns_dtype"]  # a name; a torch.dtype in state_dicts of 0.1.0 betas
        requested = getattr(torch, requested) if isinstance(requested, str) else requested
        ns_dtype = NS.ns_compute_dtype(requested, device)
        # Full matrices to orthogonalize here: key -> (B, m, n) tensor.
        full: dict[tuple[str, int], torch.Tensor] = {}
        geos: dict[tuple[str, int], MatrixGeometry] = {}
        sharded = [i for i, plan in enumerate(plans) if plan.info is not None]
        for i, plan in enumerate(plans):
            if plan.info is None:
                geo = plan.geometry
                full[("local", i)] = updates[i].view(geo.batch, geo.rows, geo.cols)
                geos[("local", i)] = geo
        exchanges = []
        by_group: dict[int, list[int]] = {}
        for i in sharded:
            by_group.setdefault(id(plans[i].info.group), []).append(i)
        for members in by_group.values():
            info = plans[members[0]].info
            costs = [
                sum(
                    D.ns_cost(e - s, plans[i].geometry.cols)
                    for s, e in plans[i].geometry.row_blocks
                )
                for i in members
            ]
            owners = D.assign_owners(costs, info.world)
            offsets = [plans[i].offsets for i in members]
            local_rows = [
                updates[i].view(plans[i].hi - plans[i].lo, plans[i].geometry.cols) for i in members
            ]
            wire = (
                D.wire_dtype_for(local_rows[0].device, self.comm_dtype) or updates[members[0]].dtype
            )
            assembled = D.rows_to_owners(local_rows, offsets, owners, info, wire)
            for k, mat in assembled.items():
                i = members[k]
                full[("owned", i)] = mat.view(1, *mat.shape)
                geos[("owned", i)] = plans[i].geometry
            exchanges.append((members, info, owners, offsets))

        # Bucket every row block by shape so that same-shaped matrices share one batched NS.
        buckets: dict[tuple[int, int], list[tuple[tuple[str, int], int]]] = {}
        for key, geo in geos.items():
            for bi, (s, e) in enumerate(geo.row_blocks):
                buckets.setdefault((e - s, geo.cols), []).append((key, bi))
        results: dict[tuple[str, int], torch.Tensor] = {}
        for key, geo in geos.items():
            if len(geo.row_blocks) > 1:
                results[key] = torch.empty(full[key].shape, dtype=ns_dtype, device=full[key].device)
        for members in buckets.values():
            blocks = [
                full[key][:, s:e] for key, bi in members for s, e in [geos[key].row_blocks[bi]]
            ]
            stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # (sum B, m, n)
            out = self.orthogonalizer(stacked, coefficients, ns_dtype)
            for (key, bi), part in zip(members, out.split([b.shape[0] for b in blocks])):
                if key in results:
                    s, e = geos[key].row_blocks[bi]
                    results[key][:, s:e] = part
                else:
                    results[key] = part

        ortho: list[torch.Tensor | None] = [results.get(("local", i)) for i in range(len(plans))]
        for members, info, owners, offsets in exchanges:
            owned = {
                k: results[("owned", members[k])][0]
                for k in range(len(members))
                if ("owned", members[k]) in results
            }
            cols = [plans[i].geometry.cols for i in members]
            back_wire = D.wire_dtype_for(device, self.comm_dtype) or ns_dtype
            back = D.rows_from_owners(owned, offsets, owners, cols, info, back_wire)
            for k, i in enumerate(members):
                ortho[i] = back[k].view(1, *back[k].shape)
        return ortho  # type: ignore[return-value]

    @staticmethod
    def _units(plan: _ParamPlan, normalize: str):
        """(local rows, slice of v's local (B, L) view, reduce dim, m_block) per row block.

        Sharded parameters list every block, even with no local rows, so that the partial
        statistics of all ranks line up in the collectives.
        """
        geo = plan.geometry
        units = []
        neuron_offset = 0
        for s, e in geo.row_blocks:
            m_block = e - s
            dim = F.reduce_dim(m_block, geo.cols, normalize)
            a = min(max(s, plan.lo), plan.hi) - plan.lo
            b = min(max(e, plan.lo), plan.hi) - plan.lo
            length = m_block if dim == -1 else geo.cols
            if plan.info is not None and dim == -1:
                v_slice = slice(a, b)  # v is sharded like the rows
            else:
                v_slice = slice(neuron_offset, neuron_offset + length)
            units.append((slice(a, b), v_slice, dim, m_block))
            neuron_offset += length
        return units

    def _apply_normuon(self, group, plans, states, ok, ortho) -> None:
        beta2, eps, lr = group["beta2"], group["eps"], group["lr"]
        scale_rule, normalize = group["update_scale"], group["normalize"]
        work = []  # (plan index, rows slice, v view, dim, m_block, O rows)
        col_partials, col_work = [], []
        for i, plan in enumerate(plans):
            v_full = self._local(states[i]["neuron_second_moment"])
            batch = ortho[i].shape[0]
            v2 = v_full.view(batch, -1)
            for rows, v_slice, dim, m_block in self._units(plan, normalize):
                o = ortho[i][:, rows]
                item = [i, rows, v2[:, v_slice], dim, m_block, o, None]
                if dim == -2:
                    # Column statistics: partial column sums of O^2 over the rows held here.
                    part = o.to(F.accum_dtype(o.dtype)).square().sum(dim=-2)  # (B, n)
                    if plan.info is not None:
                        col_partials.append(part)
                        col_work.append(item)
                    item[6] = part
                work.append(item)
        if col_partials:
            flat = torch.cat([t.reshape(-1) for t in col_partials])
            D.all_reduce_(flat, plans[col_work[0][0]].info.group)
            pos = 0
            for item, part in zip(col_work, col_partials):
                item[6] = flat[pos : pos + part.numel()].view_as(part)
                pos += part.numel()
        # v update and partial sums for the update scale.
        sums, sharded_sums = [], []
        for item in work:
            i, rows, v, dim, m_block, o, colsum = item
            r = colsum / m_block if dim == -2 else F.neuron_mean_square(o, -1)  # (B, L)
            okb = ok[i].view(1, 1)
            v.lerp_(torch.where(okb, r, v), 1.0 - beta2)  # v <- beta2 v + (1 - beta2) r
            f = F.inverse_rms(v, eps)
            s_r, s_rf2 = F.normuon_partial_sums(r, f)
            entry = [s_r, s_rf2, f, item]
            sums.append(entry)
            if plans[i].info is not None and dim == -1:
                sharded_sums.append(entry)
        if sharded_sums:
            flat = torch.cat([torch.stack([e[0], e[1]]).reshape(-1) for e in sharded_sums])
            D.all_reduce_(flat, plans[sharded_sums[0][3][0]].info.group)
            pos = 0
            for e in sharded_sums:
                n = e[0].numel()
                e[0], e[1] = flat[pos : pos + n], flat[pos + n : pos + 2 * n]
                pos += 2 * n
        for s_r, s_rf2, f, (i, rows, _, dim, m_block, o, _) in sums:
            if o.shape[-2] == 0:
                continue
            n = plans[i].geometry.cols
            g = F.normuon_row_factors(f, s_r, s_rf2, m_block, n, dim, scale_rule)
            g = g * ok[i].to(g.dtype)
            geo = plans[i].geometry
            target = plans[i].local.view(o.shape[0], -1, geo.cols)[:, rows]
            F.apply_matrix_update(target, o, g, -1 if dim == -1 else -2, lr)

    def _apply_muon(self, group, plans, ok, ortho) -> None:
        lr, rule = group["lr"], group["update_scale"]
        work, partials, shared = [], [], []
        for i, plan in enumerate(plans):
            for rows, _, _, m_block in self._units(plan, "rows"):
                o = ortho[i][:, rows]
                part = o.to(F.accum_dtype(o.dtype)).square().sum(dim=(-2, -1))  # (B,)
                item = [i, rows, m_block, o, part]
                work.append(item)
                if rule == "adam_rms" and plan.info is not None:
                    partials.append(part)
                    shared.append(item)
        if partials:
            flat = torch.cat(partials)
            D.all_reduce_(flat, plans[shared[0][0]].info.group)
            pos = 0
            for item in shared:
                n = item[4].numel()
                item[4] = flat[pos : pos + n]
                pos += n
        for i, rows, m_block, o, sum_sq in work:
            if o.shape[-2] == 0:
                continue
            geo = plans[i].geometry
            scale = F.muon_scale_from_sum(sum_sq, m_block, geo.cols, rule)  # (B,)
            g = (scale * ok[i].to(scale.dtype)).unsqueeze(-1)  # (B, 1)
            target = plans[i].local.view(o.shape[0], -1, geo.cols)[:, rows]
            F.apply_matrix_update(target, o, g, -1, lr)


@dataclass
class _ParamPlan:
    """One matrix parameter in one step: its local tensor and where its rows live.

    ``info``/``offsets`` are None when all rows are here; else rows ``lo:hi`` of the (global)
    ``geometry`` are local and ``offsets`` gives every rank's rows.
    """

    param: torch.Tensor
    local: torch.Tensor
    geometry: MatrixGeometry
    info: D.ShardInfo | None
    offsets: tuple[int, ...] | None
    lo: int
    hi: int


class NorMuon(_MatrixOptimizer):
    r"""NorMuon: Muon with a per-neuron second moment (Li et al., arXiv 2510.05491).

    For each matrix W (m, n) with gradient G, one step is::

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
    ``adamw_*`` arguments. Use :func:`normuon.param_groups` to split a model.

    Args:
        params: parameters or parameter groups (dicts). A group's ``algorithm`` key is
            ``"normuon"`` (default) or ``"adamw"``.
        lr: learning rate of the matrices (0.02, the authors' default).
        momentum: beta1 of the momentum EMA (0.95).
        beta2: EMA factor of the per-neuron second moment (0.95).
        nesterov: Nesterov-style momentum U = G.lerp(M, beta1) (True).
        eps: added to sqrt(v) (1e-10).
        weight_decay: decoupled weight decay, applied as W *= 1 - lr * weight_decay (0).
        ns_steps: Newton-Schulz steps (5).
        ns_coefficients: ``"muon"`` (3.4445, -4.7750, 2.0315) every step, ``"polar_express"``
            (schedule computed for ``ns_steps``), one (a, b, c) or a list of ``ns_steps`` triples.
        ns_dtype: dtype of the Newton-Schulz iteration (torch.bfloat16; torch.float32 for exact
            comparisons).
        update_scale: ``"preserve_norm"`` (authors' code; Muon learning rates carry over) or
            ``"adam_rms"`` (paper's Algorithm 1; update RMS 0.2, AdamW learning rates carry over).
        normalize: ``"rows"`` (paper: one second-moment entry per output neuron) or
            ``"larger_dim"`` (modded-nanogpt: along the larger of rows and columns).
        split_sizes: row counts of a fused projection (e.g. QKV stacked on dim 0), each block
            orthogonalized and scaled on its own; None treats the matrix as one (paper).
        layout: ``"auto"`` (2-D matrix, 3-D stack of matrices, 4-D/5-D conv kernel),
            ``"conv"`` (flatten (out, in, *k) to (out, in*k); needed for Conv1d) or ``"stacked"``.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: defaults of ``"adamw"`` groups.
        nonfinite_grads: ``"skip"`` (default): a parameter whose gradient has NaN/Inf is left
            untouched that step (parameter and state), counted in :attr:`nonfinite_skips`,
            without a host sync; ``"raise"``: FloatingPointError before anything is changed.
        process_group: replicated (DDP-style) parameters: ``"auto"`` uses the default process
            group when one is initialized with more than one rank (each rank updates ~1/W of the
            matrices and the results are all-gathered); None keeps every rank independent; or a
            ProcessGroup. DTensor (FSDP2) parameters use their own mesh whatever this says.
        comm_dtype: dtype of the momentum sent to a row-sharded matrix's owner: ``"auto"``
            (bfloat16 on CUDA, exact elsewhere), None (exact) or a torch.dtype.
    """

    _matrix_algorithm = "normuon"
    _neuron_norm = True
    _matrix_keys = frozenset(
        {
            "lr", "momentum", "beta2", "nesterov", "eps", "weight_decay", "ns_steps",
            "ns_coefficients", "ns_dtype", "update_scale", "normalize", "split_sizes", "layout",
        }
    )  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        beta2: float = 0.95,
        nesterov: bool = True,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: Any = "muon",
        ns_dtype: torch.dtype = torch.bfloat16,
        update_scale: str = "preserve_norm",
        normalize: str = "rows",
        split_sizes: Sequence[int] | None = None,
        layout: str = "auto",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite_grads: str = "skip",
        process_group: Any = "auto",
        comm_dtype: Any = "auto",
        orthogonalizer: NS.Orthogonalizer | None = None,
    ) -> None:
        matrix_defaults = dict(
            lr=lr, momentum=momentum, beta2=beta2, nesterov=nesterov, eps=eps,
            weight_decay=weight_decay, ns_steps=ns_steps, ns_coefficients=ns_coefficients,
            ns_dtype=ns_dtype, update_scale=update_scale, normalize=normalize,
            split_sizes=split_sizes, layout=layout,
        )  # fmt: skip
        adamw_defaults = dict(
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        super().__init__(
            params,
            matrix_defaults,
            adamw_defaults,
            nonfinite_grads,
            process_group,
            comm_dtype,
            orthogonalizer,
        )


class Muon(_MatrixOptimizer):
    r"""Muon (Jordan et al. 2024): momentum orthogonalized by Newton-Schulz; NorMuon's baseline.

    The same pipeline as :class:`NorMuon` without the per-neuron second moment::

        M <- beta1 M + (1 - beta1) G ;  U <- G.lerp(M, beta1) if nesterov else M
        O <- NS_k(U)
        D <- O * sqrt(max(1, m/n))       # update_scale="preserve_norm" (Keller Jordan's Muon)
             O * 0.2 sqrt(m n) / ||O||   # update_scale="adam_rms" (update RMS 0.2, Moonlight)
        W <- W (1 - lr weight_decay) - lr D

    Groups route with ``algorithm="muon"`` (default) or ``"adamw"``; options as in NorMuon,
    without ``beta2``, ``eps`` and ``normalize``. State per matrix: ``momentum_buffer`` only.
    """

    _matrix_algorithm = "muon"
    _neuron_norm = False
    _matrix_keys = frozenset(
        {
            "lr", "momentum", "nesterov", "weight_decay", "ns_steps", "ns_coefficients",
            "ns_dtype", "update_scale", "split_sizes", "layout",
        }
    )  # fmt: skip

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients: Any = "muon",
        ns_dtype: torch.dtype = torch.bfloat16,
        update_scale: str = "preserve_norm",
        split_sizes: Sequence[int] | None = None,
        layout: str = "auto",
        *,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        nonfinite_grads: str = "skip",
        process_group: Any = "auto",
        comm_dtype: Any = "auto",
        orthogonalizer: NS.Orthogonalizer | None = None,
    ) -> None:
        matrix_defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
            update_scale=update_scale, split_sizes=split_sizes, layout=layout,
        )  # fmt: skip
        adamw_defaults = dict(
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        super().__init__(
            params,
            matrix_defaults,
            adamw_defaults,
            nonfinite_grads,
            process_group,
            comm_dtype,
            orthogonalizer,
        )

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

from . import functional as F

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
            f"a parameter of shape {shape} is not a matrix: NorMuon/Muon groups take 2-D and larger "
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
    ) -> None:
        if nonfinite_grads not in _NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_grads must be one of {_NONFINITE_POLICIES}, got {nonfinite_grads!r}"
            )
        self.nonfinite_grads = nonfinite_grads
        self._matrix_defaults = matrix_defaults
        self._adamw_defaults = adamw_defaults
        self._skip_counter: torch.Tensor | None = None
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
        F.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        if group["ns_dtype"] not in _NS_DTYPES:
            raise ValueError(
                f"ns_dtype must be one of {[str(d) for d in _NS_DTYPES]}, got {group['ns_dtype']!r}"
            )
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

    # ---------------------------------------------------------------- non-finite gradients

    @property
    def nonfinite_skips(self) -> int:
        """How many (parameter, step) updates were skipped for a NaN/Inf gradient (host sync)."""
        return 0 if self._skip_counter is None else int(self._skip_counter.item())

    def _finite_flags(self, grads: list[torch.Tensor], what: list[str]) -> list[torch.Tensor]:
        """One 0-d bool tensor per gradient, True when every entry is finite (no host sync)."""
        if not grads:
            return []
        # The max-abs norm is NaN/Inf exactly when some entry is (one fused reduction per list).
        flags = [n.isfinite() for n in torch._foreach_norm(grads, ord=math.inf)]
        if self.nonfinite_grads == "raise":
            bad = [name for name, ok in zip(what, flags) if not bool(ok)]
            if bad:
                raise FloatingPointError(f"non-finite gradient in {', '.join(bad)}")
        else:
            bad_count = torch.stack([~f for f in flags]).sum()
            if self._skip_counter is None:
                self._skip_counter = torch.zeros((), dtype=torch.int64, device=bad_count.device)
            self._skip_counter += bad_count.to(self._skip_counter.device)
        return flags

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
        for gi, group in enumerate(self.param_groups):
            if group["algorithm"] == "adamw":
                self._adamw_step(gi, group)
            else:
                self._matrix_step(gi, group)
        return loss

    def _adamw_step(self, gi: int, group: dict[str, Any]) -> None:
        params, grads, names = [], [], []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            grads.append(self._grad_of(p, name))
            params.append(p)
            names.append(name)
        if not params:
            return
        ok = self._finite_flags(grads, names)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self._init_adamw_state(p) for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        # A skipped parameter sees its own state as the "gradient": lerp then leaves it unchanged.
        g_safe = [torch.where(f, g, m) for f, g, m in zip(ok, grads, exp_avgs)]
        g2_safe = [torch.where(f, g.square(), v) for f, g, v in zip(ok, grads, exp_avg_sqs)]
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
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, [-lr * f / bc for f, bc in zip(okf, bias_correction1)])
        torch._foreach_add_(params, update)

    def _matrix_step(self, gi: int, group: dict[str, Any]) -> None:
        params, grads, names = [], [], []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            grads.append(self._grad_of(p, name))
            params.append(p)
            names.append(name)
        if not params:
            return
        ok = self._finite_flags(grads, names)
        states = [self._init_matrix_state(p, group) for p in params]
        bufs = [s["momentum_buffer"] for s in states]
        beta1 = group["momentum"]

        # A skipped matrix uses its own momentum as the gradient: lerp leaves it unchanged and
        # the Newton-Schulz input stays finite. (B, ...) like the parameter, state dtype.
        g_safe = [torch.where(f, g, b) for f, g, b in zip(ok, grads, bufs)]
        torch._foreach_lerp_(bufs, g_safe, 1.0 - beta1)  # M <- beta1 M + (1 - beta1) G
        if group["nesterov"]:
            torch._foreach_lerp_(g_safe, bufs, beta1)  # U = (1 - beta1) G + beta1 M, in place
            updates = g_safe
        else:
            updates = bufs  # read only from here on: Newton-Schulz never writes its input

        geos = [self._geometry(p, group) for p in params]
        # Bucket every row block by shape so that same-shaped matrices share one batched NS.
        buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, geo in enumerate(geos):
            for bi, (start, stop) in enumerate(geo.row_blocks):
                buckets.setdefault((stop - start, geo.cols), []).append((i, bi))

        coefficients = F.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            decay = [
                1.0 - (lr * wd) * f.to(F.accum_dtype(p.dtype)) for f, p in zip(ok, params)
            ]
            torch._foreach_mul_(params, decay)

        for (m, n), members in buckets.items():
            blocks = []
            for i, bi in members:
                geo = geos[i]
                start, stop = geo.row_blocks[bi]
                blocks.append(updates[i].view(geo.batch, geo.rows, geo.cols)[:, start:stop])
            stacked = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # (sum B, m, n)
            ortho = F.newton_schulz(stacked, coefficients, group["ns_dtype"])
            sizes = [geos[i].batch for i, _ in members]
            okf = torch.cat(
                [ok[i].to(F.accum_dtype(ortho.dtype)).expand(geos[i].batch) for i, _ in members]
            )  # (sum B,)
            if self._neuron_norm:
                factors, dim = self._normuon_factors(group, members, geos, states, ok, ortho, m, n)
            else:
                scale = F.muon_scale(ortho, group["update_scale"])  # (sum B,)
                factors, dim = scale.unsqueeze(-1), -1
            factors = factors * okf.unsqueeze(-1)
            for (i, bi), o_part, g_part in zip(
                members, ortho.split(sizes), factors.split(sizes)
            ):
                geo = geos[i]
                start, stop = geo.row_blocks[bi]
                target = params[i].view(geo.batch, geo.rows, geo.cols)[:, start:stop]
                F.apply_matrix_update(target, o_part, g_part, dim, lr)

    def _normuon_factors(self, group, members, geos, states, ok, ortho, m, n):
        """Update v for a bucket and return the per-neuron factors g (sum B, L) and the axis."""
        dim = F.reduce_dim(m, n, group["normalize"])
        r = F.neuron_mean_square(ortho, dim)  # (sum B, L)
        v_views, ok_rows = [], []
        for i, bi in members:
            v_views.append(self._neuron_slice(states[i], geos[i], bi, group["normalize"]))
            ok_rows.append(ok[i].expand(geos[i].batch, 1))
        v = torch.cat(v_views) if len(v_views) > 1 else v_views[0].clone()
        okb = torch.cat(ok_rows)  # (sum B, 1)
        v = torch.lerp(v, torch.where(okb, r, v), 1.0 - group["beta2"])  # v <- beta2 v + (1-beta2) r
        offset = 0
        for view in v_views:
            view.copy_(v[offset : offset + view.shape[0]])
            offset += view.shape[0]
        factors = F.normuon_row_factors(r, v, group["eps"], m, n, dim, group["update_scale"])
        return factors, (-1 if dim == -1 else -2)

    @staticmethod
    def _neuron_slice(state, geo: MatrixGeometry, block: int, normalize: str) -> torch.Tensor:
        """View (B, L_block) of the second moment belonging to one row block."""
        v = state["neuron_second_moment"].view(geo.batch, geo.neurons)
        offset = 0
        for bi, (start, stop) in enumerate(geo.row_blocks):
            m_block = stop - start
            length = m_block if F.reduce_dim(m_block, geo.cols, normalize) == -1 else geo.cols
            if bi == block:
                return v[:, offset : offset + length]
            offset += length
        raise IndexError(block)


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
        super().__init__(params, matrix_defaults, adamw_defaults, nonfinite_grads)


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
    ) -> None:
        matrix_defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            ns_steps=ns_steps, ns_coefficients=ns_coefficients, ns_dtype=ns_dtype,
            update_scale=update_scale, split_sizes=split_sizes, layout=layout,
        )  # fmt: skip
        adamw_defaults = dict(
            lr=adamw_lr, betas=adamw_betas, eps=adamw_eps, weight_decay=adamw_weight_decay
        )
        super().__init__(params, matrix_defaults, adamw_defaults, nonfinite_grads)

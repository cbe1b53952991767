"""One optimizer step, top to bottom: every group's parameters through their algorithm.

The optimizer class (:mod:`normuon.optimizer`) keeps what torch.optim asks of it (groups, state,
state dicts, hooks) and hands each ``step()`` to a :class:`StepPipeline`. A matrix group's step
is one sequence over its planned batches (:mod:`normuon.step_plan`)::

    finite flags   -> which gradients count (NaN/Inf skipped, or masked on the device)
    momentum, U    -> local blocks: in the batch's input buffer; sharded blocks: sent to owners
    Newton-Schulz  -> O, in place of U, one batch of same-shaped blocks at a time
    factors        -> NorMuon's per-neuron rescale (second moment updated) or Muon's scale
    apply          -> W <- W - lr (weight_decay M W + D), M = 1 or the cautious mask,
                      in one function (:func:`update_weights_`), for every placement
    return         -> an owner's D back to the ranks holding each block, applied there

Where a parameter lives is its plan's placement object (:mod:`normuon.distributed.placement`):
the pipeline asks it, never a kind string. The math is :mod:`normuon.functional` and
:mod:`normuon.newton_schulz`; data moves through the :class:`~normuon.distributed.Distributor`.
Nothing here reads a tensor's value on the host (but the finite flags of CPU tensors with
``host_reads="auto"``, and ``nonfinite_grads="raise"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import functional as F
from . import newton_schulz as NS
from . import ns_kernels
from .distributed.distributor import Distributor, OwnedMatrix
from .distributed.plan import ParamPlan, local_tensor
from .finite import FiniteCheck, NonfiniteGuard
from .geometry import second_moment_key
from .options import ROUNDING_STEP, group_ns_dtype
from .step_plan import BlockBatch, MatrixBlock, Workspace

__all__ = [
    "LocalMatrix", "MatrixHyper", "Rounding", "StepPipeline", "StepTensors", "update_weights_",
]


@dataclass(frozen=True)
class Rounding:
    """One step's stochastic rounding of a matrix group's bf16 momentum: its bits are
    :func:`normuon.functional.rounding_noise` at (``step``, key of (``group``, parameter, row)),
    or drawn from the workspace's generator (``draw``: a step prepared for capture)."""

    group: int = 0
    step: int = 0
    draw: bool = False


@dataclass(frozen=True)
class MatrixHyper:
    """A matrix group's options, resolved once per step into what the step reads (Tensor
    values stay on the device; no dict lookups by string below this point)."""

    lr: F.Scalar
    weight_decay: F.Scalar
    momentum: F.Scalar
    beta2: F.Scalar
    eps: F.Scalar
    nesterov: bool
    update_scale: str
    coefficients: tuple[NS.Coefficients, ...]
    ns_dtype: torch.dtype
    orthogonalizer: Callable[..., torch.Tensor] | None
    neuron_norm: bool
    #: decay only where D * W >= 0 (:func:`normuon.functional.cautious_decay_`)
    cautious: bool = False
    #: NorMuon (Front): the per-neuron rescale of the Newton-Schulz input, not of its output
    normalize_input: bool = False
    #: NorMuon's rescale for blocks with more rows than columns only; Muon for the others
    tall_only: bool = False
    #: this step's stochastic rounding of bf16 momentum (set after :meth:`of`)
    rounding: Rounding | None = None

    def rescales(self, m: int, n: int) -> bool:
        """Whether (m, n) blocks get NorMuon's per-neuron rescale (else Muon's update)."""
        return self.neuron_norm and (not self.tall_only or m > n)

    @classmethod
    def of(cls, group: dict[str, Any], device: torch.device, ns_dtype: torch.dtype,
           orthogonalizer, neuron_norm: bool) -> MatrixHyper:  # fmt: skip
        """From a param group: Tensor values as 0-d tensors on ``device`` (a no-op when they
        live there, as they must for a sync-free step)."""

        def value(key: str, default: Any = 0.0) -> F.Scalar:
            return F.device_scalar(group.get(key, default), device)

        return cls(
            lr=value("lr"), weight_decay=value("weight_decay"), momentum=value("momentum"),
            beta2=value("beta2"), eps=value("eps"), nesterov=group["nesterov"],
            update_scale=group["update_scale"],
            coefficients=NS.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"]),
            ns_dtype=ns_dtype, orthogonalizer=orthogonalizer, neuron_norm=neuron_norm,
            cautious=group.get("cautious_weight_decay", False),
            normalize_input=group.get("normalize_input", False),
            tall_only=group.get("normalize_matrices", "all") == "tall",
        )  # fmt: skip


@dataclass(frozen=True)
class LocalMatrix:
    """A matrix parameter this rank updates in place: its local tensors for this step."""

    param: torch.Tensor
    grad: torch.Tensor
    momentum: torch.Tensor
    second_moment: torch.Tensor | None


@dataclass
class StepTensors:
    """What one step's blocks read and write, by parameter index in the group.

    Attributes:
        local: matrices updated from their own tensors (one process, DDP owners, DTensors
            holding whole matrices).
        owned: sharded matrices assembled on this rank, their owner.
        ok: finite flag per parameter (0-d bool tensors), or None: nothing to mask.
        pending: parameters that cannot be viewed as (B, m, n) stacks in place (non-contiguous):
            (geometry, their (B, m, n) update D), assembled across batches, applied at the end.
    """

    local: dict[int, LocalMatrix]
    owned: dict[int, OwnedMatrix]
    ok: dict[int, torch.Tensor] | None
    pending: dict[int, tuple[Any, torch.Tensor]]

    def present(self, block: MatrixBlock) -> bool:
        return block.index in (self.owned if block.owned else self.local)

    def flag(self, index: int) -> torch.Tensor | None:
        return None if self.ok is None else self.ok[index]

    def second_moment(self, block: MatrixBlock) -> torch.Tensor:
        """(B, L) view of the block's second-moment entries ((B, m, n) for one per weight)."""
        v = (self.owned if block.owned else self.local)[block.index].second_moment
        if block.reduce_dim is None:  # normalize="elements": shaped like the parameter
            return block.plan.geometry.as_matrices(v)[:, block.row_slice]
        return v.view(block.stack, -1)[:, block.moment[0] : block.moment[1]]


# ------------------------------------------------------------------------------- the update


def update_weights_(
    targets: Sequence[torch.Tensor],
    o: Sequence[torch.Tensor],
    g: Sequence[torch.Tensor | None],
    flags: Sequence[torch.Tensor | None],
    hyper: MatrixHyper,
) -> None:
    """W <- W - lr (weight_decay M W + D) for every target: the one place where a matrix
    group's learning rate and weight decay meet its weights, whatever the placement.

    ``targets[i]`` is a (B, m, n) view of a parameter's rows, or a whole parameter; its update
    is D = o[i] * g[i] (per-neuron or per-matrix factors, shaped to broadcast), or o[i] itself
    where g[i] is None (an update formed elsewhere: an owner's, or a parameter-shaped one).
    M is 1, or I(D W >= 0) with ``cautious_weight_decay`` (W as it was before the step).
    ``flags[i]`` (0-d bool, or None) False: that target is left as it was (its g is already 0,
    and its decay is skipped).
    """
    if not targets:
        return
    masks = None if all(f is None for f in flags) else list(flags)
    if hyper.cautious:  # the mask needs each update's sign, so D is formed per target
        for target, oi, gi, flag in zip(targets, o, g, flags):
            update = oi if gi is None else oi * gi
            F.cautious_decay_(target, update, flag, hyper.lr, hyper.weight_decay)
    else:
        F.decay_(list(targets), masks, hyper.lr, hyper.weight_decay)
    factored = [i for i, gi in enumerate(g) if gi is not None]
    if factored:  # one foreach addcmul over every (B, m, n) view
        F.apply_updates_([targets[i] for i in factored], [o[i] for i in factored],
                         [g[i] for i in factored], hyper.lr)  # fmt: skip
    for i, gi in enumerate(g):
        if gi is None:
            F.sub_scaled_(targets[i], o[i], hyper.lr)


# ------------------------------------------------------------------------------- the pipeline


class StepPipeline:
    """Runs ``step()`` for an optimizer: owns what a step uses and is not saved (the workspace,
    the distributor, the non-finite guard) and reads the optimizer's options and state.

    The optimizer supplies, through ``owner``: ``param_groups``, ``state``, its options
    (``nonfinite_grads``, ``host_reads``, ``comm_dtype``, ``orthogonalizer``, ``ns_kernel``),
    ``_neuron_norm``, ``_init_state(p, plan, group)`` and ``_ns_dtype(requested, device)``.
    """

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.guard = NonfiniteGuard()
        self.distributor = Distributor()
        self.workspace = Workspace()
        # (ns_kernel, m, n, count, iteration dtype, device type, steps) -> (kernel, chunk) of
        # the buckets this optimizer has run: plain constants, so a traced step reads them.
        self.kernels: dict[tuple, tuple[str, int]] = {}
        # The same keys -> the full choice (timings included), for reports.
        self.kernel_choices: dict[tuple, ns_kernels.KernelChoice] = {}

    # --------------------------------------------------------------------- the whole step

    def step(self, plans: list[list[ParamPlan]], batches: list[tuple[BlockBatch, ...]],
             capture_flags: dict[int, torch.Tensor] | None) -> None:  # fmt: skip
        """Every group once; ``capture_flags``: a captured step's has-grad flag per parameter
        id (see :meth:`normuon.NorMuon.prepare_capture`), or None."""
        opt = self.owner
        if opt.nonfinite_grads == "raise":
            self._raise_on_nonfinite(plans)
        for index, (group, group_plans, group_batches) in enumerate(
            zip(opt.param_groups, plans, batches)
        ):
            if group["algorithm"] == "adamw":
                self.adamw_group(group, group_plans, capture_flags)
            else:
                self.matrix_group(group, group_plans, group_batches, capture_flags, index)
        self._sync_replicas(plans)

    # --------------------------------------------------------------------- matrix groups

    def matrix_group(self, group: dict[str, Any], plans: list[ParamPlan],
                     batches: tuple[BlockBatch, ...], capture_flags,
                     index: int = 0) -> None:  # fmt: skip
        """One matrix group (``param_groups[index]``): gradients -> momentum and U -> (owners)
        -> Newton-Schulz -> factors -> weights updated -> (blocks back to their ranks, updated
        there)."""
        opt = self.owner
        # Counted before anything can return: every rank, with gradients or not.
        rounding = self._rounding_of(group, index, capture_flags is not None)
        for plan in plans:  # every rank holds the same state keys (DCP), grad or not
            if plan.placement.state_everywhere(group["params"][plan.index]):
                opt._init_state(group["params"][plan.index], plan, group)
        entries, masks = self._collect(group, plans, capture_flags)
        if not entries:
            return
        matrices = [self._local_matrix(group, plan, p, g) for plan, p, g in entries]
        ok = None if masks is None else {plan.index: f for (plan, _, _), f in zip(entries, masks)}
        device = matrices[0].param.device
        hyper = MatrixHyper.of(group, device, opt._ns_dtype(group_ns_dtype(group), device),
                               opt.orthogonalizer, opt._neuron_norm)  # fmt: skip
        hyper = replace(hyper, rounding=rounding)
        pairs = [(plan, m) for (plan, _, _), m in zip(entries, matrices)]
        sharded = [(plan, m) for plan, m in pairs if plan.placement.assembled_on_owner]
        local = {plan.index: m for plan, m in pairs if not plan.placement.assembled_on_owner}
        # 1. Sharded matrices: this rank's blocks of momentum and U, sent to their owners.
        owned = self._send_to_owners(sharded, ok, hyper)
        tensors = StepTensors(local, {o.plan.index: o for o in owned}, ok, {})
        # 2. Batch by batch: U, Newton-Schulz, factors; local weights updated.
        for batch in batches:
            self._run_batch(batch, tensors, hyper)
        # 3. Parameters whose update was assembled parameter-shaped: applied now.
        indices = sorted(tensors.pending)
        update_weights_(
            [local[i].param for i in indices],
            [geometry.from_matrices(d) for geometry, d in (tensors.pending[i] for i in indices)],
            [None] * len(indices), [tensors.flag(i) for i in indices], hyper,
        )  # fmt: skip
        # 4. Owners' updates back to every rank's blocks, applied there.
        self._return_from_owners(sharded, owned, ok, hyper)

    def _rounding_of(self, group: dict[str, Any], index: int, draw: bool) -> Rounding:
        """This step's stochastic rounding in matrix group ``index``; counts its step.

        The step is the group's ``rounding_step``, advanced here at every eager step of a group
        with bf16 momentum, on every rank and whether or not the group has gradients, so that it
        is the same wherever and whenever the group is stepped. A step prepared for capture
        (``draw``) leaves it: it draws its bits from a generator."""
        step = group.get(ROUNDING_STEP, 0)
        if group.get("state_dtype") == "bfloat16" and not draw:
            group[ROUNDING_STEP] = step + 1
        return Rounding(index, step, draw)

    def _rounding_scratch(self, like: torch.Tensor, hyper: MatrixHyper, param: int, row: int):
        """The ``rounding`` of one bf16 momentum block (``like``: its float32 update), its bits
        keyed by (group index, parameter index, first row) and the group's step."""
        rounding = hyper.rounding
        key = F.rounding_key(rounding.group, param, row)
        return self.workspace.rounding_scratch(like, rounding.step, key, rounding.draw)

    def _local_matrix(self, group: dict, plan: ParamPlan, p, grad) -> LocalMatrix:
        state = self.owner._init_state(p, plan, group)
        v = state.get(second_moment_key(group.get("normalize", "rows")))
        return LocalMatrix(local_tensor(p), grad, local_tensor(state["momentum_buffer"]),
                           None if v is None else local_tensor(v))  # fmt: skip

    def _send_to_owners(self, sharded, ok, hyper: MatrixHyper) -> list[OwnedMatrix]:
        """Momentum and U of this rank's blocks of sharded matrices, sent to their owners;
        returns the matrices this rank owns, assembled."""
        if not sharded:
            return []
        inputs = []
        for plan, m in sharded:
            # This rank's block of U, kept until the exchange has sent it (one per parameter).
            u = self.workspace.flat(f"sharded_input_{plan.index}",
                                    F.accum_dtype(m.momentum.dtype), m.momentum.device,
                                    m.momentum.numel()).view(m.momentum.shape)  # fmt: skip
            flag = None if ok is None else ok[plan.index]
            # A bf16 momentum (state_dtype): updated in float32, stored stochastically rounded.
            rounding = (None if m.momentum.dtype == u.dtype
                        else self._rounding_scratch(u, hyper, plan.index, 0))  # fmt: skip
            F.momentum_and_input_(m.momentum, m.grad, flag, hyper.momentum, hyper.nesterov, u,
                                  rounding)  # fmt: skip
            inputs.append(u)
        return self.distributor.gather(
            [plan for plan, _ in sharded], inputs, [m.second_moment for _, m in sharded],
            self.owner.comm_dtype, self.workspace.flat,
        )  # fmt: skip

    def _return_from_owners(self, sharded, owned: list[OwnedMatrix], ok,
                            hyper: MatrixHyper) -> None:  # fmt: skip
        """Every rank's block of the owners' updates (and new second moments), applied."""
        if not sharded:
            return
        returned = self.distributor.scatter(
            [plan for plan, _ in sharded], owned, [m.param for _, m in sharded],
            [m.second_moment for _, m in sharded], self.owner.comm_dtype, self.workspace.flat,
        )  # fmt: skip
        targets, updates, flags = [], [], []
        for (plan, m), (update_block, v_block) in zip(sharded, returned):
            if update_block.numel():
                targets.append(m.param)
                updates.append(update_block)
                flags.append(None if ok is None else ok[plan.index])
            if v_block is not None and v_block.numel():
                m.second_moment.copy_(v_block)
        update_weights_(targets, updates, [None] * len(targets), flags, hyper)

    # --------------------------------------------------------------------- one batch

    def _run_batch(self, batch: BlockBatch, tensors: StepTensors, hyper: MatrixHyper) -> None:
        """Orthogonalize, scale and apply the blocks of ``batch`` that have a gradient."""
        members = [block for block in batch.blocks if tensors.present(block)]
        if not members:
            return
        stack = sum(block.stack for block in members)
        # (stack, m, n): U is written here, overwritten by O, then read by the factors.
        u = self.workspace.flat("input", batch.dtype, batch.device, stack * batch.m * batch.n)
        u = u.view(stack, batch.m, batch.n)
        self._write_inputs(members, tensors, hyper, u)
        ok = _batch_ok(members, tensors)
        rescale = hyper.rescales(batch.m, batch.n)
        dim = batch.reduce_dim
        if rescale and hyper.normalize_input:  # NorMuon (Front): rescale U, then Muon
            moments, stacked = _stacked_moments(members, tensors)
            F.rescale_input_(u, stacked, ok, hyper.beta2, hyper.eps, dim)
            _write_back(moments, stacked, members)
            rescale = False
        self._orthogonalize_(u, hyper)
        factors = _factors(members, tensors, hyper, u, ok, dim, rescale)
        if factors.ndim == 2:  # (B, L) per neuron along dim, or (B, 1) per matrix
            factors = factors.unsqueeze(-1 if dim is None else dim)
        _apply(members, tensors, hyper, u, factors)

    def _write_inputs(self, members: Sequence[MatrixBlock], tensors: StepTensors,
                      hyper: MatrixHyper, u: torch.Tensor) -> None:  # fmt: skip
        """U of every member into its rows of ``u``; local matrices update their momentum."""
        pos = 0
        for block in members:
            out = u[pos : pos + block.stack]
            pos += block.stack
            geometry, rows = block.plan.geometry, block.row_slice
            if block.owned:
                out.copy_(geometry.as_matrices(tensors.owned[block.index].u)[:, rows])
                continue
            local = tensors.local[block.index]
            momentum = geometry.as_matrices(local.momentum)[:, rows]
            grad = geometry.as_matrices(local.grad)[:, rows]
            # A bf16 momentum (state_dtype) is updated in float32 and stored rounded.
            rounding = (None if momentum.dtype == out.dtype
                        else self._rounding_scratch(out, hyper, block.index,
                                                      block.rows[0]))  # fmt: skip
            F.momentum_and_input_(momentum, grad, tensors.flag(block.index), hyper.momentum,
                                  hyper.nesterov, out, rounding)  # fmt: skip

    def _orthogonalize_(self, u: torch.Tensor, hyper: MatrixHyper) -> None:
        """O = NS(U), written over U. The default iteration runs in the workspace's scratch."""
        if hyper.orthogonalizer is not None:
            u.copy_(hyper.orthogonalizer(u, hyper.coefficients, hyper.ns_dtype))
            return
        count, m, n = u.shape
        kernel, chunk = self.kernel_for(m, n, count, hyper.ns_dtype, hyper.coefficients,
                                        u.device, u.dtype)  # fmt: skip
        numel = NS.NSScratch.numel(chunk, m, n)
        flat = self.workspace.flat("newton_schulz", hyper.ns_dtype, u.device, numel)
        scratch = NS.NSScratch.carve(flat, chunk, m, n)
        NS.newton_schulz_(u, hyper.coefficients, scratch, kernel=kernel)

    def kernel_for(self, m: int, n: int, count: int, dtype: torch.dtype, coefficients,
                   device: torch.device, input_dtype: torch.dtype):  # fmt: skip
        """(kernel, chunk) of a bucket of ``count`` (m, n) matrices iterated in ``dtype``:
        decided once (:func:`normuon.ns_kernels.choose`, which times the candidates the first
        time this process sees the bucket with ``ns_kernel="auto"``), then read from a dict.

        The optimizer decides every planned bucket when its plans are built (and again in
        ``prepare_capture`` and ``ns_kernel_choices``), so a step only reads the dict; a
        bucket first met inside a traced step (``torch.compile``) is not timed there: it runs
        the shape rule, undecided."""
        mode = self.owner.ns_kernel
        key = _kernel_key(mode, m, n, count, dtype, device, coefficients)
        found = self.kernels.get(key)
        if found is not None:
            return found
        if torch.compiler.is_compiling():
            rule = ns_kernels.shape_rule(m, n, count, dtype, device.type)
            return (mode if mode in NS.KERNELS else rule.kernel), rule.chunk
        choice = self._choice_for(m, n, count, dtype, coefficients, device, input_dtype)
        return choice.kernel, choice.candidate.chunk

    def _choice_for(self, m: int, n: int, count: int, dtype: torch.dtype, coefficients,
                    device: torch.device, input_dtype: torch.dtype) -> ns_kernels.KernelChoice:
        """The bucket's full choice (timings included): the one kept, or made now and kept
        unless it could not be timed here (meta, a capture: the shape rule, not kept)."""
        mode = self.owner.ns_kernel
        key = _kernel_key(mode, m, n, count, dtype, device, coefficients)
        kept = self.kernel_choices.get(key)
        if kept is not None:
            return kept
        choice = ns_kernels.choose(mode, m, n, count, dtype, device, coefficients, input_dtype)
        if choice.source != "shape" or mode == "shape":
            self.kernels[key] = (choice.kernel, choice.candidate.chunk)
            self.kernel_choices[key] = choice
        return choice

    def plan_kernels(self, batches: list[tuple[BlockBatch, ...]]) -> list[ns_kernels.KernelChoice]:
        """Decide the kernel of every planned batch (all members present), timing the
        candidates of buckets this process has not seen (``ns_kernel="auto"``); returns the
        choice of each batch, in plan order (batches of one bucket share theirs). Empty with a
        custom ``orthogonalizer``."""
        opt = self.owner
        if opt.orthogonalizer is not None:
            return []
        chosen: list[ns_kernels.KernelChoice] = []
        for group, group_batches in zip(opt.param_groups, batches):
            if group["algorithm"] == "adamw" or not group_batches:
                continue
            requested = group_ns_dtype(group)
            coefficients = NS.resolve_ns_coefficients(group["ns_coefficients"],
                                                      group["ns_steps"])  # fmt: skip
            for batch in group_batches:
                dtype = opt._ns_dtype(requested, batch.device)
                count = sum(block.stack for block in batch.blocks)
                chosen.append(self._choice_for(batch.m, batch.n, count, dtype, coefficients,
                                               batch.device, batch.dtype))  # fmt: skip
        return chosen

    # --------------------------------------------------------------------- AdamW groups

    def adamw_group(self, group: dict[str, Any], plans: list[ParamPlan], capture_flags) -> None:
        """Bias-corrected AdamW with decoupled weight decay over the group's parameters."""
        entries, ok = self._collect(group, plans, capture_flags)
        if not entries:
            return
        grads = [g for _, _, g in entries]
        states = [self.owner._init_state(p, plan, group) for plan, p, _ in entries]
        beta1, beta2 = group["betas"]
        if "momentum" in group:  # a scheduler cycling momentum drives beta1 (optimizer.py)
            beta1 = group["momentum"]
            group["betas"] = (beta1, beta2)
        device = grads[0].device
        on_device = lambda v: F.device_scalar(v, device)  # noqa: E731
        F.adamw_step_(
            [local_tensor(p) for _, p, _ in entries],
            grads,
            [local_tensor(s["exp_avg"]) for s in states],
            [local_tensor(s["exp_avg_sq"]) for s in states],
            [s["step"] for s in states],
            ok,
            F.AdamWHyper(
                lr=on_device(group["lr"]), beta1=on_device(beta1), beta2=on_device(beta2),
                eps=on_device(group["eps"]), weight_decay=on_device(group["weight_decay"]),
                cautious=group.get("cautious_weight_decay", False),
            ),
        )  # fmt: skip

    # --------------------------------------------------------------------- gradients

    def _collect(self, group: dict, plans: list[ParamPlan], capture_flags):
        """The parameters this rank updates that have a gradient, and what to do about
        non-finite ones.

        Returns ((plan, param, local grad) entries, masks): the entries whose gradient the
        host-read flags found non-finite are dropped; masks are one 0-d bool tensor per kept
        entry to mask with (device path), or None.
        """
        opt = self.owner
        entries = []
        for plan in plans:
            p = group["params"][plan.index]
            if p.grad is None or not plan.placement.updated_here(plan):
                continue
            entries.append((plan, p, local_tensor(_grad_of(p, plan.name))))
        if not entries or opt.nonfinite_grads == "raise":  # raise: checked before the step
            return entries, None
        chosen = [plan for plan, _, _ in entries]
        present = None
        if capture_flags is not None:  # a captured step: which parameters have a gradient
            # A parameter added after the capture has no flag yet: it has its gradient.
            present = [capture_flags[id(p)] if id(p) in capture_flags
                       else torch.ones((), dtype=torch.bool, device=g.device)
                       for _, p, g in entries]  # fmt: skip
        check: FiniteCheck = self.guard.check([g for _, _, g in entries], self._combine(chosen),
                                              opt.host_reads, present)  # fmt: skip
        if check.keep is not None:
            entries = [e for e, finite in zip(entries, check.keep) if finite]
        return entries, check.masks

    def _combine(self, plans: list[ParamPlan]):
        """The guard's ``combine``: finite flags agreed over each DTensor's mesh."""
        return lambda flags: self.distributor.combine_flags(flags, plans)

    def _raise_on_nonfinite(self, plans: list[list[ParamPlan]]) -> None:
        """``nonfinite_grads="raise"``: check every gradient of every group before any change."""
        grads, chosen = [], []
        for group, group_plans in zip(self.owner.param_groups, plans):
            for plan in group_plans:
                p = group["params"][plan.index]
                if p.grad is not None:
                    grads.append(local_tensor(_grad_of(p, plan.name)))
                    chosen.append(plan)
        self.guard.raise_on_nonfinite(grads, [plan.name for plan in chosen],
                                      self._combine(chosen))  # fmt: skip

    def _sync_replicas(self, plans: list[list[ParamPlan]]) -> None:
        """Replicated placements: every rank receives the parameters the others updated."""
        tensors, chosen = [], []
        for group, group_plans in zip(self.owner.param_groups, plans):
            for plan in group_plans:
                p = group["params"][plan.index]
                if plan.placement.synced_after_step and p.grad is not None:
                    tensors.append(p)
                    chosen.append(plan)
        self.distributor.sync_replicated(tensors, chosen, self.workspace.flat)


def _kernel_key(mode: str, m: int, n: int, count: int, dtype: torch.dtype,
                device: torch.device, coefficients) -> tuple:  # fmt: skip
    return (mode, m, n, count, dtype, device.type, len(coefficients))


def _grad_of(p: torch.Tensor, where: str) -> torch.Tensor:
    g = p.grad
    if g.is_sparse:
        raise TypeError(f"{where} has a sparse gradient; sparse gradients are not supported")
    if g.shape != p.shape:
        raise ValueError(f"{where}: gradient shape {tuple(g.shape)} != {tuple(p.shape)}")
    return g


# ------------------------------------------------------------------------------- batch helpers


def _batch_ok(members: Sequence[MatrixBlock], tensors: StepTensors) -> torch.Tensor | None:
    """(stack,) finite flags of the batch's matrices, or None: nothing to mask."""
    if tensors.ok is None:
        return None
    return torch.cat([tensors.flag(b.index).reshape(1).expand(b.stack) for b in members])


def _stacked_moments(members: Sequence[MatrixBlock], tensors: StepTensors):
    """(the members' second-moment views, one stack of them): the views themselves when there
    is one member, else a copy to be written back with :func:`_write_back`."""
    moments = [tensors.second_moment(block) for block in members]
    return moments, (moments[0] if len(moments) == 1 else torch.cat(moments))


def _write_back(moments, stacked: torch.Tensor, members: Sequence[MatrixBlock]) -> None:
    if len(moments) > 1:
        torch._foreach_copy_(moments, list(stacked.split([b.stack for b in members])))


def _factors(
    members: Sequence[MatrixBlock],
    tensors: StepTensors,
    hyper: MatrixHyper,
    o: torch.Tensor,
    ok: torch.Tensor | None,
    dim: int | None,
    rescale: bool,
) -> torch.Tensor:
    """Factors of the whole batch at once: (stack, L) per neuron, (stack, m, n) per weight
    (``rescale``: NorMuon, whose second moments are gathered into one stack and written back)
    or (stack, 1) per matrix (Muon). ``ok``: the batch's (stack,) finite flags, or None."""
    if not rescale:
        return F.muon_factors(o, ok, hyper.update_scale)
    moments, stacked = _stacked_moments(members, tensors)
    factors = F.normuon_factors_(
        o, stacked, ok, hyper.beta2, hyper.eps, dim, hyper.update_scale
    )
    _write_back(moments, stacked, members)
    return factors


def _apply(
    members: Sequence[MatrixBlock],
    tensors: StepTensors,
    hyper: MatrixHyper,
    o: torch.Tensor,
    factors: torch.Tensor,
) -> None:
    """Local blocks: their weights updated (:func:`update_weights_`). An owner's blocks: D = O g
    into the assembled update, sent back later. Non-contiguous parameters: D into their
    parameter-shaped pending update, applied once every block of them is done."""
    targets, blocks, block_factors, flags = [], [], [], []
    pos = 0
    for block in members:
        o_block, g_block = o[pos : pos + block.stack], factors[pos : pos + block.stack]
        pos += block.stack
        geometry, rows = block.plan.geometry, block.row_slice
        if block.owned:
            update = geometry.as_matrices(tensors.owned[block.index].update)[:, rows]
            torch.mul(o_block, g_block, out=update)
            continue
        param = tensors.local[block.index].param
        if param.is_contiguous():
            targets.append(geometry.as_matrices(param)[:, rows])
            blocks.append(o_block)
            block_factors.append(g_block)
            flags.append(tensors.flag(block.index))
            continue
        # Cannot be viewed as matrices in place: D goes into a parameter-shaped update.
        if block.index not in tensors.pending:
            tensors.pending[block.index] = (geometry, torch.zeros(
                (geometry.batch, geometry.rows, geometry.cols), dtype=o_block.dtype,
                device=param.device))  # fmt: skip
        torch.mul(o_block, g_block, out=tensors.pending[block.index][1][:, rows])
    update_weights_(targets, blocks, block_factors, flags, hyper)

"""The one object through which the optimizer's step moves data between ranks. No math.

The optimizer decides what to compute; the :class:`Distributor` decides how tensors travel:
wire dtypes, packing, which blocks go where, the shapes that come back, and how distributed
state (DTensors) is created. In one process every method is a cheap pass-through, so one
optimizer class serves world size 1 and W (``docs/distributed.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..functional import accum_dtype
from . import comm
from .plan import ParamPlan, is_dtensor, local_tensor
from .sharded import gather_to_owners, scatter_from_owners

__all__ = ["Distributor", "OwnedMatrix"]


class OwnedMatrix:
    """A sharded matrix assembled on this rank, its owner, for one step.

    Attributes:
        plan: the parameter's plan (``plan.owner`` is this rank).
        u: Newton-Schulz input U with the parameter's full shape (wire dtype).
        second_moment: NorMuon's full second moment (None for Muon), updated in place.
        update: the full update D (accumulation dtype), written by the step, sent back.
    """

    __slots__ = ("plan", "u", "second_moment", "update")

    def __init__(self, plan: ParamPlan, u: torch.Tensor, second_moment: torch.Tensor | None,
                 update: torch.Tensor) -> None:  # fmt: skip
        self.plan = plan
        self.u = u
        self.second_moment = second_moment
        self.update = update


class Distributor:
    """Moves the step's data for sharded (FSDP2 / TP) and replicated (DDP) parameters.

    Stateless: what the wire carries comes with each call (the optimizer's ``comm_dtype``
    option: ``"auto"``, bf16 on CUDA and exact elsewhere; None, exact; or a dtype), so changing
    the option on a live optimizer takes effect at the next step.
    """

    # ------------------------------------------------------------------ finite flags

    def combine_flags(
        self, flags: list[torch.Tensor], plans: Sequence[ParamPlan]
    ) -> list[torch.Tensor]:
        """Each DTensor parameter's flag agreed over its mesh (one all_reduce MIN per mesh), so
        that a NaN in one rank's block skips the whole matrix everywhere."""
        by_group: dict[int, list[int]] = {}
        for i, plan in enumerate(plans):
            if plan.placement.agrees_flags and plan.group is not None:
                by_group.setdefault(id(plan.group), []).append(i)
        flags = list(flags)
        for members in by_group.values():
            stacked = torch.stack([flags[i] for i in members]).to(torch.float32)
            comm.packed_all_reduce_([stacked], plans[members[0]].group, op=dist.ReduceOp.MIN)
            for k, i in enumerate(members):
                flags[i] = stacked[k] > 0
        return flags

    # ------------------------------------------------------------------ sharded matrices

    @staticmethod
    def wire_dtype(device: torch.device, dtype: torch.dtype, comm_dtype: Any) -> torch.dtype:
        """dtype of U and D on the wire for tensors of ``dtype`` on ``device``."""
        return comm.wire_dtype_for(device, comm_dtype) or dtype

    def gather(
        self,
        plans: Sequence[ParamPlan],
        inputs: Sequence[torch.Tensor],
        second_moments: Sequence[torch.Tensor | None],
        comm_dtype: Any,
        buffers: comm.Buffers = comm.fresh_buffers,
    ) -> list[OwnedMatrix]:
        """Send every rank's block of U (and of the second moment) to the matrix's owner; returns
        the matrices this rank owns, assembled (one all_to_all per mesh). ``buffers`` holds the
        traffic, the assembled matrices and their update buffers (the optimizer's workspace)."""
        wire = self.wire_dtype(inputs[0].device, inputs[0].dtype, comm_dtype)
        full = gather_to_owners(plans, inputs, second_moments, wire, buffers)
        owned = []
        for k, (u, v) in sorted(full.items()):
            # D of the whole matrix; every row is written by the step before it is sent back.
            update = buffers(f"owned_update_{k}", accum_dtype(u.dtype), u.device, u.numel())
            owned.append(OwnedMatrix(plans[k], u, v, update.view(u.shape)))
        return owned

    def scatter(
        self,
        plans: Sequence[ParamPlan],
        owned: Sequence[OwnedMatrix],
        params: Sequence[torch.Tensor],
        second_moments: Sequence[torch.Tensor | None],
        comm_dtype: Any,
        buffers: comm.Buffers = comm.fresh_buffers,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Send the owners' updates (and new second moments) back; returns per plan this rank's
        (block of D, block of v or None), shaped like ``params[k]`` / ``second_moments[k]``."""
        index = {id(plan): k for k, plan in enumerate(plans)}
        results = {index[id(o.plan)]: (o.update, o.second_moment) for o in owned}
        device = params[0].device
        back = self.wire_dtype(device, accum_dtype(params[0].dtype), comm_dtype)
        moment = next((v for v in second_moments if v is not None), None)
        dtypes = (back, moment.dtype if moment is not None else back)
        shapes = [
            (p.shape, v.shape if v is not None else None)
            for p, v in zip(params, second_moments)
        ]
        return scatter_from_owners(plans, results, shapes, dtypes, buffers)

    # ------------------------------------------------------------------ replicated (DDP)

    @staticmethod
    def sync_replicated(tensors: Sequence[torch.Tensor], plans: Sequence[ParamPlan],
                        buffers: comm.Buffers = comm.fresh_buffers) -> None:  # fmt: skip
        """Every rank receives the replicated tensors their owners updated (``tensors[j]``
        belongs to ``plans[j]``; one all_gather per dtype): parameters after a step, and the
        state for ``state_dict()``."""
        if not tensors:
            return
        group = plans[0].group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        comm.all_gather_owned(tensors, [plan.owner for plan in plans], group, rank, world,
                              buffers)  # fmt: skip

    # ------------------------------------------------------------------ state

    @staticmethod
    def second_moment_state(
        p: torch.Tensor, plan: ParamPlan, full_shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """Zero second moment of ``p``: a plain tensor, or for a DTensor parameter a DTensor
        with the parameter's mesh and ``plan.state_placements`` (every rank holds the key)."""
        if not is_dtensor(p):
            return torch.zeros(full_shape, dtype=dtype, device=p.device)
        from torch.distributed.tensor import DTensor

        local_shape = plan.placement.second_moment_block_shape(plan)
        local = torch.zeros(local_shape, dtype=dtype, device=local_tensor(p).device)
        stride = torch.empty(full_shape, device="meta").stride()
        return DTensor.from_local(
            local, p.device_mesh, plan.state_placements, run_check=False, shape=full_shape,
            stride=stride,
        )  # fmt: skip

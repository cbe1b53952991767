"""Sharded matrices: assemble each on its owner, send the owner's results back. Data only.

For every mesh, one ``all_to_all`` carries to each owner the blocks of its matrices' Newton-Schulz
inputs (and NorMuon's second moment), and one carries back the blocks of the updates (and the new
second moment). Each block travels once: a block held by several ranks (replicated mesh dims) is
sent by one of them, and not at all when the owner holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .comm import Buffers, exchange, fresh_buffers
from .plan import ParamPlan

__all__ = ["gather_to_owners", "scatter_from_owners"]


def _by_mesh(plans: Sequence[ParamPlan]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for k, plan in enumerate(plans):
        out.setdefault(id(plan.group), []).append(k)
    return out


def _pieces(plan: ParamPlan, update: torch.Tensor, state: torch.Tensor | None, wire):
    """(layout, this rank's block, dtype on the wire) of the Newton-Schulz input and, for
    NorMuon, the second moment (which travels in its own dtype)."""
    if state is None:
        return [(plan.layout, update, wire)]
    return [(plan.layout, update, wire), (plan.state_layout, state, state.dtype)]


def gather_to_owners(
    plans: Sequence[ParamPlan],
    updates: Sequence[torch.Tensor],
    states: Sequence[torch.Tensor | None],
    wire_dtype: torch.dtype,
    buffers: Buffers = fresh_buffers,
) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Full tensors on their owners.

    Args:
        plans: sharded plans (same order on every rank).
        updates: per plan, this rank's block of U (the parameter's local shape).
        states: per plan, this rank's block of the second moment, or None (Muon).
        wire_dtype: dtype of U on the wire (the second moment travels in its own dtype).
        buffers: where the traffic and the assembled tensors live (valid until the next
            gather).

    Returns:
        {k: (U, v)} for the plans this rank owns: U with the parameter's full shape in
        ``wire_dtype``, v the full second moment (or None).
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for mesh, members in enumerate(_by_mesh(plans).values()):
        layout0 = plans[members[0]].layout
        world, rank, group = layout0.world, layout0.rank, layout0.group
        device = updates[members[0]].device
        sends: list[list[torch.Tensor]] = [[] for _ in range(world)]
        expects: list[list] = [[] for _ in range(world)]
        # Per plan, (layout, this rank's block, wire dtype) of U and of v: cast while packed.
        pieces = {k: _pieces(plans[k], updates[k], states[k], wire_dtype) for k in members}
        for k in members:
            plan = plans[k]
            for layout, local, wire in pieces[k]:
                for src in layout.senders_to(plan.owner):
                    if src == rank:
                        sends[plan.owner].append((local, wire))
                    if plan.owner == rank:
                        expects[src].append((layout.block_shape(src), wire))
        # One purpose per mesh: received views of every mesh are alive until the step ends.
        received = exchange(sends, expects, group, device, buffers, f"gather{mesh}")
        cursor = [0] * world
        for k in members:
            plan = plans[k]
            if plan.owner != rank:
                continue
            full = []
            for j, (layout, local, wire) in enumerate(pieces[k]):
                whole = buffers(f"owned_{j}_{k}", wire, device,
                                math.prod(layout.shape)).view(layout.shape)  # fmt: skip
                if local.numel():
                    whole[layout.index(rank)] = local.to(wire)  # index_put needs one dtype
                for src in layout.senders_to(rank):
                    whole[layout.index(src)] = received[src][cursor[src]]
                    cursor[src] += 1
                full.append(whole)
            out[k] = (full[0], full[1] if len(full) > 1 else None)
    return out


def scatter_from_owners(
    plans: Sequence[ParamPlan],
    results: dict[int, tuple[torch.Tensor, torch.Tensor | None]],
    local_shapes: Sequence[tuple[torch.Size, torch.Size | None]],
    dtypes: tuple[torch.dtype, torch.dtype],
    buffers: Buffers = fresh_buffers,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Send each owner's full results back; returns per plan this rank's blocks.

    Args:
        plans: as for :func:`gather_to_owners`.
        results: {k: (D, v)} on the owner: the update in the parameter's full shape and the new
            second moment (or None).
        local_shapes: per plan, this rank's (parameter block shape, second-moment block shape).
        dtypes: (dtype of D on the wire, dtype of the second moment).
        buffers: where the traffic lives (returned blocks are valid until the next scatter).
    """
    out: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(plans)
    for mesh, members in enumerate(_by_mesh(plans).values()):
        layout0 = plans[members[0]].layout
        world, rank, group = layout0.world, layout0.rank, layout0.group
        device = next(iter(results.values()))[0].device if results else torch.device("cpu")
        sends: list[list[torch.Tensor]] = [[] for _ in range(world)]
        expects: list[list] = [[] for _ in range(world)]
        for k in members:
            plan = plans[k]
            layouts = [plan.layout] + ([plan.state_layout] if plan.state_layout else [])
            for j, layout in enumerate(layouts):
                for dst in range(world):
                    if dst == plan.owner or layout.block_numel(dst) == 0:
                        continue
                    if plan.owner == rank:  # cast while packed: no copy of its own
                        sends[dst].append((results[k][j][layout.index(dst)], dtypes[j]))
                    if dst == rank:
                        expects[plan.owner].append((layout.block_shape(dst), dtypes[j]))
        # One purpose per mesh: the returned blocks of every mesh are applied after the last.
        received = exchange(sends, expects, group, device, buffers, f"scatter{mesh}")
        cursor = [0] * world
        for k in members:
            plan = plans[k]
            blocks: list[torch.Tensor | None] = []
            layouts = [plan.layout] + ([plan.state_layout] if plan.state_layout else [])
            for j, layout in enumerate(layouts):
                if plan.owner == rank:
                    blocks.append(results[k][j][layout.index(rank)])
                elif layout.block_numel(rank) == 0:
                    blocks.append(torch.empty(local_shapes[k][j], dtype=dtypes[j], device=device))
                else:
                    blocks.append(received[plan.owner][cursor[plan.owner]])
                    cursor[plan.owner] += 1
            out[k] = (blocks[0], blocks[1] if len(blocks) > 1 else None)
    return out  # type: ignore[return-value]

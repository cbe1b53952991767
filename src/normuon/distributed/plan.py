"""Where each parameter of each group is updated: decided once, then cached by the optimizer.

Three placements (``docs/distributed.md``):

- ``local``: this rank holds whole matrices that no other rank updates (one process; plain
  tensors without a process group; DTensors sharded only across whole matrices, e.g. experts);
- ``replicated``: plain tensors replicated over a process group (DDP): one owner per
  parameter updates it and the result is all-gathered;
- ``sharded``: DTensors whose matrices are split over ranks (FSDP2 ``Shard(0)``, tensor parallel
  ``Shard(1)``, FSDP2 x TP ``_StridedShard``, HSDP's ``Replicate``): each matrix is assembled
  on one owner rank of the whole mesh, which computes its update; the blocks go back.

Owners are balanced by Newton-Schulz cost (longest processing time first), identically on
every rank. No tensor math here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..geometry import MatrixGeometry, matrix_geometry
from .layout import BlockLayout, block_layout
from .placement import LOCAL, REPLICATED, SHARDED, Placement

__all__ = ["ParamPlan", "assign_owners", "build_plans", "is_dtensor", "local_tensor"]

try:  # DTensor parameters (FSDP2, tensor parallel); absent from torch builds without distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover

    class DTensor:  # type: ignore[no-redef]
        """Stand-in so isinstance checks are False when torch has no DTensor."""


def is_dtensor(t: object) -> bool:
    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class ParamPlan:
    """How one parameter is updated on this rank.

    Attributes:
        index: position in its group's ``params``.
        name: how errors name it (``param_groups[g]['params'][i] (shape ...)``).
        placement: :data:`~normuon.distributed.placement.LOCAL`, ``REPLICATED`` or
            ``SHARDED`` (module docstring): what the step asks about where it lives.
        geometry: the matrix view (None in AdamW groups). For a local DTensor it describes the
            local tensor; otherwise the whole parameter.
        owner: replicated and sharded kinds: the rank (in ``group``) that updates it.
        group: the process group of ``owner`` (replicated) or spanning the mesh (sharded).
        layout: sharded: every rank's block of the parameter.
        state_layout: sharded NorMuon: every rank's block of the second moment.
        state_placements: DTensor placements of the second moment (None: plain tensor).
        rank: replicated kind: this rank in ``group`` (set with the owner).
    """

    index: int
    name: str
    placement: Placement
    geometry: MatrixGeometry | None
    owner: int | None = None
    group: object = None
    layout: BlockLayout | None = None
    state_layout: BlockLayout | None = None
    state_placements: tuple | None = field(default=None)
    rank: int = 0

    @property
    def updated_here(self) -> bool:
        """Whether this rank updates the parameter (replicated: only its owner does)."""
        return self.placement.updated_here(self)

    @property
    def kind(self) -> str:
        """The placement's name (reports and messages; the step asks the placement)."""
        return self.placement.name


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Longest-processing-time-first: the costliest item goes to the least loaded rank.

    Deterministic (ties to the lower index/rank), so every rank computes the same assignment.
    """
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


def _state_placements(placements: Sequence, geometry: MatrixGeometry) -> tuple:
    """Placements of NorMuon's second moment (shape: stack dims, then neurons; or the
    parameter's own shape under ``normalize="elements"``, placed as it is) that follow the
    parameter's: stack dims keep their sharding, the neuron dim takes the sharding of the
    parameter dim its entries correspond to, every other sharding becomes Replicate."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if geometry.elementwise:  # shaped like the parameter (normalize="elements"): sharded alike
        return tuple(placements)
    neuron_axis = len(geometry.state_shape) - 1
    out = []
    for placement in placements:
        if isinstance(placement, Shard):
            d = placement.dim
            if d in geometry.batch_dims:
                target = d
            elif d == geometry.neuron_dim:
                target = neuron_axis
            else:
                out.append(Replicate())
                continue
            if isinstance(placement, _StridedShard):
                out.append(_StridedShard(target, split_factor=placement.split_factor))
            else:
                out.append(Shard(target))
        else:
            out.append(Replicate())
    return tuple(out)


def _replication_group(option):
    """The process group of replicated (DDP-style) parameters, or None for one process."""
    if option is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if option == "auto" else option
    return group if dist.get_world_size(group) > 1 else None


def _dtensor_plan(
    index: int, name: str, p: torch.Tensor, group: dict, neuron_norm: bool
) -> ParamPlan:
    normalize = group.get("normalize", "rows")
    geometry = matrix_geometry(p.shape, group["layout"], group["split_sizes"], normalize)
    layout = block_layout(p.shape, p.device_mesh, p.placements, name)
    local_shape = tuple(p.to_local().shape)
    if layout.block_shape(layout.rank) != local_shape:
        raise ValueError(
            f"{name}: local shard of shape {local_shape} does not match placements "
            f"{tuple(p.placements)} (expected {layout.block_shape(layout.rank)}); only torch's "
            f"chunked sharding is supported"
        )
    whole_matrices = all(
        len(ix) == p.shape[d]
        for block in layout.blocks
        for d, ix in enumerate(block)
        if d in geometry.matrix_dims
    )
    unique = all(len(replicas) == 1 for replicas in layout.holders())
    if layout.world == 1 or (whole_matrices and unique):
        local_geometry = matrix_geometry(
            local_shape, group["layout"], group["split_sizes"], normalize
        )
        placements = _state_placements(p.placements, geometry) if neuron_norm else None
        group_ = layout.group if layout.world > 1 else None
        return ParamPlan(
            index, name, LOCAL, local_geometry, group=group_, state_placements=placements
        )
    plan = ParamPlan(index, name, SHARDED, geometry, group=layout.group, layout=layout)
    if neuron_norm:
        plan.state_placements = _state_placements(p.placements, geometry)
        plan.state_layout = block_layout(
            geometry.state_shape, p.device_mesh, plan.state_placements, name
        )
    return plan


def build_plans(
    param_groups: Sequence[dict], matrix_algorithm: str, neuron_norm: bool, process_group
) -> list[list[ParamPlan]]:
    """Plan every parameter of every group (collective on first use of a mesh: call on all
    ranks). Owners of sharded matrices are balanced over all groups sharing a mesh."""
    rgroup = _replication_group(process_group)
    plans: list[list[ParamPlan]] = []
    for gi, group in enumerate(param_groups):
        matrix = group["algorithm"] == matrix_algorithm
        group_plans = []
        for pi, p in enumerate(group["params"]):
            name = f"param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)})"
            if is_dtensor(p):
                if matrix:
                    group_plans.append(_dtensor_plan(pi, name, p, group, neuron_norm))
                else:
                    layout = block_layout(p.shape, p.device_mesh, p.placements, name)
                    mesh_group = layout.group if layout.world > 1 else None
                    group_plans.append(ParamPlan(pi, name, LOCAL, None, group=mesh_group))
                continue
            geometry = (
                matrix_geometry(
                    p.shape, group["layout"], group["split_sizes"], group.get("normalize", "rows")
                )
                if matrix
                else None
            )
            placement = LOCAL if rgroup is None else REPLICATED
            group_plans.append(ParamPlan(pi, name, placement, geometry, group=rgroup))
        # Replicated parameters: owners balanced within the group, offset by the group index
        # so that small groups land on different ranks.
        replicated = [pl for pl in group_plans if pl.placement is REPLICATED]
        if replicated:
            world = dist.get_world_size(rgroup)
            costs = [
                pl.geometry.ns_cost() if pl.geometry else float(group["params"][pl.index].numel())
                for pl in replicated
            ]
            rank = dist.get_rank(rgroup)
            for pl, owner in zip(replicated, assign_owners(costs, world)):
                pl.owner = (owner + gi) % world
                pl.rank = rank
        plans.append(group_plans)
    # Sharded matrices: one balanced assignment per mesh over every group.
    by_mesh: dict[int, list[ParamPlan]] = {}
    for group_plans in plans:
        for pl in group_plans:
            if pl.placement.assembled_on_owner:
                by_mesh.setdefault(id(pl.group), []).append(pl)
    for members in by_mesh.values():
        owners = assign_owners([pl.geometry.ns_cost() for pl in members], members[0].layout.world)
        for pl, owner in zip(members, owners):
            pl.owner = owner
    return plans

"""Where a parameter lives, as an object its plan carries: what a step asks of a placement.

Three placements (``docs/distributed.md``), each a singleton:

- :data:`LOCAL`: this rank holds whole matrices that no other rank updates (one process; plain
  tensors without a process group; DTensors sharded only across whole matrices, e.g. experts).
- :data:`REPLICATED`: plain tensors replicated over a process group (DDP): one owner per
  parameter updates it and the result is all-gathered after the step.
- :data:`SHARDED`: DTensors whose matrices are split over ranks (FSDP2, tensor parallel, both):
  each matrix is assembled on one owner rank of the mesh, which computes its update; the blocks
  go back to the ranks that hold them.

The step (:mod:`normuon.pipeline`), the batch planner (:mod:`normuon.step_plan`) and the
:class:`~normuon.distributed.Distributor` ask these questions instead of branching on a name.
No tensor math.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .plan import ParamPlan

__all__ = ["LOCAL", "REPLICATED", "SHARDED", "Placement"]


class Placement:
    """How a parameter's update is computed and delivered (subclasses answer differently)."""

    #: a short name for messages and reports
    name: str = ""
    #: the parameter's matrices are split over ranks and assembled on an owner for the step
    assembled_on_owner: bool = False
    #: the owner's result is all-gathered to the other replicas after the step
    synced_after_step: bool = False
    #: finite flags of its gradient blocks are agreed over the plan's group (a NaN in one
    #: rank's block skips the whole parameter on every rank)
    agrees_flags: bool = True

    def updated_here(self, plan: ParamPlan) -> bool:
        """Whether this rank applies the parameter's update (and keeps its state)."""
        return True

    def computed_here(self, plan: ParamPlan) -> bool:
        """Whether this rank orthogonalizes the parameter's matrices."""
        return self.updated_here(plan)

    def state_everywhere(self, p: torch.Tensor) -> bool:
        """Whether every rank must hold the parameter's state keys whether or not a gradient
        arrived (DTensor state, saved through DCP by every rank)."""
        from .plan import is_dtensor

        return is_dtensor(p)

    def second_moment_block_shape(self, plan: ParamPlan) -> tuple[int, ...]:
        """This rank's block of the second moment, as a DTensor's local shape."""
        return tuple(plan.geometry.state_shape)

    def __repr__(self) -> str:
        return self.name


class _Local(Placement):
    name = "local"


class _Replicated(Placement):
    name = "replicated"
    synced_after_step = True
    agrees_flags = False  # replicas see the same gradient: their flags agree already

    def updated_here(self, plan: ParamPlan) -> bool:
        return plan.owner == plan.rank

    def state_everywhere(self, p: torch.Tensor) -> bool:
        return False  # the owner keeps it; state_dict() gathers it


class _Sharded(Placement):
    name = "sharded"
    assembled_on_owner = True

    def computed_here(self, plan: ParamPlan) -> bool:
        return plan.owner == plan.layout.rank

    def second_moment_block_shape(self, plan: ParamPlan) -> tuple[int, ...]:
        return tuple(plan.state_layout.block_shape(plan.state_layout.rank))


LOCAL: Placement = _Local()
REPLICATED: Placement = _Replicated()
SHARDED: Placement = _Sharded()

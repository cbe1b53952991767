"""Where matrices are updated and how their data moves between ranks (no optimizer math).

- :mod:`.plan`: per parameter, local / replicated (DDP) / sharded (FSDP2, tensor parallel),
  with owners balanced by Newton-Schulz cost; built once per set of groups.
- :mod:`.layout`: which global indices every rank holds, from DTensor placements.
- :mod:`.sharded`: assemble sharded matrices on their owners and send the results back.
- :mod:`.comm`: the packed collectives all of the above use.

``docs/distributed.md`` describes the design.
"""

from .comm import all_gather_owned, exchange, packed_all_reduce_, wire_dtype_for
from .layout import BlockLayout, block_layout, chunk_range
from .plan import ParamPlan, assign_owners, build_plans

__all__ = [
    "BlockLayout",
    "ParamPlan",
    "all_gather_owned",
    "assign_owners",
    "block_layout",
    "build_plans",
    "chunk_range",
    "dim0_offsets",
    "exchange",
    "packed_all_reduce_",
    "wire_dtype_for",
]


def dim0_offsets(size: int, world: int) -> tuple[int, ...]:
    """Row offsets (world + 1) of torch.chunk-style dim-0 sharding over ``world`` ranks, as
    FSDP2's ``Shard(0)`` lays a parameter out."""
    return tuple(chunk_range(range(size), world, r).start for r in range(world)) + (size,)

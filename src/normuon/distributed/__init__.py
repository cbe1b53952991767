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
    "exchange",
    "packed_all_reduce_",
    "wire_dtype_for",
]


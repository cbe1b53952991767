"""Where the elements of a DTensor live: per rank, the global indices of its local block.

DTensor placements on an N-D device mesh are applied mesh dim by mesh dim (``docs/distributed.md``):

- ``Shard(d)``: dim d is cut into ``mesh.size(i)`` chunks of ceil(size / k) (torch.chunk; the
  last chunks may be short or empty); the rank at coordinate c keeps chunk c.
- ``_StridedShard(d, split_factor=s)`` (FSDP2 on top of tensor parallelism): dim d is first cut
  into s pieces (the later mesh dim's chunks), each piece is chunked over this mesh dim, and the
  rank keeps its chunk of every piece, in order.
- ``Replicate()``: every rank of the mesh dim holds the same data.

This module computes those index sets for every rank of a mesh, without communication, so each
rank knows where every block of every matrix is. ``Partial`` placements (unreduced sums) are
refused: an optimizer must see reduced gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["BlockLayout", "block_layout", "chunk_range", "flat_mesh_group"]

#: Global indices along one tensor dim: a contiguous ``range`` or an explicit sorted tuple.
Indices = range | tuple[int, ...]


def chunk_range(indices: Indices, chunks: int, index: int) -> Indices:
    """Piece ``index`` of ``indices`` cut into ``chunks`` torch.chunk-style pieces."""
    size = len(indices)
    per = -(-size // chunks) if size else 0
    lo, hi = min(index * per, size), min((index + 1) * per, size)
    return indices[lo:hi]


def _concat(parts: Sequence[Indices]) -> Indices:
    flat = [i for part in parts for i in part]
    if flat and flat == list(range(flat[0], flat[0] + len(flat))):
        return range(flat[0], flat[0] + len(flat))
    return tuple(flat) if flat else range(0)


def _local_indices(
    shape: Sequence[int], mesh_shape: Sequence[int], placements: Sequence, coord: Sequence[int]
) -> tuple[Indices, ...]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    idx: list[Indices] = [range(s) for s in shape]
    for mesh_dim, placement in enumerate(placements):
        chunks, c = mesh_shape[mesh_dim], coord[mesh_dim]
        if isinstance(placement, _StridedShard):
            d = placement.dim
            factor = int(placement.split_factor)
            pieces = [chunk_range(idx[d], factor, j) for j in range(factor)]
            idx[d] = _concat([chunk_range(piece, chunks, c) for piece in pieces])
        elif isinstance(placement, Shard):
            d = placement.dim
            idx[d] = chunk_range(idx[d], chunks, c)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"placement {placement} is not supported")
    return tuple(idx)


@dataclass(frozen=True)
class BlockLayout:
    """How one tensor of global shape ``shape`` is spread over the ranks of a process group.

    Attributes:
        shape: global shape.
        group: the process group spanning the whole mesh (None: one process).
        rank: this process's rank in ``group``.
        world: ranks in ``group``.
        blocks: per group rank, the global indices of its local block, per dim.
    """

    shape: tuple[int, ...]
    group: object
    rank: int
    world: int
    blocks: tuple[tuple[Indices, ...], ...]

    def block_shape(self, rank: int) -> tuple[int, ...]:
        return tuple(len(ix) for ix in self.blocks[rank])

    def block_numel(self, rank: int) -> int:
        n = 1
        for ix in self.blocks[rank]:
            n *= len(ix)
        return n

    def holders(self) -> list[list[int]]:
        """Ranks grouped by identical block (replicas of one block), in rank order."""
        seen: dict[tuple, list[int]] = {}
        for r, block in enumerate(self.blocks):
            key = tuple((ix.start, ix.stop) if isinstance(ix, range) else ix for ix in block)
            seen.setdefault(key, []).append(r)
        return list(seen.values())

    def senders_to(self, owner: int) -> list[int]:
        """One rank per distinct non-empty block to send it to ``owner`` (none for a block the
        owner holds itself): together they cover the whole tensor once."""
        out = []
        own = self.blocks[owner]
        for replicas in self.holders():
            if self.block_numel(replicas[0]) == 0 or self.blocks[replicas[0]] == own:
                continue
            out.append(replicas[0])
        return out

    def index(self, rank: int) -> tuple:
        """An index for ``full[index]`` selecting ``rank``'s block of a full tensor."""
        block = self.blocks[rank]
        if all(isinstance(ix, range) for ix in block):
            return tuple(slice(ix.start, ix.stop) for ix in block)
        # Advanced indexing with broadcast index vectors: (len_0, 1, ...), (1, len_1, ...), ...
        nd = len(block)
        out = []
        for d, ix in enumerate(block):
            shape = [1] * nd
            shape[d] = len(ix)
            out.append(torch.as_tensor(list(ix), dtype=torch.long).view(shape))
        return tuple(out)


def flat_mesh_group(mesh) -> object:
    """One process group spanning every rank of ``mesh`` (a flattened view of an N-D mesh)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    return mesh._flatten().get_group()


def block_layout(shape: Sequence[int], mesh, placements: Sequence, what: str) -> BlockLayout:
    """Every rank's block of a tensor with ``placements`` on ``mesh`` (checked against the local
    shape by the caller). Raises ValueError naming ``what`` for placements that cannot be served.
    """
    from torch.distributed.tensor import Partial

    for placement in placements:
        if isinstance(placement, Partial):
            raise ValueError(
                f"{what} has a Partial placement ({tuple(placements)}): its values are unreduced "
                f"partial sums; reduce them (redistribute to Replicate or Shard) before the "
                f"optimizer step"
            )
    group = flat_mesh_group(mesh)
    world = dist.get_world_size(group)
    # The flat group's rank r is the global rank ranks[r]; its coordinates come from the mesh.
    ranks = dist.get_process_group_ranks(group)
    mesh_ranks = mesh.mesh
    blocks = []
    for global_rank in ranks:
        where = (mesh_ranks == global_rank).nonzero()
        if where.shape[0] != 1:
            raise ValueError(f"{what}: rank {global_rank} is not in the mesh {mesh}")
        coord = where[0].tolist()
        try:
            blocks.append(_local_indices(shape, tuple(mesh_ranks.shape), placements, coord))
        except ValueError as err:
            raise ValueError(f"{what}: {err} (placements {tuple(placements)})") from None
    return BlockLayout(
        shape=tuple(int(s) for s in shape),
        group=group,
        rank=dist.get_rank(group),
        world=world,
        blocks=tuple(blocks),
    )

"""Moving optimizer data between ranks: ownership, row exchange, reductions. No optimizer math.

Two settings are served (SPEC section 2):

- Replicated parameters (DDP, or plain tensors with an initialized process group): each rank
  owns about 1/W of the matrices (balanced by Newton-Schulz cost), updates them alone, and the new
  values are all-gathered (:func:`all_gather_owned`).
- FSDP2 / DTensor parameters sharded on dim 0: each matrix's rows are spread over the ranks of the
  shard mesh dim. :func:`rows_to_owners` assembles each full matrix on its owner (one
  ``all_to_all_single`` for all of them), :func:`rows_from_owners` sends the row blocks of the
  result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "ShardInfo",
    "all_gather_owned",
    "all_reduce_",
    "assign_owners",
    "dim0_offsets",
    "rows_from_owners",
    "rows_to_owners",
    "shard_info",
]


def dim0_offsets(size: int, world: int) -> tuple[int, ...]:
    """Row offsets (world + 1) of torch.chunk-style dim-0 sharding, as FSDP2 and DTensor do it:
    ceil(size / world) rows per rank, the last ranks possibly short or empty."""
    chunk = -(-size // world) if size else 0
    return tuple(min(r * chunk, size) for r in range(world + 1))


@dataclass(frozen=True)
class ShardInfo:
    """Where a DTensor parameter lives: its mesh, the mesh dim that shards dim 0 (or None when
    dim 0 is not sharded), that dim's process group, this rank's index in it and the world."""

    mesh: object
    shard_mesh_dim: int | None
    group: object
    rank: int
    world: int


def shard_info(p: torch.Tensor, what: str) -> ShardInfo:
    """Check a DTensor's placements and say how dim 0 is sharded. Raises ValueError otherwise.

    Supported: every placement Replicate except at most one Shard(0) (FSDP2 on a 1-D mesh, and
    the shard dim of a 2-D HSDP mesh). Anything else would silently change the result.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    shard_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            if placement.dim != 0:
                raise ValueError(
                    f"{what} is sharded on dim {placement.dim} (placements {p.placements}); "
                    f"NorMuon supports parameters sharded on dim 0 only (FSDP2's default)"
                )
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(
                f"{what} has placement {placement} (placements {p.placements}); only Shard(0) "
                f"and Replicate are supported"
            )
    if len(shard_dims) > 1:
        raise ValueError(
            f"{what} is sharded on dim 0 over {len(shard_dims)} mesh dims ({p.placements}); "
            f"one shard mesh dim is supported"
        )
    if not shard_dims:
        return ShardInfo(mesh, None, None, 0, 1)
    mesh_dim = shard_dims[0]
    group = mesh.get_group(mesh_dim)
    world = mesh.size(mesh_dim)
    rank = mesh.get_local_rank(mesh_dim)
    offsets = dim0_offsets(p.shape[0], world)
    local_rows = p.to_local().shape[0]
    if local_rows != offsets[rank + 1] - offsets[rank]:
        raise ValueError(
            f"{what}: local shard has {local_rows} rows but chunked dim-0 sharding of "
            f"{p.shape[0]} rows over {world} ranks gives rank {rank} "
            f"{offsets[rank + 1] - offsets[rank]}; this sharding is not supported"
        )
    return ShardInfo(mesh, mesh_dim, group, rank, world)


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


def ns_cost(m: int, n: int, batch: int = 1) -> float:
    """Flops of one Newton-Schulz step on a (batch, m, n) stack: 4 k^2 K + 2 k^3, k = min."""
    k, big = min(m, n), max(m, n)
    return float(batch) * (4.0 * k * k * big + 2.0 * k**3)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all_reduce over ``group`` (no-op when the group is None)."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def rows_to_owners(
    local_rows: Sequence[torch.Tensor],
    offsets: Sequence[Sequence[int]],
    owners: Sequence[int],
    info: ShardInfo,
    wire_dtype: torch.dtype,
) -> dict[int, torch.Tensor]:
    """Assemble full matrices on their owners with one all_to_all.

    Args:
        local_rows: per matrix j, this rank's (rows_j_local, n_j) block (rows may be 0).
        offsets: per matrix j, the world + 1 row offsets of the sharding.
        owners: per matrix j, the rank (in the shard group) that assembles it.
        wire_dtype: dtype sent over the wire (bfloat16 halves the traffic).

    Returns:
        {j: (m_j, n_j) full matrix in ``wire_dtype``} for the matrices this rank owns.
    """
    world, rank = info.world, info.rank
    send_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for j, block in enumerate(local_rows):
        send_parts[owners[j]].append(block.reshape(-1))
    send_counts = [sum(t.numel() for t in parts) for parts in send_parts]
    owned = [j for j in range(len(local_rows)) if owners[j] == rank]
    cols = [local_rows[j].shape[-1] for j in range(len(local_rows))]
    recv_counts = [
        sum((offsets[j][src + 1] - offsets[j][src]) * cols[j] for j in owned)
        for src in range(world)
    ]
    device = local_rows[0].device if local_rows else torch.device("cpu")
    send = (
        torch.cat([t.to(wire_dtype) for parts in send_parts for t in parts])
        if any(send_counts)
        else torch.empty(0, dtype=wire_dtype, device=device)
    )
    recv = torch.empty(sum(recv_counts), dtype=wire_dtype, device=device)
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=info.group)
    full = {j: torch.empty(offsets[j][-1], cols[j], dtype=wire_dtype, device=device) for j in owned}
    pos = 0
    for src in range(world):
        for j in owned:
            rows = offsets[j][src + 1] - offsets[j][src]
            count = rows * cols[j]
            full[j][offsets[j][src] : offsets[j][src + 1]] = recv[pos : pos + count].view(
                rows, cols[j]
            )
            pos += count
    return full


def rows_from_owners(
    full: dict[int, torch.Tensor],
    offsets: Sequence[Sequence[int]],
    owners: Sequence[int],
    cols: Sequence[int],
    info: ShardInfo,
    wire_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Send each owner's full results back as row blocks: the inverse of :func:`rows_to_owners`.

    Returns per matrix j this rank's (rows_j_local, n_j) block in ``wire_dtype``.
    """
    world, rank = info.world, info.rank
    owned = sorted(full)
    send_counts = []
    parts = []
    for dst in range(world):
        count = 0
        for j in owned:
            block = full[j][offsets[j][dst] : offsets[j][dst + 1]]
            parts.append(block.reshape(-1).to(wire_dtype))
            count += block.numel()
        send_counts.append(count)
    n_mats = len(offsets)
    recv_counts = [
        sum(
            (offsets[j][rank + 1] - offsets[j][rank]) * cols[j]
            for j in range(n_mats)
            if owners[j] == src
        )
        for src in range(world)
    ]
    device = next(iter(full.values())).device if full else torch.device("cpu")
    send = torch.cat(parts) if parts else torch.empty(0, dtype=wire_dtype, device=device)
    recv = torch.empty(sum(recv_counts), dtype=wire_dtype, device=device)
    dist.all_to_all_single(recv, send, recv_counts, send_counts, group=info.group)
    out: list[torch.Tensor | None] = [None] * n_mats
    pos = 0
    for src in range(world):
        for j in range(n_mats):
            if owners[j] != src:
                continue
            rows = offsets[j][rank + 1] - offsets[j][rank]
            count = rows * cols[j]
            out[j] = recv[pos : pos + count].view(rows, cols[j])
            pos += count
    return out  # type: ignore[return-value]


def all_gather_owned(
    tensors: Sequence[torch.Tensor], owners: Sequence[int], group, rank: int, world: int
) -> None:
    """Replicated mode: copy every owner's tensors to all ranks (one all_gather per dtype).

    ``tensors[j]`` is updated in place on every rank from ``owners[j]``'s copy.
    """
    by_dtype: dict[torch.dtype, list[int]] = {}
    for j, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(j)
    for dtype, idx in by_dtype.items():
        per_rank = [[j for j in idx if owners[j] == r] for r in range(world)]
        sizes = [sum(tensors[j].numel() for j in js) for js in per_rank]
        width = max(sizes) if sizes else 0
        if width == 0:
            continue
        device = tensors[idx[0]].device
        mine = torch.zeros(width, dtype=dtype, device=device)
        if per_rank[rank]:
            flat = torch.cat([tensors[j].reshape(-1) for j in per_rank[rank]])
            mine[: flat.numel()] = flat
        gathered = torch.empty(world * width, dtype=dtype, device=device)
        dist.all_gather_into_tensor(gathered, mine, group=group)
        for r in range(world):
            if r == rank:
                continue
            pos = r * width
            for j in per_rank[r]:
                n = tensors[j].numel()
                tensors[j].copy_(gathered[pos : pos + n].view_as(tensors[j]))
                pos += n


def wire_dtype_for(device: torch.device, option: str | torch.dtype | None) -> torch.dtype | None:
    """Resolve the ``comm_dtype`` option: "auto" is bfloat16 on CUDA, exact (None) elsewhere."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if option is None or isinstance(option, torch.dtype):
        return option
    raise ValueError(f"comm_dtype must be 'auto', None or a torch.dtype, got {option!r}")

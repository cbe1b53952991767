"""Collectives packed so that one step issues a bounded number of them. No optimizer math.

- :func:`packed_all_reduce_`: many small tensors, one all_reduce.
- :func:`exchange`: per destination rank a list of tensors of any dtypes and shapes, sent as one
  byte buffer with one ``all_to_all_single``; the receiver knows what to expect from each
  source (every rank computes the same plan).
- :func:`all_gather_owned`: replicated (DDP) parameters, each updated by its owner, copied to
  every rank with one all_gather per dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["Expect", "all_gather_owned", "exchange", "packed_all_reduce_", "wire_dtype_for"]

#: Bytes every packed segment is aligned to, so that a received slice can be viewed as any dtype.
_ALIGN = 8

#: What a rank expects from one source: (shape, dtype) per tensor, in the order they were sent.
Expect = Sequence[tuple[tuple[int, ...], torch.dtype]]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def packed_all_reduce_(tensors: Sequence[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    """All-reduce every tensor (same dtype) in place with one collective over ``group``."""
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    pos = 0
    for t in tensors:
        t.copy_(flat[pos : pos + t.numel()].view_as(t))
        pos += t.numel()


def exchange(
    sends: Sequence[Sequence[torch.Tensor]],
    expects: Sequence[Expect],
    group,
    device: torch.device,
) -> list[list[torch.Tensor]]:
    """One all_to_all: ``sends[dst]`` go to rank ``dst``; returns per source what ``expects``
    describes, as tensors viewing one receive buffer (nothing is sent to oneself: pass those
    tensors directly). Segments are byte-packed and aligned, so dtypes can be mixed.
    """
    world = len(sends)
    send_sizes = [sum(_padded(t.numel() * t.element_size()) for t in parts) for parts in sends]
    recv_sizes = [sum(_padded(_nbytes(s, d)) for s, d in exp) for exp in expects]
    send = torch.empty(sum(send_sizes), dtype=torch.uint8, device=device)
    pos = 0
    for parts in sends:
        for t in parts:
            n = t.numel() * t.element_size()
            if n:
                send[pos : pos + n].copy_(t.detach().reshape(-1).contiguous().view(torch.uint8))
            pos += _padded(n)
    recv = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
    if world > 1:  # every rank joins, also one with nothing to send or receive this time
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=group)
    out: list[list[torch.Tensor]] = []
    pos = 0
    for exp in expects:
        got = []
        for shape, dtype in exp:
            n = _nbytes(shape, dtype)
            got.append(recv[pos : pos + n].view(dtype).view(shape))
            pos += _padded(n)
        out.append(got)
    return out


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

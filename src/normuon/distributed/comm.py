"""Collectives packed so that one step issues a bounded number of them. No optimizer math.

- :func:`packed_all_reduce_`: many small tensors, one all_reduce.
- :func:`exchange`: per destination rank a list of tensors of any dtypes and shapes, sent as one
  byte buffer with one ``all_to_all_single``; the receiver knows what to expect from each
  source (every rank computes the same plan).
- :func:`all_gather_owned`: replicated (DDP) parameters, each updated by its owner, copied to
  every rank with one all_gather per dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


#: ``buffers(purpose, dtype, device, numel) -> 1-D tensor`` (contents undefined): where the
#: collectives take their traffic buffers. The optimizer passes its workspace's ``flat``, which
#: reuses one buffer per purpose across steps; the default allocates.
Buffers = Callable[[str, torch.dtype, torch.device, int], torch.Tensor]


def fresh_buffers(purpose: str, dtype: torch.dtype, device: torch.device, numel: int):
    return torch.empty(numel, dtype=dtype, device=device)


#: What one rank sends to another: tensors, or (tensor, dtype) pairs sent cast to that dtype
#: (the cast happens while packing, with no copy of its own).
Send = torch.Tensor | tuple[torch.Tensor, torch.dtype]


def _parts(item: Send) -> tuple[torch.Tensor, torch.dtype]:
    return item if isinstance(item, tuple) else (item, item.dtype)


def exchange(
    sends: Sequence[Sequence[Send]],
    expects: Sequence[Expect],
    group,
    device: torch.device,
    buffers: Buffers = fresh_buffers,
    purpose: str = "exchange",
) -> list[list[torch.Tensor]]:
    """One all_to_all: ``sends[dst]`` go to rank ``dst``; returns per source what ``expects``
    describes, as tensors viewing one receive buffer (nothing is sent to oneself: pass those
    tensors directly). Segments are byte-packed and aligned, so dtypes can be mixed. The send
    and receive buffers come from ``buffers`` (``purpose`` + "_send" / "_recv"): the returned
    views are valid until the next exchange of that purpose.
    """
    world = len(sends)
    send_sizes = [sum(_padded(_nbytes(t.shape, d)) for t, d in map(_parts, parts))
                  for parts in sends]  # fmt: skip
    recv_sizes = [sum(_padded(_nbytes(s, d)) for s, d in exp) for exp in expects]
    send = buffers(f"{purpose}_send", torch.uint8, device, sum(send_sizes))
    pos = 0
    for parts in sends:
        for t, dtype in map(_parts, parts):
            n = _nbytes(t.shape, dtype)
            if n:  # packed in place: a view of the buffer as the tensor's shape and wire dtype
                send[pos : pos + n].view(dtype).view(t.shape).copy_(t.detach())
            pos += _padded(n)
    recv = buffers(f"{purpose}_recv", torch.uint8, device, sum(recv_sizes))
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
    tensors: Sequence[torch.Tensor], owners: Sequence[int], group, rank: int, world: int,
    buffers: Buffers = fresh_buffers,
) -> None:  # fmt: skip
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
        # This rank's tensors packed (the padding stays whatever it was: nobody reads it).
        mine = buffers("all_gather_send", dtype, device, width)
        pos = 0
        for j in per_rank[rank]:
            n = tensors[j].numel()
            mine[pos : pos + n].view_as(tensors[j]).copy_(tensors[j])
            pos += n
        gathered = buffers("all_gather_recv", dtype, device, world * width)
        _all_gather_into(gathered, mine, group, world, buffers)
        for r in range(world):
            if r == rank:
                continue
            pos = r * width
            for j in per_rank[r]:
                n = tensors[j].numel()
                tensors[j].copy_(gathered[pos : pos + n].view_as(tensors[j]))
                pos += n


def _all_gather_into(gathered: torch.Tensor, mine: torch.Tensor, group, world: int,
                     buffers: Buffers) -> None:  # fmt: skip
    """``all_gather_into_tensor(gathered, mine)``, without temporaries on gloo.

    gloo's all-gather copies through two temporaries the size of the output on every call
    (measured: 2 x world x width bytes per call, torch 2.13), while its ``all_to_all_single``
    reads and writes the caller's buffers; so on gloo every rank sends its slot to every rank
    with one all_to_all (the same bytes on the wire per rank, (W - 1) x width), from a send
    buffer of W copies. Other backends (NCCL) gather in place.
    """
    if world > 1 and dist.get_backend(group) == "gloo":
        width = mine.numel()
        send = buffers("all_gather_tiled", mine.dtype, mine.device, world * width)
        send.view(world, width).copy_(mine.expand(world, width))
        dist.all_to_all_single(gathered, send, group=group)
    else:
        dist.all_gather_into_tensor(gathered, mine, group=group)


def wire_dtype_for(device: torch.device, option: str | torch.dtype | None) -> torch.dtype | None:
    """Resolve the ``comm_dtype`` option: "auto" is bfloat16 on CUDA, exact (None) elsewhere."""
    if option == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if option is None or isinstance(option, torch.dtype):
        return option
    raise ValueError(f"comm_dtype must be 'auto', None or a torch.dtype, got {option!r}")

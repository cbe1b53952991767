"""What every step of a matrix group repeats, planned once: its blocks, their batches, and the
workspace their Newton-Schulz runs in. No tensor math.

A matrix parameter is one or more *blocks* (row blocks of ``split_sizes``; one block covering
every row by default), each a (B, m, n) stack. Blocks of the same shape and state dtype are
*batched* so that Newton-Schulz runs once per batch, each batch at most ``ns_memory_budget``
bytes of input. The plan is built when the optimizer's placement plans are (construction,
``add_param_group``, ``load_state_dict``) and reused by every step; a step only skips the blocks
of parameters that have no gradient this time.

The :class:`Workspace` owns the buffers batches run in (the Newton-Schulz input, which is
overwritten by its output, and the iteration's scratch), reused across batches and steps, so a
steady-state step allocates no large tensor; and the table that bf16 momentum's stochastic
rounding reads its bits from (built by :func:`normuon.functional.rounding_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import functional as F
from .distributed.plan import ParamPlan

__all__ = ["BlockBatch", "MatrixBlock", "Workspace", "plan_batches", "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of a parameter's optimizer state: low-precision parameters keep float32 state
    (bf16 momentum loses the small updates)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


@dataclass(frozen=True)
class MatrixBlock:
    """One row block of one matrix parameter, as a step orthogonalizes it.

    Attributes:
        index: the parameter's position in its group's ``params``.
        plan: the parameter's placement plan (its ``geometry`` describes the tensors the block
            is read from: the local tensor, or the owner's assembled matrix).
        rows: (start, stop) rows of each matrix of the stack.
        stack: B, the matrices of the stack (the geometry's batch).
        reduce_dim: axis of a (B, m, n) block averaged for its second moment (-1 rows, -2
            columns, None: nothing averaged, one entry per weight).
        moment: (start, stop) of the block's entries along the last dim of the (B, L) second
            moment.
        owned: True when the block is read from a matrix assembled on this rank (its owner)
            from shards; False when from the parameter's own (local or replicated) tensors.
    """

    index: int
    plan: ParamPlan
    rows: tuple[int, int]
    stack: int
    reduce_dim: int | None
    moment: tuple[int, int]
    owned: bool

    @property
    def row_slice(self) -> slice:
        return slice(*self.rows)


@dataclass(frozen=True)
class BlockBatch:
    """Blocks of one shape (m, n) and state dtype orthogonalized together.

    Attributes:
        m, n: rows and columns of every matrix.
        dtype: dtype of the Newton-Schulz input buffer (the members' state dtype).
        device: where the members live.
        blocks: the members, in order (a step's input buffer holds the (stack, m, n) matrices of
            those that have a gradient).
    """

    m: int
    n: int
    dtype: torch.dtype
    device: torch.device
    blocks: tuple[MatrixBlock, ...]

    @property
    def reduce_dim(self) -> int | None:
        return self.blocks[0].reduce_dim


def _blocks_of(plan: ParamPlan) -> list[MatrixBlock]:
    geometry = plan.geometry
    if geometry is None or geometry.rows * geometry.cols == 0:
        return []  # AdamW, or (k, 0) and empty matrices: nothing to orthogonalize
    owned = plan.placement.assembled_on_owner
    blocks, offset = [], 0
    for (start, stop), dim in zip(geometry.row_blocks, geometry.reduce_dims):
        length = (stop - start) if dim == -1 else geometry.cols
        blocks.append(
            MatrixBlock(plan.index, plan, (start, stop), geometry.batch, dim,
                        (offset, offset + length), owned)
        )  # fmt: skip
        offset += length
    return blocks




def plan_batches(
    plans: Sequence[ParamPlan],
    params: Sequence[torch.Tensor],
    momentum_dtypes: Sequence[torch.dtype],
    budget: int | None,
) -> tuple[BlockBatch, ...]:
    """The batches of one matrix group: blocks grouped by (m, n, input dtype, device), split so
    that a batch's input is at most ``budget`` bytes (None: one batch per key). ``params[i]`` is
    the local tensor of ``plans[i]``'s parameter, ``momentum_dtypes[i]`` its momentum's dtype;
    U is formed in at least float32 (a bf16 momentum is updated in float32)."""
    by_key: dict[tuple, list[MatrixBlock]] = {}
    for plan, p, momentum_dtype in zip(plans, params, momentum_dtypes):
        if not plan.placement.computed_here(plan):
            continue
        dtype = torch.promote_types(momentum_dtype, torch.float32)
        for block in _blocks_of(plan):
            m = block.rows[1] - block.rows[0]
            key = (m, plan.geometry.cols, dtype, p.device)
            by_key.setdefault(key, []).append(block)
    batches = []
    for (m, n, dtype, device), blocks in by_key.items():
        current: list[MatrixBlock] = []
        size = 0
        for block in blocks:
            nbytes = block.stack * m * n * dtype.itemsize
            if current and budget is not None and size + nbytes > budget:
                batches.append(BlockBatch(m, n, dtype, device, tuple(current)))
                current, size = [], 0
            current.append(block)
            size += nbytes
        batches.append(BlockBatch(m, n, dtype, device, tuple(current)))
    return tuple(batches)


class Workspace:
    """Flat buffers, one per (purpose, dtype, device), reused by every batch of every step.

    A buffer is (re)allocated when a batch asks for more than it holds, so after the first
    step nothing is allocated again. Batches run one after another, so one buffer per purpose
    serves all of them.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}
        self._generators: dict[str, torch.Generator] = {}
        # Per device: the stochastic-rounding table (int32, 1-D), a pure function of the entry
        # index (functional.rounding_table), so rebuilding or growing it changes no bit.
        self._tables: dict[str, torch.Tensor] = {}

    def flat(self, purpose: str, dtype: torch.dtype, device: torch.device, numel: int):
        """A 1-D view of ``numel`` elements of the buffer (contents undefined)."""
        key = (purpose, dtype, str(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def rounding_scratch(self, like: torch.Tensor, step: int, key: int, draw: bool):
        """The ``rounding`` of :func:`normuon.functional.momentum_and_input_` for a bf16 momentum
        whose float32 update is shaped like ``like``: (a float32 buffer shaped like it, the
        random bits, None), the bits a view of this device's rounding table at (``step``,
        ``key``) (:func:`normuon.functional.rounding_noise`: nothing generated, nothing
        written).

        ``draw``: a step prepared for CUDA-graph capture, where a view chosen at capture would
        be replayed with the same bits every step; then (float32 buffer, int32 scratch, this
        device's generator), which the graph registers and advances at each replay.
        """
        m_new = self.flat("rounded_momentum", like.dtype, like.device, like.numel())
        if draw:
            noise = self.flat("rounding_noise", torch.int32, like.device, like.numel())
            return m_new.view(like.shape), noise.view(like.shape), self.generator(like.device)
        table = self.rounding_table(like.device, like.numel() + F.ROUNDING_WINDOWS)
        return m_new.view(like.shape), F.rounding_noise(table, step, key, like), None

    def rounding_table(self, device: torch.device, numel: int) -> torch.Tensor:
        """This device's table of rounding bits, at least ``numel`` entries (built when first
        needed, regrown when a larger tensor asks: as large as the largest bf16 momentum block
        plus ``ROUNDING_WINDOWS``, which is what a generated-bits scratch took)."""
        key = str(device)
        table = self._tables.get(key)
        if table is None or table.numel() < numel:
            table = self._tables[key] = F.rounding_table(numel, device)
        return table

    def generator(self, device: torch.device) -> torch.Generator:
        """The random bits of stochastic rounding on ``device`` in a step prepared for capture
        (seeded 0 when first used, so a run is reproducible; not saved with the state, so a
        resumed captured run rounds differently). Eager steps read the rounding table."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(0)
        return self._generators[key]

    def generators(self) -> list[torch.Generator]:
        """The generators created so far (a CUDA graph must register them)."""
        return list(self._generators.values())

    def clear(self) -> None:
        self._buffers.clear()
        self._tables.clear()

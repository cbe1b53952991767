"""How a parameter tensor is seen as a stack of matrices, and where its neurons are.

NorMuon and Muon work on matrices W of shape (m, n) whose row i belongs to output neuron i
(``docs/algorithm.md``, "Shapes"). A parameter maps to a (B, m, n) stack in one of four ways:

- a 2-D ``nn.Linear`` weight (out, in) is one matrix;
- a 3-D tensor (E, m, n), e.g. stacked MoE experts, is E independent matrices;
- a convolution kernel (out, in, *k) is one (out, in * prod(k)) matrix: a neuron is an output
  channel (``layout="conv"`` forces this for 3-D Conv1d kernels);
- a *transposed* weight stores (in, out), e.g. Hugging Face's ``Conv1D`` (``x @ W``):
  ``layout="transposed"`` treats it as its transpose, so rows are still output neurons.

No tensor math beyond views lives here; the second moment's shape and the row blocks of
``split_sizes`` are decided here so the optimizer, the distributed layer and the neuron
diagnostics (:func:`neuron_rows`) agree on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "LAYOUTS",
    "MatrixGeometry",
    "matrix_geometry",
    "neuron_rows",
    "reduce_dim",
    "second_moment_key",
]

#: Values of the ``layout`` group option.
LAYOUTS = ("auto", "conv", "stacked", "transposed")


def reduce_dim(m: int, n: int, normalize: str) -> int | None:
    """Axis of a (B, m, n) stack averaged to get one second-moment entry per neuron.

    ``"rows"`` (paper): one entry per row (output neuron), so average over columns (dim -1).
    ``"larger_dim"`` (modded-nanogpt): one entry per element of the larger dimension; rows win
    ties. ``"elements"`` (the paper's Muon+Adam ablation): None, nothing is averaged, one entry
    per weight.
    """
    if normalize == "elements":
        return None
    if normalize == "rows" or m >= n:
        return -1
    return -2


def second_moment_key(normalize: str) -> str:
    """The state key of NorMuon's second moment: ``"neuron_second_moment"`` (one entry per
    neuron, ``normalize="rows"`` / ``"larger_dim"``) or ``"element_second_moment"`` (shaped
    like the parameter, ``normalize="elements"``)."""
    return "element_second_moment" if normalize == "elements" else "neuron_second_moment"


@dataclass(frozen=True)
class MatrixGeometry:
    """A parameter of shape ``shape`` seen as a (batch, rows, cols) stack of matrices.

    Attributes:
        shape: the parameter's shape.
        layout: the resolved layout: ``"matrix"``, ``"stacked"``, ``"conv"`` or ``"transposed"``.
        batch, rows, cols: the stack's shape; rows are output neurons.
        row_blocks: (start, stop) row ranges orthogonalized and scaled separately
            (``split_sizes``; one block covering every row by default).
        reduce_dims: per row block, the axis averaged for its second moment (-1: one entry per
            row; -2: one per column, ``normalize="larger_dim"`` on a wide block; None: one per
            element, ``normalize="elements"``).
        state_shape: shape of NorMuon's second moment: the stack dims, then the neurons of all
            blocks concatenated; the parameter's own shape for ``normalize="elements"``.
        neuron_dim: the parameter dim whose indices are the second moment's last dim one for one
            (rows of a matrix: dim 0, or dim 1 of a transposed weight, or dim -2 of a stack), or
            None when some block keeps per-column statistics.
        batch_dims: the parameter dims that index whole matrices (the stack's leading dims).
    """

    shape: tuple[int, ...]
    layout: str
    batch: int
    rows: int
    cols: int
    row_blocks: tuple[tuple[int, int], ...]
    reduce_dims: tuple[int | None, ...]
    state_shape: tuple[int, ...]
    neuron_dim: int | None
    batch_dims: tuple[int, ...]

    @property
    def elementwise(self) -> bool:
        """Whether the second moment has one entry per weight (``normalize="elements"``)."""
        return any(d is None for d in self.reduce_dims)

    @property
    def matrix_dims(self) -> tuple[int, ...]:
        """Parameter dims that lie inside one matrix (sharding them splits matrices)."""
        return tuple(d for d in range(len(self.shape)) if d not in self.batch_dims)

    def as_matrices(self, t: torch.Tensor) -> torch.Tensor:
        """(B, m, n) view of a parameter-shaped tensor ``t`` (a view when ``t`` is contiguous)."""
        if self.layout == "transposed":
            return t.reshape(self.batch, self.cols, self.rows).mT
        return t.reshape(self.batch, self.rows, self.cols)

    def from_matrices(self, m: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`as_matrices`: a (B, m, n) stack back in the parameter's shape."""
        if self.layout == "transposed":
            m = m.mT
        return m.reshape(self.shape)

    def ns_cost(self) -> float:
        """Flops of one Newton-Schulz step over every block: 4 k^2 K + 2 k^3, k = min side."""
        total = 0.0
        for start, stop in self.row_blocks:
            k, big = sorted((stop - start, self.cols))
            total += 4.0 * k * k * big + 2.0 * k**3
        return self.batch * total


def matrix_geometry(
    shape: Sequence[int],
    layout: str = "auto",
    split_sizes: Sequence[int] | None = None,
    normalize: str = "rows",
) -> MatrixGeometry:
    """Resolve a parameter shape to its stack of matrices. Raises ValueError on a misfit.

    ``layout="auto"``: 2-D is one matrix; 3-D is a stack (E, m, n); 4-D and 5-D are
    convolution kernels. ``"conv"`` forces the kernel flattening, ``"stacked"`` makes leading
    dims a batch, ``"transposed"`` reads the last two dims as (in, out).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(
            f"a parameter of shape {shape} is not a matrix: NorMuon/Muon groups take 2-D and "
            f"larger tensors; put scalars and vectors in an algorithm='adamw' group "
            f"(normuon.param_groups does this for a whole model)"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "conv" or (layout == "auto" and len(shape) >= 4):
        kind, batch, rows, cols = "conv", 1, shape[0], math.prod(shape[1:])
        lead: tuple[int, ...] = ()
        row_dim = 0
    elif layout == "transposed":
        kind = "transposed"
        batch, rows, cols = math.prod(shape[:-2]), shape[-1], shape[-2]
        lead, row_dim = shape[:-2], len(shape) - 1
    elif len(shape) == 2:
        kind, batch, rows, cols = "matrix", 1, shape[0], shape[1]
        lead, row_dim = (), 0
    else:
        kind = "stacked"
        batch, rows, cols = math.prod(shape[:-2]), shape[-2], shape[-1]
        lead, row_dim = shape[:-2], len(shape) - 2
    if split_sizes is None:
        blocks: tuple[tuple[int, int], ...] = ((0, rows),)
    else:
        if sum(split_sizes) != rows:
            raise ValueError(
                f"split_sizes {tuple(split_sizes)} sum to {sum(split_sizes)} but the parameter of "
                f"shape {shape} has {rows} output rows per matrix"
            )
        starts = [0]
        for size in split_sizes:
            starts.append(starts[-1] + size)
        blocks = tuple(zip(starts[:-1], starts[1:]))
    reduce_dims = tuple(reduce_dim(stop - start, cols, normalize) for start, stop in blocks)
    neurons = sum(
        (stop - start) if dim == -1 else cols
        for (start, stop), dim in zip(blocks, reduce_dims)
    )
    state_shape = lead + (neurons,)
    if normalize == "elements":  # one entry per weight: the parameter's shape and sharding
        state_shape = shape
    neuron_dim = row_dim if all(d == -1 for d in reduce_dims) else None
    if len(blocks) == 1 and reduce_dims[0] == -2 and kind in ("matrix", "stacked"):
        neuron_dim = len(shape) - 1  # one entry per column of a single wide block
    elif len(blocks) == 1 and reduce_dims[0] == -2 and kind == "transposed":
        neuron_dim = len(shape) - 2
    return MatrixGeometry(
        shape=shape,
        layout=kind,
        batch=batch,
        rows=rows,
        cols=cols,
        row_blocks=blocks,
        reduce_dims=reduce_dims,
        state_shape=state_shape,
        neuron_dim=neuron_dim,
        batch_dims=tuple(range(len(lead))),
    )


def neuron_rows(
    t: torch.Tensor, layout: str = "auto", split_sizes: Sequence[int] | None = None
) -> torch.Tensor:
    """A parameter-shaped tensor as (neurons, fan_in): one row per output neuron.

    The rows of :meth:`MatrixGeometry.as_matrices` with the stack flattened: a (E, m, n) stack
    gives E*m rows of length n, a conv kernel (out, in, *k) out rows of length in*prod(k), a
    transposed (in, out) weight its transpose. ``layout`` and ``split_sizes`` are the group
    options (``split_sizes`` does not move rows; it is checked against them). A view of ``t``
    whenever ``reshape`` can give one.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"neuron_rows expects a tensor, got {type(t).__name__}")
    matrices = matrix_geometry(t.shape, layout, split_sizes).as_matrices(t)
    return matrices.reshape(-1, matrices.shape[-1])

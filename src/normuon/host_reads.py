"""Catching host reads: any op that copies a tensor's value back to the host.

On an accelerator such a read stalls the step until the device catches up, breaks CUDA-graph
capture and causes graph breaks or recompiles under ``torch.compile``. The test suite and
``normuon check`` prove the optimizer's step has none, on any device: :class:`NoHostReads`
fails on every dispatched host read
(``aten._local_scalar_dense`` behind ``.item()``, ``bool(t)``, ``int(t)``; ``aten.nonzero``;
``aten.is_nonzero``; ``aten.equal``) and on ``Tensor.tolist()`` / ``Tensor.numpy()``, which do
not go through the dispatcher.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HOST_READ_OPS", "HostReadError", "NoHostReads"]

#: Dispatched ops whose result is a host value computed from tensor data.
HOST_READ_OPS = frozenset({
    "aten._local_scalar_dense.default",
    "aten.nonzero.default",
    "aten.nonzero_static.default",
    "aten.is_nonzero.default",
    "aten.equal.default",
    "aten.allclose.default",
    "aten.masked_select.default",
    "aten.unique_dim.default",
    "aten._unique2.default",
})  # fmt: skip


class HostReadError(RuntimeError):
    """A host read happened inside :class:`NoHostReads`."""


class NoHostReads(TorchDispatchMode):
    """Within the context, every host read raises :class:`HostReadError` naming the op."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in HOST_READ_OPS:
            self.seen.append(name)
            raise HostReadError(f"host read in the optimizer step: {name}")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for attr in ("tolist", "numpy"):
            self._saved[attr] = getattr(torch.Tensor, attr)

            def refuse(t, *args, _attr=attr, **kwargs):
                self.seen.append(f"Tensor.{_attr}")
                raise HostReadError(f"host read in the optimizer step: Tensor.{_attr}()")

            setattr(torch.Tensor, attr, refuse)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, fn in self._saved.items():
            setattr(torch.Tensor, attr, fn)
        return super().__exit__(*exc)

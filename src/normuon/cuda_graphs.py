"""Capturing the optimizer step in a CUDA graph and replaying it.

A captured step replays the recorded kernels on the tensors they were recorded with, without
Python or launch overhead. That holds only if the step reads nothing back to the host (true of
NorMuon/Muon on CUDA) and every tensor it touches stays the same object. The optimizer's public
hook :meth:`normuon.NorMuon.prepare_capture` makes it so and returns a
:class:`~normuon.capture.CaptureSpec` saying what the graph reads; :class:`GraphedStep` uses
only that hook. The traps other implementations fell into, and what is done about them:

- **hyperparameters frozen at capture**: every hyperparameter is a 0-d tensor on the device,
  which LR schedulers update in place; a value written into a group as a Python number (a
  scheduler's ``group["momentum"] = 0.9``, a user's ``group["lr"] = 0.01``) is copied into the
  captured tensor before the next replay (``CaptureSpec.refresh``);
- **options or groups changed after capture** (``nesterov``, ``ns_steps``, a new group): the
  next step captures again;
- **parameters without a gradient**: every parameter has a gradient buffer the graph reads and
  a has-grad flag; a parameter whose ``grad`` is None is masked out of the step (unchanged, its
  state too, as torch.optim skips it), and a gradient that is a new tensor (after
  ``zero_grad(set_to_none=True)``) is copied into the captured buffer (use
  ``set_to_none=False`` to save the copy);
- **state created lazily**: all state, the non-finite skip counter and bf16 state's random
  generators exist before the capture, and the first steps run eagerly (warm-up, which also
  fills the optimizer's workspace);
- **random bits frozen at capture**: eager steps read bf16 state's stochastic-rounding bits as
  views of a fixed table at an offset set by the step counter, which a replay would repeat; a
  step prepared for capture draws them from a generator the graph registers (its offset
  advances at each replay) instead;
- **a state dict loaded after capture**: ``load_state_dict`` replaces the state tensors, so the
  next step captures again, with the same generators (kept by the load) registered again and
  the skip counter kept;
- **a step counter stuck in low precision**: AdamW's step counter is float32 (exact to 2^24
  steps), never bf16;
- **collectives in the graph**: captured NCCL work can hang ``destroy_process_group``; only
  single-process steps are captured.

Only the capture and replay need CUDA: :class:`GraphedStep` takes the graph machinery as a
``backend``, so its logic is tested on the CPU with a stand-in that replays what a graph would
read (``tests/test_cuda_graphs.py``); the real capture is in ``tests/test_cuda.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .capture import HYPERPARAMETERS, CaptureSpec

__all__ = ["CudaGraphs", "EagerReplay", "GraphedStep", "HYPERPARAMETERS", "prepare_for_capture"]


def _check_optimizer(optimizer: Any, what: str) -> None:
    if not hasattr(optimizer, "prepare_capture"):
        raise ValueError(
            f"{what} needs a normuon.NorMuon or normuon.Muon, got {type(optimizer).__name__}"
        )


def prepare_for_capture(optimizer: torch.optim.Optimizer) -> torch.device:
    """``optimizer.prepare_capture()`` (see there), returning the parameters' device; parameters
    without a gradient get a zero one (for a caller that captures ``step()`` itself)."""
    _check_optimizer(optimizer, "prepare_for_capture")
    spec = optimizer.prepare_capture()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    return spec.device


class CudaGraphs:
    """The graph machinery of :class:`GraphedStep`: CUDA streams and ``torch.cuda.CUDAGraph``."""

    def check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA parameters, got {device}")

    def eager(self, step: Callable[[], Any], device: torch.device) -> None:
        """One step outside a graph, on a side stream (as warm-up before a capture must)."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(device).wait_stream(stream)

    def capture(self, step: Callable[[], Any], spec: CaptureSpec):
        """A graph of ``step`` with the spec's generators registered (recorded, not run)."""
        graph = torch.cuda.CUDAGraph()
        if spec.generators and not hasattr(graph, "register_generator_state"):
            raise ValueError(
                "state_dtype='bfloat16' draws random bits from its own generator, which this "
                "torch cannot register with a CUDA graph; use the default state_dtype"
            )
        for generator in spec.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize(spec.device)
        with torch.cuda.graph(graph):
            step()
        return graph


class EagerReplay:
    """A stand-in for :class:`CudaGraphs` on any device, to test what :class:`GraphedStep` does
    without a GPU (``normuon check --device cpu``, the test suite).

    A "capture" records what a CUDA graph would keep: the hyperparameter objects the groups hold
    and the gradient tensors of the parameters. A replay runs the step eagerly on those very
    objects, whatever the groups and ``.grad`` hold now; so a number written into a group that
    GraphedStep failed to copy into the captured tensor is missed here as a real replay would
    miss it. (Kernels still run eagerly, so reading the host is not caught here: see
    ``normuon.host_reads``.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.captures = 0
        self.replays = 0
        self.generators: list[torch.Generator] = []

    def check_device(self, device: torch.device) -> None:
        """Any device."""

    def eager(self, step: Callable[[], Any], device: torch.device) -> None:
        step()

    def capture(self, step: Callable[[], Any], spec: CaptureSpec):
        self.captures += 1
        self.generators = list(spec.generators)
        keys = ("betas",) + HYPERPARAMETERS
        groups = self.optimizer.param_groups
        frozen = [{k: g[k] for k in keys if k in g} for g in groups]
        buffers = [p.grad for g in groups for p in g["params"]]
        if any(b is None for b in buffers):
            raise ValueError("a capture records every parameter's gradient buffer")
        return _Replay(self, step, frozen, buffers)


class _Replay:
    """EagerReplay's graph: the step on the captured hyperparameter objects and buffers."""

    def __init__(self, backend: EagerReplay, step, frozen, buffers) -> None:
        self.backend, self.step, self.frozen, self.buffers = backend, step, frozen, buffers

    def replay(self) -> None:
        self.backend.replays += 1
        groups = self.backend.optimizer.param_groups
        params = [p for g in groups for p in g["params"]]
        saved = [{k: g[k] for k in values} for g, values in zip(groups, self.frozen)]
        grads = [p.grad for p in params]
        for g, values in zip(groups, self.frozen):
            g.update(values)
        for p, buffer in zip(params, self.buffers):
            p.grad = buffer
        try:
            self.step()
        finally:
            for g, values in zip(groups, saved):
                g.update(values)
            for p, g in zip(params, grads):
                p.grad = g


class GraphedStep:
    """``step()`` of a NorMuon/Muon optimizer, captured in a CUDA graph after a warm-up.

    Example::

        opt = NorMuon(param_groups(model), lr=0.02)
        graphed = GraphedStep(opt)              # hyperparameters become device tensors
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        for batch in data:
            loss(model, batch).backward()
            graphed.step()                      # eager for `warmup` steps, then a replay
            sched.step()
            opt.zero_grad(set_to_none=False)    # keep the captured gradient buffers

    Args:
        optimizer: a :class:`~normuon.NorMuon` or :class:`~normuon.Muon` whose parameters are
            on one CUDA device.
        warmup: eager steps before the capture (they allocate the workspace and the state).
        backend: the graph machinery (default :class:`CudaGraphs`).

    Attributes:
        captures: how many times the step was captured (again after a state dict was loaded,
            an option changed or groups were added).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = 3, *,
                 backend: Any = None) -> None:  # fmt: skip
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        _check_optimizer(optimizer, "GraphedStep")
        self.backend = backend if backend is not None else CudaGraphs()
        self.optimizer = optimizer
        self.spec: CaptureSpec = optimizer.prepare_capture()
        self.device = self.spec.device
        self.backend.check_device(self.device)
        self.warmup = warmup
        self.eager_steps = 0
        self.captures = 0
        self.graph: Any = None
        self._buffers: list[torch.Tensor] = []  # the gradients the graph reads
        self._has_grad_now: list[bool] = []  # host copy of the spec's has-grad flags
        optimizer.register_load_state_dict_post_hook(lambda opt: self.invalidate())

    def invalidate(self) -> None:
        """Capture again at the next step (state or groups changed)."""
        self.graph = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> None:
        if self.graph is not None and not self.spec.refresh(self.optimizer.param_groups):
            self.invalidate()  # an option, the groups or the plans changed
        if self.graph is None and self.eager_steps < self.warmup:
            self._set_has_grad([True] * len(self.params))  # eager steps skip None grads
            self.backend.eager(self.optimizer.step, self.device)
            self.eager_steps += 1
            return
        if self.graph is None:
            self._capture()
        self._feed_gradients()
        self.graph.replay()
        # Flags back to True (the few that were not): a later step outside the graph, eager
        # or by hand, must not skip a parameter that had no gradient at this replay.
        self._set_has_grad([True] * len(self._has_grad_now))

    def _capture(self) -> None:
        # New groups or a loaded state: the same guarantees, over the current tensors.
        self.spec = self.optimizer.prepare_capture()
        params = self.params
        self._buffers = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self._has_grad_now = [True] * len(params)
        for flag in self.spec.has_grad:
            flag.fill_(True)
        absent = [p for p in params if p.grad is None]
        for p, buffer in zip(params, self._buffers):
            p.grad = buffer  # the step records every parameter; absent ones are masked
        try:
            self.graph = self.backend.capture(self.optimizer.step, self.spec)
        finally:
            for p in absent:
                p.grad = None
        self.captures += 1

    def _feed_gradients(self) -> None:
        """Each gradient into the buffer the graph reads; a parameter with none is masked."""
        present = []
        for p, buffer in zip(self.params, self._buffers):
            g = p.grad
            present.append(g is not None)
            if g is not None and g is not buffer:  # a new gradient tensor
                buffer.copy_(g)
                p.grad = buffer
        self._set_has_grad(present)

    def _set_has_grad(self, present: Sequence[bool]) -> None:
        """Write the flags that changed since the last step (a few tiny copies at most)."""
        if len(self._has_grad_now) != len(present):
            self._has_grad_now = [True] * len(present)
            for flag in self.spec.has_grad:
                flag.fill_(True)
        for i, (now, want) in enumerate(zip(self._has_grad_now, present)):
            if now != want:
                self.spec.has_grad[i].fill_(want)
                self._has_grad_now[i] = want

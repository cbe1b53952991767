"""Capturing the optimizer step in a CUDA graph and replaying it.

A captured step replays the recorded kernels on the tensors they were recorded with, without
Python or launch overhead. That holds only if the step reads nothing back to the host (true of
NorMuon/Muon on CUDA) and every tensor it touches stays the same object. The traps other
implementations fell into, and what :class:`GraphedStep` does about them:

- **hyperparameters frozen at capture**: a Python ``lr`` is baked into the kernels. Every
  hyperparameter becomes a 0-d tensor on the parameters' device (:func:`prepare_for_capture`),
  which LR schedulers update in place, so a replay reads the current value;
- **parameters without a gradient at capture never update**: every parameter gets a gradient
  buffer before capture, and a gradient that is a new tensor at replay time (after
  ``zero_grad(set_to_none=True)``) is copied into the captured buffer (use
  ``set_to_none=False`` to save the copy);
- **state created lazily**: all state is created up front (``init_state``) and the first steps
  run eagerly (warm-up, which also fills the optimizer's workspace) before the capture;
- **a state dict loaded after capture**: ``load_state_dict`` replaces the state tensors, so the
  next step captures again (a load-state-dict post-hook marks the graph stale), as do new
  parameter groups;
- **a step counter stuck in low precision**: AdamW's step counter is float32 (exact to 2^24
  steps), never bf16;
- **collectives in the graph**: captured NCCL work can hang ``destroy_process_group``; only
  single-process steps are captured (a process group with several ranks is refused).

Only the capture and replay need CUDA; :func:`prepare_for_capture` is plain PyTorch and is
tested on the CPU (``tests/test_cuda_graphs.py``), the capture in ``tests/test_cuda.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["GraphedStep", "HYPERPARAMETERS", "prepare_for_capture"]

#: Group keys turned into device tensors (AdamW groups: ``betas`` is a pair of them).
HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "beta2", "eps")


def prepare_for_capture(optimizer: torch.optim.Optimizer) -> torch.device:
    """Make ``optimizer``'s step capturable; returns the parameters' device.

    Every hyperparameter becomes a 0-d float32 tensor on the parameters' device (schedulers
    then update it in place), every parameter without a gradient gets a zero one, all state is
    created now, and ``host_reads`` is set to ``"never"``. Raises ValueError for parameters on
    several devices or an optimizer without ``init_state``/``host_reads`` (not NorMuon/Muon).
    """
    if not hasattr(optimizer, "init_state") or not hasattr(optimizer, "host_reads"):
        raise ValueError(
            f"prepare_for_capture needs a normuon.NorMuon or normuon.Muon, got "
            f"{type(optimizer).__name__}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"a captured step needs every parameter on one device, got {devices}")
    device = devices.pop()

    def on_device(value: Any) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.device == device and value.dtype == torch.float32 and value.ndim == 0:
                return value  # already capturable: keep the object a captured graph reads
            return value.detach().to(device=device, dtype=torch.float32).reshape(())
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    for group in optimizer.param_groups:
        for key in HYPERPARAMETERS:
            if key in group:
                group[key] = on_device(group[key])
        if "betas" in group:
            group["betas"] = tuple(on_device(b) for b in group["betas"])
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.host_reads = "never"
    optimizer.init_state()
    return device


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
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "GraphedStep captures single-process steps only: collectives captured in a "
                "CUDA graph can hang destroy_process_group"
            )
        self.optimizer = optimizer
        self.device = prepare_for_capture(optimizer)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA parameters, got {self.device}")
        self.warmup = warmup
        self.eager_steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._grads: list[torch.Tensor] = []
        self._plans = None
        optimizer.register_load_state_dict_post_hook(lambda opt: self.invalidate())

    def invalidate(self) -> None:
        """Capture again at the next step (state or groups changed)."""
        self.graph = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> None:
        if self._plans is not self.optimizer._plans():  # groups added since the capture
            self.invalidate()
        if self.graph is None and self.eager_steps < self.warmup:
            self._eager_step()
            return
        if self.graph is None:
            self._capture()
        for p, captured in zip(self.params, self._grads):
            if p.grad is not captured:  # a new gradient tensor: into the captured buffer
                captured.copy_(p.grad if p.grad is not None else torch.zeros_like(captured))
                p.grad = captured
        self.graph.replay()

    def _eager_step(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.optimizer.step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.eager_steps += 1

    def _capture(self) -> None:
        prepare_for_capture(self.optimizer)  # new groups or loaded state: same guarantees
        self._grads = [p.grad for p in self.params]
        self._plans = self.optimizer._plans()
        graph = torch.cuda.CUDAGraph()
        generators = self.optimizer._workspace.generators()  # bf16 state's rounding bits
        if generators and not hasattr(graph, "register_generator_state"):
            raise ValueError(
                "state_dtype='bfloat16' draws random bits from its own generator, which this "
                "torch cannot register with a CUDA graph; use the default state_dtype"
            )
        for generator in generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            self.optimizer.step()
        self.graph = graph

"""Where a run executes: device choice, the process group under torchrun, and its teardown.

Everything here is about the process, not the training recipe: a device that does not exist
and a collective timeout are runtime options, so they never enter a run's identity.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "Dist",
    "resolve_device",
    "init_distributed",
    "finish_distributed",
    "sync",
    "progress_bar",
]


@dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device_arg: str | None) -> torch.device:
    """``--device`` -> torch.device; ValueError for a malformed name or an absent backend."""
    if device_arg in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_arg)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device_arg!r} is not a device name; use cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device_arg}: CUDA is not available here (torch "
                f"{torch.__version__} sees no GPU); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device_arg}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device_arg}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device_arg}: the harness runs on cpu, cuda or mps")
    return device


def launch_rank() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process, (0, 1) without torchrun; readable
    before the process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(
    device_arg: str | None, timeout_s: float | None = None
) -> tuple[Dist, torch.device]:
    """Process group under torchrun (WORLD_SIZE > 1), and this process's device.

    ``timeout_s`` bounds every collective: a rank that stopped makes the others fail after that
    many seconds instead of torch's default (10 or 30 minutes).
    """
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    rank, world = launch_rank()
    if world <= 1:
        return Dist(), resolve_device(device_arg)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg not in (None, "auto"):
        resolve_device(device_arg)  # the same clear error as a single process
    use_cuda = torch.cuda.is_available() and device_arg in (None, "auto", "cuda")
    if not dist.is_initialized():
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)
    if use_cuda:
        torch.cuda.set_device(local)
        return Dist(rank, world, local), torch.device("cuda", local)
    return Dist(rank, world, local), torch.device("cpu")


def finish_distributed(clean: bool) -> None:
    """Tear the process group down (no-op without one).

    ``clean``: every rank finished its collectives, so they meet at a barrier and pause briefly
    before the group goes; destroying a gloo group while its work thread still completes a
    collective can abort the process (pytorch#56297). After an error there is no barrier: the
    other ranks may never reach it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean:
            dist.barrier()
            time.sleep(0.2)
    finally:
        dist.destroy_process_group()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings measure work done, not work launched)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(total: int, initial: int, enabled: bool | None, desc: str):
    """A tqdm bar, or None when disabled (not a TTY, CI=true, or asked)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")
    if not enabled:
        return None
    from tqdm.auto import tqdm  # lazy: the library itself does not depend on tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)

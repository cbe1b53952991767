"""How a harness run is parallelized under torchrun (DDP or FSDP2), and its model and
optimizer state gathered whole for a checkpoint (and put back on resume)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .runtime import Dist

__all__ = ["full_state", "is_sharded", "load_full_state", "wrap_model"]


def wrap_model(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """The module the training loop calls: DDP or FSDP2 under torchrun, optionally compiled.

    FSDP2 (``parallel="fsdp2"``) shards every block and then the root with
    ``torch.distributed.fsdp.fully_shard`` on a 1-D mesh; the parameters become DTensors in
    place, so the optimizer built afterwards on ``model`` takes NorMuon's DTensor path.
    """
    if d.world > 1:
        if cfg.parallel == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (d.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
    if cfg.compile:
        model = torch.compile(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state(model: nn.Module, opt: torch.optim.Optimizer, d: Dist) -> tuple[Any, Any]:
    """Model and optimizer state with whole tensors on the CPU, whatever the parallelism.

    A collective under torchrun (call it on every rank). Sharded (FSDP2) models go through
    torch.distributed.checkpoint.state_dict, which keys the optimizer state by parameter name.
    """
    if d.world > 1 and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, opt, options=options)
    # NorMuon/Muon's state_dict() gathers the owners' shares under replicated DDP (a
    # collective, hence called on every rank), so it is whole here too.
    return model.state_dict(), opt.state_dict()


def load_full_state(
    model: nn.Module, opt: torch.optim.Optimizer, model_sd: Any, opt_sd: Any, d: Dist
) -> None:
    """Inverse of :func:`full_state`: every rank passes the whole saved state."""
    if d.world > 1 and is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=opt_sd,
                       options=options)  # fmt: skip
        return
    model.load_state_dict(model_sd)
    opt.load_state_dict(opt_sd)

"""Spawned workers for tests/test_distributed_extra.py (gloo, CPU). Reuses dist_workers' model,
batches and optimizer settings. Each worker writes what it saw to ``out_dir`` so that the test
process can assert on it (an exception in a worker fails the spawn as well)."""

from __future__ import annotations

import json
import os

import dist_workers as W
import torch
from torch import nn

from normuon import NorMuon

teardown = W.teardown  # barrier + pause before destroy_process_group (gloo shutdown race)


def partial_placement_error(rank: int, world: int, port: int, out_dir: str) -> None:
    """A DTensor parameter with a Partial placement (unreduced sums): how NorMuon refuses it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    W.setup(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    p = nn.Parameter(DTensor.from_local(torch.randn(8, 6), mesh, [Partial()]))
    result = {"at": None, "type": None, "message": None}
    try:
        opt = NorMuon([p], ns_dtype=torch.float32)
        p.grad = DTensor.from_local(torch.randn(8, 6), mesh, [Partial()])
        result["at"] = "step"
        opt.step()
        result["at"] = "no error"
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        result["at"] = result["at"] or "constructor"
        result["type"] = type(exc).__name__
        result["message"] = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    teardown()


def _ddp_train(ddp, opt, steps, start):
    for step in range(start, start + steps):
        W.loss_fn(ddp, W.batch(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def ddp_dcp_save(rank: int, world: int, port: int, ckpt: str, steps: int) -> None:
    """Replicated (DDP) mode, where each rank holds the optimizer state of its own matrices
    only: train, then save model + optimizer with DCP from the DDP-wrapped model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    W.setup(rank, world, port)
    model = W.make_model()
    ddp = DDP(model)
    opt = W.make_opt(model)
    _ddp_train(ddp, opt, steps, 0)
    model_sd, optim_sd = get_state_dict(ddp, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    teardown()


def ddp_dcp_load(
    rank: int, world: int, port: int, ckpt: str, done: int, more: int, out_dir: str
) -> None:
    """Load the DDP checkpoint at ``world`` ranks (DDP-wrapped when world > 1), continue, and
    compare with one uninterrupted single-process run of done + more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    W.setup(rank, world, port)
    model = W.make_model(seed=123)  # a different init: everything must come from the checkpoint
    wrapped = DDP(model) if world > 1 else model
    opt = W.make_opt(model)
    model_sd, optim_sd = get_state_dict(wrapped, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt)
    # Strict (torch's default): every parameter needs state in the checkpoint, which holds it
    # because NorMuon.state_dict() gathers the owners' shares on every rank.
    set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    strict_error = None
    _ddp_train(wrapped, opt, more, done)

    ref_model = W.make_model()
    ref_opt = W.make_opt(ref_model, process_group=None)
    W.train(ref_model, ref_opt, done + more)
    param_err, state_err, states = 0.0, 0.0, 0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        scale = q.abs().max().clamp_min(1e-12)
        param_err = max(param_err, ((p.detach() - q.detach()).abs().max() / scale).item())
        mine = opt.state.get(p, {})
        for key, value in ref_opt.state.get(q, {}).items():
            if key == "step" or key not in mine:
                continue  # replicated mode: only the owner holds a matrix's state
            scale = value.abs().max().clamp_min(1e-12)
            state_err = max(state_err, ((mine[key] - value).abs().max() / scale).item())
            states += 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(
            {
                "param_err": param_err,
                "state_err": state_err,
                "states": states,
                "strict_error": strict_error,
            },
            fh,
        )
    teardown()


def bf16_state_sharded(rank: int, world: int, port: int, out_dir: str) -> None:
    """FSDP2 and DDP with ``state_dtype="bfloat16"``: momentum DTensors (FSDP2) / tensors (DDP)
    in bf16, training close to one process with the same option (an FSDP2 shard's rounding bits
    are keyed by the shard's own entries, not the whole matrix's, and gradients are reduced in
    another order, so equality holds to bf16 resolution, not to float rounding)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    W.setup(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    ref = W.make_model()
    ref_opt = W.make_opt(ref, NorMuon, process_group=None, state_dtype="bfloat16")
    W.train(ref, ref_opt, W.STEPS)
    result = {}
    for label in ("fsdp2", "ddp"):
        model = W.make_model()
        if label == "fsdp2":
            model = W.shard(model, mesh)
            opt = W.make_opt(model, NorMuon, state_dtype="bfloat16")
            W.train(model, opt, W.STEPS)
        else:
            opt = W.make_opt(model, NorMuon, state_dtype="bfloat16")
            ddp = DDP(model)
            _ddp_train(ddp, opt, W.STEPS, 0)
        errors, dtypes = [], set()
        for p, q in zip(model.parameters(), ref.parameters()):
            a = W.full(p.detach())
            errors.append(((a - q.detach()).norm() / q.detach().norm()).item())
            state = opt.state.get(p, {})
            if "momentum_buffer" in state:
                m = state["momentum_buffer"]
                dtypes.add(str((m.to_local() if hasattr(m, "to_local") else m).dtype))
        result[label] = {"max_rel_err": max(errors), "momentum_dtypes": sorted(dtypes),
                         "rounding_steps": [g.get("rounding_step") for g in opt.param_groups],
                         "steps": W.STEPS}  # fmt: skip
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    teardown()

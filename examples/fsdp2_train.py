"""Train a small GPT with NorMuon under FSDP2, log the loss, save and reload a DCP checkpoint.

    torchrun --nproc_per_node=2 examples/fsdp2_train.py     # 2 ranks: gloo on CPU, nccl on GPUs
    python examples/fsdp2_train.py                          # one process, no process group

What it shows:

1. FSDP2: ``fully_shard`` on every transformer block, then on the root. Parameters, gradients
   and NorMuon's state become DTensors sharded on dim 0 (rows = neurons). NorMuon assembles each
   full matrix on one owner rank for Newton-Schulz and sends the rows back; nothing else is
   needed from the training loop.
2. ``NorMuon(param_groups(model), ...)``: hidden matrices get NorMuon, the embedding, the output
   head and vectors get AdamW, all in one optimizer.
3. A checkpoint with ``torch.distributed.checkpoint`` (DCP): ``get_state_dict`` gives the model's
   and the optimizer's sharded state dicts, ``dcp.save`` writes them (every rank its shards),
   ``dcp.load`` + ``set_state_dict`` read them back, into any world size. The script saves at
   ``--ckpt-at``, then builds a fresh model, loads the checkpoint, replays the remaining steps and
   checks that the losses are those of the uninterrupted run.

Every step uses the same global batch whatever the world size (each rank trains on its slice),
so the logged loss (averaged over ranks) is comparable between 1 and N processes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from normuon import NorMuon, param_groups
from normuon.harness.config import ModelConfig
from normuon.harness.data import get_batch, load_data
from normuon.harness.model import GPT


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ckpt-at", type=int, default=15, help="save a checkpoint after this step")
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "normuon_fsdp2"),
                   help="checkpoint folder (on storage that every rank sees)")  # fmt: skip
    p.add_argument("--data", choices=["shakespeare", "synthetic"], default="shakespeare")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (all ranks)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02, help="NorMuon learning rate (matrices)")
    p.add_argument("--adamw-lr", type=float, default=3e-3, help="embedding, head, vectors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-json", default=None, help="rank 0 writes the losses here")
    return p.parse_args()


def setup():
    """(rank, world, device, mesh). Under torchrun: a process group and a 1-D device mesh."""
    if "WORLD_SIZE" not in os.environ:  # plain `python examples/fsdp2_train.py`
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device, None
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch.set_num_threads(1)  # N processes share the CPU cores
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return dist.get_rank(), dist.get_world_size(), device, mesh


def synthetic_tokens(n: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """A token stream with structure to learn: 90% of the time the next token is the current
    one plus 1 (mod vocab), otherwise a random jump."""
    gen = torch.Generator().manual_seed(seed)
    jumps = torch.randint(0, vocab, (n,), generator=gen)
    steps = torch.where(torch.rand(n, generator=gen) < 0.9, torch.ones_like(jumps), jumps)
    return steps.cumsum(0) % vocab


def build(args, device, mesh, seed: int):
    """The model (sharded when there is a mesh) and its optimizer."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=256, n_layer=args.layers, n_head=4, n_kv_head=4,
                      d_model=args.d_model, max_seq_len=args.seq_len)  # fmt: skip
    model = GPT(cfg).to(device)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embedding and lm_head
    # bfloat16 Newton-Schulz on GPUs (the authors' choice); float32 on CPUs, where bfloat16
    # matrix products are slow unless the CPU has native support.
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    groups = param_groups(model, lr=args.lr, weight_decay=0.0, adamw_lr=args.adamw_lr)
    return model, NorMuon(groups, ns_dtype=ns_dtype)


def train(model, opt, tokens, steps, args, rank, world, device) -> list[float]:
    losses = []
    for step in steps:
        t0 = time.perf_counter()
        # The global batch of this step (the same on every rank), then this rank's rows.
        x, y = get_batch(tokens, args.batch_size, args.seq_len, args.seed, step)
        x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)  # SUM (gloo has no AVG), then divide
            loss /= world
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.2f} s",
                  flush=True)  # fmt: skip
    return losses


def save_checkpoint(model, opt, path: str) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def load_checkpoint(model, opt, path: str) -> None:
    # get_state_dict gives state dicts of the right (sharded) layout; dcp.load fills them from
    # disk, resharding if the checkpoint was written by a different number of ranks.
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main() -> None:
    args = parse_args()
    if not 0 < args.ckpt_at < args.steps:
        raise SystemExit("--ckpt-at must be between 0 and --steps")
    rank, world, device, mesh = setup()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    if args.data == "shakespeare":
        tokens = load_data().train  # bytes of the embedded corpus
    else:
        tokens = synthetic_tokens(50_000, seed=args.seed)
    if rank == 0:
        print(f"{world} process(es) on {device.type}; data: {args.data}", flush=True)

    # 1. Train, checkpointing after --ckpt-at steps.
    model, opt = build(args, device, mesh, seed=args.seed)
    first = train(model, opt, tokens, range(args.ckpt_at), args, rank, world, device)
    save_checkpoint(model, opt, args.ckpt_dir)
    if rank == 0:
        print(f"saved checkpoint after step {args.ckpt_at - 1} to {args.ckpt_dir}", flush=True)
    rest = train(model, opt, tokens, range(args.ckpt_at, args.steps), args, rank, world, device)

    # 2. A fresh model and optimizer (different init) resume from the checkpoint.
    del model, opt
    model, opt = build(args, device, mesh, seed=args.seed + 1)
    load_checkpoint(model, opt, args.ckpt_dir)
    if rank == 0:
        print("resumed from the checkpoint", flush=True)
    resumed = train(model, opt, tokens, range(args.ckpt_at, args.steps), args, rank, world, device)
    gap = max(abs(a - b) for a, b in zip(rest, resumed))
    if rank == 0:
        print(f"resume check: max |loss difference| over {len(rest)} steps = {gap:.2e}")
        if args.log_json:
            with open(args.log_json, "w") as fh:
                json.dump({"world": world, "losses": first + rest, "resumed": resumed}, fh)
    if dist.is_initialized():
        dist.barrier()  # every rank is done with its collectives before the group goes away
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

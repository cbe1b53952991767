"""Worker functions for the tensor-parallel tests (spawned processes, gloo, CPU).

A small transformer block is parallelized with torch's own ``parallelize_module`` plans
(ColwiseParallel for q/k/v/up projections: rows sharded, ``Shard(0)``; RowwiseParallel for the
output projections: columns sharded, ``Shard(1)``), optionally with FSDP2 on top on a (dp, tp)
mesh (``_StridedShard(0)`` / ``Shard(0)`` x ``Shard(1)``), trained a few steps on every rank with
the same batches, and compared with the single-process optimizer on an unparallelized copy.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from bounds import CautiousAllowance
from dist_workers import compare, copy_grads, free_port, setup, teardown  # noqa: F401 - free_port re-export
from torch import nn

from normuon import Muon, NorMuon
from normuon.newton_schulz import default_orthogonalizer

STEPS = 4
D_MODEL, HEAD_DIM = 12, 6


class Block(nn.Module):
    """Pre-norm attention + two MLPs. Under (dp 2, tp 2) the 22 and 6 rows of ``up``/``up2``
    shard unevenly (11 -> 6/5, 3 -> 2/1; torch's tensor-parallel layers need even tp shards);
    ``fused`` (30 rows) is a fused projection that the tests split (10, 10, 10)."""

    def __init__(self) -> None:
        super().__init__()
        d = D_MODEL
        self.norm1 = nn.RMSNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm2 = nn.RMSNorm(d)
        self.up = nn.Linear(d, 22)
        self.down = nn.Linear(22, d, bias=False)
        self.up2 = nn.Linear(d, 6, bias=False)
        self.down2 = nn.Linear(6, d, bias=False)
        self.fused = nn.Linear(d, 30, bias=False)
        self.fused_out = nn.Linear(30, d, bias=False)
        self.head = nn.Linear(d, 7, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, 7)
        h = self.norm1(x)
        # Heads from the local width: under tensor parallelism each rank holds some heads.
        q, k, v = (lin(h).unflatten(-1, (-1, HEAD_DIM)).transpose(1, 2) for lin in (self.q,
                   self.k, self.v))  # fmt: skip
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).flatten(-2))
        h = self.norm2(x)
        x = x + self.down(torch.relu(self.up(h)).square()) + self.down2(torch.tanh(self.up2(h)))
        x = x + self.fused_out(torch.relu(self.fused(h)))
        return self.head(x)


COLWISE = ("q", "k", "v", "up", "up2", "fused")
ROWWISE = ("o", "down", "down2", "fused_out")


def make_block(seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(2, 5, D_MODEL, generator=gen), torch.randn(2, 5, 7, generator=gen)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def groups(model: Block, cls, split: bool) -> list[dict]:
    """Matrices (fused split in its own group), and AdamW for norms, biases and the head."""
    matrices = [getattr(model, n).weight for n in COLWISE + ROWWISE if n != "fused"]
    vectors = [model.norm1.weight, model.norm2.weight, model.up.bias, model.head.weight]
    fused = {"params": [model.fused.weight]}
    if split:
        fused["split_sizes"] = (10, 10, 10)
    return [{"params": matrices}, fused, {"params": vectors, "algorithm": "adamw"}]


def make_opt(model, cls=NorMuon, split=False, **opts):
    # Plain parameters (head and norms under tensor parallelism alone) are replicated copies
    # that every rank updates itself: no DDP-style process group.
    opts.setdefault("process_group", None)
    # With ns_kernel="auto" each process times its own buckets (a rank's differ from the single
    # process's in count), and the float32 Gram iteration differs from the standard loop by up
    # to ~5e-4 of O (tests/test_ns_kernels.py), above these comparisons' 2e-6: placements are
    # compared with kernels fixed by shape (the timed choice is tested in one process).
    opts.setdefault("ns_kernel", "shape")
    return cls(
        groups(model, cls, split), lr=0.02, weight_decay=0.1, adamw_lr=1e-2,
        ns_dtype=torch.float32, **opts,
    )  # fmt: skip


def parallelize(model: Block, mesh_shape: tuple[int, ...], names=None) -> Block:
    """Mesh dims named ``names`` (default: ("tp",) for 1-D, ("dp", "tp") for 2-D): "tp" dims get
    torch's tensor-parallel plans, then "dp" dims FSDP2 on top, as torchtitan does."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    names = tuple(names or (("dp", "tp") if len(mesh_shape) == 2 else ("tp",)))
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    plan = {n: ColwiseParallel() for n in COLWISE} | {n: RowwiseParallel() for n in ROWWISE}
    if "tp" in names:
        parallelize_module(model, mesh["tp"], plan)
    if "dp" in names:
        fully_shard(model, mesh=mesh["dp"])
    return model


CASES = [
    (NorMuon, dict(update_scale="preserve_norm", normalize="rows")),
    (NorMuon, dict(update_scale="adam_rms", normalize="rows")),
    (NorMuon, dict(update_scale="preserve_norm", normalize="larger_dim", split=True)),
    (NorMuon, dict(update_scale="adam_rms", normalize="larger_dim")),
    (Muon, dict(update_scale="preserve_norm", split=True)),
    (Muon, dict(update_scale="adam_rms")),
    # Elementwise on each rank's blocks of W and D, column-sharded blocks included.
    (NorMuon, dict(update_scale="preserve_norm", normalize="rows", cautious_weight_decay=True)),
    # The paper's ablations: the Muon+Adam second moment is a DTensor placed as its parameter.
    (NorMuon, dict(normalize="elements", split=True)),
    (NorMuon, dict(normalize_input=True, update_scale="adam_rms")),
    (NorMuon, dict(normalize_matrices="tall", split=True)),
    (NorMuon, dict(beta2=0.0)),
]


def _step_with_reference_grads(model, opt, ref, ref_opt, step: int) -> None:
    """One step of both optimizers on identical gradients: the single process's, laid out as
    each DTensor parameter is by torch itself (``distribute_tensor``), so that the comparison
    sees the optimizer alone and not the different summation order of a parallel forward."""
    x, y = batch(step)
    nn.functional.mse_loss(ref(x), y).backward()
    copy_grads(model, ref)
    ref_opt.step()
    opt.step()
    ref_opt.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)


def tp_matches_single(rank: int, world: int, port: int, mesh_shape, out_dir: str) -> None:
    """Every case equals the single process on identical gradients; the first also records
    each rank's Newton-Schulz work, bytes sent and collectives of one step, and the
    placements; a last run trains the parallelized block end to end."""
    setup(rank, world, port)
    report = {"placements": {}, "ns_matrices": 0, "sent_bytes": 0, "collectives": 0}
    for case, (cls, opts) in enumerate(CASES):
        ref = make_block()
        ref_opt = make_opt(ref, cls, process_group=None, **opts)
        model = parallelize(make_block(), tuple(mesh_shape))
        counted = {}
        if case == 0:
            for name, p in model.named_parameters():
                placements = getattr(p, "placements", ())  # plain tensors: head, norms (tp only)
                report["placements"][name] = [repr(pl) for pl in placements]

            def counting(u, coefficients, dtype):
                report["ns_matrices"] += u.shape[0]
                return default_orthogonalizer(u, coefficients, dtype)

            counted["orthogonalizer"] = counting
        opt = make_opt(model, cls, **opts, **counted)
        # Cautious decay's mask may flip where it is ambiguous (tests/bounds.py).
        allowance = CautiousAllowance(ref.named_parameters())
        with allowance:
            for step in range(STEPS):
                if case == 0 and step == 1:
                    report["ns_matrices"] = 0
                    with _count_traffic(report, world):
                        _step_with_reference_grads(model, opt, ref, ref_opt, step)
                    report["floor_bytes"] = _floor_bytes(model, opt, rank)
                    report["ns_after_one_step"] = report["ns_matrices"]
                else:
                    _step_with_reference_grads(model, opt, ref, ref_opt, step)
        assert allowance.calls > 0 or not opts.get("cautious_weight_decay"), opts
        compare(model, opt, ref, ref_opt, what=f"mesh {mesh_shape} {cls.__name__} {opts}",
                allowance=allowance)  # fmt: skip
    report["ns_matrices"] = report.pop("ns_after_one_step")
    # End to end: the parallelized block trained by its own forward and backward. Its gradients
    # differ from the single process's by the summation order of the parallel matmuls, which
    # Newton-Schulz amplifies, hence the wider tolerance.
    ref = make_block()
    ref_opt = make_opt(ref, process_group=None)
    train(ref, ref_opt, STEPS)
    model = parallelize(make_block(), tuple(mesh_shape))
    opt = make_opt(model)
    train(model, opt, STEPS)
    compare(model, opt, ref, ref_opt, tol=1e-4, state_tol=1e-3, what=f"mesh {mesh_shape} e2e")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    teardown()


class _count_traffic:
    """Bytes this rank sends to other ranks with all_to_all_single, and the optimizer's
    collectives, during one step."""

    def __init__(self, report: dict, world: int) -> None:
        self.report, self.world = report, world

    def __enter__(self):
        self.originals = {n: getattr(dist, n) for n in ("all_to_all_single", "all_reduce",
                                                        "all_gather_into_tensor")}  # fmt: skip
        rank = dist.get_rank()
        report = self.report

        def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                              group=None, async_op=False):  # fmt: skip
            mine = dist.get_rank(group)
            sizes = input_split_sizes or [input.numel() // self.world] * self.world
            per = input.element_size() * (input[0].numel() if input.ndim > 1 else 1)
            report["sent_bytes"] += sum(s for r, s in enumerate(sizes) if r != mine) * per
            report["collectives"] += 1
            return self.originals["all_to_all_single"](
                output, input, output_split_sizes, input_split_sizes, group, async_op
            )

        def counted(name):
            def wrapper(*args, **kwargs):
                report["collectives"] += 1
                return self.originals[name](*args, **kwargs)

            return wrapper

        del rank
        dist.all_to_all_single = all_to_all_single
        dist.all_reduce = counted("all_reduce")
        dist.all_gather_into_tensor = counted("all_gather_into_tensor")
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)


def _floor_bytes(model, opt, rank: int) -> int:
    """This rank's traffic floor for one step: each distinct block of a split matrix goes once
    to the matrix's owner (nothing for blocks the owner holds itself) and the owner sends every
    other rank its block of the result once; the same for the second moment (float32 here)."""
    total = 0
    for plans in opt._plans():
        for plan in plans:
            if plan.kind != "sharded":
                continue
            for layout in filter(None, (plan.layout, plan.state_layout)):
                if layout.rank == plan.owner:
                    others = [r for r in range(layout.world) if r != plan.owner]
                    total += 4 * sum(layout.block_numel(r) for r in others)
                elif layout.rank in layout.senders_to(plan.owner):
                    total += 4 * layout.block_numel(layout.rank)
    return total


def dcp_stage(
    rank: int, world: int, port: int, mesh: list, load: str | None, save: str, done: int,
    more: int, opts: dict,
) -> None:  # fmt: skip
    """Load a DCP checkpoint saved at another mesh shape (or start fresh), train ``more`` steps,
    check against the uninterrupted single process, and save again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    setup(rank, world, port)
    model = make_block(seed=123 if load else 0)  # a resumed run must take everything from disk
    mesh_shape = tuple(size for _, size in mesh)
    if mesh:
        model = parallelize(model, mesh_shape, [name for name, _ in mesh])
    opt = make_opt(model, **opts)
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=load)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    ref = make_block()
    ref_opt = make_opt(ref, **opts)
    train(ref, ref_opt, done)
    for step in range(done, done + more):
        _step_with_reference_grads(model, opt, ref, ref_opt, step)
    compare(model, opt, ref, ref_opt, what=f"DCP stage mesh {mesh_shape} after {done + more}")
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=save)
    teardown()


def nonfinite_skip(rank: int, world: int, port: int, mesh_shape, out_dir: str) -> None:
    """A NaN in one rank's block of a split matrix skips the whole matrix on every rank (state
    included), as one process skips it, with the flags read on the host and with device masks;
    every other parameter steps normally."""
    setup(rank, world, port)
    results = {}
    for host_flags in (True, False):
        reads = "auto" if host_flags else "never"
        ref = make_block()
        ref_opt = make_opt(ref, host_reads=reads)
        model = parallelize(make_block(), tuple(mesh_shape))
        opt = make_opt(model, host_reads=reads)
        for step in range(3):
            x, y = batch(step)
            nn.functional.mse_loss(ref(x), y).backward()
            copy_grads(model, ref)
            if step == 1:
                # Poison one element of rank 0's block of up.weight only; the single process
                # sees that one element too.
                if rank == 0:
                    model.up.weight.grad.to_local().view(-1)[0] = float("nan")
                first = model.up.weight.grad.full_tensor()
                bad = torch.isnan(first).nonzero()[0].tolist()
                ref.up.weight.grad[tuple(bad)] = float("nan")
            ref_opt.step()
            opt.step()
            ref_opt.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
        compare(model, opt, ref, ref_opt, what=f"nonfinite skip host_flags={host_flags}")
        results[str(host_flags)] = {
            "skips": opt.nonfinite_skips,
            "ref_skips": ref_opt.nonfinite_skips,
        }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    teardown()


def no_host_reads(rank: int, world: int, port: int, out_dir: str) -> None:
    """The accelerator path of every placement reads nothing back to the host: FSDP2 (dp 4),
    tensor parallel (tp 4), both on (dp 2, tp 2), and DDP-style replicated parameters, with
    Tensor hyperparameters, a NaN in one rank's block and the default ``comm_dtype``; results
    equal the single process with float hyperparameters."""
    from normuon.host_reads import NoHostReads

    setup(rank, world, port)
    layouts = {"dp4": ((4,), ("dp",)), "tp4": ((4,), ("tp",)), "dp2xtp2": ((2, 2), None)}
    results = {}
    for label in ("dp4", "tp4", "dp2xtp2", "ddp"):
        ref = make_block()
        if label == "ddp":
            model, extra = make_block(), {"process_group": "auto"}
        else:
            shape, names = layouts[label]
            model = parallelize(make_block(), shape, names)
            extra = {"process_group": None}  # plain tensors under tp: copies on every rank
        # Values exact in float32, so that the 0-d float32 tensors equal the Python floats.
        hyper = dict(lr=2**-6, weight_decay=0.125, momentum=0.875, beta2=0.9375, adamw_lr=2**-7)
        opt = NorMuon(
            groups(model, NorMuon, True), **{k: torch.tensor(v) for k, v in hyper.items()},
            ns_dtype=torch.float32, host_reads="never", **extra,
        )  # fmt: skip
        ref_opt = NorMuon(groups(ref, NorMuon, True), **hyper, ns_dtype=torch.float32,
                          process_group=None)  # fmt: skip
        for step in range(3):
            x, y = batch(step)
            nn.functional.mse_loss(ref(x), y).backward()
            if step == 1:
                ref.up.weight.grad[0, 0] = float("nan")
            copy_grads(model, ref)
            with NoHostReads():
                opt.step()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
        if label == "ddp":  # state lives with each matrix's owner: compare the replicas
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=1e-7)
        else:
            compare(model, opt, ref, ref_opt, what=f"no host reads {label}")
        results[label] = opt.nonfinite_skips
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh)
    teardown()


def bf16_wire(rank: int, world: int, port: int, out_dir: str) -> None:
    """(dp 2, tp 2) with U and D in bf16 on the wire (what ``comm_dtype="auto"`` picks on CUDA),
    forced on the CPU: uneven (11 -> 6/5, 3 -> 2/1) and column-sharded blocks; every matrix's
    total update within bf16 accuracy of one process, and fewer bytes sent than fp32."""
    from torch.distributed.tensor import DTensor

    setup(rank, world, port)
    ref = make_block()
    ref_opt = make_opt(ref)
    model = parallelize(make_block(), (2, 2))
    opt = make_opt(model, comm_dtype=torch.bfloat16)
    for step in range(STEPS):
        _step_with_reference_grads(model, opt, ref, ref_opt, step)
    init = make_block()
    errors = {}
    for (name, p), q, p0 in zip(model.named_parameters(), ref.parameters(), init.parameters()):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        moved, moved_ref = full.detach() - p0.detach(), q.detach() - p0.detach()
        errors[name] = ((moved - moved_ref).norm() / moved_ref.norm()).item()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(errors, fh)
    teardown()

"""Optimizer step under tensor parallelism and 2-D meshes (gloo, CPU): time, bytes, NS work.

A GPT-shaped stack of transformer blocks (per layer q, k, v, o of shape (d, d), MLP up (4d, d)
and down (d, 4d), nn.Linear without bias) is parallelized with torch's own plans and the
optimizer step is measured on every rank of a spawned gloo group (one torch thread per rank):

- ``1``: one process, plain tensors;
- ``dp2`` / ``dp4``: FSDP2 alone (``fully_shard`` per layer, then the root): ``Shard(0)``;
- ``tp2`` / ``tp4``: ``parallelize_module`` with ColwiseParallel for q, k, v, up (``Shard(0)``)
  and RowwiseParallel for o, down (``Shard(1)``);
- ``dp2xtp2``: the same tensor-parallel plans on the "tp" dim of a (dp 2, tp 2) mesh and FSDP2
  on top on the "dp" dim (``_StridedShard(0)`` x ``Shard(0)`` and ``Shard(0)`` x ``Shard(1)``).

Implementations, each on its own copy of the same parameters with the same gradients:

- ``normuon``: :class:`normuon.NorMuon`, fp32 wire: each matrix is assembled on one owner rank
  of the whole mesh (one all_to_all), orthogonalized there, and its blocks go back (one more);
- ``normuon-bf16wire``: the same with ``comm_dtype=torch.bfloat16``;
- ``torch-muon``: ``torch.optim.Muon`` on the same DTensors (DTensor runs its Newton-Schulz
  matmuls with sharding propagation). Its Newton-Schulz is bfloat16; on a CPU without native
  bf16 GEMMs (oneDNN) it is replaced by a float32 copy, and the report says so;
- ``every-rank``: :class:`EveryRankOrthogonalizes` below: every rank all-gathers every full
  momentum matrix (``DTensor.full_tensor()``), runs Newton-Schulz on all of them and applies
  NorMuon to its own block.

Per configuration and implementation, after a warm-up step (state allocation): one counted
step (collectives seen by ``CommDebugMode``, payload bytes from wrappers of the
``torch.distributed`` functions, bytes written to gloo's sockets, Newton-Schulz matrices and
GFLOP through a counting ``orthogonalizer``), then ``reps`` timed steps: a barrier, then
``opt.step()``; the step time of a rep is the slowest rank's, the table gives the median.

The traffic floor is computed from the placements: each distinct block of a momentum matrix
(and of NorMuon's second moment) travels once to the matrix's owner and the owner sends every
other rank its block of the result once; the owner is taken to be the rank that makes this
smallest, so the floor is a lower bound (exact for even shards).

    python benchmarks/tp_step.py [--d-model 256] [--layers 4] [--reps 5]
        [--configs 1,dp2,dp4,tp2,tp4,dp2xtp2] [--impls normuon,...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    bf16_gemm_line,
    bf16_gemm_native,
    bytes_written,
    cpu_model,
    free_port,
    leave_process_group,
    load_average,
    md_table,
    median,
    torch_muon_ns_float32,
)

from normuon import NorMuon  # noqa: E402
from normuon.newton_schulz import default_orthogonalizer, resolve_ns_coefficients  # noqa: E402

#: configuration name -> mesh dims as (name, size); () is one process without a mesh.
CONFIGS: dict[str, tuple[tuple[str, int], ...]] = {
    "1": (),
    "dp2": (("dp", 2),),
    "dp4": (("dp", 4),),
    "tp2": (("tp", 2),),
    "tp4": (("tp", 4),),
    "dp2xtp2": (("dp", 2), ("tp", 2)),
}
IMPLS = ("normuon", "normuon-bf16wire", "torch-muon", "every-rank")
COLWISE = ("q", "k", "v", "up")
ROWWISE = ("o", "down")
LR, MOMENTUM, BETA2, EPS = 0.02, 0.95, 0.95, 1e-10
NS_STEPS = 5


@dataclass
class BenchConfig:
    """What one run of the benchmark measures."""

    d_model: int = 256
    """Width d: q, k, v, o are (d, d), up (4d, d), down (d, 4d)."""
    layers: int = 4
    """Number of transformer blocks."""
    reps: int = 5
    """Timed steps per configuration and implementation (after a warm-up and a counted step)."""
    configs: list[str] = field(default_factory=lambda: list(CONFIGS))
    """Mesh configurations to run, names from ``CONFIGS``."""
    impls: list[str] = field(default_factory=lambda: list(IMPLS))
    """Implementations to run, names from ``IMPLS``."""
    threads: int = 1
    """torch threads per rank."""
    out: str = str(Path(__file__).resolve().parent / "results")
    """Directory the markdown report is written to."""
    argv: list[str] = field(default_factory=list)
    """The command line, for the report."""


def world_of(config: str) -> int:
    return math.prod(size for _, size in CONFIGS[config])


# ------------------------------------------------------------------------ model


class Block(nn.Module):
    """One transformer block's matrices; the benchmark sets gradients, nothing runs forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)


class Stack(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))


def build_model(cfg: BenchConfig, config: str) -> nn.Module:
    """The stack, parallelized as ``config`` says (tensor parallel first, FSDP2 on top)."""
    model = Stack(cfg.d_model, cfg.layers)
    dims = CONFIGS[config]
    if not dims:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    names = tuple(name for name, _ in dims)
    mesh = init_device_mesh("cpu", tuple(size for _, size in dims), mesh_dim_names=names)
    if "tp" in names:
        plan = {n: ColwiseParallel() for n in COLWISE} | {n: RowwiseParallel() for n in ROWWISE}
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], plan)
    if "dp" in names:
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def full_gradients(model: nn.Module) -> list[torch.Tensor]:
    """The same full-shape gradients on every rank (seeded)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(tuple(p.shape), generator=gen) for p in model.parameters()]


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    """Each parameter's block of the full gradient, laid out by torch itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for p, g in zip(model.parameters(), grads):
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = g.clone()


# ------------------------------------------------------------------------ measurement hooks


class Meter:
    """Newton-Schulz work and the payload of ``torch.distributed`` calls since ``reset``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ns_matrices = 0
        self.ns_flops = 0.0
        self.payload = 0.0
        self.calls = 0


METER = Meter()


def counting_orthogonalizer(u: torch.Tensor, coefficients, dtype: torch.dtype) -> torch.Tensor:
    """``default_orthogonalizer`` on a (B, m, n) stack, counting per matrix and NS step
    4 k^2 K + 2 k^3 flops (k = min(m, n), K = max(m, n))."""
    k, big = sorted(u.shape[-2:])
    METER.ns_matrices += u.shape[0]
    METER.ns_flops += u.shape[0] * len(coefficients) * (4.0 * k * k * big + 2.0 * k**3)
    return default_orthogonalizer(u, coefficients, dtype)


def _payload_wrapper(name: str, fn):
    """Adds to METER the bytes this rank must send to other ranks in one call of ``fn``."""

    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        if name == "all_to_all_single":
            inp = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            if len(args) > 4:
                group = args[4]
            world, mine = dist.get_world_size(group), dist.get_rank(group)
            splits = splits or [inp.shape[0] // world] * world
            row = inp.element_size() * (inp[0].numel() if inp.ndim > 1 else 1)
            METER.payload += sum(s for r, s in enumerate(splits) if r != mine) * row
        elif name == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
            group = args[2] if len(args) > 2 else group
            world = dist.get_world_size(group)
            METER.payload += 2.0 * (world - 1) / world * t.numel() * t.element_size()
        elif name == "all_gather_into_tensor":
            t = args[1] if len(args) > 1 else kwargs["input_tensor"]
            group = args[2] if len(args) > 2 else group
            METER.payload += (dist.get_world_size(group) - 1) * t.numel() * t.element_size()
        METER.calls += 1
        return fn(*args, **kwargs)

    return wrapper


def install_payload_wrappers() -> None:
    for name in ("all_to_all_single", "all_reduce", "all_gather_into_tensor"):
        setattr(dist, name, _payload_wrapper(name, getattr(dist, name)))


# ------------------------------------------------------------------------ baseline


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EveryRankOrthogonalizes:
    """Baseline: every rank orthogonalizes every matrix.

    Momentum stays in the parameters' blocks; each step every rank all-gathers each full
    momentum matrix (``full_tensor()``), runs the same batched Newton-Schulz on all of them,
    and applies NorMuon (nesterov, ``normalize="rows"``, ``update_scale="preserve_norm"``, no
    weight decay) to its own block. The per-row second moment (m,) is kept whole on every rank:
    every rank computes the same values from the full result.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.coefficients = resolve_ns_coefficients("muon", NS_STEPS)
        self.momentum = [torch.zeros_like(_local(p)) for p in self.params]
        self.second_moment = [torch.zeros(p.shape[0]) for p in self.params]  # (m,) each

    @torch.no_grad()
    def step(self) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        full: list[torch.Tensor] = []
        for p, buf in zip(self.params, self.momentum):
            g = _local(p.grad)
            buf.lerp_(g, 1.0 - MOMENTUM)
            u = g.lerp(buf, MOMENTUM)  # nesterov: (1 - beta) G + beta M, this rank's block
            if isinstance(p, DTensor):
                world = p.device_mesh.size()
                METER.payload += (world - 1) * u.numel() * u.element_size()
                u = DTensor.from_local(
                    u, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                    stride=p.stride(),
                ).full_tensor()  # fmt: skip
            full.append(u)  # (m, n)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, u in enumerate(full):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        ortho: list[torch.Tensor] = list(full)
        for members in by_shape.values():
            stacked = torch.stack([full[i] for i in members])  # (B, m, n)
            out = counting_orthogonalizer(stacked, self.coefficients, torch.float32)
            for i, o in zip(members, out):
                ortho[i] = o
        for p, o, v in zip(self.params, ortho, self.second_moment):
            m, n = o.shape
            r = o.square().mean(dim=-1)  # (m,) mean square of each row
            v.lerp_(r, 1.0 - BETA2)
            f = torch.where(v > 0, 1.0 / (v.sqrt() + EPS), 0.0)  # (m,)
            scale = (r.sum() / (r * f.square()).sum().clamp_min(1e-38)).sqrt()
            update = o * (f * scale * math.sqrt(max(1.0, m / n)))[:, None]  # (m, n)
            if isinstance(p, DTensor):
                update = distribute_tensor(
                    update, p.device_mesh, p.placements, src_data_rank=None
                ).to_local()
            _local(p).add_(update, alpha=-LR)


# ------------------------------------------------------------------------ traffic floor


def _block_fingerprints(shape, mesh, placements) -> tuple[int, tuple]:
    """This rank's block of a tensor with ``placements``: (element count, a fingerprint of its
    global indices), found by letting torch lay out a tensor of global flat indices."""
    from torch.distributed.tensor import distribute_tensor

    index = torch.arange(math.prod(shape), dtype=torch.float64).view(shape)
    block = distribute_tensor(index, mesh, placements, src_data_rank=None).to_local()
    if block.numel() == 0:
        return 0, ()
    flat = block.reshape(-1)
    return block.numel(), (float(flat.sum()), float(flat.square().sum()), float(flat.min()),
                           float(flat.max()))  # fmt: skip


def floor_elements(blocks: list[tuple[int, tuple]]) -> int:
    """Elements every rank together must move for one tensor: distinct blocks not held by the
    owner go to it, and the owner sends every other rank its block back; minimized over the
    owner (a lower bound whatever owner the optimizer picks)."""
    best = None
    for owner in range(len(blocks)):
        own = blocks[owner][1]
        distinct = {fp: n for n, fp in blocks if n and fp != own}
        gather = sum(distinct.values())
        scatter = sum(n for r, (n, _) in enumerate(blocks) if r != owner)
        total = gather + scatter
        best = total if best is None else min(best, total)
    return best or 0


def traffic_floor(model: nn.Module, opt) -> dict[str, float]:
    """Mean bytes per rank and step at the floor, per wire dtype: matrix elements at 4 or 2
    bytes, NorMuon's second moment (its float32 state, shaped as the optimizer keeps it)."""
    from torch.distributed.tensor import DTensor

    mine = []
    for p in model.parameters():
        if not isinstance(p, DTensor):
            continue
        entry = [_block_fingerprints(tuple(p.shape), p.device_mesh, p.placements)]
        state = opt.state.get(p, {}).get("neuron_second_moment") if opt is not None else None
        if isinstance(state, DTensor):
            entry.append(
                _block_fingerprints(tuple(state.shape), state.device_mesh, state.placements)
            )
        mine.append(entry)
    world = dist.get_world_size()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    matrix = second_moment = 0
    for j in range(len(mine)):
        matrix += floor_elements([everyone[r][j][0] for r in range(world)])
        if len(mine[j]) > 1:
            second_moment += floor_elements([everyone[r][j][1] for r in range(world)])
    return {
        "matrix_elements": matrix / world,
        "second_moment_elements": second_moment / world,
    }


# ------------------------------------------------------------------------ worker


def make_optimizer(impl: str, model: nn.Module):
    params = list(model.parameters())
    if impl in ("normuon", "normuon-bf16wire"):
        wire = torch.bfloat16 if impl == "normuon-bf16wire" else None
        return NorMuon(
            params, lr=LR, momentum=MOMENTUM, beta2=BETA2, eps=EPS, ns_steps=NS_STEPS,
            ns_dtype=torch.float32, comm_dtype=wire, process_group=None,
            orthogonalizer=counting_orthogonalizer,
        )  # fmt: skip
    if impl == "torch-muon":
        return torch.optim.Muon(params, lr=LR, momentum=MOMENTUM, nesterov=True, ns_steps=NS_STEPS)
    if impl == "every-rank":
        return EveryRankOrthogonalizes(params)
    raise ValueError(f"unknown implementation {impl!r}; known: {IMPLS}")


def _placements(model: nn.Module) -> dict[str, str]:
    out = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks.0."):
            out[name.removeprefix("blocks.0.")] = repr(tuple(getattr(p, "placements", ())))
    return out


def worker(rank: int, world: int, port: int, cfg: dict, config: str, out_dir: str) -> None:
    cfg = BenchConfig(**cfg)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    install_payload_wrappers()
    patched_muon = False
    if "torch-muon" in cfg.impls and not bf16_gemm_native():
        import torch.optim._muon as torch_muon

        torch_muon._zeropower_via_newtonschulz = torch_muon_ns_float32
        patched_muon = True
    runs = {}
    for impl in cfg.impls:
        model = build_model(cfg, config)
        runs[impl] = (model, make_optimizer(impl, model))
    first = runs[cfg.impls[0]][0]
    grads = full_gradients(first)
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for impl, (model, opt) in runs.items():
        try:
            set_grads(model, grads)
            opt.step()  # warm-up: state allocation
            set_grads(model, grads)
            dist.barrier()
            METER.reset()
            written = bytes_written()
            with CommDebugMode() as comm:
                opt.step()
            results[impl] = {
                "wire": bytes_written() - written,
                "payload": METER.payload,
                "dist_calls": METER.calls,
                "collectives": comm.get_total_counts(),
                "ns_matrices": METER.ns_matrices,
                "ns_gflop": METER.ns_flops / 1e9,
                "step": [],
            }
        except Exception as exc:  # noqa: BLE001 - reported in the table
            errors[impl] = f"{type(exc).__name__}: {exc}"[:300]
    # Timed reps go round-robin over the implementations, so a burst of load from other
    # processes hits all of them.
    for _ in range(cfg.reps):
        for impl, (model, opt) in runs.items():
            if impl in errors:
                continue
            set_grads(model, grads)
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            results[impl]["step"].append(time.perf_counter() - t0)
    floor = {"matrix_elements": 0.0, "second_moment_elements": 0.0}
    normuon = runs.get("normuon")
    if world > 1:
        floor = traffic_floor(first, normuon[1] if normuon else None)
    # The baseline and the library got the same gradients for the same number of steps.
    agreement = None
    if "every-rank" in results and "normuon" in results:
        diffs = []
        for p, q in zip(runs["every-rank"][0].parameters(), runs["normuon"][0].parameters()):
            a = (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            b = (q.full_tensor() if isinstance(q, DTensor) else q).detach()
            diffs.append(float((a - b).abs().max() / b.abs().max()))
        agreement = max(diffs)
    summary = {
        "rank": rank,
        "results": results,
        "errors": errors,
        "floor": floor,
        "every_rank_vs_normuon": agreement,
        "placements": _placements(first),
        "numel": sum(p.numel() for p in first.parameters()),
        "matrices": len(list(first.parameters())),
        "patched_muon": patched_muon,
    }
    with open(os.path.join(out_dir, f"{config}_r{rank}.json"), "w") as fh:
        json.dump(summary, fh)
    leave_process_group()


# ------------------------------------------------------------------------ report


#: Bytes per matrix element on the wire for the floor column of each implementation.
WIRE_BYTES = {"normuon": 4, "normuon-bf16wire": 2, "torch-muon": 4, "every-rank": 4}


def config_table(cfg: BenchConfig, config: str, ranks: list[dict]) -> list[str]:
    world = len(ranks)
    dims = CONFIGS[config]
    mesh = " x ".join(f"{name} {size}" for name, size in dims) or "one process"
    lines = [f"### `{config}`: {mesh} ({world} rank{'s' if world > 1 else ''})", ""]
    if dims:
        placements = ranks[0]["placements"]
        lines += ["Placements: " + ", ".join(f"{n} {p}" for n, p in placements.items()), ""]
    header = ["implementation", "step ms (median of slowest rank)", "vs normuon",
              "payload B/rank (mean)", "floor B/rank (mean)", "payload / floor",
              "socket bytes/rank (mean)", "collectives/step", "NS matrices per rank",
              "NS GFLOP per rank"]  # fmt: skip
    rows = []
    base = None
    if all("normuon" in r["results"] for r in ranks):
        steps = zip(*(r["results"]["normuon"]["step"] for r in ranks))
        base = median([max(s) for s in steps])
    floor = ranks[0]["floor"]
    for impl in cfg.impls:
        got = [r["results"].get(impl) for r in ranks]
        if any(g is None for g in got):
            error = next((r["errors"][impl] for r in ranks if impl in r["errors"]), "missing")
            rows.append([impl, f"error: {error}"] + [""] * (len(header) - 2))
            continue
        step = median([max(s) for s in zip(*(g["step"] for g in got))])
        payload = sum(g["payload"] for g in got) / world
        with_state = impl.startswith("normuon")
        floor_bytes = floor["matrix_elements"] * WIRE_BYTES[impl] + (
            4 * floor["second_moment_elements"] if with_state else 0
        )
        wire = sum(g["wire"] for g in got) / world
        torch_muon = impl == "torch-muon"
        rows.append([
            impl,
            f"{step * 1e3:.0f}",
            f"{step / base:.2f}x" if base else "-",
            "n/a" if torch_muon else f"{payload:.0f}",
            f"{floor_bytes:.0f}",
            "-" if torch_muon or floor_bytes == 0 else f"{payload / floor_bytes:.4f}",
            f"{wire:.0f}",
            str(max(g["collectives"] for g in got)),
            "n/a" if torch_muon else " / ".join(str(g["ns_matrices"]) for g in got),
            "n/a" if torch_muon else " / ".join(f"{g['ns_gflop']:.2f}" for g in got),
        ])  # fmt: skip
    lines += md_table(header, rows)
    agreement = ranks[0].get("every_rank_vs_normuon")
    if agreement is not None:
        lines += ["", f"every-rank vs normuon parameters after all steps: max relative "
                      f"difference {agreement:.1e}."]  # fmt: skip
    return lines + [""]


def report(cfg: BenchConfig, per_config: dict[str, list[dict]], facts: dict) -> list[str]:
    d, layers = cfg.d_model, cfg.layers
    bf16 = facts["bf16"]
    muon_ns = (
        "bfloat16 as shipped (this CPU has native bf16 GEMMs)"
        if bf16
        else "replaced by a float32 copy (this CPU has no native bf16 GEMMs)"
    )
    lines = [
        f"# Optimizer step under tensor parallelism and 2-D meshes (gloo, CPU) - {facts['date']}",
        "",
        f"- date: {facts['started']}",
        f"- machine: {cpu_model()} (lscpu), {os.cpu_count()} logical cores, no GPU",
        f"- Python {platform.python_version()}, torch {torch.__version__}, gloo backend, "
        f"{cfg.threads} torch thread(s) per rank",
        bf16_gemm_line(),
        f"- load average at start {facts['load_start']}, at the end {facts['load_end']}",
        f"- model: d_model {d} x {layers} blocks; per block q, k, v, o (d, d), up (4d, d), down "
        f"(d, 4d), float32: {6 * layers} matrices, {per_config_numel(per_config)} elements",
        f"- {cfg.reps} timed steps per implementation after a warm-up step and a counted step; "
        f"Newton-Schulz: normuon and every-rank float32 ({NS_STEPS} quintic steps); torch-muon "
        f"{muon_ns}",
        "- command: `python benchmarks/tp_step.py " + " ".join(cfg.argv) + "`",
        "",
        "## Results",
        "",
    ]
    for config in cfg.configs:
        if config in per_config:
            lines += config_table(cfg, config, per_config[config])
    lines += [
        "## How to read it",
        "",
        "- step: after a barrier, wall time of `opt.step()` on each rank; per rep the slowest "
        "rank's, then the median over reps. vs normuon: ratio to `normuon`'s in the same table.",
        "- payload: bytes this rank hands to other ranks in one step, counted by wrapping "
        "`torch.distributed.all_to_all_single` (bytes to other ranks), `all_reduce` "
        "(2 (W-1)/W of the tensor) and `all_gather_into_tensor` ((W-1) x the input); for "
        "every-rank, each `full_tensor()` as an all-gather of the local block to W-1 ranks. "
        "n/a for torch-muon, whose collectives DTensor issues inside its matmuls.",
        "- floor: from the placements (module docstring): every distinct block of a momentum "
        "matrix once to its owner, every other rank's block of the result once back; for "
        "normuon also NorMuon's float32 second moment, laid out as the optimizer keeps it. "
        "Matrix elements at 4 bytes (2 for normuon-bf16wire). Mean over ranks.",
        "- socket bytes: growth of `wchar` in `/proc/self/io` during the counted step, i.e. what "
        "this process wrote to gloo's TCP sockets, gloo's framing included; it is the one byte "
        "count that sees torch-muon's DTensor collectives.",
        "- collectives: ops counted by `torch.distributed.tensor.debug.CommDebugMode` in the "
        "counted step (c10d calls and DTensor's functional collectives), the largest over ranks.",
        "- NS matrices / GFLOP per rank: counted by the `orthogonalizer=` passed to normuon "
        "(and called by every-rank), 4 k^2 K + 2 k^3 flops per matrix and NS step "
        "(k = min(m, n), K = max(m, n)); rank 0 / 1 / ... . n/a for torch-muon (DTensor splits "
        "its matmuls by sharding rules).",
        f"- {os.cpu_count()} cores are shared by all ranks and by other jobs: with 4 ranks the "
        "cores are oversubscribed, so wall times there measure contention as much as the "
        "algorithm; bytes, collectives and NS work are the numbers that carry over.",
        "- gloo on loopback TCP stands in for NCCL.",
    ]
    return lines


def per_config_numel(per_config: dict[str, list[dict]]) -> int:
    return next(iter(per_config.values()))[0]["numel"] if per_config else 0


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    impls = [i for i in args.impls.split(",") if i]
    for c in configs:
        if c not in CONFIGS:
            parser.error(f"unknown configuration {c!r}; known: {', '.join(CONFIGS)}")
    for i in impls:
        if i not in IMPLS:
            parser.error(f"unknown implementation {i!r}; known: {', '.join(IMPLS)}")
    if not configs or not impls:
        parser.error("--configs and --impls need at least one name each")
    if args.d_model < 4 or args.d_model % 4:
        parser.error(f"--d-model must be a positive multiple of 4, got {args.d_model}")
    for name in ("layers", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return BenchConfig(
        d_model=args.d_model, layers=args.layers, reps=args.reps, configs=configs, impls=impls,
        threads=args.threads, out=args.out,
        argv=without_out(sys.argv[1:] if argv is None else list(argv)),
    )  # fmt: skip


def without_out(argv: list[str]) -> list[str]:
    """The command line for the report, less ``--out DIR`` (where the report went)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(argv)
    out = Path(cfg.out)
    facts = {
        "date": datetime.date.today().isoformat(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_start": load_average(),
        "bf16": bf16_gemm_native(),
    }
    per_config: dict[str, list[dict]] = {}
    plain = asdict(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for config in cfg.configs:
            world = world_of(config)
            t0 = time.perf_counter()
            mp.start_processes(worker, args=(world, free_port(), plain, config, tmp),
                               nprocs=world, start_method="spawn")  # fmt: skip
            per_config[config] = [
                json.loads(Path(tmp, f"{config}_r{r}.json").read_text()) for r in range(world)
            ]
            print(f"{config} done in {time.perf_counter() - t0:.0f} s", flush=True)
    facts["load_end"] = load_average()
    lines = report(cfg, per_config, facts)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"tp_step-{facts['date']}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()

"""Distributed optimizer step on FSDP2 row shards: time, Newton-Schulz time and traffic per rank.

Spawns W gloo processes on the CPU for each world size in ``--world`` (1 thread each), shards
a GPT-shaped set of float32 matrices with FSDP2 (``fully_shard`` per layer, then the root), and
times ``optimizer.step()`` for:

- ``normuon``: :class:`normuon.NorMuon`, exact (fp32) wire: each full momentum matrix is
  assembled on one owner rank, orthogonalized there, and its row blocks sent back;
- ``normuon-bf16wire``: the same with ``comm_dtype=torch.bfloat16`` (half the bytes);
- ``zero1``: every rank all-gathers every full momentum matrix (``DTensor.full_tensor()``),
  runs the same Newton-Schulz on all of them and keeps its own rows (NorMuon's math written out
  in this file, :func:`normuon_row_update`; tests/test_benchmarks_smoke.py checks it against
  the library);
- ``torch-muon-fp32ns``: ``torch.optim.Muon`` on the same DTensors, with its Newton-Schulz
  patched to float32 (like for like with the others);
- ``torch-muon``: ``torch.optim.Muon`` as shipped, whose Newton-Schulz is bfloat16 (slow on a
  CPU without native bf16 matmul; by default only run for the small shape sets).

Every method has its own copy of the same parameters and receives the same gradients; the timed
repetitions go round-robin over the methods. All Newton-Schulz runs in float32 (``ns_dtype``):
bfloat16 matmul on an AVX2-only CPU is a scalar fallback ~50x slower than float32.

Measured per rank and step:

- step: wall time of ``opt.step()`` after a barrier (median over reps);
- NS: time inside ``normuon.functional.newton_schulz`` (the optimizer calls it as
  ``orthogonalizer`` option, so the counted function sees every call) or inside
  ``torch.optim._muon._zeropower_via_newtonschulz`` (for torch's Muon on DTensors that includes
  the collectives DTensor issues inside the iteration);
- collectives: number of collective ops seen by ``CommDebugMode`` (c10d ops such as
  ``alltoall_base_``/``allreduce_`` and the functional collectives DTensor uses);
- payload bytes: what the collectives must move, counted by wrapping the ``torch.distributed``
  module functions (``all_to_all_single``: elements sent to other ranks; ``all_reduce``: the
  ring's 2 (W-1)/W of the tensor; ``all_gather_into_tensor`` and ``full_tensor``: (W-1) x the
  input shard). Not available for torch's Muon (its collectives are issued inside DTensor);
- wire bytes: growth of ``wchar`` in ``/proc/self/io`` over the step, i.e. bytes this process
  wrote to gloo's TCP sockets, headers included (Linux only; no printing happens meanwhile).

The communication floor (docs/distributed.md): each rank holds P/W of the P matrix elements and
must send (W-1)/W of them to the owners and receive as much back: (P/W)(W-1)/W elements each
way, 2 (P/W)(W-1)/W x bytes per element in total.

    python benchmarks/distributed_step.py --world 1,2,4 [--shapes gpt-small|small|tiny]
        [--reps 3] [--torch-muon-bf16 auto|yes|no] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SHAPE_SETS as ALL_SHAPE_SETS,
)
from _common import (  # noqa: E402
    bytes_written,
    free_port,
    layer_shapes,
    leave_process_group,
    load_average,
    machine_lines,
    md_table,
    median,
    ns_flops,
    today,
    torch_muon_ns_float32,
    write_report,
)

import normuon.newton_schulz as NS  # noqa: E402
from normuon import NorMuon  # noqa: E402

SHAPE_SETS = {name: ALL_SHAPE_SETS[name] for name in ("tiny", "small", "gpt-small")}
METHODS = ("normuon", "normuon-bf16wire", "zero1", "torch-muon-fp32ns", "torch-muon")
#: NorMuon's defaults (the library's and the ZeRO-1 baseline's): lr, momentum (Nesterov), the
#: second-moment decay beta2, eps of 1 / (sqrt(v) + eps), weight decay.
LR, MOMENTUM, BETA2, EPS, WD = 0.02, 0.95, 0.95, 1e-10, 0.0


class Layer(nn.Module):
    """One transformer layer's matrices (q, k, v, o, mlp up, mlp down); no forward needed."""

    def __init__(self, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.mats = nn.ParameterList(
            nn.Parameter(torch.randn(m, n, generator=gen) / n**0.5) for m, n in layer_shapes(d)
        )


class Stack(nn.Module):
    """The layers; the benchmark sets gradients directly, so nothing runs forward."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList(Layer(d, gen) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        raise NotImplementedError


def build_model(d: int, layers: int, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = Stack(d, layers)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    from torch.distributed.tensor import distribute_tensor

    for p, g in zip(model.parameters(), grads):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)


# ------------------------------------------------------------------------ measurement hooks


class Meter:
    """Newton-Schulz seconds and collective payload bytes since the last ``reset``."""

    def __init__(self) -> None:
        self.ns_seconds = 0.0
        self.ns_flops = 0.0
        self.payload = 0.0
        self.world = 1
        self.rank = 0

    def reset(self) -> None:
        self.ns_seconds = 0.0
        self.ns_flops = 0.0
        self.payload = 0.0


METER = Meter()


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            METER.ns_seconds += time.perf_counter() - t0

    return wrapper


def _counted(fn):
    """Time normuon's Newton-Schulz and count its flops (standard-loop count, see
    ``_common.ns_flops``: the split of the work between ranks, not the Gram iteration's)."""
    timed = _timed(fn)

    def wrapper(u, coefficients, *args, **kwargs):
        METER.ns_flops += u.shape[0] * ns_flops(u.shape[-2], u.shape[-1], len(coefficients))
        return timed(u, coefficients, *args, **kwargs)

    return wrapper


#: normuon's Newton-Schulz, timed and flop-counted; given to the optimizers as ``orthogonalizer``.
COUNTED_NS = _counted(NS.default_orthogonalizer)


def _count_payload(name: str, fn):
    """Wrap a torch.distributed collective so that it adds its payload to METER."""

    def wrapper(*args, **kwargs):
        w, r = METER.world, METER.rank
        if name == "all_to_all_single":
            inp = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            per = inp.numel() // max(inp.shape[0], 1) if inp.ndim and inp.shape[0] else 0
            if splits is None:
                splits = [inp.shape[0] // w] * w if inp.ndim else [0] * w
            sent = sum(s for dst, s in enumerate(splits) if dst != r) * per
            METER.payload += sent * inp.element_size()
        elif name == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
            METER.payload += 2.0 * (w - 1) / w * t.numel() * t.element_size()
        elif name == "all_gather_into_tensor":
            t = args[1] if len(args) > 1 else kwargs["input_tensor"]
            METER.payload += (w - 1) * t.numel() * t.element_size()
        return fn(*args, **kwargs)

    return wrapper


def install_hooks() -> None:
    import torch.optim._muon as tmuon

    tmuon._zeropower_via_newtonschulz = _timed(tmuon._zeropower_via_newtonschulz)
    for name in ("all_to_all_single", "all_reduce", "all_gather_into_tensor"):
        setattr(dist, name, _count_payload(name, getattr(dist, name)))


# ------------------------------------------------------------------------ baseline (a): ZeRO-1


def normuon_row_update(o: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """NorMuon's update D (m, n) of one whole matrix from its orthogonalized momentum O (m, n),
    written out here so the baseline does not depend on the library's internals; updates the
    per-row second moment v (m,) in place.

    r = mean of O*O over each row; v <- beta2 v + (1 - beta2) r; f = 1 / (sqrt(v) + eps)
    (0 where v = 0); D = O f ||O||_F / ||O f||_F * sqrt(max(1, m / n)) ("preserve_norm").
    """
    m, n = o.shape
    r = o.float().square().mean(dim=-1)  # (m,)
    v.lerp_(r, 1.0 - BETA2)
    f = torch.where(v > 0, 1.0 / (v.sqrt() + EPS), 0.0)  # (m,)
    # ||O||_F^2 = n sum(r) and ||O f||_F^2 = n sum(r f^2): the n cancels in the ratio.
    tiny = torch.finfo(torch.float32).tiny
    scale = ((r.sum() / (r * f.square()).sum().clamp_min(tiny)).sqrt()
             * math.sqrt(max(1.0, m / n)))  # fmt: skip
    return o * (f * scale).unsqueeze(-1)


class Zero1NorMuon:
    """Every rank orthogonalizes every matrix: the ZeRO-1 way to run NorMuon on row shards.

    Momentum and the rows of W stay sharded; each step all-gathers every full momentum matrix
    (``full_tensor()``), runs the batched Newton-Schulz on all of them on every rank, and each
    rank applies the NorMuon update (:func:`normuon_row_update`) to its own rows. v is kept
    whole on every rank (it is tiny; every rank computes the same values).
    """

    def __init__(self, params: list[nn.Parameter], ns_dtype: torch.dtype = torch.float32):
        self.params = params
        self.ns_dtype = ns_dtype
        self.coefficients = NS.resolve_ns_coefficients("muon", 5)
        self.momentum = [torch.zeros_like(p.to_local()) for p in params]
        self.v = [torch.zeros(p.shape[0]) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        from torch.distributed.tensor import DTensor

        full = []
        for p, buf in zip(self.params, self.momentum):
            g = p.grad.to_local()
            buf.lerp_(g, 1.0 - MOMENTUM)
            u = g.lerp(buf, MOMENTUM)  # Nesterov
            dt = DTensor.from_local(
                u, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            world = p.device_mesh.size()
            rows = -(-p.shape[0] // world)  # full_tensor pads every shard to this
            METER.payload += (world - 1) * rows * p.shape[1] * u.element_size()
            full.append(dt.full_tensor())
        # The same shape buckets as the library: one batched Newton-Schulz per shape.
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, u in enumerate(full):
            buckets.setdefault(tuple(u.shape), []).append(i)
        ortho: list[torch.Tensor | None] = [None] * len(full)
        for idx in buckets.values():
            out = COUNTED_NS(torch.stack([full[i] for i in idx]), self.coefficients,
                             self.ns_dtype)  # fmt: skip
            for i, o in zip(idx, out):
                ortho[i] = o
        for p, o, v in zip(self.params, ortho, self.v):
            update = normuon_row_update(o, v)  # (m, n)
            world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
            # FSDP2 row shards: rank i holds rows [i * ceil(m / W), (i + 1) * ceil(m / W)).
            rows = -(-p.shape[0] // world)
            lo, hi = min(rank * rows, p.shape[0]), min((rank + 1) * rows, p.shape[0])
            local = p.to_local()
            if hi > lo:
                if WD:
                    local.mul_(1.0 - LR * WD)
                local.sub_(update[lo:hi], alpha=LR)


# ------------------------------------------------------------------------ worker


def make_optimizer(method: str, model: nn.Module):
    params = list(model.parameters())
    if method == "normuon":
        return NorMuon(
            params, lr=LR, ns_dtype=torch.float32, comm_dtype=None, orthogonalizer=COUNTED_NS
        )
    if method == "normuon-bf16wire":
        return NorMuon(
            params, lr=LR, ns_dtype=torch.float32, comm_dtype=torch.bfloat16,
            orthogonalizer=COUNTED_NS,
        )
    if method == "zero1":
        return Zero1NorMuon(params)
    if method.startswith("torch-muon"):
        return torch.optim.Muon(params, lr=LR, momentum=MOMENTUM, nesterov=True)
    raise ValueError(method)


def worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import torch.optim._muon as tmuon
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    METER.world, METER.rank = world, rank
    install_hooks()
    timed_bf16 = tmuon._zeropower_via_newtonschulz
    timed_fp32 = _timed(torch_muon_ns_float32)
    mesh = init_device_mesh("cpu", (world,))
    d, layers = SHAPE_SETS[cfg["shapes"]]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(m, n, generator=gen) for _ in range(layers) for m, n in layer_shapes(d)]
    runs = {}
    for method in cfg["methods"]:
        model = build_model(d, layers, mesh)
        runs[method] = (model, make_optimizer(method, model))
    keys = ("step", "ns", "flops", "payload", "wire", "count")
    results = {m: {k: [] for k in keys} for m in runs}
    errors = {}
    for rep in range(cfg["reps"] + 1):  # rep 0 is a warm-up (state creation, allocations)
        for method, (model, opt) in runs.items():
            if method in errors:
                continue
            if method.startswith("torch-muon"):
                tmuon._zeropower_via_newtonschulz = (
                    timed_fp32 if method == "torch-muon-fp32ns" else timed_bf16
                )
            set_grads(model, grads)
            dist.barrier()
            METER.reset()
            w0 = bytes_written()
            try:
                with CommDebugMode() as comm:
                    t0 = time.perf_counter()
                    opt.step()
                    seconds = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - reported in the table
                errors[method] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            wire = bytes_written() - w0
            if rep == 0:
                continue
            r = results[method]
            r["step"].append(seconds)
            r["ns"].append(METER.ns_seconds)
            r["flops"].append(METER.ns_flops)
            r["payload"].append(METER.payload)
            r["wire"].append(wire)
            r["count"].append(comm.get_total_counts())
    # Sanity: the ZeRO-1 baseline computes the same update as the library.
    agreement = None
    if "zero1" in runs and "normuon" in runs and "zero1" not in errors:
        diffs = []
        for p, q in zip(runs["zero1"][0].parameters(), runs["normuon"][0].parameters()):
            a, b = p.full_tensor(), q.full_tensor()
            diffs.append(((a - b).abs().max() / b.abs().max()).item())
        agreement = max(diffs)
    summary = {
        "rank": rank,
        "world": world,
        "numel": sum(p.numel() for p in runs[next(iter(runs))][0].parameters()),
        "methods": {
            m: {k: median(v) for k, v in r.items()}
            for m, r in results.items()
            if m not in errors
        },
        "errors": errors,
        "zero1_vs_normuon": agreement,
    }
    with open(os.path.join(out_dir, f"w{world}_r{rank}.json"), "w") as fh:
        json.dump(summary, fh)
    leave_process_group()


# ------------------------------------------------------------------------ report


def fmt_bytes(x: float) -> str:
    if x != x:  # NaN
        return "n/a"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def report(per_world: dict[int, list[dict]], cfg: dict) -> list[str]:
    d, layers = SHAPE_SETS[cfg["shapes"]]
    lines = [
        f"# Distributed optimizer step (FSDP2 row shards, gloo, CPU) - {today()}",
        "",
        *machine_lines(),
        f"- shapes: `{cfg['shapes']}` = d_model {d} x {layers} layers; per layer four (d, d), one "
        f"(4d, d), one (d, 4d), float32",
        f"- reps: {cfg['reps']} timed steps after one warm-up step, median; 1 torch thread per "
        f"rank; Newton-Schulz in float32 everywhere except `torch-muon` (torch's hard-coded "
        f"bfloat16)",
        "- command: `python benchmarks/distributed_step.py "
        + " ".join(cfg["argv"])
        + "`",
        "",
    ]
    header = ["W", "method", "step (max rank)", "step per rank", "NS per rank", "NS GFLOP/rank",
              "collectives",
              "payload sent/rank", "wire sent/rank", "floor (fp32)", "wire / floor"]  # fmt: skip
    rows = []
    ratios = []
    notes = []
    for world, ranks in sorted(per_world.items()):
        numel = ranks[0]["numel"]
        floor4 = 2 * numel / world * (world - 1) / world * 4
        for method in cfg["methods"]:
            got = [r["methods"].get(method) for r in ranks]
            if any(g is None for g in got):
                err = next((r["errors"][method] for r in ranks if method in r["errors"]), "")
                if err:
                    rows.append([world, method, f"error: {err}"] + [""] * 8)
                continue
            step = max(g["step"] for g in got)
            wire = sum(g["wire"] for g in got) / len(got)
            payload = sum(g["payload"] for g in got) / len(got)
            bpe = 2 if method == "normuon-bf16wire" else 4
            floor = floor4 * bpe / 4
            rows.append([
                world,
                method,
                f"{step * 1e3:.0f} ms",
                " / ".join(f"{g['step'] * 1e3:.0f}" for g in got),
                " / ".join(f"{g['ns'] * 1e3:.0f}" for g in got),
                " / ".join(f"{g['flops'] / 1e9:.1f}" for g in got)
                if not method.startswith("torch-muon") else "n/a",
                f"{got[0]['count']:.0f}",
                fmt_bytes(payload) if not method.startswith("torch-muon") else "n/a",
                fmt_bytes(wire),
                fmt_bytes(floor) if world > 1 else "0",
                f"{wire / floor:.2f}" if world > 1 else "-",
            ])  # fmt: skip
        has_base = all("normuon" in r["methods"] for r in ranks)
        base = max(r["methods"]["normuon"]["step"] for r in ranks) if has_base else float("nan")
        for method in cfg["methods"]:
            if method == "normuon" or any(method not in r["methods"] for r in ranks):
                continue
            other = max(r["methods"][method]["step"] for r in ranks)
            ratios.append([world, method, f"{other / base:.2f}x"])
        agreement = ranks[0].get("zero1_vs_normuon")
        if agreement is not None:
            notes.append(f"- W={world}: zero1 baseline vs normuon parameters after all steps: "
                         f"max relative difference {agreement:.2e}")  # fmt: skip
    lines += md_table(header, rows)
    lines += ["", "Step time of each method over `normuon`'s (max over ranks, same W):", ""]
    lines += md_table(["W", "method", "step / normuon step"], ratios)
    lines += ["", "## Notes", ""]
    lines += notes
    lines += [
        "- floor: 2 (P/W)(W-1)/W x 4 bytes per rank and step for the P matrix elements (fp32 "
        "gather to the owner + fp32 scatter back; docs/distributed.md); for `normuon-bf16wire` the "
        "floor column uses 2 bytes per element. `normuon` also sends a few small all_reduces "
        "(whole-matrix norm sums, finite-gradient flags).",
        "- payload: counted by wrapping `torch.distributed.all_to_all_single` / `all_reduce` / "
        "`all_gather_into_tensor` (and, for zero1, each `full_tensor()` as an all-gather of the "
        "padded shard): bytes this rank must send to other ranks. wire: growth of `wchar` in "
        "`/proc/self/io` during the step = bytes written to gloo's sockets including gloo's "
        "framing. Per rank numbers are means over the ranks.",
        "- NS GFLOP/rank: Newton-Schulz work each rank did (4 k^2 N + 2 k^3 per step and "
        "matrix, k = min(m, n)): the split of the work, independent of machine load. n/a for "
        "torch's Muon, whose DTensor matmuls split the work by sharding rules.",
        "- `comm_dtype` applies both ways: the momentum sent to the owner and the orthogonalized "
        "rows sent back, so `normuon-bf16wire` moves 2 + 2 bytes per element.",
        "- collectives: ops counted by `torch.distributed.tensor.debug.CommDebugMode` per step "
        "(rank 0).",
        "- step per rank / NS per rank: medians of rank 0 / 1 / ... . For `torch-muon*` the NS "
        "time includes the collectives DTensor issues inside the iteration.",
        f"- this machine has {os.cpu_count()} cores shared by W processes and by other jobs "
        f"(load average at start {cfg['load_start']}, at the end {cfg['load_end']}): wall times "
        "are noisy (even W=1 rows of identical work differ), and at W=4 the 4 ranks "
        "oversubscribe 2 cores, so wall times there measure contention as much as the "
        "algorithm; NS GFLOP per rank, collectives and bytes are the transferable numbers.",
        "- gloo on loopback TCP stands in for NCCL; on GPUs NS is much faster relative to the "
        "exchange, and the library's default wire there is bfloat16.",
    ]
    return lines


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--shapes", default="gpt-small", choices=sorted(SHAPE_SETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--torch-muon-bf16", default="auto", choices=["auto", "yes", "no"],
                        help="run torch.optim.Muon's bf16 Newton-Schulz (auto: not for "
                             "gpt-small, where it takes minutes per step on AVX2)")  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; known: {METHODS}")
    bf16 = args.torch_muon_bf16
    if bf16 == "no" or (bf16 == "auto" and args.shapes == "gpt-small"):
        methods = [m for m in methods if m != "torch-muon"]
    cfg = {
        "shapes": args.shapes,
        "reps": args.reps,
        "methods": methods,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "load_start": load_average(),
    }
    worlds = [int(w) for w in args.world.split(",")]
    per_world = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            t0 = time.perf_counter()
            mp.start_processes(worker, args=(world, free_port(), cfg, tmp), nprocs=world,
                               start_method="spawn")  # fmt: skip
            per_world[world] = [
                json.loads(Path(tmp, f"w{world}_r{r}.json").read_text()) for r in range(world)
            ]
            print(f"W={world} done in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg["load_end"] = load_average()
    lines = report(per_world, cfg)
    suffix = "" if args.shapes == "gpt-small" else f"-{args.shapes}"
    path = write_report(args.out, f"distributed_step{suffix}", lines)
    print("\n".join(lines))
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()

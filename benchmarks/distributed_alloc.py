"""Bytes a steady distributed optimizer step allocates, per rank, against its local parameters.

The one-process step allocates almost nothing outside the matrix-product kernels' own scratch
(benchmarks/step_time.py): every buffer comes from the optimizer's workspace and is reused. This
measures the same promise on the distributed paths, each at world size 2 (gloo, CPU, one
thread per rank), on the GPT-shaped stack of benchmarks/tp_step.py:

- ``fsdp2``: FSDP2 row shards (``fully_shard`` per block, then the root);
- ``tp``: tensor parallel (ColwiseParallel q, k, v, up; RowwiseParallel o, down);
- ``ddp``: plain tensors replicated over the process group (one owner per matrix, all-gathered).

Per configuration: two warm-up steps (state and workspace are created), then the bytes
allocated during a third step, with those inside matrix-product kernels given their output
buffer counted apart (oneDNN's own scratch; ``benchmarks/_common.step_allocations``), divided
by the rank's local parameter bytes. The target is <= 0.05 outside GEMM scratch.

    python benchmarks/distributed_alloc.py [--d-model 256] [--layers 4] [--configs fsdp2,tp,ddp]
        [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    free_port,
    leave_process_group,
    machine_lines,
    md_table,
    step_allocations,
    today,
    write_report,
)
from tp_step import BenchConfig, build_model, full_gradients, set_grads  # noqa: E402

from normuon import NorMuon  # noqa: E402

#: configuration -> the tp_step mesh configuration it builds on (ddp: plain tensors)
CONFIGS = {"fsdp2": "dp2", "tp": "tp2", "ddp": "1"}
TARGET = 0.05


def _local_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())


def worker(rank: int, world: int, port: int, cfg: dict, config: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    bench = BenchConfig(**cfg)
    model = build_model(bench, CONFIGS[config])
    # ddp: plain tensors, replicated over the default group (process_group="auto").
    opt = NorMuon(model.parameters(), lr=0.02, ns_dtype=torch.float32)
    grads = full_gradients(model)
    for _ in range(2):
        set_grads(model, grads)
        opt.step()
    set_grads(model, grads)
    dist.barrier()
    total, in_gemm = step_allocations(opt.step)
    result = {"rank": rank, "total": total, "in_gemm": in_gemm,
              "param_bytes": _local_bytes(model)}  # fmt: skip
    Path(out_dir, f"{config}-rank{rank}.json").write_text(json.dumps(result))
    leave_process_group()


def run(cfg: dict, configs: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            mp.start_processes(worker, args=(2, free_port(), cfg, config, tmp), nprocs=2,
                               start_method="spawn")  # fmt: skip
            out[config] = [json.loads(Path(tmp, f"{config}-rank{r}.json").read_text())
                           for r in range(2)]  # fmt: skip
    return out


def report(cfg: dict, results: dict[str, list[dict]], argv: list[str]) -> list[str]:
    rows = []
    for config, ranks in results.items():
        for r in ranks:
            outside = (r["total"] - r["in_gemm"]) / r["param_bytes"]
            rows.append([config, r["rank"], f"{r['param_bytes'] / 2**20:.2f}",
                         f"{r['total'] / 2**20:.3f}", f"{r['in_gemm'] / 2**20:.3f}",
                         f"{outside:.3f}", "yes" if outside <= TARGET else "**no**"])  # fmt: skip
    lines = [f"# Distributed step allocations ({today()})", ""] + machine_lines() + [
        "", f"`python benchmarks/distributed_alloc.py {' '.join(argv)}`: "
        f"d_model {cfg['d_model']}, {cfg['layers']} blocks, world size 2, NorMuon (fp32 "
        f"Newton-Schulz, exact wire), bytes allocated during the third step.", "",
    ]  # fmt: skip
    lines += md_table(["config", "rank", "local params MiB", "allocated MiB", "in GEMM kernels MiB",
                       "outside GEMMs / params", f"<= {TARGET}"], rows)  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    cfg = {"d_model": args.d_model, "layers": args.layers}
    results = run(cfg, configs)
    lines = report(cfg, results, argv)
    print("\n".join(lines))
    return write_report(args.out, "distributed_alloc", lines)


if __name__ == "__main__":
    main()

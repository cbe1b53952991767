"""Command line: ``normuon compare | sweep | train`` (the comparison harness).

The harness modules are imported inside the commands, so ``import normuon`` never needs tqdm
or matplotlib.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    from .harness.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help=f"model, batch, schedule and learning rates (default {DEFAULT_PRESET})")
    p.add_argument("--data", default=None,
                   help="UTF-8 text file, folder of text files, or FineWeb .bin shard(s) "
                        "(default: the embedded Shakespeare corpus)")
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=None, help="override the preset's steps")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None,
                   help="under torchrun: replicate (ddp, default) or shard (fsdp2)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is more robust on a "
                        "busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normuon",
        description="Train a GPT with AdamW, Muon and NorMuon on real text and compare them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train each optimizer on the same model, data and seeds")
    _common(c, "runs/compare")
    c.add_argument("--seeds", type=_positive_int, default=1, help="seeds per optimizer")
    c.add_argument("--optimizers", default="adamw,muon,normuon", help="comma-separated list")
    c.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once in worker processes, one thread each (default 1)")
    s = sub.add_parser("sweep", help="learning-rate sweep per optimizer")
    _common(s, "runs/sweep")
    s.add_argument("--optimizers", default="adamw,muon,normuon", help="comma-separated list")
    s.add_argument("--lrs", action="append", default=None, metavar="SPEC",
                   help="learning rates: 'OPT=V1,V2,...' (repeatable) or 'M1x,M2x,...' "
                        "multipliers of each preset lr (default 0.25x,0.5x,1x,2x,4x)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="train nothing: combine the sweep.json of these sweep folders into OUT")
    t = sub.add_parser("train", help="one run: one optimizer, one seed (resumable)")
    _common(t, "runs/train")
    t.add_argument("--optimizer", default="normuon", choices=["adamw", "muon", "normuon"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--stop-at-step", type=_positive_int, default=None,
                   help="checkpoint and stop after this step (continue later with --resume)")
    return parser


def _parse_lrs(specs: list[str] | None, optimizers: list[str], cfg) -> dict[str, list[float]]:
    """``--lrs`` values -> {optimizer: [lr, ...]}; ValueError naming a malformed entry."""
    specs = specs or ["0.25x,0.5x,1x,2x,4x"]
    out: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        targets = [name.strip()] if sep else optimizers
        if not sep:
            values = spec
        for target in targets:
            if target not in cfg.optimizers:
                raise ValueError(f"--lrs {spec!r}: unknown optimizer {target!r}")
            lrs = []
            for item in values.split(","):
                item = item.strip()
                try:
                    lr = (float(item[:-1]) * cfg.optimizers[target].lr if item.endswith("x")
                          else float(item))  # fmt: skip
                except ValueError:
                    raise ValueError(f"--lrs {spec!r}: {item!r} is not a number") from None
                if not lr > 0:
                    raise ValueError(f"--lrs {spec!r}: learning rates must be > 0, got {item!r}")
                lrs.append(lr)
            out[target] = lrs
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    from .harness.compare import merge_sweeps, run_compare, run_sweep
    from .harness.config import get_preset
    from .harness.data import load_data
    from .harness.train import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = False if args.no_progress else None
    try:
        cfg = get_preset(args.preset)
        if args.steps is not None:
            cfg.train.steps = args.steps
            cfg.train.warmup_steps = min(cfg.train.warmup_steps, args.steps)
        if args.parallel is not None:
            cfg.train.parallel = args.parallel
        data = load_data(args.data, cfg.train.val_fraction)
        start = time.perf_counter()
        # Under torchrun every rank runs this; only rank 0 prints.
        say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
        if args.command == "compare":
            optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
            summary = run_compare(cfg, data, optimizers=optimizers, seeds=args.seeds,
                                  out=args.out, device=args.device, progress=progress,
                                  jobs=args.jobs)
            say(summary["table"])
        elif args.command == "sweep" and args.merge:
            say(merge_sweeps(args.merge, args.out)["table"])
        elif args.command == "sweep":
            optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
            lrs = _parse_lrs(args.lrs, optimizers, cfg)
            summary = run_sweep(cfg, data, lrs=lrs, seed=args.seed, out=args.out,
                                device=args.device, progress=progress)
            say(summary["table"])
        else:
            r = train_run(cfg, args.optimizer, data, seed=args.seed, out_dir=args.out,
                          device=args.device, resume=args.resume, progress=progress,
                          stop_at_step=args.stop_at_step)
            say(f"{r.optimizer} seed {r.seed}: {r.steps} steps, final val loss "
                  f"{r.final_val_loss:.4f}, {r.train_time_s:.1f}s")
        say(f"total wall time {time.perf_counter() - start:.1f}s; outputs in {args.out}")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank done with its collectives before the group goes: destroying a gloo
            # group while its work thread finishes one can abort the process (pytorch#56297).
            torch.distributed.barrier()
            time.sleep(0.2)
    except ValueError as exc:
        print(f"normuon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0

"""Command line: ``normuon compare | sweep | tune | train`` (the comparison harness).

The harness modules are imported inside the commands, so ``import normuon`` never needs tqdm
or matplotlib. Every user error ends as one line ``normuon <command>: error: ...`` on stderr
with exit status 2; a run stopped by SIGINT/SIGTERM writes a checkpoint, says how to continue
and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
import time

__all__ = ["main"]


def _int_at_least(low: int, what: str):
    """argparse type: an int >= ``low``; ``what`` names it in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text}")
    return value


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    from .harness.config import DEFAULT_PRESET, PRESETS

    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help=f"model, batch, schedule and learning rates (default {DEFAULT_PRESET})")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="JSON file of settings applied over the preset: {\"model\": {...}, "
                        "\"train\": {...}, \"optimizers\": {\"adamw\": {...}}} (a run's "
                        "config.json works too)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config field (repeatable), after --config: model.d_model=64, "
                        "train.grad_clip=1.0, adamw.weight_decay=0.1, muon.adamw_lr=0.004; "
                        "--list-fields shows them all")
    p.add_argument("--list-fields", action="store_true",
                   help="print every settable config field with its preset value and exit")
    p.add_argument("--data", default=None,
                   help="UTF-8 text file, folder of text files, or FineWeb .bin shard(s) "
                        "(default: the embedded Shakespeare corpus)")
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run into a non-empty --out first deletes the harness's files "
                        "there (config, metrics, checkpoints, results, plots)")
    p.add_argument("--steps", type=_positive_int, default=None, help="override the preset's steps")
    p.add_argument("--tokens-per-param", type=_positive_number, default=None, metavar="R",
                   help="set the length as R training tokens per parameter instead (steps = "
                        "ceil(R x params / (batch_size x seq_len)); parameters counted as "
                        "train.param_count says: all, default, or non_embedding); 20 is "
                        "Chinchilla's ratio. Not with --steps")
    p.add_argument("--checkpoint-every", type=_non_negative_int, default=None, metavar="N",
                   help="also checkpoint every N steps (0: only at the end; SIGINT/SIGTERM "
                        "always checkpoint)")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"], default=None,
                   help="under torchrun: replicate (ddp, default) or shard (fsdp2)")
    p.add_argument("--dist-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="under torchrun: fail a collective after this long (a stopped rank "
                        "ends the others' wait; default: torch's, 10-30 minutes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: 1 when training on the CPU: the CPU "
                        "presets are too small to gain from more, and threads waiting for a "
                        "busy core slow every step many times)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log scalars to OUT/.../tensorboard (needs: pip install tensorboard)")
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
    c.add_argument("--first-seed", type=_non_negative_int, default=0, metavar="N",
                   help="seeds N .. N+seeds-1 (default 0), e.g. 1 to keep seed 0 for tuning")
    c.add_argument("--optimizers", default="adamw,muon,normuon",
                   help="comma-separated list of adamw, muon, normuon and the paper's "
                        "ablations muon-adam, normuon-front, normuon-tall-only, muon-rownorm "
                        "(default adamw,muon,normuon)")
    c.add_argument("--stretch", default=None, metavar="F1,F2,...",
                   help="also train muon on schedules F times longer (same shape), e.g. "
                        "1.05,1.1,1.2, and report how many more steps Muon needs to match each "
                        "optimizer's final loss (the paper's protocol against Muon)")
    c.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once in worker processes, one thread each (default 1)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in --out (finished runs are kept)")
    c.add_argument("--diagnostics-every", type=_non_negative_int, default=None, metavar="K",
                   help="record per-neuron update statistics every K steps (default: at every "
                        "validation; 0: off) and plot neurons.png")
    s = sub.add_parser("sweep", help="learning-rate sweep per optimizer")
    _common(s, "runs/sweep")
    s.add_argument("--optimizers", default="adamw,muon,normuon", help="comma-separated list")
    s.add_argument("--lrs", action="append", default=None, metavar="SPEC",
                   help="learning rates: 'OPT=V1,V2,...' (repeatable) or 'M1x,M2x,...' "
                        "multipliers of each preset lr (default 0.25x,0.5x,1x,2x,4x)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="train nothing: combine the sweep.json of these sweep folders into OUT")
    u = sub.add_parser("tune", help="the fair tuning protocol: every optimizer tuned alike on "
                                    "several seeds, retrained on fresh seeds, tested on unseen "
                                    "text (resumable)")  # fmt: skip
    _common(u, "runs/tune")
    u.add_argument("--optimizers", default="adamw,muon,normuon",
                   help="comma-separated list, as for compare (default adamw,muon,normuon)")
    u.add_argument("--tune-seeds", type=_int_at_least(2, "an integer >= 2"), default=2,
                   metavar="N", help="seeds 0..N-1 score every tuning point (default 2)")
    u.add_argument("--seeds", type=_int_at_least(2, "an integer >= 2"), default=3,
                   help="fresh seeds the tuned settings are retrained with (default 3)")
    u.add_argument("--first-seed", type=_non_negative_int, default=100, metavar="N",
                   help="the final seeds are N .. N+seeds-1 (default 100; must not overlap "
                        "the tuning seeds)")
    u.add_argument("--grid-points", type=_positive_int, default=3, metavar="K",
                   help="values of each first x2 grid (x sqrt 2 with --check), odd "
                        "(default 3)")
    u.add_argument("--max-extend", type=_non_negative_int, default=3, metavar="K",
                   help="grid steps a search may take past a grid edge (default 3)")
    u.add_argument("--score", choices=("final", "lowest"), default=None,
                   help="what each tuning seed is scored by: its final validation loss "
                        "(default), or the lowest point of its validation curve, the loss early "
                        "stopping keeps (for text read many times, where the final loss ranks "
                        "overfitting); --resume keeps the folder's unless another is named, "
                        "which rescores the ledger")
    u.add_argument("--no-separate-aux", action="store_true",
                   help="skip the second table (each matrix optimizer's own embeddings/head lr)")
    u.add_argument("--check", action="store_true",
                   help="instead of full searches, check settings carried over from a smaller "
                        "model: each lr (adamw.lr, muon.lr, ...) at its value and x sqrt 2 "
                        "either side, stepped on while the best is on an edge; every "
                        "matrix optimizer keeps the embeddings/head lr muon.adamw_lr (without "
                        "muon: the first matrix optimizer's)")
    u.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once in worker processes, one thread each (default 1)")
    u.add_argument("--resume", action="store_true",
                   help="continue the protocol in --out from its ledger")
    u.add_argument("--report", nargs="+", default=None, metavar="SUMMARY",
                   help="train nothing: the size-ladder tables of these summary.json files "
                        "(several corpora and presets)")
    u.add_argument("--plot", default=None, metavar="FILE",
                   help="with --report: also draw the saving-vs-parameters figure here (with "
                        "--transfer: score against lr per width)")
    u.add_argument("--transfer", nargs="?", const="width", default=None,
                   choices=("width", "depth", "steps"), metavar="AXIS",
                   help="with --report: read the summaries as a sweep along AXIS (width, the "
                        "default; depth; steps), the other two held: each search's scores by "
                        "lr and point, the best lr's vertex per point, and how it scales")
    k = sub.add_parser("check", help="self-check on this device: correctness against float64, "
                                     "host syncs, compile, speed against the peers")
    k.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    k.add_argument("--quick", action="store_true",
                   help="fewer shapes and repetitions (about two minutes on a 2-core CPU)")
    k.add_argument("--out", default=None, help="also write the report as OUT/check-DEVICE.md")
    k.add_argument("--sections", default=None, metavar="S1,S2",
                   help="run only these sections: correctness, host-syncs, compile, speed "
                        "(default: all)")
    from .harness.config import OPTIMIZERS

    t = sub.add_parser("train", help="one run: one optimizer, one seed (resumable)")
    _common(t, "runs/train")
    t.add_argument("--optimizer", default="normuon", choices=list(OPTIMIZERS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--stop-at-step", type=_positive_int, default=None,
                   help="checkpoint and stop after this step (continue later with --resume)")
    t.add_argument("--diagnostics-every", type=_non_negative_int, default=0, metavar="K",
                   help="record per-neuron update statistics every K steps (default 0: off)")
    return parser


_DEFAULT_LRS = ["0.25x,0.5x,1x,2x,4x"]


def _lr_targets(specs: list[str] | None, optimizers: list[str]) -> list[str]:
    """The optimizers that ``--lrs`` sweeps, in order (each once)."""
    targets: list[str] = []
    for spec in specs or _DEFAULT_LRS:
        name, sep, _ = spec.partition("=")
        targets += [name.strip()] if sep else optimizers
    return list(dict.fromkeys(targets))


def _parse_lrs(specs: list[str] | None, optimizers: list[str], spec) -> dict[str, list[float]]:
    """``--lrs`` values -> {optimizer: [lr, ...]}, multipliers of ``spec``'s lrs resolved;
    ValueError naming a malformed entry."""
    out: dict[str, list[float]] = {}
    for entry in specs or _DEFAULT_LRS:
        name, sep, values = entry.partition("=")
        targets = [name.strip()] if sep else optimizers
        if not sep:
            values = entry
        for target in targets:
            lrs = []
            for item in values.split(","):
                item = item.strip()
                try:
                    lr = (float(item[:-1]) * spec.optimizers[target].lr if item.endswith("x")
                          else float(item))  # fmt: skip
                except ValueError:
                    raise ValueError(f"--lrs {entry!r}: {item!r} is not a number") from None
                if not lr > 0:
                    raise ValueError(f"--lrs {entry!r}: learning rates must be > 0, got {item!r}")
                lrs.append(lr)
            out[target] = lrs
    return out


def _parse_factors(text: str | None) -> list[float]:
    """``--stretch 1.05,1.1`` -> [1.05, 1.1]; ValueError naming a malformed entry."""
    if text is None:
        return []
    factors = []
    for item in text.split(","):
        try:
            factors.append(float(item))
        except ValueError:
            raise ValueError(f"--stretch: {item.strip()!r} is not a number") from None
    return factors


def main_rank() -> bool:
    """Rank 0 under torchrun (every rank runs the command), or a plain process."""
    from .harness.runtime import launch_rank

    return launch_rank()[0] == 0


def _config(args):
    """The preset with --config, --set and the shortcut options applied: parsed and
    type-checked, not yet validated (:func:`_resolve` does that, once)."""
    from .harness.config import apply_config_file, apply_overrides, get_preset

    cfg = get_preset(args.preset)
    if args.config is not None:
        apply_config_file(cfg, args.config)
    apply_overrides(cfg, args.overrides)
    t = cfg.train
    if args.tokens_per_param is not None:
        steps_set = [key.strip() for key, _, value in (o.partition("=") for o in args.overrides)
                     if key.strip() in ("steps", "train.steps") and value.strip() != "0"]
        if args.steps is not None or steps_set:
            given = f"--steps {args.steps}" if args.steps is not None else f"--set {steps_set[0]}"
            raise ValueError(f"{given} and --tokens-per-param {args.tokens_per_param:g} both set "
                             f"the run's length: give one")  # fmt: skip
        t.tokens_per_param, t.steps = args.tokens_per_param, 0  # steps: resolved from it
    if args.steps is not None:
        if t.tokens_per_param:
            raise ValueError(
                f"--steps {args.steps} and train.tokens_per_param={t.tokens_per_param:g} (preset "
                f"{cfg.preset}, --config or --set) both set the run's length: give one (--set "
                f"train.tokens_per_param=0 with --steps, or --tokens-per-param without it)"
            )
        t.steps = args.steps
        t.warmup_steps = min(t.warmup_steps, args.steps)
    if args.checkpoint_every is not None:
        cfg.train.checkpoint_every = args.checkpoint_every
    if args.parallel is not None:
        cfg.train.parallel = args.parallel
    return cfg


def _optimizer_list(args) -> list[str]:
    return [o.strip() for o in args.optimizers.split(",") if o.strip()]


def _resolve(args, cfg):
    """The command's :class:`~normuon.harness.spec.RunSpec` and data: the settings, the
    command's choices, the launch and the data's vocabulary, validated once."""
    from .harness.spec import resolve_spec

    if args.command == "compare":
        seeds = list(range(args.first_seed, args.first_seed + args.seeds))
        return resolve_spec(cfg, args.data, optimizers=_optimizer_list(args), seeds=seeds,
                            stretch=_parse_factors(args.stretch))  # fmt: skip
    if args.command == "sweep":
        optimizers = _lr_targets(args.lrs, _optimizer_list(args))
        return resolve_spec(cfg, args.data, optimizers=optimizers, seeds=[args.seed])
    return resolve_spec(cfg, args.data, optimizers=[args.optimizer], seeds=[args.seed])


def _list_fields(cfg) -> str:
    import dataclasses

    lines = []
    for section in ("model", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            lines.append(f"{section}.{f.name} = {getattr(getattr(cfg, section), f.name)!r}")
    for name, opt in cfg.optimizers.items():
        for f in dataclasses.fields(opt):
            lines.append(f"{name}.{f.name} = {getattr(opt, f.name)!r}")
    return "\n".join(lines)


def _plots(say, write, *args) -> None:
    """Draw figures after the results are written; without matplotlib, say what to install."""
    from .harness.report import PlottingUnavailable

    try:
        for path in write(*args):
            say(f"wrote {path}")
    except PlottingUnavailable as exc:
        print(f"normuon: note: results written; {exc}", file=sys.stderr)


def _run(args, say) -> int:
    import torch

    from .harness.compare import (
        merge_sweeps,
        run_compare,
        run_sweep,
        write_compare_plots,
        write_sweep_plot,
    )
    from .harness.train import train_run

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device in (None, "auto", "cpu") and not torch.cuda.is_available():
        # Measured on a shared 2-core machine: 1.8 s per step with torch's 2 threads against
        # 0.07 s with 1 thread for the default preset (docs/results.md).
        torch.set_num_threads(1)
    progress = False if args.no_progress else None
    if args.command == "tune" and args.report:
        return _tune_report(args, say)
    if args.command == "tune" and (args.plot or args.transfer):
        given = "--plot" if args.plot else "--transfer"
        raise ValueError(f"{given} only goes with --report (it reads summaries, trains nothing)")
    cfg = _config(args)
    if args.list_fields:
        say(_list_fields(cfg))
        return 0
    if args.command == "sweep" and args.merge:
        summary = merge_sweeps(args.merge, args.out)
        say(summary["table"])
        _plots(say, lambda s, o: [write_sweep_plot(s, o)], summary, args.out)
        return 0
    if args.command == "tune":
        return _tune(args, cfg, say, progress)
    spec, data = _resolve(args, cfg)
    start = time.perf_counter()
    if args.command == "compare":
        summary = run_compare(spec, data, out=args.out, device=args.device,
                              progress=progress, jobs=args.jobs,
                              resume=args.resume, overwrite=args.overwrite,
                              diagnostics_every=args.diagnostics_every,
                              tensorboard=args.tensorboard,
                              dist_timeout_s=args.dist_timeout, log=say)  # fmt: skip
        say(summary["table"])
        if summary.get("neuron_table"):
            say("\nneuron balance of the hidden-matrix updates (mean over recorded steps, "
                "geometric for p95/p5):")
            say(summary["neuron_table"])
        if main_rank():  # the other ranks of a torchrun wrote nothing
            _plots(say, write_compare_plots, summary, args.out)
    elif args.command == "sweep":
        lrs = _parse_lrs(args.lrs, _optimizer_list(args), spec)
        summary = run_sweep(spec, data, lrs=lrs, out=args.out,
                            device=args.device, progress=progress, overwrite=args.overwrite,
                            log=say)  # fmt: skip
        say(summary["table"])
        _plots(say, lambda s, o: [write_sweep_plot(s, o)], summary, args.out)
    else:
        r = train_run(spec, args.optimizer, data, seed=args.seed, out_dir=args.out,
                      device=args.device, resume=args.resume, overwrite=args.overwrite,
                      progress=progress, stop_at_step=args.stop_at_step,
                      dist_timeout_s=args.dist_timeout, tensorboard=args.tensorboard,
                      diagnostics_every=args.diagnostics_every)  # fmt: skip
        say(f"{r.optimizer} seed {r.seed}: {r.steps} steps, final val loss "
            f"{r.final_val_loss:.4f}, {r.train_time_s:.1f}s; budget {spec.budget.describe()}")
    say(f"total wall time {time.perf_counter() - start:.1f}s; outputs in {args.out}")
    return 0


def _tune(args, cfg, say, progress) -> int:
    from .harness.tune import TuneProtocol, resolve_tune, run_tune, saved_score, write_tune_plot

    # A resume keeps the folder's score unless one is named: another one rescores the ledger.
    score = args.score or (saved_score(args.out) if args.resume else None) or "final"
    choices = {"tune_seeds": tuple(range(args.tune_seeds)),
               "final_seeds": tuple(range(args.first_seed, args.first_seed + args.seeds)),
               "grid_points": args.grid_points, "max_extend": args.max_extend,
               "score": score}  # fmt: skip
    if args.check:
        protocol = TuneProtocol.check(**choices)
    else:
        protocol = TuneProtocol(**choices, separate_aux=not args.no_separate_aux)
    spec, final_spec, data, final_data = resolve_tune(
        cfg, args.data, optimizers=_optimizer_list(args), protocol=protocol)
    say(f"normuon tune: {spec.preset}, {spec.budget.describe()}")
    passes = spec.budget.tokens / data.train.numel()
    if passes > 1:
        say(f"note: each training reads its {data.train.numel():,} training tokens {passes:.1f} "
            f"times; past one pass the losses measure overfitting as well as optimization "
            f"(a larger corpus, or fewer tokens per parameter, stays in the paper's regime"
            + ("" if protocol.score == "lowest" else
               "; --score lowest tunes for the lowest point of each curve instead")
            + ")")
    start = time.perf_counter()
    summary = run_tune(spec, final_spec, data, final_data, protocol, out=args.out,
                       jobs=args.jobs, resume=args.resume, overwrite=args.overwrite,
                       device=args.device, progress=progress, log=say)  # fmt: skip
    say(summary["tables"])
    _plots(say, lambda s, o: [write_tune_plot(s, f"{o}/tune.png")], summary, args.out)
    say(f"total wall time {time.perf_counter() - start:.1f}s; outputs in {args.out}")
    return 0


def _tune_report(args, say) -> int:
    import json
    from pathlib import Path

    from .harness.transfer import model_shape, transfer_report
    from .harness.tune import ladder_report

    summaries = []
    for name in args.report:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--report: {path}: no such summary file")
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"--report: {path} is not JSON") from None
        if not isinstance(summary, dict) or "tuning_runs" not in summary:
            raise ValueError(f"--report: {path} is not a summary.json of normuon tune")
        if args.transfer:
            model_shape(summary, source=f"--report --transfer: {path}")  # fails early, naming it
        summaries.append(summary)
    if args.transfer:
        say(transfer_report(summaries, axis=args.transfer, plot=args.plot))
    else:
        say(ladder_report(summaries, plot=args.plot))
    if args.plot:
        say(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .harness.runtime import finish_distributed
    from .harness.train import RunInterrupted

    # Under torchrun every rank runs this; only rank 0 prints.
    say = print if main_rank() else (lambda *a, **k: None)
    prog = f"normuon {args.command}"
    if args.command == "check":
        from .check import SECTIONS, main_check

        try:
            sections = SECTIONS if args.sections is None else tuple(
                s.strip() for s in args.sections.split(",") if s.strip()
            )
            return main_check(args.device, args.quick, args.out, sections=sections)
        except (ValueError, OSError) as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
    clean = False
    try:
        code = _run(args, say)
        clean = True
        return code
    except RunInterrupted as exc:
        if main_rank():
            print(f"{prog}: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        # A second Ctrl-C, or one outside a training step: runs that already wrote a
        # checkpoint continue with --resume.
        print(f"{prog}: interrupted; where a checkpoint was written, continue with --resume",
              file=sys.stderr)  # fmt: skip
        return 130
    except (ValueError, FloatingPointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # Disk full, permission denied, a path that is a file...: one line naming the path.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        finish_distributed(clean)

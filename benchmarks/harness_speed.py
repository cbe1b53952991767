"""Training tokens per second of the harness per ladder rung, eager against torch.compile.

How much evidence fits in a CPU budget is bounded by the harness's speed, and whether compiling the
model pays depends on the machine and the model size (compile time against the time it saves), so
it is measured here rather than assumed. Per rung and optimizer, one thread (the CLI's CPU
default): a :class:`~normuon.harness.trainer.Trainer` on the rung's preset takes ``--warmup`` steps
(in compiled mode the compilation happens there, in-process caches reset first as in a fresh run;
its extra time is reported as the compile cost), then ``--steps`` timed steps (forward, backward,
clipping, optimizer step, scheduler: the trainer's own step). Modes alternate eager / compiled
``--reps`` times per rung (median reported), so a change in the machine's load hits both.

    python benchmarks/harness_speed.py [--rungs xs,s,m,l] [--optimizers adamw,muon,normuon]
        [--measure training,optimizer-step] [--steps 60] [--warmup 10] [--reps 2]
        [--out benchmarks/results]

The verdict per rung: a run of the rung's 20-tokens-per-parameter preset takes
``steps * tokens_per_step / tokens_per_s`` seconds; compiling pays when the time saved exceeds
the compile cost.

``--measure optimizer-step`` times the Muon family's optimizer step alone (a quarter to a third
of a training's time at ``l``: the ``optimizer step`` share ``normuon tune`` prints), eager
against ``torch.compile(step, fullgraph=True)``: the rung's model and optimizer, fixed random
gradients, learning rates held as tensors (a float lr that a schedule changes every step would
recompile every step) and changed in place before each step, as a schedule does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, md_table, median, today, write_report  # noqa: E402

from normuon.harness.config import LADDER_SHAPES, get_preset  # noqa: E402
from normuon.harness.data import load_data  # noqa: E402
from normuon.harness.model import GPT  # noqa: E402
from normuon.harness.optimizers import build_optimizer  # noqa: E402
from normuon.harness.spec import resolve_spec  # noqa: E402
from normuon.harness.trainer import Trainer  # noqa: E402

#: What ``--measure`` can time.
MEASURES = ("training", "optimizer-step")


def measure(rung: str, optimizer: str, compiled: bool, data, steps: int, warmup: int) -> dict:
    """(tokens/s over the timed steps, seconds of the warm-up steps) of one fresh trainer."""
    cfg = get_preset(f"ladder-{rung}-20tpp")
    cfg.train.compile = compiled
    if compiled:
        # Every run of the CLI is a fresh process: forget what this one compiled before, so
        # each compiled measurement pays the compilation a run pays (inductor's on-disk cache,
        # which a user's later runs also find, is left alone).
        torch._dynamo.reset()
    spec, data = resolve_spec(cfg, data, optimizers=[optimizer], seeds=[0])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(spec, optimizer, data, out_dir=tmp, progress=False)
        trainer.start()
        t0 = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step()
        t1 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        t2 = time.perf_counter()
    per_step = spec.train.batch_size * spec.train.seq_len
    return {"tokens_per_s": steps * per_step / (t2 - t1), "warmup_s": t1 - t0,
            "step_s": (t2 - t1) / steps, "run_steps": spec.train.steps,
            "tokens_per_step": per_step}  # fmt: skip


def measure_optimizer_step(rung: str, optimizer: str, steps: int, reps: int,
                           backend: str = "inductor") -> dict:
    """Median ms of one optimizer step, eager and compiled (fullgraph), alternating ``reps``
    times over ``steps`` steps each, and the compiled step's first two calls' seconds."""
    cfg = get_preset(f"ladder-{rung}-20tpp")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(optimizer, model, cfg.optimizers[optimizer], torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    base = [float(group["lr"]) for group in opt.param_groups]
    for group, lr in zip(opt.param_groups, base, strict=True):
        group["lr"] = torch.tensor(lr)
    torch._dynamo.reset()
    steps_by_mode = {"eager": opt.step, "compiled": torch.compile(opt.step, fullgraph=True,
                                                                 backend=backend)}
    count = 0

    def run(step, n: int) -> None:
        nonlocal count
        for _ in range(n):
            count += 1
            for group, lr in zip(opt.param_groups, base, strict=True):
                group["lr"].fill_(lr / (1 + 1e-3 * count))  # a decaying schedule
            step()

    t0 = time.perf_counter()
    run(steps_by_mode["compiled"], 2)
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {mode: [] for mode in steps_by_mode}
    for _ in range(reps):
        for mode, step in steps_by_mode.items():
            t0 = time.perf_counter()
            run(step, steps)
            times[mode].append((time.perf_counter() - t0) / steps * 1e3)
    return {"eager_ms": median(times["eager"]), "compiled_ms": median(times["compiled"]),
            "compile_s": compile_s}  # fmt: skip


def training_section(rungs, optimizers, data, args) -> list[str]:
    """Tokens per second of the trainer's whole step per rung and optimizer, eager against a
    compiled model, and whether compiling pays over one 20-tpp run."""
    rows, verdict = [], []
    for rung in rungs:
        saved_total = 0.0
        compile_cost = 0.0
        for name in optimizers:
            found: dict[bool, list[dict]] = {False: [], True: []}
            for _ in range(args.reps):
                for compiled in (False, True):
                    found[compiled].append(measure(rung, name, compiled, data, args.steps,
                                                   args.warmup))  # fmt: skip
            eager = median([m["tokens_per_s"] for m in found[False]])
            comp = median([m["tokens_per_s"] for m in found[True]])
            step_e = median([m["step_s"] for m in found[False]])
            step_c = median([m["step_s"] for m in found[True]])
            # The compile cost: the compiled warm-up's time beyond as many steady steps.
            cost = median([m["warmup_s"] for m in found[True]]) - args.warmup * step_c
            run_steps = found[False][0]["run_steps"]
            saved = run_steps * (step_e - step_c)
            saved_total += saved
            compile_cost += cost
            rows.append([rung, name, run_steps, f"{eager:,.0f}", f"{comp:,.0f}",
                         f"{comp / eager:.2f}", f"{cost:.1f}", f"{run_steps * step_e:.1f}",
                         f"{saved:+.1f}"])  # fmt: skip
        verdict.append(f"- `{rung}`: compiling saves {saved_total:+.1f} s over one 20-tpp run of "
                       f"each optimizer and costs {compile_cost:.1f} s of compilation: "
                       f"{'pays' if saved_total > compile_cost else 'does not pay'}.")
    return ["## The training step: eager model against a compiled one", "",
            f"Median of {args.reps} alternations, {args.steps} timed steps after {args.warmup}.",
            "", *md_table(["rung", "optimizer", "steps at 20 tpp", "eager tokens/s",
                           "compiled tokens/s", "ratio", "compile cost (s)",
                           "eager run time (s)", "compiled saves (s)"], rows),
            "", *verdict]  # fmt: skip


def optimizer_step_section(rungs, optimizers, data, args) -> list[str]:
    """The Muon family's optimizer step alone, eager against compiled (fullgraph), and what
    compiling it would save over one 20-tpp run (its steps resolved on ``data``)."""
    steps, reps = max(args.steps, 20), 2 * args.reps
    rows = []
    for rung in rungs:
        # The steps of a 20-tpp run (resolved from the parameter count, as a run does).
        spec, _ = resolve_spec(get_preset(f"ladder-{rung}-20tpp"), data,
                               optimizers=optimizers[:1], seeds=[0])  # fmt: skip
        run_steps = spec.train.steps
        for name in optimizers:
            m = measure_optimizer_step(rung, name, steps, reps, args.step_backend)
            saved = run_steps * (m["eager_ms"] - m["compiled_ms"]) / 1e3
            rows.append([rung, name, f"{m['eager_ms']:.2f}", f"{m['compiled_ms']:.2f}",
                         f"{m['eager_ms'] / m['compiled_ms']:.2f}", f"{m['compile_s']:.1f}",
                         f"{saved:+.1f}"])  # fmt: skip
    return ["## The optimizer step alone: eager against torch.compile(step, fullgraph=True)", "",
            f"Compile backend `{args.step_backend}`; median of {reps} alternations of {steps} "
            "steps; the rung's model and optimizer with fixed random gradients; learning rates "
            "held as tensors and changed in place before every step (a decaying schedule). "
            "'First 2 compiled calls' is the compilation (in-process caches reset first, "
            "inductor's on-disk cache left as it is); 'saves over a run' is the 20-tpp run's "
            "steps x the difference per step.", "",
            *md_table(["rung", "optimizer", "eager ms/step", "compiled ms/step",
                       "eager / compiled", "first 2 compiled calls (s)",
                       "saves over a 20-tpp run (s)"], rows)]  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rungs", default="xs,s,m,l")
    p.add_argument("--optimizers", default="adamw,muon,normuon")
    p.add_argument("--measure", default="training",
                   help="comma-separated: training (the trainer's step, eager vs compiled "
                        "model), optimizer-step (the Muon family's step alone, eager vs "
                        "compiled)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    p.add_argument("--reps", type=int, default=2, help="alternations eager / compiled")
    p.add_argument("--step-backend", default="inductor", choices=("inductor", "eager"),
                   help="torch.compile backend of the optimizer-step measurement (eager: the "
                        "fullgraph trace alone, without inductor's code generation; for smoke "
                        "tests)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    for rung in rungs:
        if rung not in LADDER_SHAPES:
            raise SystemExit(f"harness_speed: unknown rung {rung!r}; known: "
                             f"{', '.join(LADDER_SHAPES)}")  # fmt: skip
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    measures = [m.strip() for m in args.measure.split(",") if m.strip()]
    for what in measures:
        if what not in MEASURES:
            raise SystemExit(f"harness_speed: unknown --measure {what!r}; known: "
                             f"{', '.join(MEASURES)}")  # fmt: skip
    lines = [f"# Harness speed, eager vs torch.compile ({today()})", "", *machine_lines(), "",
             f"`python benchmarks/harness_speed.py --rungs {','.join(rungs)} --optimizers "
             f"{','.join(optimizers)} --measure {','.join(measures)} --steps {args.steps} "
             f"--warmup {args.warmup} --reps {args.reps}"
             + (f" --step-backend {args.step_backend}" if args.step_backend != "inductor" else "")
             + "`: one torch thread.", ""]  # fmt: skip
    data = load_data(None)  # the embedded corpus, read once for both sections
    if "training" in measures:
        lines += training_section(rungs, optimizers, data, args)
    matrix_optimizers = [o for o in optimizers if o != "adamw"]  # AdamW's step is torch's
    if "optimizer-step" in measures:
        if not matrix_optimizers:
            raise SystemExit("harness_speed: --measure optimizer-step times the Muon family's "
                             "step: give --optimizers muon and/or normuon")  # fmt: skip
        lines += ["", *optimizer_step_section(rungs, matrix_optimizers, data, args)]
    path = write_report(args.out, "harness_speed", lines)
    print("\n".join(lines))
    return path


if __name__ == "__main__":
    main()

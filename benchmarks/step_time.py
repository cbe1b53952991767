"""Optimizer step time, Newton-Schulz throughput and memory: normuon against its peers.

One run, one set of inputs: every implementation gets its own copy of the same float32
parameters and the same gradients, and the timed repetitions go round-robin over the
implementations (rep 1 of each, then rep 2 of each, ...) so that load from other processes
hits all of them alike. Medians and ratios come from this one run.

    python benchmarks/step_time.py [--shapes gpt-small|gpt2-124m|all] [--reps N] [--quick]
                                   [--out benchmarks/results]

See benchmarks/README.md for what each column means and how memory is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    machine_lines,
    matmul_rate,
    md_table,
    median,
    timed,
    today,
)

from normuon import Muon, NorMuon  # noqa: E402
from normuon import newton_schulz as F  # noqa: E402

# ------------------------------------------------------------------------------ shapes

#: name -> (d_model, layers). Per layer: four (d, d), one (4d, d) and one (d, 4d) matrix.
SHAPE_SETS = {"tiny": (32, 2), "gpt-small": (384, 6), "gpt2-124m": (768, 12)}


def layer_shapes(d: int, layers: int) -> list[tuple[int, int]]:
    return [(d, d)] * 4 * layers + [(4 * d, d)] * layers + [(d, 4 * d)] * layers


def ns_flops(m: int, n: int, steps: int = 5) -> float:
    """Flops of `steps` Newton-Schulz steps on an (m, n) matrix: 4 k^2 N + 2 k^3 per step."""
    k, big = min(m, n), max(m, n)
    return steps * (4.0 * k * k * big + 2.0 * k**3)


# ------------------------------------------------------------------------------ implementations


def _po_normuon(params):
    from pytorch_optimizer import NorMuon as PoNorMuon

    return PoNorMuon([dict(params=params, use_muon=True)])


def _hb_muon(params):
    import heavyball

    return heavyball.Muon(params)


#: (label, factory, uses the matrix pipeline). Factories raise ImportError when not installed.
IMPLS: list[tuple[str, Callable, bool]] = [
    ("normuon.NorMuon (default)", lambda ps: NorMuon(ps), True),
    ("normuon.NorMuon ns_dtype=fp32", lambda ps: NorMuon(ps, ns_dtype=torch.float32), True),
    (
        "normuon.NorMuon polar_express 4 steps",
        lambda ps: NorMuon(ps, ns_steps=4, ns_coefficients="polar_express"),
        True,
    ),
    ("normuon.Muon (default)", lambda ps: Muon(ps), True),
    ("torch.optim.Muon", lambda ps: torch.optim.Muon(ps), True),
    ("torch.optim.AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True), False),
    ("pytorch_optimizer.NorMuon", _po_normuon, True),
    ("heavyball.Muon", _hb_muon, True),
]
BASELINE = "torch.optim.Muon"


@dataclass
class Impl:
    label: str
    factory: Callable
    params: list[torch.Tensor] = field(default_factory=list)
    opt: object = None
    note: str = ""
    first_step: float = float("nan")
    times: list[float] = field(default_factory=list)
    reps: int = 0
    warm: float = float("nan")


def make_inputs(shapes, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return init, grads


def build(label, factory, init) -> tuple[list[torch.Tensor], object]:
    params = [torch.nn.Parameter(t.clone()) for t in init]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = factory(params)
    return params, opt


def do_step(params, opt, grads) -> None:
    # Some optimizers (heavyball) clear .grad after a step: set it before every step.
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()


def probe_seconds(factory) -> float:
    """Seconds of one (warm) step on a single 256 x 256 matrix: a gate against hour-long runs."""
    init, grads = make_inputs([(256, 256)], seed=1)
    params, opt = build("probe", factory, init)
    do_step(params, opt, grads)
    return min(timed(lambda: do_step(params, opt, grads)) for _ in range(3))


# ------------------------------------------------------------------------------ step timing


def time_steps(
    shapes, reps: int, max_step_s: float, impl_budget_s: float, skip: dict[str, str], log
) -> list[Impl]:
    init, grads = make_inputs(shapes)
    total_flops = sum(ns_flops(m, n) for m, n in shapes)
    impls: list[Impl] = []
    for label, factory, is_matrix in IMPLS:
        impl = Impl(label, factory)
        impls.append(impl)
        if label in skip:
            impl.note = skip[label]
            log(f"  {label}: {impl.note}")
            continue
        try:
            if is_matrix:
                probe = probe_seconds(factory)
                predicted = probe * total_flops / ns_flops(256, 256)
                if predicted > max_step_s:
                    impl.note = (
                        f"not run: one 256x256 step took {probe * 1e3:.0f} ms, so one step of "
                        f"this set is predicted at ~{predicted:.0f} s (> --max-step-seconds "
                        f"{max_step_s:.0f})"
                    )
                    log(f"  {label}: {impl.note}")
                    continue
            impl.params, impl.opt = build(label, factory, init)
            impl.first_step = timed(lambda i=impl: do_step(i.params, i.opt, grads))
        except ImportError as exc:
            impl.note = f"skipped: not importable ({exc.name or exc})"
            log(f"  {label}: {impl.note}")
            continue
        except Exception as exc:  # a peer that fails on this machine is reported, not fatal
            impl.note = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            impl.opt = None
            log(f"  {label}: {impl.note}")
            continue
        # A second untimed warm-up (compiled peers compile on step 1, some allocate on step 2),
        # skipped for an implementation whose step alone eats a third of the step cap.
        if impl.first_step > max_step_s / 3:
            warm = impl.first_step
        else:
            warm = timed(lambda i=impl: do_step(i.params, i.opt, grads))
        impl.warm = warm
        impl.reps = max(1, min(reps, int(impl_budget_s / max(warm, 1e-9))))
        if impl.reps < reps:
            impl.note = f"{impl.reps} reps (time budget {impl_budget_s:.0f} s)"
        log(f"  {label}: first step {impl.first_step:.3f} s, warm {warm:.3f} s, {impl.reps} reps")
    for r in range(max((i.reps for i in impls), default=0)):
        for impl in impls:
            if impl.opt is not None and r < impl.reps:
                impl.times.append(timed(lambda i=impl: do_step(i.params, i.opt, grads)))
    return impls


# ------------------------------------------------------------------------------ NS throughput


def ns_throughput(shapes, reps: int, rate_fp32: float, rate_bf16: float, budget_s: float, log):
    """Time F.newton_schulz per same-shape bucket (the optimizer batches buckets the same way)."""
    buckets: dict[tuple[int, int], int] = {}
    for s in shapes:
        buckets[s] = buckets.get(s, 0) + 1
    coeffs = F.resolve_ns_coefficients("muon", 5)
    variants = [
        ("bf16 request (auto compute)", lambda u: F.newton_schulz(u, coeffs, torch.bfloat16)),
        ("fp32", lambda u: F.newton_schulz(u, coeffs, torch.float32)),
        (
            "bf16 native compute",
            lambda u: F.newton_schulz(u, coeffs, torch.bfloat16, compute_dtype=torch.bfloat16),
        ),
        ("gram fp32", lambda u: F.newton_schulz_gram(u, coeffs, torch.float32)),
    ]
    rows = []
    for (m, n), count in buckets.items():
        u = torch.randn(count, m, n)
        flops = count * ns_flops(m, n)
        results = {}
        for name, fn in variants:
            rate = rate_bf16 if name == "bf16 native compute" else rate_fp32
            if flops / (rate * 1e9) > budget_s:
                results[name] = None  # predicted too slow at the measured rate
                continue
            fn(u)
            results[name] = []
        for _ in range(reps):
            for name, fn in variants:
                if results[name] is not None:
                    results[name].append(timed(lambda f=fn, u=u: f(u)))
        for name, _ in variants:
            auto = F.ns_compute_dtype(torch.bfloat16, "cpu")
            if name.startswith("bf16 native"):
                rate, rate_name = rate_bf16, "bf16"
            elif name.startswith("bf16 request") and auto == torch.bfloat16:
                rate, rate_name = rate_bf16, "bf16"
            else:
                rate, rate_name = rate_fp32, "fp32"
            floor_ms = flops / (rate * 1e9) * 1e3
            ts = results[name]
            if ts is None:
                rows.append(
                    [f"{count} x ({m}, {n})", name, "not run", "-", "-", f"{floor_ms:.1f}", "-"]
                )
                continue
            t = median(ts)
            gfs = flops / t / 1e9
            rows.append(
                [
                    f"{count} x ({m}, {n})",
                    name,
                    f"{t * 1e3:.1f}",
                    f"{gfs:.0f}",
                    f"{100 * gfs / rate:.0f}% of {rate_name}",
                    f"{floor_ms:.1f}",
                    f"{t * 1e3 / floor_ms:.2f}x",
                ]
            )
        log(f"  NS bucket {count} x ({m}, {n}) done")
    return rows


# ------------------------------------------------------------------------------ memory


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def state_numbers(opt, params) -> tuple[int, int]:
    """(state elements, state bytes) over every tensor in the optimizer state."""
    numbers = nbytes = 0
    for p in params:
        for v in opt.state.get(p, {}).values():
            stack = [v]
            while stack:
                x = stack.pop()
                if torch.is_tensor(x):
                    numbers += x.numel()
                    nbytes += x.numel() * x.element_size()
                elif isinstance(x, dict):
                    stack.extend(x.values())
                elif isinstance(x, (list, tuple)):
                    stack.extend(x)
    return numbers, nbytes


def memory_probe(shape_set: str, labels: list[str]) -> dict:
    """Runs in a fresh subprocess (see measure_memory): peak RSS growth during a step."""
    d, layers = SHAPE_SETS[shape_set]
    shapes = layer_shapes(d, layers)
    init, grads = make_inputs(shapes)
    factories = {label: factory for label, factory, _ in IMPLS}
    out = {}
    for label in labels:
        gc.collect()
        try:
            params, opt = build(label, factories[label], init)
            gc.collect()
            rss0 = _status_kb("VmRSS")
            ok = _reset_peak()
            do_step(params, opt, grads)
            first = _status_kb("VmHWM") - rss0
            gc.collect()
            rss1 = _status_kb("VmRSS")
            _reset_peak()
            do_step(params, opt, grads)
            steady = _status_kb("VmHWM") - rss1
            numbers, nbytes = state_numbers(opt, params)
            out[label] = dict(
                first_kb=first, step_kb=steady, state_numbers=numbers, state_bytes=nbytes,
                reset_ok=ok,
            )  # fmt: skip
        except Exception as exc:
            out[label] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
        params = opt = None
    return out


def measure_memory(shape_set: str, labels: list[str]) -> dict:
    """One child process, implementations one after another. Allocations of 64 KiB and more
    are mmap'd there (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves RSS at once and the
    peak RSS (VmHWM, reset through /proc/self/clear_refs) of a step is what that step needed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_memory-probe", shape_set, "--_labels", json.dumps(labels)]
    cmd += ["--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report


def fmt_ms(t: float) -> str:
    return "-" if math.isnan(t) else f"{t * 1e3:.1f}"


def run_set(name: str, args, log) -> list[str]:
    d, layers = SHAPE_SETS[name]
    shapes = layer_shapes(d, layers)
    n_params = sum(m * n for m, n in shapes)
    lines = [
        f"## Shape set `{name}`: d={d} x {layers} layers, {len(shapes)} float32 matrices, "
        f"{n_params / 1e6:.2f}M parameters",
        "",
    ]
    log(f"[{name}] step timing")
    skip = {}
    if args.quick:
        skip["heavyball.Muon"] = "skipped in --quick (torch.compile of its step takes ~40 s)"
    impls = time_steps(shapes, args.reps, args.max_step_seconds, args.impl_budget, skip, log)
    med = {i.label: median(i.times) for i in impls if i.times}
    base = med.get(BASELINE)
    po = med.get("pytorch_optimizer.NorMuon")
    adamw = med.get("torch.optim.AdamW foreach")
    rows = []
    for i in impls:
        t = med.get(i.label, float("nan"))
        rows.append(
            [
                i.label,
                fmt_ms(t),
                fmt_ms(min(i.times)) if i.times else "-",
                str(len(i.times)),
                f"{t / base:.3f}" if base and i.times else "-",
                f"{t / po:.3f}" if po and i.times else "-",
                f"{t / adamw:.2f}" if adamw and i.times else "-",
                fmt_ms(i.first_step),
                i.note,
            ]
        )
    lines += ["### Optimizer step (ms; ratios of medians from this run)", ""]
    lines += md_table(
        [
            "implementation", "median", "min", "reps", "vs torch Muon", "vs po NorMuon",
            "vs AdamW", "first step", "note",
        ],  # fmt: skip
        rows,
    )
    lines.append("")

    if not args.no_memory:
        log(f"[{name}] memory")
        labels = [i.label for i in impls if i.times and i.warm < args.memory_max_step]
        slow = [i.label for i in impls if i.times and i.warm >= args.memory_max_step]
        mem = measure_memory(name, labels)
        for label in slow:
            mem[label] = {"error": f"not measured: step > {args.memory_max_step} s"}
        labels += slow
        adam_bytes = mem.get("torch.optim.AdamW foreach", {}).get("state_bytes")
        mrows = []
        mn = sum(m * n for m, n in shapes)
        rows_sum = sum(m for m, _ in shapes)
        for label in labels:
            r = mem.get(label, {})
            if "error" in r or not r:
                mrows.append([label, "-", "-", "-", "-", "-", r.get("error", "missing")])
                continue
            per = r["state_numbers"] / (mn + rows_sum)
            mrows.append(
                [
                    label,
                    f"{r['step_kb'] / 1024:.1f}",
                    f"{r['first_kb'] / 1024:.1f}",
                    f"{r['state_bytes'] / 2**20:.2f}",
                    f"{r['state_bytes'] / adam_bytes:.3f}" if adam_bytes else "-",
                    f"{per:.4f}",
                    "" if r.get("reset_ok") else "peak reset unavailable",
                ]
            )
        lines += [
            "### Memory (MiB; peak RSS growth during a step, measured in a child process)",
            "",
            f"Parameters: {mn * 4 / 2**20:.2f} MiB. m*n + m numbers over all matrices: "
            f"{mn + rows_sum}. Last column but one: state numbers / (sum of m*n + m); "
            f"1.0000 is exactly one momentum matrix plus one number per row.",
            "",
        ]
        lines += md_table(
            [
                "implementation", "step peak", "first-step peak (allocates state)",
                "state", "state vs AdamW", "state / (mn + m)", "note",
            ],  # fmt: skip
            mrows,
        )
        lines.append("")

    if not args.no_ns:
        log(f"[{name}] Newton-Schulz throughput")
        rows = ns_throughput(
            shapes, args.reps, args.rate_fp32, args.rate_bf16, args.max_step_seconds, log
        )
        lines += [
            "### Newton-Schulz, 5 Muon steps per bucket (flops: 4 k^2 N + 2 k^3 per step)",
            "",
            "Rates are against the matmul rates measured at the start of this run. 'floor' is "
            "the time NS5 would take at that rate; 'vs floor' = time / floor. The Gram variant "
            "does fewer flops than counted, so it can beat the floor.",
            "",
        ]
        lines += md_table(
            ["bucket", "variant", "ms", "GFLOP/s", "of matmul rate", "floor ms", "vs floor"],
            rows,
        )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="gpt-small", choices=[*SHAPE_SETS, "all"])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument(
        "--max-step-seconds", type=float, default=120.0,
        help="do not run an implementation whose step is predicted to take longer",
    )  # fmt: skip
    ap.add_argument(
        "--impl-budget", type=float, default=240.0,
        help="timed seconds per implementation; slower ones get fewer reps (at least 1)",
    )  # fmt: skip
    ap.add_argument(
        "--memory-max-step", type=float, default=20.0,
        help="skip the memory probe (2 more steps) of implementations slower than this",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch.set_num_threads (0: torch's default); 1 is steadier on a shared machine",
    )  # fmt: skip
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-ns", action="store_true")
    ap.add_argument("--_memory-probe", dest="memory_probe", help=argparse.SUPPRESS)
    ap.add_argument("--_labels", dest="labels", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_probe:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_probe(args.memory_probe, json.loads(args.labels))))
        return 0

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.shapes = "tiny" if args.shapes == "gpt-small" else args.shapes
        args.reps = min(args.reps, 3)
    sets = [s for s in SHAPE_SETS if s != "tiny"] if args.shapes == "all" else [args.shapes]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    log("measuring matmul rates")
    args.rate_fp32, size32 = matmul_rate(torch.float32)
    args.rate_bf16, size16 = matmul_rate(torch.bfloat16)
    auto = F.ns_compute_dtype(torch.bfloat16, "cpu")
    lines = [
        f"# Optimizer step time, {today()}",
        "",
        "Command: `python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        *machine_lines(),
        f"- measured matmul rate: fp32 {args.rate_fp32:.1f} GFLOP/s ({size32}^2), bf16 "
        f"{args.rate_bf16:.1f} GFLOP/s ({size16}^2)",
        f"- newton_schulz(dtype=bfloat16) computes in {auto} on this CPU",
        f"- repetitions: {args.reps}, round-robin over implementations; other processes share "
        "the cores, so compare ratios within this file, not absolute times across files",
        "",
    ]
    for name in sets:
        lines += run_set(name, args, log)
    lines.append(f"Total benchmark time: {time.time() - t0:.0f} s.")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"step_time-{today()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

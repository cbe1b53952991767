"""Optimizer step time, Newton-Schulz share, transient memory, bytes allocated per step:
normuon against its peers.

One run, one set of inputs: every implementation gets its own copy of the same float32
parameters and gradients, and the timed repetitions go round-robin over the implementations
(rep 1 of each, then rep 2 of each, ...) so that load from other processes hits all of them
alike. Medians and ratios come from this one run. Every implementation runs its Newton-Schulz
in the same dtype (``--ns-dtype``; default: bfloat16 where this CPU multiplies it natively,
float32 otherwise).

    python benchmarks/step_time.py [--shapes gpt-small|gpt2-124m|all] [--reps N] [--quick]
                                   [--ns-dtype auto|bf16|fp32] [--out benchmarks/results]

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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SHAPE_SETS,
    PeerNewtonSchulz,
    TimedOrthogonalizer,
    default_ns_dtype,
    layer_shapes,
    machine_lines,
    matmul_rate,
    md_table,
    median,
    ns_flops,
    step_allocations,
    timed,
    today,
    write_report,
)

from normuon import Muon, NorMuon  # noqa: E402
from normuon import newton_schulz as F  # noqa: E402
from normuon.check import newton_schulz_timer  # noqa: E402

NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: normuon's built-in Newton-Schulz, run in the optimizer's kept buffers (no orthogonalizer).
BUILTIN = "builtin"
#: The peers' Newton-Schulz: timed, and switched to float32 for ``--ns-dtype fp32``.
PEER_NS = PeerNewtonSchulz()


# ------------------------------------------------------------------------------ implementations


def _standard_ns(u, coefficients, dtype):
    return F.newton_schulz(u, coefficients, dtype, method="standard")


def _po_normuon(params, ns_dtype):
    from pytorch_optimizer import NorMuon as PoNorMuon

    return PoNorMuon([dict(params=params, use_muon=True)])


@dataclass(frozen=True)
class ImplSpec:
    """One implementation in the tables."""

    #: Row label.
    label: str
    #: (params, ns_dtype, orthogonalizer) -> optimizer; raises ImportError when not installed.
    factory: Callable
    #: Orthogonalizes matrices (counts towards the Newton-Schulz flops and the probe gate).
    is_matrix: bool
    #: The normuon ``orthogonalizer`` to time; BUILTIN: normuon's default path (kept buffers),
    #: timed by normuon.check.newton_schulz_timer; None: a peer timed through PEER_NS, or AdamW.
    orthogonalizer: Callable | str | None = None


IMPLS: list[ImplSpec] = [
    ImplSpec(
        "normuon.NorMuon (default)",
        lambda ps, dt, ortho: NorMuon(ps, ns_dtype=dt, orthogonalizer=ortho),
        True,
        BUILTIN,
    ),
    ImplSpec(
        "normuon.NorMuon standard NS",
        lambda ps, dt, ortho: NorMuon(ps, ns_dtype=dt, orthogonalizer=ortho),
        True,
        _standard_ns,
    ),
    ImplSpec(
        "normuon.NorMuon fast mode (4 steps)",
        lambda ps, dt, ortho: NorMuon(
            ps, ns_dtype=dt, ns_steps=F.FAST_NS_STEPS,
            ns_coefficients=F.fast_ns_coefficients(), orthogonalizer=ortho,
        ),  # fmt: skip
        True,
        BUILTIN,
    ),
    ImplSpec(
        "normuon.NorMuon bf16 state",
        lambda ps, dt, ortho: NorMuon(ps, ns_dtype=dt, orthogonalizer=ortho,
                                      state_dtype="bfloat16"),  # fmt: skip
        True,
        BUILTIN,
    ),
    ImplSpec(
        "normuon.Muon (default)",
        lambda ps, dt, ortho: Muon(ps, ns_dtype=dt, orthogonalizer=ortho),
        True,
        BUILTIN,
    ),
    ImplSpec("torch.optim.Muon", lambda ps, dt, ortho: torch.optim.Muon(ps), True),
    ImplSpec("pytorch_optimizer.NorMuon", lambda ps, dt, ortho: _po_normuon(ps, dt), True),
    ImplSpec(
        "torch.optim.AdamW foreach",
        lambda ps, dt, ortho: torch.optim.AdamW(ps, foreach=True),
        False,
    ),
]
BASELINE = "torch.optim.Muon"
PO_NORMUON = "pytorch_optimizer.NorMuon"
ADAMW = "torch.optim.AdamW foreach"


@dataclass
class Impl:
    spec: ImplSpec
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    opt: object = None
    #: what holds the Newton-Schulz seconds: the orthogonalizer given, or (BUILTIN) a namespace
    timer: TimedOrthogonalizer | SimpleNamespace | None = None
    note: str = ""
    first_step: float = float("nan")
    times: list[float] = field(default_factory=list)
    ns_times: list[float] = field(default_factory=list)
    reps: int = 0
    warm: float = float("nan")

    @property
    def label(self) -> str:
        return self.spec.label

    def ns_seconds(self) -> float:
        """Newton-Schulz seconds so far (normuon: its orthogonalizer; peers: PEER_NS)."""
        if self.timer is not None:
            return self.timer.seconds
        return PEER_NS.seconds if self.spec.is_matrix else 0.0


def make_inputs(shapes, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return init, grads


def build(spec: ImplSpec, init, grads, ns_dtype: torch.dtype) -> Impl:
    """A fresh implementation with its own parameters and its own gradients (some optimizers,
    pytorch_optimizer's NorMuon among them, modify ``p.grad`` in place)."""
    impl = Impl(spec)
    impl.params = [torch.nn.Parameter(t.clone()) for t in init]
    impl.grads = [g.clone() for g in grads]
    ortho = None
    if spec.orthogonalizer == BUILTIN:
        impl.timer = SimpleNamespace(seconds=0.0)
    elif spec.orthogonalizer is not None:
        impl.timer = ortho = TimedOrthogonalizer(spec.orthogonalizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        impl.opt = spec.factory(impl.params, ns_dtype, ortho)
    return impl


def do_step(impl: Impl) -> tuple[float, float]:
    """One optimizer step: (seconds, seconds inside Newton-Schulz)."""
    for p, g in zip(impl.params, impl.grads, strict=True):
        p.grad = g
    ns0 = impl.ns_seconds()
    builtin = impl.spec.orthogonalizer == BUILTIN
    with warnings.catch_warnings(), newton_schulz_timer() if builtin else nullcontext() as ns:
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        impl.opt.step()
        seconds = time.perf_counter() - t0
    if builtin:
        impl.timer.seconds += ns[0]
    return seconds, impl.ns_seconds() - ns0


def probe_seconds(spec: ImplSpec, ns_dtype: torch.dtype) -> float:
    """Seconds of one (warm) step on a single 256 x 256 matrix: a gate against hour-long runs."""
    init, grads = make_inputs([(256, 256)], seed=1)
    impl = build(spec, init, grads, ns_dtype)
    do_step(impl)
    return min(do_step(impl)[0] for _ in range(3))


# ------------------------------------------------------------------------------ step timing


def time_steps(shapes, args, log) -> list[Impl]:
    init, grads = make_inputs(shapes)
    total_flops = sum(ns_flops(m, n) for m, n in shapes)
    impls: list[Impl] = []
    for spec in IMPLS:
        try:
            if spec.is_matrix:
                probe = probe_seconds(spec, args.ns_dtype)
                predicted = probe * total_flops / ns_flops(256, 256)
                if predicted > args.max_step_seconds:
                    impls.append(Impl(spec, note=(
                        f"not run: one 256x256 step took {probe * 1e3:.0f} ms, so one step of "
                        f"this set is predicted at ~{predicted:.0f} s (> --max-step-seconds "
                        f"{args.max_step_seconds:.0f})"
                    )))  # fmt: skip
                    log(f"  {spec.label}: {impls[-1].note}")
                    continue
            impl = build(spec, init, grads, args.ns_dtype)
            impl.first_step = do_step(impl)[0]
        except ImportError as exc:
            impls.append(Impl(spec, note=f"skipped: not importable ({exc.name or exc})"))
            log(f"  {spec.label}: {impls[-1].note}")
            continue
        except Exception as exc:  # a peer that fails on this machine is reported, not fatal
            note = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            impls.append(Impl(spec, note=note))
            log(f"  {spec.label}: {note}")
            continue
        impls.append(impl)
        # A second untimed warm-up (some implementations allocate on step 2), skipped for an
        # implementation whose step alone eats a third of the step cap.
        warm = impl.first_step if impl.first_step > args.max_step_seconds / 3 else do_step(impl)[0]
        impl.warm = warm
        impl.reps = max(1, min(args.reps, int(args.impl_budget / max(warm, 1e-9))))
        if impl.reps < args.reps:
            impl.note = f"{impl.reps} reps (time budget {args.impl_budget:.0f} s)"
        log(f"  {spec.label}: first step {impl.first_step:.3f} s, warm {warm:.3f} s, "
            f"{impl.reps} reps")  # fmt: skip
    for r in range(max((i.reps for i in impls), default=0)):
        for impl in impls:
            if impl.opt is not None and r < impl.reps:
                seconds, ns = do_step(impl)
                impl.times.append(seconds)
                impl.ns_times.append(ns)
    return impls


# ------------------------------------------------------------------------------ NS throughput


#: Newton-Schulz schedules of the per-bucket table: (label, NorMuon options).
NS_SCHEDULES = [
    ("muon 5", {}),
    ("fast 4", {"ns_steps": F.FAST_NS_STEPS, "ns_coefficients": F.fast_ns_coefficients()}),
]


def _bucket(choice) -> str:
    return f"{choice.count} x ({choice.m}, {choice.n})"


def ns_throughput(shapes, args, log) -> tuple[list[list[str]], list[list[str]]]:
    """Per bucket of the default NorMuon's plan (its batches of same-shaped matrices, as a step
    runs them, in the run's NS dtype): the kernel chosen at plan time with the candidates'
    plan-time times, then every candidate timed again (``args.reps`` round-robin rounds, in
    the optimizer's way: U copied into a kept buffer, orthogonalized in place in kept scratch)
    against the floor of its own iteration (its multiply-adds at the measured matmul rate).

    Returns (plan-time rows, timing rows)."""
    work = F.ns_compute_dtype(args.ns_dtype, "cpu")
    # The floor's rate: the best of the run's first measurement and one taken now, so a cold
    # start (or load then) does not make every kernel look faster than the hardware.
    rate_name = "bf16" if work == torch.bfloat16 else "fp32"
    attr = f"rate_{rate_name}"
    setattr(args, attr, max(getattr(args, attr), matmul_rate(work)[0]))
    rate = args.ns_rate = getattr(args, attr)
    init, _ = make_inputs(shapes)
    plan_rows, rows = [], []
    for label, options in NS_SCHEDULES:
        opt = NorMuon([torch.nn.Parameter(t.clone()) for t in init], ns_dtype=args.ns_dtype,
                      **options)  # fmt: skip
        coeffs = F.resolve_ns_coefficients(opt.param_groups[0]["ns_coefficients"],
                                           opt.param_groups[0]["ns_steps"])  # fmt: skip
        batches: dict = {}  # choice -> batches of the plan that run it
        for choice in opt.ns_kernel_choices():
            batches[choice] = batches.get(choice, 0) + 1
        chosen_ms = floor_ms_total = 0.0
        for choice, n_batches in batches.items():
            plan_rows.append([
                _bucket(choice), str(n_batches), label,
                str(choice.dtype).replace("torch.", ""), choice.candidate.label, choice.source,
                ", ".join(f"{c.label} {t * 1e3:.2f}" for c, t in choice.timings) or "-",
            ])  # fmt: skip
            candidates = [c for c, _ in choice.timings] or [choice.candidate]
            m, n, count = choice.m, choice.n, choice.count
            u = torch.randn(count, m, n)
            buffer = torch.empty_like(u)
            largest = max(c.chunk for c in candidates)
            flat = torch.empty(F.NSScratch.numel(largest, m, n), dtype=work)

            def run(candidate, m=m, n=n, u=u, buffer=buffer, flat=flat, coeffs=coeffs):
                buffer.copy_(u)
                scratch = F.NSScratch.carve(flat, candidate.chunk, m, n)
                F.newton_schulz_(buffer, coeffs, scratch, kernel=candidate.kernel)

            times: dict = {c: [] for c in candidates}
            for c in candidates:
                run(c)  # warm-up
            for _ in range(args.reps):
                for c in candidates:
                    times[c].append(timed(lambda c=c: run(c)))
            for c in candidates:
                restarts = F.gram_restarts(len(coeffs), work) if c.kernel == "gram" else ()
                flops = 2.0 * count * F.ns_multiply_adds(m, n, len(coeffs), c.kernel, restarts)
                floor_ms = flops / (rate * 1e9) * 1e3
                t = median(times[c])
                is_chosen = c == choice.candidate
                if is_chosen:
                    chosen_ms += n_batches * t * 1e3
                    floor_ms_total += n_batches * floor_ms
                rows.append([
                    f"{_bucket(choice)}{f' [{n_batches} batches]' if n_batches > 1 else ''}",
                    label, c.label + (" (chosen)" if is_chosen else ""), f"{t * 1e3:.3g}",
                    f"{flops / t / 1e9:.0f}", f"{100 * flops / t / 1e9 / rate:.0f}% of {rate_name}",
                    f"{floor_ms:.3g}", f"{t * 1e3 / floor_ms:.2f}x",
                ])  # fmt: skip
            log(f"  NS bucket {_bucket(choice)} ({label}) done")
        ratio_total = f"{chosen_ms / floor_ms_total:.2f}x" if floor_ms_total else "-"
        rows.append(["all buckets of a step", label, "chosen kernels", f"{chosen_ms:.3g}", "-",
                     "-", f"{floor_ms_total:.3g}", ratio_total])  # fmt: skip
    return plan_rows, rows


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


def memory_probe(shape_set: str, labels: list[str], ns_dtype: torch.dtype) -> dict:
    """Runs in a fresh subprocess (see measure_memory): peak RSS growth during the first and the
    second step, then the bytes allocated during a third (steady-state: all state exists)."""
    d, layers = SHAPE_SETS[shape_set]
    shapes = layer_shapes(d, layers)
    init, grads = make_inputs(shapes)
    specs = {spec.label: spec for spec in IMPLS}
    out = {}
    for label in labels:
        gc.collect()
        impl = None
        try:
            impl = build(specs[label], init, grads, ns_dtype)
            gc.collect()
            rss0 = _status_kb("VmRSS")
            ok = _reset_peak()
            do_step(impl)
            first = _status_kb("VmHWM") - rss0
            gc.collect()
            rss1 = _status_kb("VmRSS")
            _reset_peak()
            do_step(impl)
            steady = _status_kb("VmHWM") - rss1
            numbers, nbytes = state_numbers(impl.opt, impl.params)
            out[label] = dict(
                first_kb=first, step_kb=steady, state_numbers=numbers, state_bytes=nbytes,
                reset_ok=ok,
            )  # fmt: skip
            # After the RSS steps, so the profiler's own buffers stay out of them; step 3,
            # since some implementations still allocate state on step 2.
            total, in_gemm = step_allocations(lambda impl=impl: do_step(impl))
            out[label]["alloc_bytes"], out[label]["alloc_gemm_bytes"] = total, in_gemm
        except Exception as exc:
            out[label] = dict(error=f"{type(exc).__name__}: {exc}"[:200])
        impl = None
    return out


def measure_memory(shape_set: str, labels: list[str], args) -> dict:
    """One child process, implementations one after another. Allocations of 64 KiB and more
    are mmap'd there (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves RSS at once and the
    peak RSS (VmHWM, reset through /proc/self/clear_refs) of a step is what that step needed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_memory-probe", shape_set, "--_labels", json.dumps(labels)]
    cmd += ["--threads", str(torch.get_num_threads()), "--ns-dtype", args.ns_dtype_name]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        return {"error": res.stderr[-500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report


def fmt_ms(t: float) -> str:
    return "-" if math.isnan(t) else f"{t * 1e3:.1f}"


def ratio(t: float, base: float | None, digits: int = 3) -> str:
    return f"{t / base:.{digits}f}" if base and not math.isnan(t) else "-"


def run_set(name: str, args, log) -> list[str]:
    d, layers = SHAPE_SETS[name]
    shapes = layer_shapes(d, layers)
    mn = sum(m * n for m, n in shapes)
    param_bytes = 4 * mn
    lines = [
        f"## Shape set `{name}`: d={d} x {layers} layers, {len(shapes)} float32 matrices, "
        f"{mn / 1e6:.2f}M parameters ({param_bytes / 2**20:.1f} MiB)",
        "",
    ]
    log(f"[{name}] step timing")
    impls = time_steps(shapes, args, log)
    med = {i.label: median(i.times) for i in impls if i.times}
    base, po, adamw = med.get(BASELINE), med.get(PO_NORMUON), med.get(ADAMW)

    mem: dict = {}
    if not args.no_memory:
        log(f"[{name}] memory")
        labels = [i.label for i in impls if i.times and i.warm < args.memory_max_step]
        mem = measure_memory(name, labels, args)
        for i in impls:
            if i.times and i.warm >= args.memory_max_step:
                mem[i.label] = {"error": f"not measured: step > {args.memory_max_step} s"}

    rows = []
    for i in impls:
        t = med.get(i.label, float("nan"))
        ns = median(i.ns_times) if i.ns_times else float("nan")
        non_ns = f"{100 * (t - ns) / t:.0f}%" if i.times else "-"
        r = mem.get(i.label, {})
        transient = (
            f"{r['step_kb'] * 1024 / param_bytes:.2f}" if "step_kb" in r else "-"
        )
        alloc = f"{r['alloc_bytes'] / param_bytes:.2f}" if "alloc_bytes" in r else "-"
        own = (
            f"{(r['alloc_bytes'] - r['alloc_gemm_bytes']) / param_bytes:.3f}"
            if "alloc_bytes" in r else "-"
        )  # fmt: skip
        rows.append([
            i.label, fmt_ms(t), fmt_ms(min(i.times)) if i.times else "-", str(len(i.times)),
            ratio(t, base), ratio(t, po), ratio(t, adamw, 2), fmt_ms(ns), non_ns, transient,
            alloc, own, i.note,
        ])  # fmt: skip
    lines += ["### Optimizer step (ms; ratios of medians from this run)", ""]
    lines += [
        "NS = median time inside Newton-Schulz per step (normuon: its built-in Newton-Schulz, "
        "or the `orthogonalizer` given (standard NS row, which thus allocates its own "
        "buffers); peers: "
        "their Newton-Schulz function); non-NS share = (step - NS) / step. Transient = peak "
        "memory growth of a step (state already allocated, see Memory) / parameter bytes. "
        "Alloc = bytes allocated during a steady-state step (see Memory) / parameter bytes; "
        "'outside GEMMs' leaves out the scratchpads that matrix-product kernels given their "
        "output buffer take on every call (oneDNN's bf16 kernels: ~100 KiB per call).",
        "",
    ]
    lines += md_table(
        [
            "implementation", "median", "min", "reps", "vs torch Muon", "vs po NorMuon",
            "vs AdamW", "NS", "non-NS share", "transient / params", "alloc / params",
            "alloc outside GEMMs / params", "note",
        ],  # fmt: skip
        rows,
    )
    lines.append("")

    if not args.no_memory:
        adam_bytes = mem.get(ADAMW, {}).get("state_bytes")
        rows_sum = sum(m for m, _ in shapes)
        mrows = []
        for i in impls:
            if not i.times:
                continue
            r = mem.get(i.label, {})
            if "error" in r or not r:
                err = r.get("error", mem.get("error", "missing"))
                mrows.append([i.label, "-", "-", "-", "-", "-", "-", "-", "-", "-",
                              str(err)[:200]])  # fmt: skip
                continue
            mrows.append([
                i.label, f"{r['step_kb'] / 1024:.1f}", f"{r['step_kb'] * 1024 / param_bytes:.2f}",
                f"{r['alloc_bytes'] / 2**20:.1f}", f"{r['alloc_bytes'] / param_bytes:.2f}",
                f"{r['alloc_gemm_bytes'] / 2**20:.1f}", f"{r['first_kb'] / 1024:.1f}",
                f"{r['state_bytes'] / 2**20:.2f}",
                f"{r['state_bytes'] / adam_bytes:.3f}" if adam_bytes else "-",
                f"{r['state_numbers'] / (mn + rows_sum):.4f}",
                "" if r.get("reset_ok") else "peak reset unavailable",
            ])  # fmt: skip
        lines += [
            "### Memory (MiB; peak RSS growth during a step, measured in a child process)",
            "",
            f"Parameters: {param_bytes / 2**20:.2f} MiB. m*n + m numbers over all matrices: "
            f"{mn + rows_sum}. 'state / (mn + m)' = state numbers / (sum of m*n + m); 1.0000 is "
            "exactly one momentum matrix plus one number per row. 'alloc/step' = bytes torch's "
            "allocator hands out during the third step (all state exists), every allocation "
            "counted once whether freed within the step or not (torch.profiler memory events); "
            "'in GEMM kernels' = the part allocated inside matrix products given an output "
            "buffer (the kernels' own scratchpads).",
            "",
        ]
        lines += md_table(
            [
                "implementation", "step peak", "step peak / params", "alloc/step MiB",
                "alloc / params", "in GEMM kernels MiB", "first-step peak (allocates state)",
                "state", "state vs AdamW",
                "state / (mn + m)", "note",
            ],  # fmt: skip
            mrows,
        )
        lines.append("")

    if not args.no_ns:
        log(f"[{name}] Newton-Schulz throughput")
        plan_rows, rows = ns_throughput(shapes, args, log)
        lines += [
            f"### Newton-Schulz kernels chosen at plan time, {args.ns_dtype} requested",
            "",
            "Each bucket (a batch of same-shaped matrices of the default NorMuon's plan) runs "
            "the kernel `ns_kernel=\"auto\"` chose when the optimizer was built: every "
            "candidate timed once on random data of the bucket (minimum of 3 rounds after a "
            "warm-up, ms), the fastest kept for the process. Kernel labels are kernel/chunk "
            "(matrices per chunk). 'only': a single candidate, nothing timed.",
            "",
        ]
        lines += md_table(
            ["bucket", "batches", "schedule", "iteration dtype", "chosen", "source",
             "plan-time ms per candidate"],
            plan_rows,
        )  # fmt: skip
        lines += [
            "",
            f"### Newton-Schulz per bucket, {args.ns_dtype} requested "
            f"(floor: the flops of each kernel's own iteration)",
            "",
            "Every candidate of each bucket timed again here (medians of the run's reps, "
            "round-robin). GFLOP/s and 'of matmul rate' count the flops of the iteration that "
            "ran (standard and loop: s (4 k^2 N + 2 k^3); Gram with r restarts: "
            "4 (r + 1) k^2 N + 2 (4 s - 3 (r + 1)) k^3; `normuon.newton_schulz.ns_multiply_adds`"
            f"), so 'floor' is the time that iteration's flops take at {args.ns_rate:.0f} "
            "GFLOP/s (the best matmul rate measured, at the start of the run or just before "
            "these timings), and 'vs floor' <= 1.15x is the target for the chosen "
            "kernel. The last row of each schedule sums the chosen kernels over a step's "
            "batches.",
            "",
        ]
        lines += md_table(
            ["bucket", "schedule", "kernel", "ms", "GFLOP/s", "of matmul rate", "floor ms",
             "vs floor"],
            rows,
        )  # fmt: skip
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="gpt-small", choices=[*SHAPE_SETS, "all"])
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 3 reps (smoke test)")
    ap.add_argument(
        "--ns-dtype", default="auto", choices=["auto", *NS_DTYPES],
        help="Newton-Schulz dtype of every implementation (auto: bf16 where this CPU has native "
        "bf16 GEMMs, fp32 otherwise)",
    )  # fmt: skip
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

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.ns_dtype = NS_DTYPES.get(args.ns_dtype, None) or default_ns_dtype()
    args.ns_dtype_name = "bf16" if args.ns_dtype == torch.bfloat16 else "fp32"
    PEER_NS.install()
    PEER_NS.float32 = args.ns_dtype == torch.float32
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, json.loads(args.labels), args.ns_dtype)))
        return 0

    if args.quick:
        args.shapes = "tiny" if args.shapes == "gpt-small" else args.shapes
        args.reps = min(args.reps, 3)
    sets = [s for s in SHAPE_SETS if s in ("gpt-small", "gpt2-124m")]
    sets = sets if args.shapes == "all" else [args.shapes]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.time()
    log("measuring matmul rates")
    args.rate_fp32, size32 = matmul_rate(torch.float32)
    args.rate_bf16, size16 = matmul_rate(torch.bfloat16)
    work = F.ns_compute_dtype(args.ns_dtype, "cpu")
    lines = [
        f"# Optimizer step time, {today()}, Newton-Schulz in {args.ns_dtype_name} for everyone",
        "",
        "Command: `python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]) + "`",
        "",
        *machine_lines(),
        f"- measured matmul rate: fp32 {args.rate_fp32:.1f} GFLOP/s ({size32}^2), bf16 "
        f"{args.rate_bf16:.1f} GFLOP/s ({size16}^2)",
        f"- Newton-Schulz dtype: {args.ns_dtype} for every implementation (normuon: `ns_dtype`, "
        f"which iterates in {work} on this CPU; torch.optim.Muon and pytorch_optimizer: "
        + ("their shipped bfloat16" if args.ns_dtype == torch.bfloat16 else
           "their Newton-Schulz switched to float32")
        + ")",
        f"- repetitions: {args.reps}, round-robin over implementations; other processes share "
        "the cores, so compare ratios within this file, not absolute times across files",
        "",
    ]  # fmt: skip
    for name in sets:
        lines += run_set(name, args, log)
    lines.append(f"Total benchmark time: {time.time() - t0:.0f} s.")
    explicit = "auto" not in (argv if argv is not None else sys.argv[1:]) and any(
        a.startswith("--ns-dtype") for a in (argv if argv is not None else sys.argv[1:])
    )
    stem = f"step_time-{args.ns_dtype_name}ns" if explicit else "step_time"
    path = write_report(args.out, stem, lines)
    print("\n".join(lines))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

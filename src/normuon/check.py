"""``normuon check``: is the optimizer right, sync-free and fast on this device?

Runs on the device it is given (``cpu``, ``cuda``, ``cuda:N``) and reports:

- **correctness**: NorMuon, Muon and their AdamW groups on this device against references
  computed on the CPU in float64 (the optimizer's own float64 path, which the test suite checks
  against an independent float64 implementation, and ``torch.optim.AdamW`` in float64), for
  square, tall, wide, conv, transposed, stacked and bf16 parameters; Newton-Schulz quality per
  iteration dtype against the float64 iteration, measured along the polar factor's directions;
- **host syncs**: the step's host reads (on CUDA ``torch.cuda.set_sync_debug_mode("error")``
  around steps; elsewhere :class:`normuon.host_reads.NoHostReads` on the sync-free path);
- **compile**: ``torch.compile(step, fullgraph=True)`` equals the eager step;
- **speed**: step time of the default NorMuon against ``torch.optim.Muon`` (and
  ``pytorch_optimizer.NorMuon`` when installed) on one transformer layer of each of the paper's
  models (GPT-2 124M and 350M, the 1.1B model: hidden 2048, MLP 8192, 4 KV heads of 16), with
  the Newton-Schulz share of the step and its rate against the device's measured matmul rate
  (counting the flops of the kernels that ran), and the Newton-Schulz kernel each bucket of the
  step uses with the times of the candidates measured at plan time (``ns_kernel="auto"``).

It exits non-zero when a correctness, host-sync or compile check fails, naming what failed.
``--quick`` keeps it to about two minutes on a 2-core CPU (fewer shapes, fewer repetitions).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import newton_schulz as NS
from .host_reads import HostReadError, NoHostReads
from .optimizer import Muon, NorMuon

__all__ = ["CheckResult", "PAPER_LAYERS", "SECTIONS", "kernel_summary", "main_check",
           "newton_schulz_timer", "run_check"]


@dataclass
class CheckResult:
    """One line of the report: ``ok`` is None for a measurement or a skipped check."""

    section: str
    name: str
    ok: bool | None
    detail: str


#: One transformer layer of each of the paper's models: (name, [(out, in), ...]).
PAPER_LAYERS: dict[str, list[tuple[int, int]]] = {
    "GPT-2 124M": [(768, 768)] * 4 + [(3072, 768), (768, 3072)],
    "GPT-2 350M": [(1024, 1024)] * 4 + [(4096, 1024), (1024, 4096)],
    # hidden 2048, 16 query heads, 4 KV heads (k, v: 4 x 128 rows), MLP 4x = 8192
    "1.1B": [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (2048, 8192)],
}

# (label, shape, layout)
_SHAPES = [
    ("square", (32, 32), "auto"),
    ("tall", (48, 16), "auto"),
    ("wide", (16, 48), "auto"),
    ("conv", (8, 4, 3, 3), "auto"),
    ("transposed", (24, 40), "transposed"),
    ("stacked", (3, 12, 20), "auto"),
]


def _groups(params: list[torch.Tensor], layouts: list[str], vectors: list[torch.Tensor]):
    groups = [{"params": [p], "layout": layout} for p, layout in zip(params, layouts)]
    return groups + [{"params": vectors, "algorithm": "adamw", "weight_decay": 0.01}]


#: What ``--quick`` compiles: a tall matrix (the Gram iteration, aspect 3), a transposed layout
#: and a stacked one (the standard loop, aspect 1.67); a cold compile of the step takes 40-100 s
#: on a 2-core CPU, mostly a fixed cost, so the other three shapes are left to the full check.
_QUICK_COMPILE_SHAPES = ("tall", "transposed", "stacked")


def _train(cls, device, dtype, ns_dtype, steps=3, host_reads="auto", compile_step=False,
           shapes=None):  # fmt: skip
    """(matrices, vectors, optimizer) after ``steps`` steps on fixed random data; ``shapes``:
    the labels of :data:`_SHAPES` to train (None: all)."""
    gen = torch.Generator().manual_seed(0)
    chosen = [entry for entry in _SHAPES if shapes is None or entry[0] in shapes]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 for _, s, _ in chosen]
    vec_init = [torch.randn(16, generator=gen, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in init]
    vectors = [torch.nn.Parameter(t.to(device=device, dtype=dtype)) for t in vec_init]
    opt = cls(_groups(params, [lay for _, _, lay in chosen], vectors), lr=0.02,
              weight_decay=0.1, ns_dtype=ns_dtype, adamw_lr=1e-2, host_reads=host_reads)
    step = torch.compile(opt.step, fullgraph=True) if compile_step else opt.step
    for _ in range(steps):
        for p in params + vectors:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p)
        step()
    return params, vectors, opt


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_correctness(device: torch.device) -> list[CheckResult]:
    out = []
    for cls in (NorMuon, Muon):
        ref, ref_vec, _ = _train(cls, "cpu", torch.float64, "float64")
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            got, got_vec, _ = _train(cls, device, dtype, "float32")
            for (label, _, _), p, r in zip(_SHAPES, got, ref):
                err = _rel_err(p, r)
                out.append(CheckResult("correctness", f"{cls.__name__} {label} {dtype}".replace(
                    "torch.", ""), err < tol, f"max rel. error {err:.2e} (limit {tol:.0e})"))
            if dtype == torch.float32:  # the AdamW group against torch.optim.AdamW in float64
                err = _rel_err(got_vec[0], ref_vec[0])
                out.append(CheckResult("correctness", f"{cls.__name__} AdamW group", err < 1e-5,
                                       f"max rel. error vs float64 {err:.2e}"))
    out.append(_adamw_against_torch(device))
    out += _ns_quality(device)
    return out


def _adamw_against_torch(device) -> CheckResult:
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(64, generator=gen, dtype=torch.float64)
    ours = torch.nn.Parameter(init.to(device=device, dtype=torch.float32))
    ref = torch.nn.Parameter(init.clone())
    opt = NorMuon([{"params": [ours], "algorithm": "adamw", "weight_decay": 0.1}], adamw_lr=1e-2)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(64, generator=gen, dtype=torch.float64)
        ours.grad, ref.grad = g.to(ours), g.clone()
        opt.step()
        ref_opt.step()
    err = _rel_err(ours, ref)
    return CheckResult("correctness", "AdamW groups vs torch.optim.AdamW (float64)", err < 1e-5,
                       f"max rel. error {err:.2e}")


def _ns_quality(device: torch.device) -> list[CheckResult]:
    """sigma_i = u_i^T O v_i along U's singular directions carrying >= 1% of its norm: the
    Muon quintic lands them in about [0.7, 1.2] by design, so each dtype is held to the float64
    iteration's error, not to 0."""
    gen = torch.Generator().manual_seed(2)
    u = (torch.randn(2, 64, 8, generator=gen) @ torch.randn(2, 8, 160, generator=gen)
         + 0.1 * torch.randn(2, 64, 160, generator=gen))  # low rank + noise, gradient-like
    left, s, right = torch.linalg.svd(u.double(), full_matrices=False)
    significant = s / torch.linalg.matrix_norm(u.double()).unsqueeze(-1) >= 1e-2
    coefficients = NS.resolve_ns_coefficients("muon", 5)

    def sigma_error(dtype: torch.dtype, on: torch.device) -> float:
        o = NS.default_orthogonalizer(u.to(on), coefficients, dtype).double().cpu()
        sigma = torch.einsum("bmi,bmn,bin->bi", left, o, right)
        return (sigma - 1)[significant].abs().max().item()

    baseline = sigma_error(torch.float64, torch.device("cpu"))
    out = []
    for dtype, tol in ((torch.float32, 5e-3), (torch.bfloat16, 5e-2), (torch.float16, 5e-2)):
        work = NS.ns_compute_dtype(dtype, device)
        if work != dtype:
            out.append(CheckResult("newton-schulz", str(dtype).replace("torch.", ""), None,
                                   f"not native on {device.type}: iterates in {work}"))
            continue
        err = sigma_error(dtype, device)
        out.append(CheckResult(
            "newton-schulz", str(dtype).replace("torch.", ""), abs(err - baseline) <= tol,
            f"sigma error {err:.4f} vs float64 iteration {baseline:.4f} (limit +{tol})"))
    return out


def check_host_syncs(device: torch.device) -> list[CheckResult]:
    """The default step on this device (CUDA: the sync debug mode), and on the CPU the sync-free
    path (``host_reads="never"``) with a Tensor lr, both with a NaN gradient to skip."""
    results = []
    for cls in (NorMuon, Muon):
        params, vectors, opt = _train(cls, device, torch.float32, "float32", steps=1,
                                      host_reads="auto" if device.type != "cpu" else "never")
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        params[0].grad = torch.full_like(params[0], float("nan"))
        for p in params[1:] + vectors:
            p.grad = torch.randn_like(p)
        try:
            with _no_host_reads(device):
                opt.step()
                opt.step()
            results.append(CheckResult("host syncs", cls.__name__, True,
                                       "no host read in two steps (Tensor lr, a NaN gradient)"))
        except (HostReadError, RuntimeError) as exc:
            results.append(CheckResult("host syncs", cls.__name__, False, str(exc)[:200]))
    return results


@contextlib.contextmanager
def _no_host_reads(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    with NoHostReads():
        yield


def check_compile(device: torch.device, quick: bool = False) -> list[CheckResult]:
    results = []
    # Muon's step is NorMuon's without the neuron factors: --quick compiles NorMuon only, on
    # fewer shapes.
    shapes = _QUICK_COMPILE_SHAPES if quick else None
    for cls in (NorMuon,) if quick else (NorMuon, Muon):
        try:
            eager, _, _ = _train(cls, device, torch.float32, "float32", steps=2,
                                 host_reads="never", shapes=shapes)
            torch._dynamo.reset()
            compiled, _, _ = _train(cls, device, torch.float32, "float32", steps=2,
                                    host_reads="never", compile_step=True, shapes=shapes)
            err = max(_rel_err(a, b) for a, b in zip(compiled, eager))
            results.append(CheckResult("compile", f"{cls.__name__} fullgraph", err < 1e-5,
                                       f"max rel. difference from eager {err:.2e}"
                                       + (f" ({', '.join(shapes)})" if shapes else "")))
        except Exception as exc:  # noqa: BLE001 - a compiler failure is a failed check
            results.append(CheckResult("compile", f"{cls.__name__} fullgraph", False,
                                       f"{type(exc).__name__}: {str(exc)[:160]}"))
    results += check_graph_step(device)
    return results


def _graph_setup(device: torch.device, **matrix_options):
    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device))
              for s in [(64, 32), (32, 96), (32,)]]  # fmt: skip
    opt = NorMuon([{"params": params[:2], "weight_decay": 0.5, **matrix_options},
                   {"params": params[2:], "algorithm": "adamw"}], ns_dtype="float32")  # fmt: skip
    return params, opt


def _graph_backend(opt, device: torch.device):
    from .cuda_graphs import CudaGraphs, EagerReplay

    return CudaGraphs() if device.type == "cuda" else EagerReplay(opt)


def check_graph_step(device: torch.device) -> list[CheckResult]:
    """:class:`normuon.cuda_graphs.GraphedStep` (a real CUDA graph on CUDA, its
    :class:`~normuon.cuda_graphs.EagerReplay` stand-in elsewhere) against eager steps: under
    OneCycleLR (which writes Python floats into the groups) and a user's ``group["lr"] = ...``,
    with parameters without a gradient at two steps and a NaN gradient at one; then with bf16
    momentum, a state dict loaded mid-run (a recapture that must register the same random
    generator and keep the skip counter)."""
    from .cuda_graphs import GraphedStep

    name = "CUDA graph step" if device.type == "cuda" else "graphed step (stand-in replay)"
    results = []
    try:
        runs, skips = [], []
        for graphed in (True, False):
            params, opt = _graph_setup(device)
            step = lambda opt=opt: opt.step()  # noqa: E731 - the scheduler's wrapped step
            if graphed:
                step = GraphedStep(opt, warmup=2, backend=_graph_backend(opt, device)).step
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.01], total_steps=20)
            gen = torch.Generator().manual_seed(5)
            for t in range(8):
                if t == 5:
                    opt.param_groups[0]["lr"] = 0.01
                for i, p in enumerate(params):
                    g = torch.randn(p.shape, generator=gen).to(device)
                    if t == 6 and i == 1:
                        g[0, 0] = float("nan")
                    p.grad = None if (t in (3, 4) and i in (0, 2)) else g
                step()
                sched.step()
            runs.append([p.detach().clone() for p in params])
            skips.append(opt.nonfinite_skips)
        _sync(device)
        err = max(_rel_err(a, b) for a, b in zip(*runs))
        ok = err < 1e-5 and skips[0] == skips[1] == 1
        results.append(CheckResult("compile", name, ok,
                                   f"vs eager after 8 steps (floats written by a scheduler and a "
                                   f"user, absent and NaN gradients): max rel. difference "
                                   f"{err:.2e}, skips {skips}"))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a capture failure is a failed check
        results.append(CheckResult("compile", name, False,
                                   f"{type(exc).__name__}: {str(exc)[:160]}"))  # fmt: skip
    try:
        params, opt = _graph_setup(device, state_dtype="bfloat16")
        backend = _graph_backend(opt, device)
        graphed = GraphedStep(opt, warmup=1, backend=backend)
        generators = list(graphed.spec.generators)
        gen = torch.Generator().manual_seed(6)
        for t in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device)
            if t == 1:
                params[0].grad[0, 0] = float("nan")
            if t == 3:
                opt.load_state_dict(opt.state_dict())
            graphed.step()
        _sync(device)
        finite = all(bool(torch.isfinite(p).all()) for p in params)
        kept = graphed.spec.generators == generators and len(generators) == 1
        ok = graphed.captures == 2 and kept and opt.nonfinite_skips == 1 and finite
        detail = (f"captures {graphed.captures} (2 expected), generator kept {kept}, skips "
                  f"{opt.nonfinite_skips} (1), finite {finite}")  # fmt: skip
        results.append(CheckResult("compile", f"{name}: load_state_dict, bf16 state", ok,
                                   detail))  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        results.append(CheckResult("compile", f"{name}: load_state_dict, bf16 state", False,
                                   f"{type(exc).__name__}: {str(exc)[:160]}"))  # fmt: skip
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 2048) -> float:
    """Measured GFLOP/s of one (size, size) matrix product in ``dtype`` on ``device``."""
    a = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ a
    reps = 3
    seconds = min(_timed(lambda: a @ a, device) for _ in range(reps))
    return 2 * size**3 / seconds / 1e9


def check_speed(device: torch.device, quick: bool) -> list[CheckResult]:
    layers = dict(PAPER_LAYERS)
    if quick and device.type == "cpu":
        layers = {"GPT-2 124M": layers["GPT-2 124M"]}
    ns_dtype = NS.ns_compute_dtype(torch.bfloat16, device)
    rate = matmul_rate(device, ns_dtype)
    results = [CheckResult("speed", "matmul rate", None,
                           f"{rate:.0f} GFLOP/s ({str(ns_dtype).replace('torch.', '')}, 2048^2)")]
    if device.type == "cpu":
        results.append(CheckResult("speed", "bf16 Newton-Schulz dtype", None,
                                   NS.describe_cpu_half_choice(torch.bfloat16)))
    reps = 2 if quick else 5
    for model, shapes in layers.items():
        timings = {}
        for label, factory in _speed_impls(ns_dtype):
            try:
                timings[label] = _step_seconds(factory, shapes, device, reps)
            except ImportError:
                continue
        base = timings.get("torch.optim.Muon")
        ours, ns_seconds, choices = timings["normuon.NorMuon"]
        # The flops of the iterations that ran (the Gram iteration does fewer than the standard
        # loop on rectangular matrices): a rate of 100% is the floor.
        flops = sum(2.0 * c.multiply_adds() for c in choices)
        detail = (f"{ours * 1e3:.1f} ms per layer step, Newton-Schulz "
                  f"{100 * ns_seconds / ours:.0f}% at {flops / ns_seconds / 1e9 / rate * 100:.0f}%"
                  f" of the matmul rate (flops of the kernels run)")  # fmt: skip
        for label, (seconds, _, _) in timings.items():
            if label != "normuon.NorMuon":
                detail += f"; {label} {seconds * 1e3:.1f} ms ({ours / seconds:.2f}x)"
        if base is None:
            detail += "; torch.optim.Muon unavailable in this torch"
        if device.type == "cuda":
            detail += f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        results.append(CheckResult("speed", model, None, detail))
        results.append(CheckResult("speed", f"{model}: Newton-Schulz kernels", None,
                                   kernel_summary(choices)))  # fmt: skip
    return results


def kernel_summary(choices) -> str:
    """The kernel of each distinct bucket of a plan (:meth:`normuon.NorMuon.ns_kernel_choices`)
    and how many batches run it, with the times measured at plan time."""
    counts: dict[object, int] = {}
    for choice in choices:
        counts[choice] = counts.get(choice, 0) + 1
    parts = [f"{choice.describe()}" + (f" [{n} batches]" if n > 1 else "")
             for choice, n in counts.items()]  # fmt: skip
    return "; ".join(parts) or "custom orthogonalizer: no built-in kernel"


def _speed_impls(ns_dtype: torch.dtype):
    yield "normuon.NorMuon", lambda ps: NorMuon(ps, ns_dtype=ns_dtype)
    if hasattr(torch.optim, "Muon"):
        yield "torch.optim.Muon", lambda ps: torch.optim.Muon(ps)

    def po(ps):
        from pytorch_optimizer import NorMuon as PoNorMuon  # optional peer

        return PoNorMuon([dict(params=ps, use_muon=True)])

    yield "pytorch_optimizer.NorMuon", po


@contextlib.contextmanager
def newton_schulz_timer(device: torch.device | str = "cpu") -> Iterator[list[float]]:
    """Time normuon's built-in Newton-Schulz within the block: yields a one-element list that
    collects the seconds spent in :func:`normuon.newton_schulz.newton_schulz_` (the optimizers'
    default path, kept buffers), synchronizing ``device`` around each call. Replacing the
    ``orthogonalizer`` option to time it would take the allocating custom path instead."""
    device = torch.device(device)
    seconds = [0.0]
    original = NS.newton_schulz_

    def timed(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            seconds[0] += time.perf_counter() - t0

    NS.newton_schulz_ = timed
    try:
        yield seconds
    finally:
        NS.newton_schulz_ = original


def _step_seconds(factory, shapes, device, reps) -> tuple[float, float, list]:
    """(median step seconds, median seconds inside normuon's Newton-Schulz, the Newton-Schulz
    kernel choice of each of the optimizer's batches: empty for a peer) after a warm-up."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device) * 0.02)
              for s in shapes]  # fmt: skip
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    opt = factory(params)

    def step():
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    step()
    steps, ns = [], []
    for _ in range(reps):
        with newton_schulz_timer(device) as seconds:
            steps.append(_timed(step, device))
        ns.append(seconds[0])
    steps.sort()
    ns.sort()
    choices = opt.ns_kernel_choices() if hasattr(opt, "ns_kernel_choices") else []
    return steps[len(steps) // 2], ns[len(ns) // 2], choices


#: The sections of ``normuon check``, in the order they run (``--sections`` names them).
SECTIONS = ("correctness", "host-syncs", "compile", "speed")


def run_check(device: str = "cpu", quick: bool = False,
              log: Callable[[str], object] = print,
              sections: tuple[str, ...] = SECTIONS) -> list[CheckResult]:  # fmt: skip
    """The ``sections`` (default: every one) on ``device``; ``log`` gets a line as each section
    finishes."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available in this torch build")
    results: list[CheckResult] = []
    for section, fn in (("correctness", lambda: check_correctness(dev)),
                        ("host-syncs", lambda: check_host_syncs(dev)),
                        ("compile", lambda: check_compile(dev, quick)),
                        ("speed", lambda: check_speed(dev, quick))):  # fmt: skip
        if section not in sections:
            continue
        t0 = time.perf_counter()
        part = fn()
        results += part
        failed = [r.name for r in part if r.ok is False]
        log(f"{section}: {'FAILED ' + ', '.join(failed) if failed else 'ok'} "
            f"({time.perf_counter() - t0:.0f} s)")
    return results


def report(results: list[CheckResult], device: str) -> str:
    """The markdown report."""
    from . import __version__

    lines = [f"# normuon check on {device}", "",
             f"normuon {__version__}, torch {torch.__version__}, Python {platform.python_version()}"
             f", {platform.machine()}", ""]  # fmt: skip
    if torch.device(device).type == "cuda":
        lines += [f"GPU: {torch.cuda.get_device_name(torch.device(device))}", ""]
    lines += ["| section | check | result | detail |", "|---|---|---|---|"]
    for r in results:
        verdict = {True: "pass", False: "**FAIL**", None: "-"}[r.ok]
        lines.append(f"| {r.section} | {r.name} | {verdict} | {r.detail} |")
    failed = [r for r in results if r.ok is False]
    lines += ["", f"{len(failed)} failed of {sum(r.ok is not None for r in results)} checks."]
    return "\n".join(lines) + "\n"


def main_check(device: str, quick: bool, out: str | None, say=print,
               sections: tuple[str, ...] = SECTIONS) -> int:  # fmt: skip
    """The ``normuon check`` command: prints the report, writes it under ``out``; exit 1 when a
    check failed."""
    results = run_check(device, quick, log=say, sections=sections)
    text = report(results, device)
    say(text)
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        target = path / f"check-{device.replace(':', '')}.md"
        target.write_text(text)
        say(f"wrote {target}")
    failed = [f"{r.section}: {r.name}" for r in results if r.ok is False]
    if failed:
        say("FAILED: " + "; ".join(failed))
        return 1
    return 0

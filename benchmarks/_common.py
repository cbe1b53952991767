"""Helpers shared by the benchmark scripts (step_time.py, distributed_step.py, ns_quality.py).

Machine facts (CPU model, SIMD flags, whether this CPU multiplies bfloat16 natively), timing
(median, matmul rate), the bytes allocated during a step, the GPT-shaped parameter sets and their
Newton-Schulz flop count, markdown tables and report files, and the peers' Newton-Schulz in
float32 (like for like on CPUs without bfloat16 GEMMs) with a timer around it.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

import normuon.newton_schulz as NS

# ------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """lscpu's model name (falls back to /proc/cpuinfo, then platform)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    """The SIMD flags that decide matmul speed (AVX2 / AVX-512 / BF16 / AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [f for f in flags if f.startswith(("avx", "amx", "fma"))]
                    return " ".join(sorted(keep)) or "none"
    except OSError:
        pass
    return "unknown"


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def bf16_gemm_native() -> bool | None:
    """Whether bfloat16 matrix products on this CPU are fast enough for Newton-Schulz to run in
    bfloat16: oneDNN supports them and they measured at least
    ``HALF_MATMUL_MIN_SPEEDUP`` x float32's rate (:func:`normuon.newton_schulz.native_half_matmul`;
    oneDNN also "supports" bf16 on AVX512 CPUs without BF16 instructions, emulated at ~0.25x
    float32's rate). None when this torch build cannot tell."""
    try:
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return None
    return NS.native_half_matmul("cpu", torch.bfloat16)


def bf16_gemm_line() -> str:
    """The machine line saying how this CPU multiplies bfloat16 and what Newton-Schulz runs in."""
    native = bf16_gemm_native()
    if native is None:
        return "- native bf16 GEMMs: unknown (this torch build cannot tell)"
    return f"- native bf16 GEMMs: {native} (Newton-Schulz in {NS.describe_cpu_half_choice()})"


def default_ns_dtype() -> torch.dtype:
    """The Newton-Schulz dtype every implementation gets by default: bfloat16 (what all of them
    ship with) where this CPU multiplies it fast, float32 where bfloat16 GEMMs are emulated
    (~4x slower than float32) or a scalar fallback (50-200x slower), which is not a fair
    opponent."""
    return torch.bfloat16 if bf16_gemm_native() else torch.float32


def load_average() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "(" + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + ")"


def machine_lines() -> list[str]:
    """Markdown bullet lines describing the machine, its bf16 GEMM capability and versions."""
    return [
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, "
        f"torch threads {torch.get_num_threads()}; no GPU used",
        f"- SIMD flags: {cpu_flags()}",
        bf16_gemm_line(),
        f"- load average at start (1, 5, 15 min): {load_average()}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, normuon "
        f"{version_of('normuon')}, pytorch-optimizer {version_of('pytorch-optimizer')}",
    ]


# ------------------------------------------------------------------------------ timing


def today() -> str:
    return _dt.date.today().isoformat()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def matmul_rate(
    dtype: torch.dtype, reps: int = 5, target_seconds: float = 0.5
) -> tuple[float, int]:
    """GFLOP/s of one large square matmul in ``dtype`` (size adapted to the speed): the best of
    ``reps`` products after a warm-up, i.e. the rate the CPU reaches, which is what a floor
    needs (a cold first product ran at half the rate on an AMX Xeon: 855 against 1,724+).

    Starts at 256 and doubles the size (up to 2048) while one product takes under
    ``target_seconds`` / 8, so a slow scalar fallback (half types on CPUs without native
    support) is measured at a size that finishes. Returns (GFLOP/s, size).
    """
    size = 256
    while True:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        t = timed(lambda a=a, b=b: a @ b)
        if size >= 2048 or t * 8 > target_seconds:
            break
        size *= 2
    warm_until = time.perf_counter() + min(target_seconds, 4 * t)
    while time.perf_counter() < warm_until:
        a @ b
    times = [timed(lambda: a @ b) for _ in range(reps)]
    return 2.0 * size**3 / min(times) / 1e9, size


# ------------------------------------------------------------------------------ allocations


def step_allocated_bytes(step_fn: Callable[[], object]) -> int:
    """Bytes the allocator hands out while ``step_fn()`` runs: the sizes of all allocations
    summed, each counted once, freed again before the end or not.

    With ``profile_memory=True`` torch's allocators report every allocation (+size) and every
    free (-size) to the profiler, one ``[memory]`` event each, whichever op (however deeply
    nested) asked for it; the positive events are summed. Views, in-place ops and ``out=``
    writes allocate nothing and so count nothing. Not ``cpu_memory_usage`` of
    ``prof.events()``: that is the net of the events inside an op and its children, so frees
    cancel allocations and an allocation counts again in every enclosing op.

    The profiler's state is thread-local: allocations made on other threads (a Python thread
    started by ``step_fn``) are not seen; torch's CPU kernels allocate their outputs on the
    calling thread before they fan out to intra-op threads. Memory that
    libraries take from malloc directly (BLAS / oneDNN workspaces) is not torch's allocator
    and is not counted either.
    """
    # Imported here: the profiler is only needed by the scripts that measure allocations.
    from torch.autograd.profiler_util import MEMORY_EVENT_NAME
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step_fn()
    # The raw events (what torch's own profiler_util parses): the FunctionEvent list has
    # already folded the memory events into per-op net sums.
    events = prof.profiler.kineto_results.events()
    return sum(e.nbytes() for e in events if e.name() == MEMORY_EVENT_NAME and e.nbytes() > 0)


#: Matrix-product ops whose CPU kernels (oneDNN, for bf16) take a scratchpad from torch's
#: allocator on every call, whatever the caller does with the output.
GEMM_OPS = frozenset({"aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm", "aten::matmul"})


def step_allocations(step_fn: Callable[[], object]) -> tuple[int, int]:
    """(bytes allocated while ``step_fn()`` runs, as :func:`step_allocated_bytes`; of those, the
    bytes allocated inside matrix-product kernels that were given their output buffer).

    The second number is the GEMM library's own scratch (bf16 oneDNN kernels on CPUs: ~100 KiB
    per call, none in float32): an allocation counts there when the innermost op around it is
    one of :data:`GEMM_OPS` called with ``out=`` (its output then needs no allocation, so what
    it allocates is the kernel's). A product that allocates its result is not counted there.
    """
    from torch.autograd.profiler_util import MEMORY_EVENT_NAME
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True) as prof:  # fmt: skip
        step_fn()
    events = prof.profiler.kineto_results.events()
    allocations = [
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == MEMORY_EVENT_NAME and e.nbytes() > 0
    ]
    # Product ops given an output buffer: their last input is out= (record_shapes lists it).
    gemms = sorted(
        (e.start_ns(), e.end_ns())
        for e in events
        if e.name() in GEMM_OPS and _has_out(e)
    )
    starts = [start for start, _ in gemms]
    in_gemm = 0
    for t, nbytes in allocations:
        k = bisect.bisect_right(starts, t) - 1
        if k >= 0 and gemms[k][0] <= t <= gemms[k][1]:
            in_gemm += nbytes
    return sum(n for _, n in allocations), in_gemm


def _has_out(event) -> bool:
    """Whether a profiled bmm/baddbmm/mm/addmm call was given ``out=`` (one more tensor input
    than its functional form: bmm/mm 2, baddbmm/addmm 3)."""
    functional_inputs = {"aten::bmm": 2, "aten::mm": 2, "aten::baddbmm": 3, "aten::addmm": 3}
    shapes = [s for s in event.shapes() if s]
    return len(shapes) > functional_inputs.get(event.name(), 99)


# ------------------------------------------------------------------------------ shapes, flops

#: name -> (d_model, layers). Per layer: four (d, d), one (4d, d) and one (d, 4d) matrix.
SHAPE_SETS: dict[str, tuple[int, int]] = {
    "tiny": (32, 2),
    "small": (128, 4),
    "gpt-small": (384, 6),
    "gpt2-124m": (768, 12),
}


def layer_shapes(d: int, layers: int = 1) -> list[tuple[int, int]]:
    """The matrices of ``layers`` transformer layers of width d: q, k, v, o, MLP up, MLP down."""
    return ([(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]) * layers


def ns_flops(m: int, n: int, steps: int = 5) -> float:
    """Flops of ``steps`` standard Newton-Schulz steps on an (m, n) matrix: 4 k^2 N + 2 k^3 per
    step for k = min(m, n), N = max(m, n). The Gram iteration does fewer (its 'rate' against
    this count can exceed the matmul rate)."""
    k, big = min(m, n), max(m, n)
    return steps * (4.0 * k * k * big + 2.0 * k**3)


# ------------------------------------------------------------------------------ reports


def md_table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def write_report(out_dir: str | Path, stem: str, lines: list[str]) -> Path:
    """Write ``lines`` to ``out_dir/stem-DATE.md`` (directories created) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}-{today()}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    """A TCP port free on the loopback interface right now (for a spawned gloo group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bytes_written() -> int:
    """``wchar`` of /proc/self/io: bytes this process (all threads, gloo's sockets included)
    has written since it started; -1 where the kernel does not say."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("wchar:"):
                    return int(line.split(":")[1])
    except OSError:
        pass
    return -1


def leave_process_group() -> None:
    """Destroy the default process group without gloo's shutdown race (pytorch/pytorch#56297:
    its destructor can abort or deadlock while its work thread finishes): barrier, pause."""
    import torch.distributed as dist

    dist.barrier()
    time.sleep(0.2)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ peers' NS


def torch_muon_ns_float32(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz (``torch.optim._muon._zeropower_via_newtonschulz``:
    wide orientation, Frobenius normalization, the same (a, b, c) every step) in float32
    instead of its hard-coded bfloat16. (m, n) in, (m, n) float32 out."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T  # (k, k)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class PeerNewtonSchulz:
    """Times the peers' Newton-Schulz and, when ``float32`` is set, runs it in float32.

    :meth:`install` replaces ``torch.optim._muon._zeropower_via_newtonschulz`` and
    pytorch_optimizer NorMuon's ``zero_power_via_newton_schulz_5`` (both looked up as module
    globals at call time) by wrappers that add their wall time to :attr:`seconds`. These are
    peers' internals; normuon itself is timed through its public ``orthogonalizer`` option.
    """

    def __init__(self) -> None:
        self.float32 = False
        self.seconds = 0.0
        self.installed: list[str] = []

    def install(self) -> None:
        if self.installed:
            return
        import torch.optim._muon as tmuon

        original_torch = tmuon._zeropower_via_newtonschulz
        tmuon._zeropower_via_newtonschulz = self._wrap(original_torch, torch_muon_ns_float32)
        self.installed.append("torch.optim.Muon")
        # pytorch_optimizer's NorMuon calls it from its own module (one matrix at a time) and,
        # on its default foreach path, from the Muon base module (same-shape batches).
        try:
            import pytorch_optimizer.optimizer.muon.base as po_base
            import pytorch_optimizer.optimizer.muon.normuon as po_normuon
        except ImportError:
            return
        for module in (po_base, po_normuon):
            shipped = getattr(module, "zero_power_via_newton_schulz_5", None)
            if shipped is not None:
                module.zero_power_via_newton_schulz_5 = self._wrap(
                    shipped, functools.partial(shipped, dtype=torch.float32)
                )
        self.installed.append("pytorch_optimizer.NorMuon")

    def _wrap(self, shipped: Callable, float32: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return (float32 if self.float32 else shipped)(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return wrapper


class TimedOrthogonalizer:
    """normuon's ``orthogonalizer`` option wrapped to add its wall time to :attr:`seconds`.

    CPU wall time; on an accelerator the calls return before the work is done, so this would
    need a synchronization (the benchmarks run on CPUs only).
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, u, coefficients, dtype):
        t0 = time.perf_counter()
        try:
            return self.fn(u, coefficients, dtype)
        finally:
            self.seconds += time.perf_counter() - t0

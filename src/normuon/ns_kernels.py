"""Which Newton-Schulz kernel each bucket runs: timed once per process, at plan time.

A *bucket* is what one call of :func:`normuon.newton_schulz.newton_schulz_` iterates: a batch
of ``count`` same-shaped (m, n) matrices, in one iteration dtype, on one kind of device, for a
number of steps. The kernels (:data:`normuon.newton_schulz.KERNELS`) give the same map and
differ in speed only, and which is fastest depends on the GEMM library and the shapes (oneDNN
and cuBLAS favour different ones), so with ``ns_kernel="auto"`` the optimizers time every
candidate of a bucket once, on random data of its shape, when the optimizer's plans are built
(or a step first meets a bucket), and keep the fastest (the shape rule's kernel stays unless
another is :data:`SWITCH_MARGIN` faster) in a per-process cache: a second optimizer with the
same buckets does not measure again. The choice then never changes in that process, so a
given process's results are deterministic; another process may choose another kernel, whose
result differs by rounding (within each kernel's error bound, ``tests/test_ns_kernels.py``).

Candidates of a bucket (:func:`candidates`): the batched standard loop in the default chunk
(:func:`normuon.newton_schulz.default_chunk_size`), the loop of 2-D products when the bucket
has several matrices, the Gram iteration (with the default restarts of its dtype) where the
aspect ratio is at least :data:`normuon.newton_schulz.GRAM_MIN_ASPECT` (below it the Gram
iteration does about as many flops or more, and its half-precision error bound is looser), and
on CPUs each batched kernel also in chunks of a quarter of the cache budget.

Nothing is timed where it cannot be: on the meta device, inside a traced step
(``torch.compile``) or during a CUDA graph capture; a bucket not chosen before then runs the
shape rule (``ns_kernel="shape"``: Gram from aspect 2, the batched standard loop otherwise),
and is not cached. The device is synchronized only around the timings here, never in a step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import newton_schulz as NS

__all__ = [
    "MEASURE_REPS",
    "NS_KERNEL_MODES",
    "SWITCH_MARGIN",
    "Candidate",
    "KernelChoice",
    "cached_choices",
    "candidates",
    "choose",
    "clear_cache",
    "measure",
    "shape_rule",
]

#: Values of the optimizers' ``ns_kernel`` option: ``"auto"`` (timed, see the module), the
#: shape rule, or one kernel for every bucket.
NS_KERNEL_MODES = ("auto", "shape", *NS.KERNELS)

#: Timed rounds per candidate after one warm-up round (the minimum is kept; rounds go over the
#: candidates in turn, so load from other processes hits all of them alike).
MEASURE_REPS = 3

#: How much faster than the shape rule's kernel (:func:`shape_rule`) another candidate must
#: time to replace it: on a shared machine the minimum of a few rounds still moves by several
#: percent between otherwise equal kernels, and a choice made on noise would only change the
#: rounding of the results from one process to the next.
SWITCH_MARGIN = 0.05


@dataclass(frozen=True)
class Candidate:
    """One way to run a bucket: a kernel of :data:`normuon.newton_schulz.KERNELS` over chunks
    of ``chunk`` matrices (the scratch holds one chunk)."""

    kernel: str
    chunk: int

    @property
    def label(self) -> str:
        return f"{self.kernel}/{self.chunk}"


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a bucket runs and why.

    Attributes:
        m, n, count: the bucket's matrices.
        dtype: the iteration dtype.
        device: the device type (``"cpu"``, ``"cuda"``, ...).
        steps: Newton-Schulz steps.
        candidate: what runs.
        source: ``"measured"`` (from ``timings``: the fastest, unless it beats the shape
            rule's kernel by less than :data:`SWITCH_MARGIN`), ``"only"`` (the one candidate:
            nothing to time), ``"fixed"`` (the ``ns_kernel`` option names it) or ``"shape"``
            (the shape rule: ``ns_kernel="shape"``, or nothing could be timed).
        timings: (candidate, seconds: minimum over :data:`MEASURE_REPS` rounds) of every
            candidate when measured, else empty.
    """

    m: int
    n: int
    count: int
    dtype: torch.dtype
    device: str
    steps: int
    candidate: Candidate
    source: str
    timings: tuple[tuple[Candidate, float], ...] = ()

    @property
    def kernel(self) -> str:
        return self.candidate.kernel

    def multiply_adds(self) -> int:
        """Multiply-adds of the iteration this bucket runs, over all its matrices (the floor:
        :func:`normuon.newton_schulz.ns_multiply_adds`)."""
        restarts = NS.gram_restarts(self.steps, self.dtype) if self.kernel == "gram" else ()
        return self.count * NS.ns_multiply_adds(self.m, self.n, self.steps, self.kernel,
                                                restarts)  # fmt: skip

    def bucket(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.count} x ({self.m}, {self.n}) {dtype} {self.device}, {self.steps} steps"

    def describe(self) -> str:
        """One line: the bucket, what runs, and the times measured at plan time."""
        text = f"{self.bucket()}: {self.candidate.label} ({self.source})"
        if self.timings:
            text += "; " + ", ".join(f"{c.label} {s * 1e3:.2f} ms" for c, s in self.timings)
        return text


#: (m, n, count, dtype, device type, steps) -> the measured choice, for this process.
_CACHE: dict[tuple, KernelChoice] = {}


def clear_cache() -> None:
    """Forget every measured choice (the next bucket seen is timed again)."""
    _CACHE.clear()


def cached_choices() -> list[KernelChoice]:
    """The choices measured in this process so far, in the order they were made."""
    return list(_CACHE.values())


def _chunks(m: int, n: int, count: int, dtype: torch.dtype, device_type: str) -> list[int]:
    """Chunk sizes worth timing: the default, and on a CPU a quarter of its cache budget
    (cache-resident operands against fewer, larger GEMM calls: which wins depends on the
    core count and cache sizes)."""
    default = NS.default_chunk_size((count, m, n), dtype, device_type)
    if device_type != "cpu":
        return [default]
    small = max(1, min(count, NS.CPU_CHUNK_BYTES // 4 // (m * n * dtype.itemsize)))
    return [default, small] if small < default else [default]


def candidates(m: int, n: int, count: int, dtype: torch.dtype,
               device_type: str) -> tuple[Candidate, ...]:  # fmt: skip
    """What ``ns_kernel="auto"`` times for a bucket (see the module docstring); the shape
    rule's kernel (:func:`shape_rule`) is among them."""
    chunks = _chunks(m, n, count, dtype, device_type)
    out = [Candidate("standard", chunk) for chunk in chunks]
    if count > 1:  # one matrix: the same products as the batched loop
        out.append(Candidate("loop", chunks[0]))
    if NS.prefers_gram(m, n):
        out += [Candidate("gram", chunk) for chunk in chunks]
    return tuple(out)


def shape_rule(m: int, n: int, count: int, dtype: torch.dtype, device_type: str) -> Candidate:
    """``ns_kernel="shape"``: Gram from aspect :data:`~normuon.newton_schulz.GRAM_MIN_ASPECT`,
    the batched standard loop otherwise, in the default chunk."""
    chunk = NS.default_chunk_size((count, m, n), dtype, device_type)
    return Candidate("gram" if NS.prefers_gram(m, n) else "standard", chunk)


def _synchronize(device: torch.device) -> None:
    """Wait for ``device`` (timing only; a step never calls this)."""
    if device.type == "cpu":
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "synchronize"):
        accelerator.synchronize(device)
        return
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def _can_time(device: torch.device) -> bool:
    """Whether timing here means anything and is allowed: not on the meta device (no data, no
    work), not inside a traced step, not during a CUDA graph capture."""
    if device.type == "meta" or torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


@torch.no_grad()
def measure(
    m: int, n: int, count: int, dtype: torch.dtype, device: torch.device,
    coefficients: Sequence[NS.Coefficients], input_dtype: torch.dtype,
    options: Sequence[Candidate], reps: int = MEASURE_REPS,
) -> tuple[tuple[Candidate, float], ...]:  # fmt: skip
    """Seconds of each candidate on ``count`` random (m, n) matrices in ``input_dtype`` (the
    step's input buffer), orthogonalized in place as a step does, iterating in ``dtype``: one
    warm-up round, then the minimum over ``reps`` rounds. Uses its own generator (the global
    random state is left alone) and its own buffers (freed on return)."""
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(count, m, n, generator=generator, dtype=input_dtype).to(device)
    buffer = torch.empty_like(source)
    largest = max(c.chunk for c in options)
    flat = torch.empty(NS.NSScratch.numel(largest, m, n), dtype=dtype, device=device)
    best = {c: math.inf for c in options}
    for round_ in range(reps + 1):
        for candidate in options:
            scratch = NS.NSScratch.carve(flat, candidate.chunk, m, n)
            buffer.copy_(source)
            _synchronize(device)
            start = time.perf_counter()
            NS.newton_schulz_(buffer, coefficients, scratch, kernel=candidate.kernel)
            _synchronize(device)
            if round_:
                best[candidate] = min(best[candidate], time.perf_counter() - start)
    return tuple(best.items())


def choose(
    mode: str, m: int, n: int, count: int, dtype: torch.dtype, device: torch.device,
    coefficients: Sequence[NS.Coefficients], input_dtype: torch.dtype,
) -> KernelChoice:  # fmt: skip
    """The kernel of a bucket under the ``ns_kernel`` option ``mode``: measured once per
    process for ``"auto"`` (then cached, see the module docstring), else decided from the
    shape. Raises ValueError for an unknown ``mode``."""
    if mode not in NS_KERNEL_MODES:
        raise ValueError(f"ns_kernel must be one of {NS_KERNEL_MODES}, got {mode!r}")
    device = torch.device(device)
    steps = len(coefficients)
    bucket = dict(m=m, n=n, count=count, dtype=dtype, device=device.type, steps=steps)
    if mode in NS.KERNELS:
        chunk = NS.default_chunk_size((count, m, n), dtype, device.type)
        return KernelChoice(**bucket, candidate=Candidate(mode, chunk), source="fixed")
    if mode == "auto":
        key = (m, n, count, dtype, device.type, steps)
        cached = _CACHE.get(key)
        if cached is not None:
            return cached
        options = candidates(m, n, count, dtype, device.type)
        if len(options) == 1:  # nothing to choose from: no timing needed
            choice = KernelChoice(**bucket, candidate=options[0], source="only")
            _CACHE[key] = choice
            return choice
        if _can_time(device):
            timings = measure(m, n, count, dtype, device, coefficients, input_dtype, options)
            seconds = dict(timings)
            incumbent = shape_rule(m, n, count, dtype, device.type)
            fastest = min(options, key=seconds.__getitem__)
            if seconds[fastest] > (1.0 - SWITCH_MARGIN) * seconds[incumbent]:
                fastest = incumbent  # not clearly faster: keep the rule's kernel
            choice = KernelChoice(**bucket, candidate=fastest, source="measured",
                                  timings=timings)  # fmt: skip
            _CACHE[key] = choice
            return choice
    return KernelChoice(**bucket, candidate=shape_rule(m, n, count, dtype, device.type),
                        source="shape")  # fmt: skip

"""Helpers shared by the benchmark scripts: machine facts, timing, matmul rate, markdown."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch


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


def machine_lines() -> list[str]:
    """Markdown bullet lines describing the machine and versions."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return [
        f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores visible, "
        f"torch threads {torch.get_num_threads()}",
        f"- SIMD flags: {cpu_flags()}; oneDNN bf16 matmul supported: {bf16}",
        f"- load average at start (1, 5, 15 min): {load}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, normuon "
        f"{version_of('normuon')}, pytorch-optimizer {version_of('pytorch-optimizer')}, "
        f"heavyball {version_of('heavyball')}",
    ]


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
    dtype: torch.dtype, reps: int = 3, target_seconds: float = 0.5
) -> tuple[float, int]:
    """Measured GFLOP/s of one large square matmul in ``dtype`` (size adapted to the speed).

    Starts at 256 and doubles the size (up to 2048) while one product takes under
    ``target_seconds`` / 8, so a slow scalar fallback (half types on CPUs without native
    support) is measured at a size that finishes. Returns (median GFLOP/s, size).
    """
    size = 256
    while True:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        t = timed(lambda a=a, b=b: a @ b)
        if size >= 2048 or t * 8 > target_seconds:
            break
        size *= 2
    times = [timed(lambda: a @ b) for _ in range(reps)]
    return 2.0 * size**3 / median(times) / 1e9, size


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out

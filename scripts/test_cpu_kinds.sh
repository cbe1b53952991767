#!/usr/bin/env bash
# The numerics-sensitive tests again as the CPU kinds this machine is not would run them.
#
# Machines differ in their matrix-product kernels, and the suite must pass on every kind:
#   - AMX (Intel Sapphire Rapids and later): oneDNN's bf16 products on AMX tiles;
#   - AVX512-BF16 without AMX (AMD Zen 4/5, Cooper Lake): oneDNN's AVX512-BF16 kernels;
#   - AVX512 without BF16 instructions (Intel Cascade Lake, Ice Lake): oneDNN emulates bf16
#     products at ~0.25x float32's rate, so Newton-Schulz runs in float32, as measured once per
#     process (normuon.newton_schulz.native_half_matmul);
#   - neither (AVX2 only): bf16 products are a scalar fallback, so Newton-Schulz runs in float32,
#     and MKL's float32 GEMMs take AVX2 code paths.
# oneDNN and MKL can be told to use fewer instructions than the CPU has (ONEDNN_MAX_CPU_ISA,
# MKL_ENABLE_INSTRUCTIONS), so one machine exercises every kind at or below its own. A kind above
# it cannot be forced (an AVX2-only CI machine cannot run AMX or AVX512-BF16 kernels); what it
# runs natively is its own kind. The limits reach spawned workers through the environment.
#
#   bash scripts/test_cpu_kinds.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY'
import torch
from normuon.newton_schulz import describe_cpu_half_choice
flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
kind = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
        else "AVX512 without BF16 (bf16 emulated)" if "avx512f" in flags
        else "AVX2 (no native bf16)")
print(f"this CPU: {kind}; torch {torch.__version__}; bf16 Newton-Schulz in "
      f"{describe_cpu_half_choice(torch.bfloat16)}")
PY

# Single-process numerics, bf16 Newton-Schulz included: as an AVX512-BF16 CPU without AMX runs them.
AVX512_BF16_TESTS=(
  tests/test_against_reference.py tests/test_newton_schulz.py tests/test_state_dtype.py
  tests/test_conformance.py tests/test_gated_experts.py tests/test_host_reads.py
  tests/test_cuda_graphs.py tests/test_bounds.py
)
# Everything compared against one process, distributed included: as an AVX2-only CPU runs them.
AVX2_TESTS=(
  "${AVX512_BF16_TESTS[@]}" tests/test_distributed.py tests/test_distributed_extra.py
  tests/test_tensor_parallel.py tests/test_comm_bytes.py
)

echo "== as an AVX512-BF16 CPU without AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"
if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
  ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 MKL_ENABLE_INSTRUCTIONS=AVX2 \
    "$PYTHON" -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "${AVX512_BF16_TESTS[@]}" "$@"
else
  # A kind above this CPU's cannot be forced: the limit would leave oneDNN as it is, and the
  # main suite has just run these tests as this CPU's own kind.
  echo "skipped: this CPU has no AVX512-BF16 or AMX instructions"
fi
echo "== as an AVX512 CPU without BF16 instructions (ONEDNN_MAX_CPU_ISA=AVX512_CORE)"
# oneDNN still supports bf16 there (emulated in float32 units), so only the measurement keeps
# Newton-Schulz in float32: check that it does (float32 runs the numerics below, as AVX2).
env -u NORMUON_CPU_HALF_MATMUL ONEDNN_MAX_CPU_ISA=AVX512_CORE "$PYTHON" -c "
import sys, torch
from normuon.newton_schulz import half_matmul_speedup, native_half_matmul
if 'avx512f' in open('/proc/cpuinfo').read():
    speedup = half_matmul_speedup(torch.bfloat16)
    print(f'bf16 products at {speedup:.2f}x float32 rate; bf16 Newton-Schulz: '
          f'{native_half_matmul(\"cpu\", torch.bfloat16)}')
    if native_half_matmul('cpu', torch.bfloat16):
        sys.exit('emulated bf16 products were taken for fast ones')
else:
    print('no AVX512 on this CPU: nothing to check')
"
echo "== as an AVX2-only CPU (ONEDNN_MAX_CPU_ISA=AVX2: no native bf16, float32 Newton-Schulz)"
# The limit must take: with it, torch must report no native bf16 products on any x86 CPU.
ONEDNN_MAX_CPU_ISA=AVX2 "$PYTHON" -c "
import platform, sys, torch
if platform.machine() in ('x86_64', 'AMD64') and torch.ops.mkldnn._is_mkldnn_bf16_supported():
    sys.exit('ONEDNN_MAX_CPU_ISA=AVX2 did not take: oneDNN still reports native bf16')
"
# Checkpoint round trips (dcp) move state, not numerics: they run once, in the main suite.
ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
  "$PYTHON" -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "${AVX2_TESTS[@]}" -k "not dcp" "$@"

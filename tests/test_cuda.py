"""On a GPU: the step against float64 references, with no host sync, compiled as eager.

Marked ``cuda``; every test here needs CUDA and is skipped, with that reason, on machines
without it (the CPU suite covers the same code through the meta device and host_reads="never").
``scripts/device_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from normuon import check

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (none on this machine)"),
]


def _failures(results):
    return [f"{r.section}: {r.name}: {r.detail}" for r in results if r.ok is False]


def test_step_on_cuda_matches_float64_references():
    assert _failures(check.check_correctness(torch.device("cuda"))) == []


def test_step_on_cuda_never_syncs():
    assert _failures(check.check_host_syncs(torch.device("cuda"))) == []


def test_compiled_step_on_cuda_equals_eager():
    assert _failures(check.check_compile(torch.device("cuda"))) == []


def test_bf16_wire_is_what_auto_picks_on_cuda():
    from normuon.distributed.comm import wire_dtype_for

    assert wire_dtype_for(torch.device("cuda"), "auto") == torch.bfloat16

"""The CPU-side half of CUDA-graph steps (normuon.cuda_graphs): what prepare_for_capture does
to an optimizer, on the CPU; the capture and replay themselves are in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from normuon import Muon, NorMuon
from normuon.cuda_graphs import GraphedStep, prepare_for_capture
from normuon.host_reads import NoHostReads


def _setup(cls, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(16, 8), (8, 24)]]
    vectors = [torch.nn.Parameter(torch.randn(8, generator=gen))]
    # Values exact in float32: the prepared (tensor) run must equal the float run.
    opt = cls([{"params": params, "lr": 2**-6, "weight_decay": 0.125},
               {"params": vectors, "algorithm": "adamw", "lr": 2**-8, "betas": (0.875, 0.9375)}],
              ns_dtype="float32")  # fmt: skip
    return params + vectors, opt


@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_prepared_step_is_sync_free_and_equals_the_plain_step(cls):
    params, opt = _setup(cls)
    ref_params, ref_opt = _setup(cls)
    params[-1].grad = None  # no gradient before preparing: gets a zero buffer
    device = prepare_for_capture(opt)
    assert device == torch.device("cpu")
    assert opt.host_reads == "never"
    assert all(isinstance(g["lr"], torch.Tensor) and g["lr"].ndim == 0 for g in opt.param_groups)
    assert all(isinstance(b, torch.Tensor) for b in opt.param_groups[1]["betas"])
    assert all(opt.state[p] for p in params)  # state exists before any step
    assert params[-1].grad is not None and not params[-1].grad.any()
    lr_tensor = opt.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: 0.5**t)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen)
            p.grad.copy_(g)  # in place, as a captured step needs
            q.grad = g.clone()
        with NoHostReads():
            opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
    # The scheduler updated the very tensor a captured graph would read.
    assert opt.param_groups[0]["lr"] is lr_tensor
    torch.testing.assert_close(lr_tensor, torch.tensor(2**-6 * 0.5**4))
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=1e-7)
    prepare_for_capture(opt)  # idempotent: the same tensors stay
    assert opt.param_groups[0]["lr"] is lr_tensor


def test_bad_inputs_are_clear_errors():
    params, opt = _setup(NorMuon)
    with pytest.raises(ValueError, match="needs a normuon.NorMuon or normuon.Muon, got SGD"):
        prepare_for_capture(torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="CUDA graphs need CUDA parameters"):
        GraphedStep(opt)
    with pytest.raises(ValueError, match="warmup must be a positive int"):
        GraphedStep(opt, warmup=0)
    mixed = NorMuon([torch.nn.Parameter(torch.randn(4, 4)),
                     torch.nn.Parameter(torch.randn(4, 4, device="meta"))])  # fmt: skip
    with pytest.raises(ValueError, match="on one device"):
        prepare_for_capture(mixed)

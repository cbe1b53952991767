"""The step reads nothing back to the host on the accelerator path (``docs/algorithm.md``).

Accelerators always take the device path; on the CPU ``host_reads="never"`` selects it, and
parameters on the meta device (which hold no data, so any host read raises) take it as a GPU
would. Hyperparameters may be Python numbers or 0-d tensors on the parameters' device, updated
in place by LR schedulers: either way ``step()`` never reads a value. The distributed placements
are covered in ``tests/test_tensor_parallel.py`` and ``tests/test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch
from reference import ABLATIONS
from torch import nn

from normuon import Muon, NorMuon
from normuon.host_reads import HostReadError, NoHostReads

CLASSES = [NorMuon, Muon]


def test_the_guard_catches_every_kind_of_host_read():
    t = torch.tensor([1.0, -2.0])
    reads = [
        lambda: t.sum().item(),
        lambda: bool(t[0] > 0),
        lambda: int(t[0]),
        lambda: t.tolist(),
        lambda: (t > 0).nonzero(),
        lambda: torch.equal(t, t),
    ]
    for read in reads:
        with pytest.raises(HostReadError), NoHostReads():
            read()
    with NoHostReads() as guard:  # device-side work is fine
        (t * 2).add_(1).clamp_min_(0)
    assert guard.seen == []
    assert t.tolist() == [1.0, -2.0]  # restored on exit


def _params(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = {
        "square": (16, 16), "tall": (24, 8), "wide": (8, 24), "conv": (6, 3, 2, 2),
        "stacked": (3, 8, 12), "transposed": (12, 20), "fused": (12, 8),
        "bias": (16,), "gain": (8,),
    }  # fmt: skip
    return {
        name: nn.Parameter(torch.randn(shape, generator=g).to(device=device, dtype=dtype))
        for name, shape in shapes.items()
    }


def _groups(params, tensor_hyper: bool, device="cpu"):
    def h(v):
        return torch.tensor(v, device=device) if tensor_hyper else v

    # Values exact in float32, so that 0-d float32 tensors hold the same numbers as the floats.
    matrix = dict(lr=h(2**-6), weight_decay=h(0.125), momentum=h(0.875))
    return [
        {"params": [params[k] for k in ("square", "tall", "wide", "conv", "stacked")], **matrix},
        {"params": [params["transposed"]], "layout": "transposed", **matrix},
        {"params": [params["fused"]], "split_sizes": [4, 8], **matrix},
        {"params": [params["bias"], params["gain"]], "algorithm": "adamw", "lr": h(2**-8),
         "betas": (h(0.875), h(0.9375)), "weight_decay": h(2**-6)},
    ]  # fmt: skip


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    grads = {k: torch.randn(p.shape, generator=g).to(p.dtype) for k, p in params.items()}
    if step == 1:  # a NaN in one matrix and one AdamW vector: both skipped, masked on device
        grads["tall"][0, 0] = float("nan")
        grads["gain"][1] = float("inf")
    return grads


def _train(cls, tensor_hyper: bool, host_reads: str, guard: bool, steps=4, dtype=torch.float32,
           **options):  # fmt: skip
    params = _params(dtype=dtype)
    extra = {"beta2": 0.9375, "eps": 2**-27} if cls is NorMuon else {}
    extra.update(options)
    if tensor_hyper:
        extra = {k: torch.tensor(v) if isinstance(v, float) else v for k, v in extra.items()}
    opt = cls(_groups(params, tensor_hyper), ns_dtype="float32", host_reads=host_reads, **extra)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    for step in range(steps):
        for name, g in _grads(params, step).items():
            params[name].grad = g
        if guard:
            with NoHostReads():
                opt.step()
        else:
            opt.step()
        sched.step()
    return params, opt


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["float", "tensor"])
def test_device_path_step_has_no_host_reads_and_equals_host_path(cls, tensor_hyper):
    """No host read in any step (first step included, NaN gradients masked, Tensor
    hyperparameters moved by a scheduler), and the same result as the host path with floats."""
    params, opt = _train(cls, tensor_hyper, "never", guard=True)
    reference, ref_opt = _train(cls, False, "auto", guard=False)
    for name in params:
        torch.testing.assert_close(params[name], reference[name], rtol=2e-6, atol=1e-7)
    assert opt.nonfinite_skips == ref_opt.nonfinite_skips == 2
    if tensor_hyper:  # the scheduler moved the Tensor lr in place: still a tensor
        assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
        torch.testing.assert_close(opt.param_groups[0]["lr"], torch.tensor(2**-6 / 5))


@pytest.mark.parametrize("variant", list(ABLATIONS))
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["float", "tensor"])
def test_ablation_variants_have_no_host_reads(variant, tensor_hyper):
    """The paper's ablations (NorMuon options) keep the device path free of host reads and
    equal to the host path."""
    options = ABLATIONS[variant]
    params, opt = _train(NorMuon, tensor_hyper, "never", guard=True, **options)
    reference, _ = _train(NorMuon, False, "auto", guard=False, **options)
    for name in params:
        torch.testing.assert_close(params[name], reference[name], rtol=2e-6, atol=1e-7)
    assert opt.nonfinite_skips == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_host_path_reads_only_the_finite_flags(cls):
    """The CPU default (``host_reads="auto"``) reads the flags back, which the guard sees."""
    with pytest.raises(HostReadError, match="tolist"):
        _train(cls, False, "auto", guard=True, steps=1)


@pytest.mark.parametrize("cls", CLASSES)
def test_bf16_parameters_device_path_has_no_host_reads(cls):
    _train(cls, True, "never", guard=True, steps=2, dtype=torch.bfloat16)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["float", "tensor"])
def test_meta_device_takes_the_accelerator_path(cls, tensor_hyper):
    """Meta tensors hold no data: any host read raises. With the default ``host_reads="auto"``
    a non-CPU device takes the device path, as on a GPU."""
    params = _params(device="meta")
    extra = {"beta2": torch.tensor(0.9, device="meta")} if tensor_hyper and cls is NorMuon else {}
    opt = cls(_groups(params, tensor_hyper, device="meta"), **extra)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.empty_like(p)
        opt.step()
    state = opt.state[params["square"]]
    assert state["momentum_buffer"].device.type == "meta"
    if cls is NorMuon:
        assert state["neuron_second_moment"].shape == (16,)

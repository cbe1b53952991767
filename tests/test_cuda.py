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


def test_graphed_step_honours_floats_absent_grads_and_reloads_on_cuda():
    """The CUDA-graph defects, on a real graph: a float written into a group by OneCycleLR or a
    user reaches the replay, a parameter without gradient is skipped, a NaN is counted on the
    device, and a load_state_dict with bf16 state recaptures with the same generator."""
    assert _failures(check.check_graph_step(torch.device("cuda"))) == []


def test_bf16_wire_is_what_auto_picks_on_cuda():
    """Only the choice: at world size 1 nothing is sent. The bytes a bf16 wire sends (half of
    U's and D's) are counted at world size 2 in tests/test_comm_bytes.py."""
    from normuon.distributed.comm import wire_dtype_for

    assert wire_dtype_for(torch.device("cuda"), "auto") == torch.bfloat16


def _graph_setup(cls, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 32), (32, 96)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in shapes]
    vectors = [torch.nn.Parameter(torch.randn(32, generator=gen).cuda())]
    opt = cls([{"params": params, "lr": 2**-6, "weight_decay": 0.125},
               {"params": vectors, "algorithm": "adamw", "lr": 2**-8}], ns_dtype="float32")
    return params + vectors, opt


@pytest.mark.parametrize("cls_name", ["NorMuon", "Muon"])
def test_graphed_step_replays_what_eager_steps_do(cls_name):
    """Warm-up, capture, replay under a scheduler; a reloaded state dict recaptures; a new
    gradient tensor (set_to_none=True) is copied into the captured buffer."""
    import normuon
    from normuon.cuda_graphs import GraphedStep, prepare_for_capture

    cls = getattr(normuon, cls_name)
    params, opt = _graph_setup(cls)
    ref_params, ref_opt = _graph_setup(cls)
    graphed = GraphedStep(opt, warmup=2)
    prepare_for_capture(ref_opt)  # the same tensor hyperparameters, stepped eagerly
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9**t)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: 0.9**t)
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, generator=gen).cuda()
            if step == 5:
                p.grad = g.clone()  # a new tensor: GraphedStep copies it into its buffer
            else:
                p.grad.copy_(g)
            q.grad = g.clone()
        if step == 6:  # replaces the state tensors: the next step captures again
            opt.load_state_dict(opt.state_dict())
        graphed.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        torch.cuda.synchronize()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step}")
    assert graphed.graph is not None


def test_fsdp2_over_nccl_at_world_size_one_equals_one_process(tmp_path):
    """NCCL initialised (world size 1), FSDP2 on a one-GPU mesh, the default comm_dtype
    ("auto": bf16 on the wire on CUDA): the step equals the plain one."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from normuon import NorMuon, param_groups

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 8)).cuda()  # fmt: skip

        ref, model = build(), build()
        fully_shard(model, mesh=init_device_mesh("cuda", (1,)))
        ref_opt = NorMuon(param_groups(ref, lr=0.02), ns_dtype="float32", process_group=None)
        opt = NorMuon(param_groups(model, lr=0.02), ns_dtype="float32")
        x = torch.randn(16, 32, device="cuda")
        for _ in range(3):
            for m, o in ((ref, ref_opt), (model, opt)):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad(set_to_none=True)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()

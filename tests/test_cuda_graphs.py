"""The CPU-side half of CUDA-graph steps (normuon.cuda_graphs): what prepare_for_capture does
to an optimizer, on the CPU; the capture and replay themselves are in tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from normuon import Muon, NorMuon
from normuon.cuda_graphs import EagerReplay, GraphedStep, prepare_for_capture
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


# ------------------------------------------------------------------ GraphedStep's logic on the CPU


def _twins(cls, **options):
    """(graphed params, GraphedStep on EagerReplay, reference params, eager reference optimizer)"""
    params, opt = _setup(cls)
    ref_params, ref_opt = _setup(cls)
    for o in (opt, ref_opt):
        for g in o.param_groups:
            g.update({k: v for k, v in options.items() if k in g})
    backend = EagerReplay(opt)
    return params, GraphedStep(opt, warmup=2, backend=backend), ref_params, ref_opt, backend


def _grads(params, ref_params, gen, absent=()):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        g = torch.randn(p.shape, generator=gen)
        p.grad = None if i in absent else g.clone()
        q.grad = None if i in absent else g.clone()


@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_a_number_written_into_a_group_reaches_the_replay(cls):
    """OneCycleLR writes Python floats into group["lr"] and group["momentum"] every step, and a
    user may set group["lr"] = 0.01: each replay must use them, as eager steps do."""
    params, graphed, ref_params, ref_opt, backend = _twins(cls)
    opt = graphed.optimizer
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.05, 0.01], total_steps=20)
              for o in (opt, ref_opt)]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        if step == 5:
            for o in (opt, ref_opt):
                o.param_groups[0]["lr"] = 0.01  # a user's float
        _grads(params, ref_params, gen)
        graphed.step()
        ref_opt.step()
        for s in scheds:
            s.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=f"step {step}")
    assert backend.captures == 1 and backend.replays == 6
    # The group holds the captured tensor again, with the scheduler's latest value in it.
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr is graphed.spec.values[0].tensor


def test_an_option_change_captures_again():
    params, graphed, ref_params, ref_opt, backend = _twins(NorMuon)
    gen = torch.Generator().manual_seed(2)
    for step in range(6):
        if step == 4:
            for o in (graphed.optimizer, ref_opt):
                o.param_groups[0]["nesterov"] = False
        _grads(params, ref_params, gen)
        graphed.step()
        ref_opt.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert backend.captures == 2


@pytest.mark.parametrize("cls", [NorMuon, Muon])
def test_a_parameter_without_gradient_is_skipped_as_torch_does(cls):
    """grad None at a replay: the parameter and its state stay as they were (its AdamW step
    count too), nothing is counted as skipped; the others step as the eager reference."""
    params, graphed, ref_params, ref_opt, backend = _twins(cls, weight_decay=0.5)
    opt = graphed.optimizer
    gen = torch.Generator().manual_seed(3)
    for step in range(7):
        absent = (0, 2) if step in (4, 5) else ()
        _grads(params, ref_params, gen, absent)
        before = [p.detach().clone() for p in params]
        state_before = {i: {k: v.clone() for k, v in opt.state[params[i]].items()}
                        for i in absent}  # fmt: skip
        graphed.step()
        ref_opt.step()
        for i in absent:
            assert torch.equal(params[i], before[i]), (step, i)
            for k, v in opt.state[params[i]].items():
                assert torch.equal(v, state_before[i][k]), (step, i, k)
            assert params[i].grad is None
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=f"step {step}")
    assert backend.replays == 5 and opt.nonfinite_skips == 0


def test_load_state_dict_recaptures_with_the_generators_and_the_counter_kept():
    """bf16 state draws rounding bits from the workspace's generator: a load keeps it (and the
    skip counter), and the new capture registers it again."""
    params, opt = _setup(NorMuon)
    for g in opt.param_groups[:1]:
        g["state_dtype"] = "bfloat16"
    opt._plans_cache = None  # state_dtype changed after construction: plan again
    backend = EagerReplay(opt)
    graphed = GraphedStep(opt, warmup=1, backend=backend)
    generators = list(graphed.spec.generators)
    assert len(generators) == 1  # created before any step, so a capture can register it
    gen = torch.Generator().manual_seed(4)
    for step in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        if step == 1:
            params[0].grad[0, 0] = float("nan")
        if step == 3:
            opt.load_state_dict(opt.state_dict())
        graphed.step()
    assert backend.captures == 2
    assert backend.generators == generators and opt._workspace.generators() == generators
    assert opt.nonfinite_skips == 1  # counted before the load, kept by it


def test_the_skip_counter_moves_to_the_gradients_device():
    """A counter restored by unpickling is made on the CPU; the step moves it to the gradients'
    device once instead of copying every step (here the meta device, where any host copy of a
    meta tensor fails)."""
    p = torch.nn.Parameter(torch.empty(8, 4, device="meta"))
    opt = NorMuon([p], host_reads="never")
    opt._guard.restore(3)
    p.grad = torch.empty(8, 4, device="meta")
    opt.step()
    assert opt._guard.counter.device.type == "meta"


def test_graphed_step_refuses_what_a_graph_cannot_do():
    params, opt = _setup(NorMuon)
    opt.nonfinite_grads = "raise"
    with pytest.raises(ValueError, match="nonfinite_grads='raise'"):
        GraphedStep(opt, backend=EagerReplay(opt))


def test_a_group_added_after_the_capture_steps_and_recaptures():
    params, graphed, ref_params, ref_opt, backend = _twins(NorMuon)
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, 6, generator=gen)
    extra = [torch.nn.Parameter(w.clone()) for _ in range(2)]
    for step in range(5):
        if step == 1:  # during the warm-up: an eager step meets a parameter without a flag
            graphed.optimizer.add_param_group({"params": [extra[0]]})
            ref_opt.add_param_group({"params": [extra[1]]})
        if step == 4:  # after the capture: the graph no longer covers every group
            graphed.optimizer.param_groups[-1]["nesterov"] = False
            ref_opt.param_groups[-1]["nesterov"] = False
        _grads(params, ref_params, gen)
        if step >= 1:
            extra[0].grad = torch.randn(12, 6, generator=gen)
            extra[1].grad = extra[0].grad.clone()
        graphed.step()
        ref_opt.step()
    for p, q in zip(params + extra[:1], ref_params + extra[1:]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert backend.captures == 2


def test_a_parameter_absent_at_a_replay_steps_again_outside_the_graph():
    """Has-grad flags go back to True after a replay: a later plain step() updates a
    parameter that had no gradient at the replay."""
    params, graphed, ref_params, ref_opt, backend = _twins(NorMuon)
    gen = torch.Generator().manual_seed(8)
    for step in range(4):
        _grads(params, ref_params, gen, absent=(1,) if step == 3 else ())
        graphed.step()
        ref_opt.step()
    assert backend.replays == 2
    _grads(params, ref_params, gen)
    before = params[1].detach().clone()
    graphed.optimizer.step()
    ref_opt.step()
    assert not torch.equal(params[1], before)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)

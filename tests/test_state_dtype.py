"""``state_dtype="bfloat16"``: a bf16 momentum, updated in float32 and stored stochastically
rounded (unbiased), half the optimizer state of the matrices; checkpoints keep the dtype."""

from __future__ import annotations

import pytest
import torch

from normuon import Muon, NorMuon
from normuon.functional import stochastic_round_

CLASSES = [NorMuon, Muon]


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    n = 400_000
    for value in (1.0 + 2**-10, -3.0 - 2**-9, 1e-3 * (1 + 2**-11)):
        src = torch.full((n,), value, dtype=torch.float32)
        dst = torch.empty(n, dtype=torch.bfloat16)
        stochastic_round_(dst, src.clone(), torch.empty(n, dtype=torch.int32),
                          torch.Generator().manual_seed(1))  # fmt: skip
        lo = torch.tensor(value).bfloat16()  # round to nearest: one of the two neighbours
        assert len(dst.unique()) == 2, dst.unique()
        mean = dst.double().mean().item()
        assert abs(mean - value) < 2e-4 * abs(value), (mean, value, lo)
    exact = torch.tensor([0.0, 1.0, -2.5, 3.0e-8, 65280.0]).bfloat16().float()
    dst = torch.empty(5, dtype=torch.bfloat16)
    stochastic_round_(dst, exact.clone(), torch.empty(5, dtype=torch.int32), None)
    assert torch.equal(dst.float(), exact)


def _run(cls, state_dtype, steps=12, seed=0, **opts):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (16, 24), (3, 8, 12), (6, 3, 2, 2)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    opt = cls(params, lr=0.02, weight_decay=0.01, ns_dtype="float32", state_dtype=state_dtype,
              **opts)  # fmt: skip
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("cls", CLASSES)
def test_bf16_momentum_tracks_the_float32_run(cls):
    ref, ref_opt = _run(cls, None)
    params, opt = _run(cls, "bfloat16")
    for p, r in zip(params, ref):
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert ref_opt.state[r]["momentum_buffer"].dtype == torch.float32
        if cls is NorMuon:  # m numbers: kept in float32 (see docs/algorithm.md)
            assert opt.state[p]["neuron_second_moment"].dtype == torch.float32
        err = ((p.detach() - r.detach()).norm() / r.detach().norm()).item()
        assert err < 2e-2, err
    state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values())
    ref_bytes = sum(t.nbytes for s in ref_opt.state.values() for t in s.values())
    assert state_bytes < 0.55 * ref_bytes


def test_bf16_momentum_keeps_updates_below_its_resolution():
    """A constant gradient slightly above M: round-to-nearest would leave a bf16 M stuck; the
    rounded-up-with-probability buffer follows the float32 EMA on average."""
    n = 20_000
    p = torch.nn.Parameter(torch.zeros(n, 1))
    opt = NorMuon([p], momentum=0.999, state_dtype="bfloat16", host_reads="never")
    target = 1.0 + 2**-9
    opt.init_state()
    opt.state[p]["momentum_buffer"].fill_(1.0)
    exact = torch.ones(n, 1, dtype=torch.float64)
    for _ in range(50):
        p.grad = torch.full((n, 1), target)
        opt.step()
        exact = 0.999 * exact + 0.001 * target
    got = opt.state[p]["momentum_buffer"].double().mean().item()
    assert abs(got - exact.mean().item()) < 2e-5, (got, exact.mean().item())
    nearest = torch.tensor(1.0 + 0.001 * (target - 1)).bfloat16().item()
    assert nearest == 1.0  # what round-to-nearest would keep every step


@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_and_dcp_round_trips_keep_bf16(cls, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    params, opt = _run(cls, "bfloat16", steps=3)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["state_dtype"] == "bfloat16"
    twin_params, twin = _run(cls, "bfloat16", steps=1, seed=5)
    twin.load_state_dict(sd)
    for p, q in zip(params, twin_params):
        got = twin.state[q]["momentum_buffer"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, opt.state[p]["momentum_buffer"])

    model = torch.nn.ParameterList(params)
    _, optim_sd = get_state_dict(model, opt)
    dcp.save({"optim": optim_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    fresh_params, fresh = _run(cls, "bfloat16", steps=1, seed=7)
    fresh_model = torch.nn.ParameterList(fresh_params)
    _, fresh_sd = get_state_dict(fresh_model, fresh)
    dcp.load({"optim": fresh_sd}, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(fresh_model, fresh, model_state_dict={}, optim_state_dict=fresh_sd)
    for p, q in zip(params, fresh_params):
        got = fresh.state[q]["momentum_buffer"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, opt.state[p]["momentum_buffer"])


def test_state_dtype_is_validated():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="state_dtype must be None, 'float32' or 'bfloat16'"):
        NorMuon([p], state_dtype="float16")
    assert NorMuon([p], state_dtype=torch.bfloat16).param_groups[0]["state_dtype"] == "bfloat16"


@pytest.mark.parametrize("normalize", ["rows", "larger_dim", "elements"])
def test_float64_parameters_with_float32_state(normalize):
    """float64 parameters may keep a float32 momentum; the second moment stays float64 and
    the step runs (it used to fail mixing the float32 O with the float64 v)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 12, generator=gen, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = NorMuon([p], state_dtype="float32", normalize=normalize, ns_dtype="float32")
    ref = NorMuon([q], normalize=normalize, ns_dtype="float32")
    for _ in range(3):
        g = torch.randn(8, 12, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    moved, moved_ref = p.detach() - q.detach(), q.detach()
    assert moved.abs().max() < 1e-5 * moved_ref.abs().max()  # float32 momentum: ~1e-7 apart

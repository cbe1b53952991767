"""``state_dtype="bfloat16"``: a bf16 momentum, updated in float32 and stored stochastically
rounded (unbiased) with bits read from a fixed table at an offset set by the step, half the
optimizer state of the matrices; checkpoints keep the dtype, and a resumed run rounds as the
uninterrupted one."""

from __future__ import annotations

import math

import pytest
import torch

from normuon import Muon, NorMuon
from normuon import functional as F
from normuon.functional import stochastic_round_

CLASSES = [NorMuon, Muon]


def _dropped_fraction(src: torch.Tensor) -> torch.Tensor:
    """p = (low 16 bits of the float32) / 2^16: the probability of rounding the magnitude up."""
    return (src.view(torch.int32) & 0xFFFF).double() / 2**16


def _rounded_up(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Whether dst holds src's bfloat16 neighbour away from zero (else the truncated one)."""
    truncated = src.view(torch.int32) >> 16
    up = dst.view(torch.int16).int() == ((truncated + 1) & 0xFFFF).to(torch.int16).int()
    down = dst.view(torch.int16).int() == truncated.to(torch.int16).int()
    assert bool((up | down).all()), "a rounding landed on neither neighbour"
    return up


def test_rounding_a_fixed_value_averages_to_it_over_steps():
    """Each entry is rounded at T steps (one table view per step, as the optimizer reads
    them); its T roundings up are independent Bernoulli(p) draws when its bits differ from step
    to step and are independent of the value, so its mean lies within 5 standard deviations,
    (ulp) sqrt(p (1 - p) / T), of the value. Bits fixed across steps, or taken from the value's
    own dropped bits, give a mean of one neighbour or the other, far outside."""
    steps, n = 4096, 48
    # Dropped fractions from 1/256 to 255/256, both signs, several exponents.
    fractions = torch.linspace(1, 255, n, dtype=torch.float64).round() / 256
    lo = torch.tensor([1.0, -3.0, 1e-3, -250.0] * (n // 4)).bfloat16().float()
    ulp = (lo.view(torch.int32) + (1 << 16)).view(torch.float32) - lo  # signed: away from zero
    values = (lo.double() + fractions * ulp.double()).float()
    assert torch.allclose(_dropped_fraction(values), fractions)
    table = F.rounding_table(n + F.ROUNDING_WINDOWS)
    key = F.rounding_key(0, 3, 0)
    total = torch.zeros(n, dtype=torch.float64)
    dst = torch.empty(n, dtype=torch.bfloat16)
    for step in range(steps):
        stochastic_round_(dst, values.clone(), F.rounding_noise(table, step, key, values))
        total += dst.double()
    mean = total / steps
    p = fractions
    bound = 5 * ulp.double().abs() * (p * (1 - p) / steps).sqrt()
    err = (mean - values.double()).abs()
    assert bool((err <= bound).all()), (err / bound).max()


@pytest.mark.parametrize("fraction", [2**-16, 1 / 16, 1 / 4, 1 / 3, 1 / 2, 3 / 4, 1 - 2**-10])
def test_rounding_up_frequency_is_the_dropped_fraction(fraction):
    """The bits are independent of the value: over n entries of one view with the same dropped
    fraction p (different magnitudes and signs), the share rounded up is p within 5 standard
    deviations sqrt(p (1 - p) / n) of a binomial share; bits derived from the value itself
    would round all of them the same way."""
    n = 1 << 16
    gen = torch.Generator().manual_seed(3)
    lo = (torch.randn(n, generator=gen) * 10.0 ** torch.randint(-3, 3, (n,), generator=gen))
    truncated = lo.view(torch.int32) & -(1 << 16)
    dropped = round(fraction * 2**16)
    src = (truncated | dropped).view(torch.float32)
    p = dropped / 2**16
    dst = torch.empty(n, dtype=torch.bfloat16)
    table = F.rounding_table(n + F.ROUNDING_WINDOWS)
    stochastic_round_(dst, src.clone(), F.rounding_noise(table, 17, F.rounding_key(1, 2, 0), src))
    share = _rounded_up(src, dst).double().mean().item()
    bound = 5 * math.sqrt(p * (1 - p) / n) + 1 / n
    assert abs(share - p) <= bound, (share, p, bound)


def test_the_table_is_uniform_and_views_move_every_step():
    """Table entries: uniform over [0, 2^16) (chi-square of the top 8 bits), the same at any
    size. Views: a tensor's offsets differ at every one of W consecutive steps (so an entry
    reads W different table entries) and differ between tensors (keys)."""
    table = F.rounding_table(1 << 20)
    assert table.dtype == torch.int32 and int(table.min()) >= 0 and int(table.max()) < 2**16
    assert torch.equal(F.rounding_table(1000), table[:1000])
    counts = torch.bincount(table >> 8, minlength=256).double()
    expected = table.numel() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255), chi2  # 255 degrees of freedom: mean 255
    w = F.ROUNDING_WINDOWS
    for key in (0, F.rounding_key(0, 1, 0), F.rounding_key(2, 5, 64)):
        offsets = {F.rounding_offset(step, key) for step in range(w)}
        assert len(offsets) == w and max(offsets) < w
    first = [F.rounding_offset(0, F.rounding_key(0, i, 0)) for i in range(8)]
    assert len(set(first)) == 8


def test_exact_bf16_values_are_unchanged_whatever_the_bits():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e-8, 65280.0, 2.0**-130, -3.0e38,
                          float("inf"), float("-inf")]).bfloat16()  # fmt: skip
    src = exact.float()
    for noise in (torch.zeros(10, dtype=torch.int32), torch.full((10,), 2**16 - 1,
                                                                 dtype=torch.int32),
                  F.rounding_noise(F.rounding_table(10 + F.ROUNDING_WINDOWS), 5, 9, src)):
        dst = torch.empty(10, dtype=torch.bfloat16)
        stochastic_round_(dst, src.clone(), noise)
        assert torch.equal(dst.view(torch.int16), exact.view(torch.int16))


def test_stochastic_round_writes_strided_views_and_checks_its_inputs():
    """The momentum block of a row-split matrix is a strided view of the bf16 buffer."""
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(2, 6, 5, generator=gen)
    noise = torch.randint(0, 2**16, (2, 6, 5), generator=gen, dtype=torch.int32)
    buffer = torch.zeros(2, 10, 5, dtype=torch.bfloat16)
    stochastic_round_(buffer[:, 2:8], src.clone(), noise)
    dense = torch.empty(2, 6, 5, dtype=torch.bfloat16)
    stochastic_round_(dense, src.clone(), noise)
    assert torch.equal(buffer[:, 2:8], dense)
    assert not buffer[:, :2].any() and not buffer[:, 8:].any()
    with pytest.raises(TypeError, match="float32 into bfloat16"):
        stochastic_round_(dense, src.double(), noise)
    with pytest.raises(ValueError, match="contiguous src"):
        stochastic_round_(dense.transpose(1, 2), src.transpose(1, 2), noise.transpose(1, 2))
    with pytest.raises(ValueError, match="rounding table holds"):
        F.rounding_noise(torch.zeros(100, dtype=torch.int32), 0, 0, src)


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


def _resume_setup(cls, seed=0):
    """Two matrix groups (one row-split into blocks, so blocks' keys differ by their first row)
    and an AdamW group, bf16 momentum; gradients as a list per step."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (16, 24), (3, 8, 12)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    fused = torch.nn.Parameter(torch.randn(30, 16, generator=gen) * 0.1)
    vector = torch.nn.Parameter(torch.randn(16, generator=gen))
    groups = [{"params": params}, {"params": [fused], "split_sizes": (10, 20)},
              {"params": [vector], "algorithm": "adamw", "lr": 1e-3}]  # fmt: skip
    opt = cls(groups, lr=0.02, ns_dtype="float32", state_dtype="bfloat16")
    return params + [fused, vector], opt


def _grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def _steps(params, opt, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _assert_same_run(params, opt, ref_params, ref_opt):
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref_opt.state[q].keys()
        for key, value in opt.state[p].items():
            assert value.dtype == ref_opt.state[q][key].dtype
            assert torch.equal(value, ref_opt.state[q][key]), key
    for g, h in zip(opt.param_groups, ref_opt.param_groups):
        assert g.get("rounding_step") == h.get("rounding_step")


@pytest.mark.parametrize("via", ["state_dict", "dcp"])
@pytest.mark.parametrize("cls", CLASSES)
def test_a_resumed_run_is_bitwise_the_uninterrupted_one(cls, via, tmp_path):
    """Train 5 steps, save, load into a fresh optimizer over copies of the parameters, train 4
    more: parameters and every state tensor equal the 9-step run's bit for bit (the rounding bits
    are a function of the saved step counter and the block's position)."""
    grads = _grads(_resume_setup(cls)[0], 9)
    ref_params, ref_opt = _resume_setup(cls)
    _steps(ref_params, ref_opt, grads)
    assert ref_opt.param_groups[0]["rounding_step"] == 9

    params, opt = _resume_setup(cls)
    _steps(params, opt, grads[:5])
    fresh_params, fresh = _resume_setup(cls, seed=7)
    with torch.no_grad():
        for p, q in zip(params, fresh_params):
            q.copy_(p)
    if via == "state_dict":
        fresh.load_state_dict(opt.state_dict())
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        _, saved = get_state_dict(torch.nn.ParameterList(params), opt)
        dcp.save({"optim": saved}, checkpoint_id=str(tmp_path / "ckpt"))
        fresh.init_state()  # every key exists before a DCP load
        model = torch.nn.ParameterList(fresh_params)
        _, into = get_state_dict(model, fresh)
        dcp.load({"optim": into}, checkpoint_id=str(tmp_path / "ckpt"))
        set_state_dict(model, fresh, model_state_dict={}, optim_state_dict=into)
    assert fresh.param_groups[0]["rounding_step"] == 5
    _steps(fresh_params, fresh, grads[5:])
    _assert_same_run(fresh_params, fresh, ref_params, ref_opt)


def test_rounding_step_counts_bf16_groups_only_and_is_validated():
    params, opt = _resume_setup(NorMuon)
    assert [g.get("rounding_step") for g in opt.param_groups] == [0, 0, None]
    _steps(params, opt, _grads(params, 2))
    assert [g.get("rounding_step") for g in opt.param_groups] == [2, 2, None]
    plain = NorMuon([torch.nn.Parameter(torch.randn(4, 4))])
    assert "rounding_step" not in plain.param_groups[0]  # float32 momentum: no bits drawn
    p = torch.nn.Parameter(torch.randn(4, 4))
    assert NorMuon([{"params": [p], "rounding_step": 3}]).param_groups[0]["rounding_step"] == 3
    with pytest.raises(ValueError, match="rounding_step must be >= 0"):
        NorMuon([{"params": [p], "rounding_step": -1}], state_dtype="bfloat16")
    with pytest.raises(TypeError, match="rounding_step must be an int"):
        NorMuon([{"params": [p], "rounding_step": 1.5}], state_dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown option"):
        NorMuon([{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(3))],
                                   "algorithm": "adamw", "rounding_step": 0}])  # fmt: skip
    sd = opt.state_dict()
    sd["param_groups"][0]["rounding_step"] = -2
    with pytest.raises(ValueError, match=r"load_state_dict: param_groups\[0\]: rounding_step"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["rounding_step"] == 2  # nothing loaded
    del sd["param_groups"][0]["rounding_step"]  # a state dict saved before the counter existed
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["rounding_step"] == 0


def test_blocks_and_parameters_read_different_bits():
    """Two equal parameters with equal gradients, and the two equal row blocks of a split one:
    updated alike in float32, each rounds with its own bits (keys of group, parameter and first
    row), so their bf16 momenta differ somewhere."""
    rows = torch.randn(10, 16, generator=torch.Generator().manual_seed(2))
    twins = [torch.nn.Parameter(torch.zeros(10, 16)) for _ in range(2)]
    fused = torch.nn.Parameter(torch.zeros(20, 16))
    opt = NorMuon([{"params": twins}, {"params": [fused], "split_sizes": (10, 10)}],
                  state_dtype="bfloat16")  # fmt: skip
    for p in twins:
        p.grad = rows.clone()
    fused.grad = torch.cat([rows, rows])
    opt.step()
    a, b = (opt.state[p]["momentum_buffer"] for p in twins)
    top, bottom = opt.state[fused]["momentum_buffer"].split(10)
    for x, y in ((a, b), (top, bottom), (a, top)):
        assert not torch.equal(x, y)
        assert ((x.float() - y.float()).abs() <= 2 * (x.float().abs() * 2**-7)).all()

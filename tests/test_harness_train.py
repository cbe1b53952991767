"""Harness training loop: the loss falls, schedules, resume reproduces the uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normuon.harness.config import TrainConfig, config_from_dict, get_preset
from normuon.harness.data import load_data
from normuon.harness.model import GPT
from normuon.harness.train import CHECKPOINT_NAME, LRSchedule, train_run

OPTIMIZERS = ("adamw", "muon", "normuon")


@pytest.fixture(scope="module")
def data():
    return load_data()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_smoke_training_lowers_the_loss(tmp_path, data, optimizer):
    cfg = get_preset("cpu-smoke")
    r = train_run(cfg, optimizer, data, seed=0, out_dir=tmp_path, progress=False)
    assert r.steps == cfg.train.steps
    # Zero-initialised head: the first loss is exactly log(256) nats for bytes.
    assert r.val_losses[0] == pytest.approx(math.log(256), abs=1e-4)
    assert r.final_val_loss < r.val_losses[0] - 2.0  # well below uniform guessing
    assert 0.0 < r.optimizer_share < 1.0 and r.optimizer_state_bytes > 0
    files = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "result.json", CHECKPOINT_NAME} <= files
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "val"] == r.val_steps
    # config.json holds the resolved config and round-trips into a RunConfig.
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["optimizer"] == optimizer
    assert config_from_dict(saved["config"]).model.vocab_size == 256


def test_optimizer_state_bytes_match_the_algorithms(tmp_path, data):
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 2
    sizes = {o: train_run(cfg, o, data, out_dir=tmp_path / o, progress=False) for o in OPTIMIZERS}
    model = GPT(cfg.model)
    hidden = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
    n_hidden = sum(p.numel() for p in hidden)
    rows = sum(p.shape[0] for p in hidden)
    # NorMuon keeps one momentum per weight plus one number per neuron (row); Muon just the
    # momentum; AdamW two moments (all three: AdamW on embedding and head).
    assert sizes["adamw"].optimizer_state_bytes - sizes["muon"].optimizer_state_bytes == (
        4 * n_hidden + 4 * len(hidden)  # exp_avg_sq of the matrices + their "step" scalars
    )
    assert sizes["normuon"].optimizer_state_bytes - sizes["muon"].optimizer_state_bytes == 4 * rows


def _records(path):
    out = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "run":  # the header: a run id of its own in every run
            continue
        out.append({k: v for k, v in rec.items() if k not in ("time", "tokens_per_s")})
    return out


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, data, optimizer):
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 24
    cfg.train.warmup_steps = 4  # the schedule's state must survive the restart too
    full = train_run(cfg, optimizer, data, seed=1, out_dir=tmp_path / "full", progress=False)
    # Interrupt at a step that is neither a log nor a validation step, then resume.
    part = train_run(cfg, optimizer, data, seed=1, out_dir=tmp_path / "split", progress=False,
                     stop_at_step=13)  # fmt: skip
    assert part.steps == 13
    resumed = train_run(cfg, optimizer, data, seed=1, out_dir=tmp_path / "split",
                        progress=False, resume=True)  # fmt: skip
    assert resumed.steps == 24
    assert resumed.val_losses == full.val_losses
    assert _records(tmp_path / "split") == _records(tmp_path / "full")
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 24


def test_resume_refuses_a_different_run(tmp_path, data):
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 4
    train_run(cfg, "normuon", data, seed=0, out_dir=tmp_path, progress=False, stop_at_step=2)
    with pytest.raises(ValueError, match="different run"):
        train_run(cfg, "normuon", data, seed=5, out_dir=tmp_path, progress=False, resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train_run(cfg, "muon", data, out_dir=tmp_path / "new", progress=False, resume=True)


def test_schedules():
    wsd = LRSchedule(TrainConfig(steps=100, warmup_steps=10, schedule="wsd", cooldown_frac=0.4))
    assert wsd(0) == pytest.approx(0.1) and wsd(9) == pytest.approx(1.0)
    assert wsd(30) == 1.0 and wsd(59) == 1.0
    assert wsd(80) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    cos = LRSchedule(TrainConfig(steps=100, warmup_steps=0, schedule="cosine", min_lr_frac=0.1))
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.55)
    assert cos(100) == pytest.approx(0.1)
    lin = LRSchedule(TrainConfig(steps=110, warmup_steps=10, schedule="linear"))
    assert lin(60) == pytest.approx(0.5) and lin(110) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        LRSchedule(TrainConfig(schedule="step"))


def test_config_errors_name_the_field(data, tmp_path):
    cfg = get_preset("cpu-smoke")
    cfg.model.n_head = 3
    with pytest.raises(ValueError, match="d_model=32 must be divisible by n_head=3"):
        train_run(cfg, "adamw", data, out_dir=tmp_path, progress=False)
    cfg = get_preset("cpu-smoke")
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        train_run(cfg, "sgd", data, out_dir=tmp_path, progress=False)
    cfg.train.batch_size = 7
    cfg.train.grad_accum = 2
    with pytest.raises(ValueError, match="batch_size=7 is not divisible"):
        train_run(cfg, "adamw", data, out_dir=tmp_path, progress=False)


def test_grad_accumulation_matches_one_big_batch(tmp_path, data):
    # Two micro-batches of 4 give the same gradient as one batch of 8 (up to float rounding).
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 3
    one = train_run(cfg, "adamw", data, out_dir=tmp_path / "a", progress=False)
    cfg.train.grad_accum = 2
    two = train_run(cfg, "adamw", data, out_dir=tmp_path / "b", progress=False)
    assert two.final_val_loss == pytest.approx(one.final_val_loss, abs=1e-4)


def test_model_is_causal():
    cfg = get_preset("cpu-smoke").model
    torch.manual_seed(0)
    model = GPT(cfg)
    for p in model.parameters():  # non-zero everywhere so that every path carries signal
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256
    a, b = model(x), model(y)
    assert a.shape == (2, 16, 256)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.distributed
def test_torchrun_ddp_matches_one_process(tmp_path):
    # Two gloo ranks each take half of every batch; DDP averages the gradients, so the run
    # must follow the one-process run up to float rounding (reduction order).
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["-m", "normuon", "train", "--preset", "cpu-smoke", "--optimizer", "normuon",
            "--steps", "10", "--no-progress", "--dist-timeout", "120"]  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *base, "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    a = json.loads((tmp_path / "ddp" / "result.json").read_text())
    b = json.loads((tmp_path / "one" / "result.json").read_text())
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    assert a["val_losses"] == pytest.approx(b["val_losses"], abs=1e-4)
    assert a["final_val_loss"] < a["val_losses"][0] - 1.0
    # Interrupted and resumed under DDP: the checkpoint must hold every rank's optimizer
    # state (NorMuon updates each matrix on one owner rank), or the curve changes.
    for extra in (["--stop-at-step", "6"], ["--resume"]):
        split = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", *base, "--out", str(tmp_path / "split"), *extra],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert split.returncode == 0, split.stderr[-3000:]
    c = json.loads((tmp_path / "split" / "result.json").read_text())
    assert c["val_losses"] == a["val_losses"]
    full = torch.load(tmp_path / "ddp" / CHECKPOINT_NAME, weights_only=True)
    resumed = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=True)
    assert len(full["optimizer"]["state"]) == len(list(GPT(get_preset("cpu-smoke").model)
                                                       .parameters()))  # fmt: skip
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cautious_weight_decay_from_the_command_line_setting(tmp_path, data, optimizer):
    """``--set <optimizer>.cautious_weight_decay=true`` reaches the optimizer's matrix groups
    (the AdamW baseline then runs normuon's AdamW groups, which offer it) and trains."""
    from normuon.harness.config import apply_overrides
    from normuon.harness.train import build_optimizer

    cfg = get_preset("cpu-smoke")
    apply_overrides(cfg, [f"{optimizer}.cautious_weight_decay=true",
                          f"{optimizer}.weight_decay=0.5"])  # fmt: skip
    assert cfg.optimizers[optimizer].cautious_weight_decay is True
    model = GPT(cfg.model)
    opt = build_optimizer(optimizer, model, cfg.optimizers[optimizer], torch.device("cpu"))
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert decayed and all(g["cautious_weight_decay"] for g in decayed)
    cfg.train.steps = 3
    r = train_run(cfg, optimizer, data, seed=0, out_dir=tmp_path, progress=False)
    assert math.isfinite(r.final_val_loss)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["config"]["optimizers"][optimizer]["cautious_weight_decay"] is True

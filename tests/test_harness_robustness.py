"""The harness never loses work: signals, resume, run folders, bad inputs, config overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from normuon.cli import main
from normuon.harness.config import apply_overrides, get_preset
from normuon.harness.data import load_data
from normuon.harness.train import CHECKPOINT_NAME, train_run

SMOKE = ["--preset", "cpu-smoke", "--no-progress"]


@pytest.fixture(scope="module")
def data():
    return load_data(None, 0.05)


def _err_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line, no traceback
    assert err.startswith(f"normuon {prog}: error: "), err
    return err


# ---------------------------------------------------------------- signals and resume


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_checkpoints_and_resume_equals_the_uninterrupted_run(tmp_path, data, sig):
    steps = 120
    args = [*SMOKE, "--optimizer", "normuon", "--seed", "3", "--steps", str(steps),
            "--set", "train.log_every=5", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "split"
    proc = subprocess.Popen([sys.executable, "-m", "normuon", "train", *args, "--out",
                             str(run_dir)], stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    # Wait until training is under way (a train line past step 10), then signal mid-run.
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(x).get("step", 0) >= 10 for x in lines[1:]):
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"{signal.Signals(sig).name} received" in err and "--resume" in err
    assert "Traceback" not in err
    stopped = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)["step"]
    assert 10 <= stopped < steps
    assert not (run_dir / "result.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "normuon", "train", *args, "--out",
                              str(run_dir), "--resume"], capture_output=True, text=True,
                             env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    # The same run without interruption, in this process: bit-for-bit the same result.
    cfg = apply_overrides(get_preset("cpu-smoke"), ["train.log_every=5"])
    cfg.train.steps = steps
    torch.set_num_threads(1)
    full = train_run(cfg, "normuon", data, seed=3, out_dir=tmp_path / "full", progress=False)
    got = json.loads((run_dir / "result.json").read_text())
    assert got["val_losses"] == full.val_losses and got["final_val_loss"] == full.final_val_loss

    def losses(path):
        recs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in recs[1:]]

    assert losses(run_dir) == losses(tmp_path / "full")
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=True)
    b = torch.load(run_dir / CHECKPOINT_NAME, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_checkpoint_every_and_orphaned_temp_files(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(["train", *SMOKE, "--steps", "12", "--checkpoint-every", "5",
                 "--stop-at-step", "7", "--out", str(out)]) == 0  # fmt: skip
    ckpt = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["step"] == 7
    assert json.loads((out / "config.json").read_text())["config"]["train"][
        "checkpoint_every"] == 5  # fmt: skip
    orphan = out / f"{CHECKPOINT_NAME}.k2j3.tmp"
    orphan.write_bytes(b"half a checkpoint")
    foreign = out / "notes.tmp"
    foreign.write_text("not ours")
    assert main(["train", *SMOKE, "--steps", "12", "--checkpoint-every", "5", "--resume",
                 "--out", str(out)]) == 0  # fmt: skip
    assert not orphan.exists() and foreign.exists()
    assert json.loads((out / "result.json").read_text())["steps"] == 12


# ---------------------------------------------------------------- run folders


def test_fresh_run_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", *SMOKE, "--steps", "2", "--out", str(out)]) == 2
    err = _err_line(capsys, "train")
    assert "is not empty" in err and "--overwrite" in err and "--resume" in err
    assert main(["train", *SMOKE, "--steps", "2", "--out", str(out)]) == 2  # still refused
    capsys.readouterr()
    # A finished run there; another fresh run is refused, --overwrite replaces the run only.
    (out / "keep.txt").unlink()
    assert main(["train", *SMOKE, "--steps", "2", "--out", str(out)]) == 0
    first = json.loads((out / "config.json").read_text())["run_id"]
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["train", *SMOKE, "--steps", "3", "--seed", "1", "--out", str(out)]) == 2
    assert json.loads((out / "config.json").read_text())["run_id"] == first  # untouched
    capsys.readouterr()
    assert main(["train", *SMOKE, "--steps", "3", "--seed", "1", "--out", str(out),
                 "--overwrite"]) == 0  # fmt: skip
    assert (out / "keep.txt").read_text() == "mine"
    assert json.loads((out / "result.json").read_text())["steps"] == 3
    # compare refuses the same way.
    capsys.readouterr()
    assert main(["compare", *SMOKE, "--steps", "2", "--out", str(out)]) == 2
    assert "is not empty" in _err_line(capsys, "compare")


def test_resume_checks_the_metrics_belong_to_the_run(tmp_path, data):
    cfg = get_preset("cpu-smoke")
    cfg.train.steps = 6
    out = tmp_path / "run"
    train_run(cfg, "muon", data, seed=0, out_dir=out, progress=False, stop_at_step=3)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    header = json.loads(lines[0])
    header["run_id"] = "0" * 32  # another run's metrics, as if it had written here
    metrics.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="belongs to another run"):
        train_run(cfg, "muon", data, seed=0, out_dir=out, progress=False, resume=True)


def test_compare_resume_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", *SMOKE, "--steps", "6", "--optimizers", "adamw,normuon", "--out",
            str(out), "--diagnostics-every", "0"]  # fmt: skip
    assert main(base) == 0
    first = json.loads((out / "results.json").read_text())
    (out / "normuon" / "seed0" / "result.json").unlink()  # as if interrupted at the end
    (out / "results.json").unlink()
    mtime = (out / "adamw" / "seed0" / "result.json").stat().st_mtime_ns
    assert main([*base, "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert (out / "adamw" / "seed0" / "result.json").stat().st_mtime_ns == mtime  # reused
    assert again["rows"][1]["final_val_mean"] == first["rows"][1]["final_val_mean"]
    capsys.readouterr()
    assert main([*base, "--resume", "--steps", "7"]) == 2
    assert "another config" in _err_line(capsys, "compare")


# ---------------------------------------------------------------- bad inputs, one line each


def _bad_checkpoint(tmp_path, content):
    out = tmp_path / "run"
    assert main(["train", *SMOKE, "--steps", "4", "--stop-at-step", "2", "--out", str(out)]) == 0
    path = out / CHECKPOINT_NAME
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty (0 bytes"),
        (b"\x00garbage\xff" * 50, "is not a readable normuon checkpoint"),
        (lambda p: torch.save({"weights": torch.ones(2)}, p), "not a normuon harness checkpoint"),
    ],
)  # fmt: skip
def test_damaged_checkpoints_are_one_line_errors(tmp_path, capsys, content, message):
    out = _bad_checkpoint(tmp_path, content)
    capsys.readouterr()
    assert main(["train", *SMOKE, "--steps", "4", "--resume", "--out", str(out)]) == 2
    err = _err_line(capsys, "train")
    assert message in err and "weights_only" not in err


def test_bad_paths_devices_and_seeds(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--out", str(a_file / "sub")], "cannot create the folder"),
        (["--resume", "--out", str(tmp_path / "none")], "no checkpoint at"),
        (["--device", "warp9", "--out", str(tmp_path / "d1")], "is not a device name"),
        (["--seed", str(2**40), "--out", str(tmp_path / "s1")], "--seed must be an integer"),
        (["--seed", "-1", "--out", str(tmp_path / "s2")], "--seed must be an integer"),
        (["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d2")],
         "no such file or folder"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda", "--out", str(tmp_path / "c")], "CUDA is not available"))
    for argv, message in cases:
        assert main(["train", *SMOKE, "--steps", "2", *argv]) == 2, argv
        assert message in _err_line(capsys, "train"), argv


# ---------------------------------------------------------------- config from the command line


def test_set_and_config_file_reach_config_json(tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model": {"d_model": 48, "n_head": 2, "n_kv_head": 1},
                                    "optimizers": {"adamw": {"weight_decay": 0.1}}}))
    out = tmp_path / "run"
    assert main(["train", *SMOKE, "--optimizer", "adamw", "--steps", "3", "--config",
                 str(settings), "--set", "train.grad_clip=1.0", "--set", "adamw.lr=0.004",
                 "--set", "schedule=cosine", "--set", "adamw.betas=0.8,0.99",
                 "--out", str(out)]) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["model"]["d_model"] == 48 and cfg["model"]["n_kv_head"] == 1
    assert cfg["train"]["grad_clip"] == 1.0 and cfg["train"]["schedule"] == "cosine"
    assert cfg["optimizers"]["adamw"] == {**cfg["optimizers"]["adamw"], "lr": 0.004,
                                          "weight_decay": 0.1, "betas": [0.8, 0.99]}  # fmt: skip
    capsys.readouterr()
    assert main(["train", *SMOKE, "--list-fields"]) == 0
    listed = capsys.readouterr().out
    assert "train.grad_clip = 0.0" in listed and "normuon.beta2 = 0.95" in listed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "train.grad_clip=abc"], "train.grad_clip expects a number, got 'abc'"),
        (["--set", "model.n_layer=2.5"], "model.n_layer expects an integer"),
        (["--set", "train.warp=1"], "unknown field 'train.warp'"),
        (["--set", "lr=0.1"], "'lr' is set per optimizer"),
        (["--set", "noequals"], "expected KEY=VALUE"),
        (["--set", "train.grad_clip=-1"], "grad_clip must be a finite number >= 0"),
        (["--set", "muon.momentum=1.5"], "muon.momentum must be in [0, 1)"),
        (["--set", "model.d_model=50"], "d_model=50 must be divisible by n_head"),
        (["--set", "train.compile=maybe"], "train.compile expects true or false"),
        (["--config", "/nonexistent/c.json"], "no such file"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(tmp_path, capsys, argv, message):
    assert main(["train", *SMOKE, "--steps", "2", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in _err_line(capsys, "train")


def test_config_file_errors(tmp_path, capsys):
    for text, message in [("{not json", "not valid JSON"),
                          ('{"train": {"steps": "ten"}}', "train.steps expects an integer"),
                          ('{"trian": {}}', "unknown section 'trian'"),
                          ('{"optimizers": {"sgd": {"lr": 1}}}', "unknown optimizer 'sgd'")]:
        path = tmp_path / "c.json"
        path.write_text(text)
        assert main(["train", *SMOKE, "--config", str(path), "--out", str(tmp_path / "r")]) == 2
        assert message in _err_line(capsys, "train"), text


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", *SMOKE, "--steps", "10", "--tensorboard", "--diagnostics-every", "5",
                 "--out", str(out)]) == 0  # fmt: skip
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "val_loss", "lr", "neurons/overall/neuron_cv"} <= tags
    assert [e.step for e in events.Scalars("neurons/overall/neuron_cv")] == [5, 10]


def test_dist_timeout_is_validated(capsys):
    from normuon.harness.runtime import init_distributed

    with pytest.raises(ValueError, match="--dist-timeout must be > 0"):
        init_distributed(None, 0.0)
    with pytest.raises(SystemExit):
        main(["train", *SMOKE, "--dist-timeout", "-5"])
    assert "--dist-timeout" in capsys.readouterr().err

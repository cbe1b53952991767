"""examples/lightning_train.py for real: Lightning fits a tiny random-weight Llama and GPT-2 with
NorMuon/Muon from configure_optimizers, fp32 and bf16-mixed, gradient clipping, checkpoint and
resume (bit-exact)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("transformers")


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"
@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _config(example, **changes):
    small = dict(steps=6, ckpt_at=3, batches_per_epoch=3, batch_size=4, seq_len=12, d_model=16)
    return example.ExampleConfig(**{**small, **changes})


@pytest.mark.parametrize(
    "model, algorithm, precision",
    [
        ("llama", "normuon", "32-true"),
        ("llama", "normuon", "bf16-mixed"),
        ("llama", "muon", "32-true"),
        ("gpt2", "normuon", "32-true"),
        ("gpt2", "muon", "bf16-mixed"),
    ],
)
def test_fit_clip_checkpoint_resume(example, tmp_path, model, algorithm, precision):
    config = _config(example, model=model, algorithm=algorithm, precision=precision, clip=1.0,
                     split_qkv=model == "gpt2")  # fmt: skip
    result = example.run(config, str(tmp_path))
    losses, resumed = result["losses"], result["resumed"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert resumed == losses[3:], (losses, resumed)
    assert result["max_weight_difference"] == 0.0


def test_gradient_clipping_reaches_the_optimizer(example):
    """Lightning clips inside the closure that NorMuon.step(closure) calls: clipped to 1e-12
    the gradients fall below every eps and the weights barely move; unclipped they move by ~lr."""
    config = _config(example, steps=1)
    start = [p.detach().clone() for p in example.build_model(config).parameters()]

    def largest_move(clip):
        module, _ = example.fit(_config(example, steps=1, clip=clip))
        return max((p.detach() - s).abs().max().item()
                   for p, s in zip(module.model.parameters(), start))  # fmt: skip

    assert largest_move(0.0) > 1e-3
    assert largest_move(1e-12) < 1e-5


def test_bad_checkpoint_step_is_rejected(example, tmp_path):
    with pytest.raises(ValueError, match=r"ckpt_at must be a multiple of batches_per_epoch \(3\) "
                                         r"between 0 and steps \(6\), got 4"):  # fmt: skip
        example.run(_config(example, ckpt_at=4), str(tmp_path))
    with pytest.raises(ValueError, match=r"algorithm must be 'normuon' or 'muon', got 'sgd'"):
        example.fit(_config(example, algorithm="sgd", steps=1))


def test_command_line(example, tmp_path, capsys):
    log = tmp_path / "losses.json"
    argv = ["--steps", "6", "--ckpt-at", "3", "--precision", "bf16-mixed",
            "--ckpt-dir", str(tmp_path / "ckpt"), "--log-json", str(log)]  # fmt: skip
    result = example.main(argv)
    out = capsys.readouterr().out
    assert "resume check: max |loss difference| 0, max |weight difference| 0" in out, out
    assert len(result["losses"]) == 6 and log.is_file()
    assert (tmp_path / "ckpt" / "step=3.ckpt").is_file()

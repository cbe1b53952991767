"""normuon.integrations.huggingface with a real transformers.Trainer: tiny random-weight GPT-2
and Llama from configs, a few steps, checkpoint at step 3, resume: bit-exact."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_models import PatternTokens, build  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from normuon import Muon, NorMuon  # noqa: E402
from normuon.integrations.huggingface import (  # noqa: E402
    create_optimizer,
    optimizer_cls_and_kwargs,
)

MODELS = ["gpt2", "llama"]
STEPS, CHECKPOINT_AT = 6, 3


def _trainer(model, out_dir, algorithm="normuon", max_steps=STEPS):
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
        save_strategy="steps", save_steps=CHECKPOINT_AT, logging_steps=1, report_to="none",
        use_cpu=True, seed=0, warmup_steps=1, lr_scheduler_type="linear", max_grad_norm=1.0,
        disable_tqdm=True, dataloader_pin_memory=False,
    )  # fmt: skip
    return Trainer(
        model=model, args=args, train_dataset=PatternTokens(32),
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(
            model, algorithm, lr=0.02, adamw_lr=3e-3, weight_decay=0.01, ns_dtype=torch.float32
        ),
    )  # fmt: skip


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("algorithm", ["normuon", "muon"])
def test_trainer_trains_checkpoints_and_resumes_bit_exactly(kind, algorithm, tmp_path):
    model = build(kind, seed=0)
    full = _trainer(model, tmp_path / "full", algorithm)
    full.train()
    assert isinstance(full.optimizer.optimizer, {"normuon": NorMuon, "muon": Muon}[algorithm])
    losses = _losses(full)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1], losses
    checkpoint = tmp_path / "full" / f"checkpoint-{CHECKPOINT_AT}"
    assert (checkpoint / "optimizer.pt").is_file()

    # A fresh process would build a fresh model: same init, then everything else from the
    # checkpoint (weights, optimizer state, scheduler, RNG, data position).
    resumed_model = build(kind, seed=0)
    resumed = _trainer(resumed_model, tmp_path / "resumed", algorithm)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_losses = _losses(resumed)
    assert {s: resumed_losses[s] for s in range(CHECKPOINT_AT + 1, STEPS + 1)} == {
        s: losses[s] for s in range(CHECKPOINT_AT + 1, STEPS + 1)
    }
    full_params = dict(model.named_parameters())
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p, full_params[name]), name
    state = resumed.optimizer.optimizer.state
    if kind == "gpt2":
        matrix = resumed_model.transformer.h[0].mlp.c_fc.weight
    else:
        matrix = resumed_model.model.layers[0].mlp.up_proj.weight
    assert "momentum_buffer" in state[matrix]


def test_entry_point_groups_and_errors():
    model = build("llama")
    cls, kwargs = optimizer_cls_and_kwargs(model, "muon", lr=0.05, adamw_lr=1e-3)
    assert cls is Muon and kwargs["lr"] == 0.05 and kwargs["adamw_lr"] == 1e-3
    groups = kwargs["params"]
    assert groups[-1]["algorithm"] == "adamw"
    assert any(p is model.lm_head.weight for p in groups[-1]["params"])
    assert any(p is model.model.layers[0].self_attn.q_proj.weight for p in groups[0]["params"])
    opt = create_optimizer(model, lr=0.05)
    assert isinstance(opt, NorMuon) and opt.param_groups[0]["lr"] == 0.05
    with pytest.raises(ValueError, match=r"must be one of \['muon', 'normuon'\], got 'adam'"):
        optimizer_cls_and_kwargs(model, "adam")
    # Bad options fail here, not when Trainer starts training.
    with pytest.raises(ValueError, match=r"\blr\b.*-1"):
        optimizer_cls_and_kwargs(model, lr=-1)
    with pytest.raises(TypeError):
        optimizer_cls_and_kwargs(model, no_such_option=1)

"""Train a Hugging Face causal LM with NorMuon under Lightning, checkpoint, resume.

    pip install -e ".[integrations]"
    python examples/lightning_train.py                              # tiny Llama, fp32
    python examples/lightning_train.py --model gpt2 --precision bf16-mixed --split-qkv

What it shows:

1. ``configure_optimizers`` returns ``NorMuon(param_groups(self.model), ...)`` and a per-step
   scheduler: hidden matrices get NorMuon (GPT-2's ``Conv1D`` weights as their transpose), the
   embeddings, the LM head, norms and biases get AdamW, in one optimizer. Nothing else in the
   LightningModule is optimizer-specific.
2. Lightning's gradient clipping (``gradient_clip_val``) and precision plugins (``32-true``,
   ``bf16-mixed``, ``bf16-true``) work unchanged: they act on gradients before ``step()``.
3. ``Trainer.save_checkpoint`` stores the optimizer's ``state_dict`` (momentum and per-neuron
   second moments); ``fit(ckpt_path=...)`` restores it. The script trains ``--steps`` steps,
   then trains again from the checkpoint written at ``--ckpt-at`` and prints how far the resumed
   losses are from the uninterrupted ones (0: the resume is exact).

The model is built from a small config with random weights (nothing is downloaded) and trained
on synthetic token sequences with a learnable pattern, so the loss falls within a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from normuon import Muon, NorMuon, param_groups


@dataclass
class ExampleConfig:
    """Everything one run depends on."""

    #: ``"llama"`` (LlamaForCausalLM) or ``"gpt2"`` (GPT2LMHeadModel, Conv1D layers).
    model: str = "llama"
    #: ``"normuon"`` or ``"muon"``.
    algorithm: str = "normuon"
    #: Lightning precision: ``"32-true"``, ``"bf16-mixed"`` or ``"bf16-true"``.
    precision: str = "32-true"
    #: Optimizer steps of the uninterrupted run.
    steps: int = 12
    #: Checkpoint after this many steps. A multiple of ``batches_per_epoch``: on resume,
    #: Lightning restarts a plain DataLoader from its first batch, so the checkpoint must be
    #: written at the last batch of an epoch for the resumed run to see the same batches.
    ckpt_at: int = 6
    #: Batches in one epoch of the synthetic data set.
    batches_per_epoch: int = 3
    #: Sequences per batch.
    batch_size: int = 8
    #: Tokens per sequence.
    seq_len: int = 16
    #: Hidden width of the model.
    d_model: int = 32
    #: Transformer blocks.
    layers: int = 2
    #: Vocabulary size.
    vocab: int = 64
    #: Learning rate of the hidden matrices (NorMuon/Muon).
    lr: float = 0.02
    #: Learning rate of the AdamW group (embeddings, head, norms, biases).
    adamw_lr: float = 3e-3
    #: Linear warm-up steps of the learning-rate schedule (all groups).
    warmup: int = 2
    #: Lightning's gradient clipping by global norm; 0 disables it.
    clip: float = 1.0
    #: Orthogonalize GPT-2's fused c_attn as three blocks (q, k, v).
    split_qkv: bool = False
    #: Seed of the model initialization and the data.
    seed: int = 0


def build_model(config: ExampleConfig) -> nn.Module:
    """A tiny random-weight transformers model (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    if config.model == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=config.vocab, n_positions=config.seq_len, n_embd=config.d_model,
                n_layer=config.layers, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
        )
    if config.model == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=config.vocab, hidden_size=config.d_model,
                intermediate_size=2 * config.d_model, num_hidden_layers=config.layers,
                num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=config.seq_len, bos_token_id=0, eos_token_id=0,
                pad_token_id=0,
            )  # fmt: skip
        )
    raise ValueError(f"model must be 'llama' or 'gpt2', got {config.model!r}")


class PatternTokens(Dataset):
    """Sequences token[t + 1] = (token[t] + stride) % vocab with random start and stride."""

    def __init__(self, count: int, seq_len: int, vocab: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (count, 1), generator=generator)
        stride = torch.randint(1, 4, (count, 1), generator=generator)
        self.tokens = (start + stride * torch.arange(seq_len)) % vocab  # (count, seq_len)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tokens[index]


class CausalLM(L.LightningModule):
    """A transformers causal LM trained with NorMuon or Muon."""

    def __init__(self, config: ExampleConfig):
        super().__init__()
        self.config = config
        self.model = build_model(config)
        self.losses: list[float] = []

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=tokens, labels=tokens).loss  # tokens: (B, T)
        self.losses.append(loss.item())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        config = self.config
        optimizer_cls = {"normuon": NorMuon, "muon": Muon}.get(config.algorithm)
        if optimizer_cls is None:
            raise ValueError(f"algorithm must be 'normuon' or 'muon', got {config.algorithm!r}")
        optimizer = optimizer_cls(
            param_groups(self.model, split_qkv=config.split_qkv),
            lr=config.lr,
            adamw_lr=config.adamw_lr,
            weight_decay=0.01,
        )
        warmup = max(1, config.warmup)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(
    config: ExampleConfig, ckpt_dir: str | None = None, resume_from: str | None = None
) -> tuple[CausalLM, list[float]]:
    """Train ``config.steps`` steps; checkpoint every ``ckpt_at`` steps into ``ckpt_dir``
    (ModelCheckpoint after the training batch; with lightning 2.6 a checkpoint written at
    ``on_train_epoch_end`` instead replays one extra batch on resume); resume from
    ``resume_from`` if given. Returns the module and the losses of the steps it ran."""
    L.seed_everything(config.seed, verbose=False)
    module = CausalLM(config)
    data = PatternTokens(
        config.batches_per_epoch * config.batch_size, config.seq_len, config.vocab, config.seed
    )
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", save_top_k=-1,
                every_n_train_steps=config.ckpt_at,
            )  # fmt: skip
        )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=config.steps, precision=config.precision,
        gradient_clip_val=config.clip or None, logger=False, callbacks=callbacks,
        enable_checkpointing=bool(callbacks), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=config.batch_size), ckpt_path=resume_from)
    return module, module.losses


def run(config: ExampleConfig, ckpt_dir: str) -> dict:
    """Uninterrupted run that checkpoints at ``ckpt_at``, then a run resumed from there."""
    if config.ckpt_at % config.batches_per_epoch or not 0 < config.ckpt_at < config.steps:
        raise ValueError(
            f"ckpt_at must be a multiple of batches_per_epoch ({config.batches_per_epoch}) "
            f"between 0 and steps ({config.steps}), got {config.ckpt_at}"
        )
    os.makedirs(ckpt_dir, exist_ok=True)
    # Checkpoints of an earlier run in the same folder would make ModelCheckpoint write
    # "step=6-v1.ckpt" beside them; start clean (only this script's file names).
    for name in os.listdir(ckpt_dir):
        if name.startswith("step=") and name.endswith(".ckpt"):
            os.remove(os.path.join(ckpt_dir, name))
    checkpoint = os.path.join(ckpt_dir, f"step={config.ckpt_at}.ckpt")
    full_module, losses = fit(config, ckpt_dir=ckpt_dir)
    if not os.path.isfile(checkpoint):
        raise RuntimeError(f"no checkpoint written at step {config.ckpt_at} in {ckpt_dir}")
    # The resumed run gets the same callbacks, as Lightning asks (it restores their state); its
    # own checkpoints get versioned names ("step=12-v1.ckpt").
    resumed_module, resumed = fit(config, ckpt_dir=ckpt_dir, resume_from=checkpoint)
    weight_gap = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(full_module.model.parameters(), resumed_module.model.parameters())
    )
    return {
        "config": asdict(config),
        "losses": losses,
        "resumed": resumed,
        "max_weight_difference": weight_gap,
    }


def main(argv: list[str] | None = None) -> dict:
    defaults = ExampleConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["llama", "gpt2"], default=defaults.model)
    p.add_argument("--algorithm", choices=["normuon", "muon"], default=defaults.algorithm)
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "bf16-true"],
                   default=defaults.precision)  # fmt: skip
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--ckpt-at", type=int, default=defaults.ckpt_at)
    p.add_argument("--clip", type=float, default=defaults.clip)
    p.add_argument("--split-qkv", action="store_true")
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "normuon_lightning"))
    p.add_argument("--log-json", default=None, help="write the losses here")
    args = p.parse_args(argv)
    config = ExampleConfig(
        model=args.model, algorithm=args.algorithm, precision=args.precision, steps=args.steps,
        ckpt_at=args.ckpt_at, clip=args.clip, split_qkv=args.split_qkv,
    )  # fmt: skip
    result = run(config, args.ckpt_dir)
    for step, loss in enumerate(result["losses"], 1):
        print(f"step {step:3d}  loss {loss:.4f}")
    tail = result["losses"][config.ckpt_at :]
    gap = max(abs(a - b) for a, b in zip(tail, result["resumed"]))
    print(f"resume check: max |loss difference| {gap:.3g}, "
          f"max |weight difference| {result['max_weight_difference']:.3g}")  # fmt: skip
    if args.log_json:
        with open(args.log_json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()

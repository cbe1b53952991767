"""Typed configuration of a harness run: model shape, training recipe, per-optimizer settings.

A :class:`RunConfig` is the editable form: a preset, changed by ``--config`` and ``--set``
(:func:`apply_config_file`, :func:`apply_overrides`, which parse and type-check each value).
:func:`~normuon.harness.spec.resolve_spec` then validates it once (:meth:`RunConfig.validate`)
and freezes it, with the data's vocabulary, into the :class:`~normuon.harness.spec.RunSpec`
that a run reads and writes as JSON next to its results (read back by ``--resume`` to check
that nothing changed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ModelConfig",
    "TrainConfig",
    "OptimizerConfig",
    "RunConfig",
    "PRESETS",
    "DEFAULT_PRESET",
    "OPTIMIZERS",
    "ABLATIONS",
    "PARAM_COUNTS",
    "get_preset",
    "config_from_dict",
    "apply_overrides",
    "apply_config_file",
    "settable_fields",
]

#: The paper's ablations (arXiv 2510.05491, Sec. 4.1.3 and App. A.2): NorMuon with these
#: library options (``docs/algorithm.md``, "Ablations"). Presets give them NorMuon's settings.
ABLATIONS: dict[str, dict[str, Any]] = {
    "muon-adam": {"normalize": "elements"},  # Adam's second moment after orthogonalization
    "normuon-front": {"normalize_input": True},  # the per-neuron rate before orthogonalization
    "normuon-tall-only": {"normalize_matrices": "tall"},  # NorMuon on m > n matrices, else Muon
    "muon-rownorm": {"beta2": 0.0},  # each row of O normalized every step, no EMA
}
#: The optimizers the harness knows, in the order tables and plots list them.
OPTIMIZERS = ("adamw", "muon", "normuon", *ABLATIONS)
SCHEDULES = ("wsd", "cosine", "linear", "constant")
#: Conventions for counting a model's parameters in a tokens-per-parameter budget
#: (:attr:`TrainConfig.param_count`).
PARAM_COUNTS = ("all", "non_embedding")


@dataclass
class ModelConfig:
    """Shape of the modded-nanogpt-style GPT (see :mod:`normuon.harness.model`)."""

    vocab_size: int = 256
    """Token vocabulary. Overwritten from the data: 256 for bytes, 50257 for GPT-2 shards."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Query heads per attention layer; ``d_model`` must be divisible by it."""
    n_kv_head: int = 4
    """Key/value heads (grouped-query attention when < ``n_head``); divides ``n_head``."""
    d_model: int = 128
    """Residual stream width (hidden size)."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of ``d_model`` (ReLU^2 activation)."""
    max_seq_len: int = 128
    """Longest sequence the rotary tables cover; at least the training sequence length."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding frequencies."""


@dataclass
class OptimizerConfig:
    """Learning rates and options of one optimizer in a comparison."""

    lr: float
    """AdamW: the learning rate of every parameter. Muon/NorMuon: of the hidden matrices."""
    adamw_lr: float = 3e-3
    """Muon/NorMuon only: AdamW learning rate of embeddings, output head and vectors."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the hidden matrices (never on embeddings, head or vectors)."""
    cautious_weight_decay: bool = False
    """Decay only where the update and the weight agree in sign (arXiv 2510.12402); for the
    AdamW baseline this runs normuon's AdamW groups, which offer it, instead of torch.optim's."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (the AdamW baseline and the AdamW part of Muon/NorMuon)."""
    momentum: float = 0.95
    """Muon/NorMuon momentum (beta1)."""
    beta2: float = 0.95
    """NorMuon per-neuron second-moment EMA factor."""
    update_scale: str = "preserve_norm"
    """Muon/NorMuon update scale: ``preserve_norm`` (Muon lrs) or ``adam_rms`` (AdamW lrs)."""
    ns_dtype: str = "auto"
    """Newton-Schulz dtype: ``auto`` = bfloat16 on CUDA, float32 on CPU (CPU bf16 is slow)."""
    state_dtype: str = "auto"
    """Muon/NorMuon momentum dtype: ``auto`` (float32 for these float32 weights) or
    ``bfloat16`` (half the bytes, stochastically rounded)."""


@dataclass
class TrainConfig:
    """The training recipe: batch, length, schedule, evaluation and bookkeeping."""

    batch_size: int = 32
    """Sequences per optimizer step, over all ranks and micro-batches."""
    seq_len: int = 128
    """Tokens per sequence (context length during training)."""
    steps: int = 500
    """Optimizer steps. 0 when ``tokens_per_param`` gives the length instead: the resolved
    spec then holds the derived count (a resolved config may keep it, as its own value)."""
    tokens_per_param: float = 0.0
    """The run's length as training tokens per parameter (> 0; 0: off, ``steps`` gives it).
    :func:`~normuon.harness.spec.resolve_spec` turns it, once, into
    ``steps = ceil(tokens_per_param * params / (batch_size * seq_len))`` (rounded up, so the
    run reaches at least this ratio) with ``params`` counted as ``param_count`` says on the
    data's vocabulary; the same run given by ``steps`` as well is an error. Chinchilla's
    compute-optimal ratio is about 20 (docs/harness.md, "Budgets")."""
    param_count: str = "all"
    """Which parameters ``tokens_per_param`` counts: ``all`` (every parameter, embedding and
    output head included: Chinchilla's convention and how the paper's model sizes are named)
    or ``non_embedding`` (without the token embedding and the untied output head: Kaplan et
    al.'s). The budget in ``config.json`` reports the achieved ratio in this convention."""
    grad_accum: int = 1
    """Micro-batches per step and rank (gradient accumulation); divides the per-rank batch."""
    schedule: str = "wsd"
    """LR schedule: ``wsd`` (warmup-stable-decay), ``cosine``, ``linear`` (warmup, linear to 0)
    or ``constant`` (warmup then flat)."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    cooldown_frac: float = 0.4
    """``wsd``: fraction of the steps (at the end) over which the lr decays linearly."""
    min_lr_frac: float = 0.0
    """Floor of the decay as a fraction of the peak lr (``wsd``, ``cosine``, ``linear``)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    val_every: int = 50
    """Evaluate every this many steps (and at step 0 and at the last step)."""
    val_batches: int = 8
    """Fixed validation batches (of ``batch_size`` sequences) averaged per evaluation."""
    val_fraction: float = 0.05
    """Fraction of a single text/token stream held out (the end) for validation."""
    log_every: int = 10
    """Write a train-loss metrics line every this many steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (0: only at the end of the run)."""
    autocast_bf16: bool = True
    """On CUDA, run the forward pass under bfloat16 autocast (ignored on CPU)."""
    compile: bool = False
    """Wrap the model in torch.compile: 1.4-1.7x eager's tokens/s at every ladder rung on a
    2-core CPU (benchmarks/harness_speed.py), for a few seconds of compilation per process and
    a working C++ toolchain; off by default so a first run needs neither."""
    parallel: str = "ddp"
    """Under torchrun with WORLD_SIZE > 1: ``ddp`` (replicated model, NorMuon's replicated
    mode) or ``fsdp2`` (``fully_shard`` per block on a 1-D mesh, NorMuon's sharded mode)."""


@dataclass
class RunConfig:
    """Everything that determines a run apart from data, seed and optimizer name (editable;
    a run reads its frozen, validated form, :class:`~normuon.harness.spec.RunSpec`)."""

    preset: str
    """Name of the preset this config was derived from."""
    description: str
    """What the preset is for."""
    model: ModelConfig
    """Model shape."""
    train: TrainConfig
    """Training recipe."""
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)
    """Settings per optimizer name (:data:`OPTIMIZERS`: ``adamw``, ``muon``, ``normuon`` and
    the ablations of :data:`ABLATIONS`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field.

        Called once per command, by :func:`~normuon.harness.spec.resolve_spec`.
        """
        m, t = self.model, self.train
        for name, value in (("n_layer", m.n_layer), ("n_head", m.n_head),
                            ("n_kv_head", m.n_kv_head), ("d_model", m.d_model),
                            ("batch_size", t.batch_size), ("seq_len", t.seq_len),
                            ("grad_accum", t.grad_accum),
                            ("val_every", t.val_every), ("val_batches", t.val_batches),
                            ("log_every", t.log_every)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_number(t.tokens_per_param) or not 0 <= t.tokens_per_param < math.inf:
            raise ValueError(f"tokens_per_param must be a finite number >= 0 (0: the length is "
                             f"train.steps), got {t.tokens_per_param!r}")  # fmt: skip
        if t.param_count not in PARAM_COUNTS:
            raise ValueError(f"param_count must be one of {PARAM_COUNTS}, got {t.param_count!r}")
        low = 0 if t.tokens_per_param > 0 else 1  # 0 steps: tokens_per_param sets them
        if not _is_int(t.steps) or t.steps < low:
            raise ValueError(f"steps must be a positive int, got {t.steps!r}" if low else
                             f"steps must be an int >= 0, got {t.steps!r}")  # fmt: skip
        if m.d_model % m.n_head or (m.d_model // m.n_head) % 2:
            raise ValueError(
                f"d_model={m.d_model} must be divisible by n_head={m.n_head} into an even head "
                f"dimension (rotary embeddings rotate pairs)"
            )
        if m.n_head % m.n_kv_head:
            raise ValueError(f"n_kv_head={m.n_kv_head} must divide n_head={m.n_head}")
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"seq_len={t.seq_len} exceeds the model's max_seq_len={m.max_seq_len}")
        if t.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {t.schedule!r}")
        if not _is_int(t.warmup_steps) or t.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {t.warmup_steps!r}")
        if t.steps and t.warmup_steps > t.steps:  # (a derived step count is checked with it)
            raise ValueError(f"warmup_steps must be in [0, steps={t.steps}], got {t.warmup_steps}")
        if not 0.0 <= t.cooldown_frac <= 1.0:
            raise ValueError(f"cooldown_frac must be in [0, 1], got {t.cooldown_frac}")
        if not 0.0 < t.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {t.val_fraction}")
        if t.parallel not in ("ddp", "fsdp2"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp2', got {t.parallel!r}")
        for fname, value in (("min_lr_frac", t.min_lr_frac), ("grad_clip", t.grad_clip),
                             ("rope_base", m.rope_base)):  # fmt: skip
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{fname} must be a finite number >= 0, got {value!r}")
        if t.min_lr_frac > 1:
            raise ValueError(f"min_lr_frac must be in [0, 1], got {t.min_lr_frac}")
        if not _is_int(t.checkpoint_every) or t.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {t.checkpoint_every!r}")
        for fname, value in (("vocab_size", m.vocab_size), ("mlp_ratio", m.mlp_ratio),
                             ("max_seq_len", m.max_seq_len)):  # fmt: skip
            if not _is_int(value) or value < 1:
                raise ValueError(f"{fname} must be a positive int, got {value!r}")
        for name, opt in self.optimizers.items():
            if name not in OPTIMIZERS:
                raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
            for fname in ("lr", "adamw_lr"):
                value = getattr(opt, fname)
                if not _is_number(value) or not math.isfinite(value) or not value > 0:
                    raise ValueError(f"{name}.{fname} must be a number > 0, got {value!r}")
            if not _is_number(opt.weight_decay) or not 0 <= opt.weight_decay < math.inf:
                raise ValueError(f"{name}.weight_decay must be >= 0, got {opt.weight_decay!r}")
            for fname, value in (("momentum", opt.momentum), ("beta2", opt.beta2),
                                 ("betas[0]", opt.betas[0]), ("betas[1]", opt.betas[1])):
                if not _is_number(value) or not 0 <= value < 1:
                    raise ValueError(f"{name}.{fname} must be in [0, 1), got {value!r}")
            if opt.update_scale not in ("preserve_norm", "adam_rms"):
                raise ValueError(f"{name}.update_scale must be 'preserve_norm' or 'adam_rms', "
                                 f"got {opt.update_scale!r}")  # fmt: skip
            if opt.ns_dtype not in ("auto", "float32", "bfloat16", "float16", "float64"):
                raise ValueError(f"{name}.ns_dtype: unknown dtype {opt.ns_dtype!r}")
            if name == "muon-rownorm" and opt.beta2 != 0:
                raise ValueError(
                    f"muon-rownorm.beta2 must be 0 (row normalization without an EMA), got "
                    f"{opt.beta2!r}; NorMuon with another beta2 is the normuon optimizer"
                )
            if opt.state_dtype not in ("auto", "float32", "bfloat16"):
                raise ValueError(
                    f"{name}.state_dtype must be auto, float32 or bfloat16, got "
                    f"{opt.state_dtype!r}"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output (e.g. config.json)."""
    try:
        optimizers = {
            k: OptimizerConfig(**{**v, "betas": tuple(v.get("betas", (0.9, 0.95)))})
            for k, v in data["optimizers"].items()
        }
        return RunConfig(
            preset=data["preset"],
            description=data["description"],
            model=ModelConfig(**data["model"]),
            train=TrainConfig(**data["train"]),
            optimizers=optimizers,
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a harness run config: {exc}") from exc


def _cpu_optimizers(
    adamw_lr: float, muon_lr: float, normuon_lr: float, aux_lr: float
) -> dict[str, OptimizerConfig]:
    # aux_lr: the AdamW lr of Muon/NorMuon's embeddings, head and vectors.
    return {
        "adamw": OptimizerConfig(lr=adamw_lr),
        "muon": OptimizerConfig(lr=muon_lr, adamw_lr=aux_lr),
        "normuon": OptimizerConfig(lr=normuon_lr, adamw_lr=aux_lr),
    }


#: The size ladder of docs/results.md: (n_layer, d_model, n_head) per rung.
LADDER_SHAPES = {"xs": (2, 16, 2), "s": (2, 32, 2), "m": (3, 64, 2), "l": (4, 96, 3)}
#: Tuned under the fair protocol (examples/fair_comparison.py, docs/results.md) on the embedded
#: Shakespeare corpus, per rung: {optimizer: (lr, embeddings/head AdamW lr)}. AdamW's single lr
#: covers every parameter (its second value is unused).
LADDER_TUNED = {
    "xs": {"adamw": (0.064, 0.004), "muon": (0.02, 0.032), "normuon": (0.04, 0.032)},
    "s": {"adamw": (0.064, 0.004), "muon": (0.08, 0.016), "normuon": (0.04, 0.032)},
    "m": {"adamw": (0.032, 0.004), "muon": (0.04, 0.016), "normuon": (0.04, 0.032)},
    "l": {"adamw": (0.016, 0.004), "muon": (0.02, 0.032), "normuon": (0.02, 0.032)},
}  # (l: tuned when it was added, docs/results.md, "The same ablation at the l rung")
#: Chinchilla's compute-optimal tokens per parameter (about 20), the budget of the
#: ``ladder-<size>-20tpp`` presets.
LADDER_TOKENS_PER_PARAM = 20.0
#: The ``-20tpp`` rungs evaluate about 16 times per run, as the 300-step rungs do every 20
#: steps: (val_every, steps there with the byte vocabulary: docs/harness.md, "Budgets").
LADDER_TPP_VAL_EVERY = {"xs": 20, "s": 50, "m": 220, "l": 600}


def _ladder(size: str, description: str, tokens_per_param: float = 0.0) -> RunConfig:
    """A rung of the size ladder with its tuned learning rates (the fair-comparison recipe).

    Same recipe for all three optimizers: batch 16 x 64 bytes, 300 steps, 20 warmup steps then
    warmup-stable-decay with the last 50% decaying to 0, global gradient clipping at 1.0; AdamW
    decays its hidden matrices with weight decay 0.1 (Muon and NorMuon: none).

    ``tokens_per_param`` > 0: the same rung and recipe with the length set in tokens per
    parameter (the steps are resolved from it; warmup and decay fraction unchanged), evaluated
    every :data:`LADDER_TPP_VAL_EVERY` steps and checkpointed every 1000.
    """
    n_layer, d_model, n_head = LADDER_SHAPES[size]
    tuned = LADDER_TUNED[size]
    optimizers = {
        "adamw": OptimizerConfig(lr=tuned["adamw"][0], weight_decay=0.1),
        "muon": OptimizerConfig(lr=tuned["muon"][0], adamw_lr=tuned["muon"][1]),
        "normuon": OptimizerConfig(lr=tuned["normuon"][0], adamw_lr=tuned["normuon"][1]),
    }
    train = TrainConfig(batch_size=16, seq_len=64, steps=300, warmup_steps=20,
                        cooldown_frac=0.5, grad_clip=1.0, val_every=20, val_batches=8,
                        log_every=20)  # fmt: skip
    name = f"ladder-{size}"
    if tokens_per_param:
        every = LADDER_TPP_VAL_EVERY[size]
        train = dataclasses.replace(train, steps=0, tokens_per_param=tokens_per_param,
                                    val_every=every, log_every=every, checkpoint_every=1000)
        name += f"-{tokens_per_param:g}tpp"
    return RunConfig(
        preset=name,
        description=description,
        model=ModelConfig(n_layer=n_layer, n_head=n_head, n_kv_head=n_head, d_model=d_model,
                          max_seq_len=64),
        train=train,
        optimizers=optimizers,
    )  # fmt: skip


def _presets() -> dict[str, RunConfig]:
    presets = {}
    presets["cpu-smoke"] = RunConfig(
        preset="cpu-smoke",
        description="A few seconds on a CPU: checks that everything runs and the loss falls.",
        model=ModelConfig(n_layer=2, n_head=2, n_kv_head=2, d_model=32, max_seq_len=32),
        train=TrainConfig(batch_size=8, seq_len=32, steps=40, warmup_steps=0, val_every=10,
                          val_batches=2, log_every=5),  # fmt: skip
        optimizers=_cpu_optimizers(adamw_lr=1e-2, muon_lr=0.05, normuon_lr=0.05, aux_lr=1e-2),
    )
    rungs = (("xs", "14k"), ("s", "41k"), ("m", "180k"), ("l", "492k"))
    for size, params in rungs:
        presets[f"ladder-{size}"] = _ladder(
            size, f"Size ladder rung {size} ({params} params), tuned under the fair protocol."
        )
    tpp = LADDER_TOKENS_PER_PARAM
    for size, params in rungs:  # the same rungs at Chinchilla's ratio (the paper's regime)
        cfg = _ladder(size, f"Size ladder rung {size} ({params} params) trained on {tpp:g} "
                            f"tokens per parameter (all parameters).", tpp)  # fmt: skip
        presets[cfg.preset] = cfg
    # The default: the fair-comparison recipe and tuned learning rates of the m rung
    # (docs/results.md), one seed per optimizer in about a minute on 2 CPU cores.
    presets["cpu-small"] = dataclasses.replace(
        _ladder("m", "Default: byte-level GPT on Shakespeare, tuned fair recipe, ~1 min."),
        preset="cpu-small",
    )
    presets["cpu-medium"] = RunConfig(
        preset="cpu-medium",
        description="A larger CPU run (tens of minutes per optimizer on 2 cores).",
        model=ModelConfig(n_layer=6, n_head=4, n_kv_head=4, d_model=256, max_seq_len=256),
        train=TrainConfig(batch_size=32, seq_len=256, steps=1500, warmup_steps=50,
                          cooldown_frac=0.5, val_every=100, val_batches=8, log_every=20),
        optimizers=_cpu_optimizers(adamw_lr=0.02, muon_lr=0.04, normuon_lr=0.04, aux_lr=4e-3),
    )  # fmt: skip
    # GPU presets. Shapes of modded-nanogpt's GPT-2 small/medium (head dim 128/64, seq 1024,
    # batch 512 sequences as in the paper, warmup-stable-decay). Step counts and lrs are
    # starting points in modded-nanogpt's range, not values published in the paper.
    gpt2_opts = {
        "adamw": OptimizerConfig(lr=1.5e-3, weight_decay=0.1),
        "muon": OptimizerConfig(lr=0.05, adamw_lr=6e-3),
        "normuon": OptimizerConfig(lr=0.05, adamw_lr=6e-3),
    }
    presets["gpt2-124m"] = RunConfig(
        preset="gpt2-124m",
        description="GPT-2 small shape (modded-nanogpt): use FineWeb .bin shards on GPUs.",
        model=ModelConfig(vocab_size=50257, n_layer=12, n_head=6, n_kv_head=6, d_model=768,
                          max_seq_len=1024),
        train=TrainConfig(batch_size=512, seq_len=1024, steps=5000, grad_accum=8,
                          warmup_steps=0, cooldown_frac=0.4, val_every=250, val_batches=20,
                          log_every=10, checkpoint_every=1000, compile=True),
        optimizers=copy.deepcopy(gpt2_opts),
    )  # fmt: skip
    presets["gpt2-350m"] = RunConfig(
        preset="gpt2-350m",
        description="GPT-2 medium shape (modded-nanogpt): use FineWeb .bin shards on GPUs.",
        model=ModelConfig(vocab_size=50257, n_layer=24, n_head=16, n_kv_head=16, d_model=1024,
                          max_seq_len=1024),
        train=TrainConfig(batch_size=512, seq_len=1024, steps=7000, grad_accum=16,
                          warmup_steps=0, cooldown_frac=0.4, val_every=250, val_batches=20,
                          log_every=10, checkpoint_every=1000, compile=True),
        optimizers=copy.deepcopy(gpt2_opts),
    )  # fmt: skip
    # The paper's 1.1B: hidden 2048, 16 layers, 16 query / 4 KV heads, MLP 4x, seq 4096, batch
    # 2M tokens (512 x 4096), 50B tokens (~23.8k steps), 1B-token warmup (~477 steps) then
    # linear decay to 0, lr 4e-4 and weight decay 0.1 for every optimizer: NorMuon/Muon use the
    # "adam_rms" update scale (paper's Algorithm 1) so that AdamW's lr carries over.
    paper = {
        "adamw": OptimizerConfig(lr=4e-4, weight_decay=0.1),
        "muon": OptimizerConfig(lr=4e-4, adamw_lr=4e-4, weight_decay=0.1,
                                update_scale="adam_rms"),
        "normuon": OptimizerConfig(lr=4e-4, adamw_lr=4e-4, weight_decay=0.1,
                                   update_scale="adam_rms"),
    }  # fmt: skip
    presets["paper-1.1b"] = RunConfig(
        preset="paper-1.1b",
        description="The paper's 1.1B shape and recipe (SlimPajama in the paper): multi-GPU.",
        model=ModelConfig(vocab_size=50257, n_layer=16, n_head=16, n_kv_head=4, d_model=2048,
                          max_seq_len=4096),
        train=TrainConfig(batch_size=512, seq_len=4096, steps=23842, grad_accum=64,
                          schedule="linear", warmup_steps=477, val_every=500, val_batches=20,
                          log_every=10, checkpoint_every=1000, grad_clip=1.0, compile=True),
        optimizers=paper,
    )  # fmt: skip
    return presets


def _with_ablations(cfg: RunConfig) -> RunConfig:
    """The ablations run with NorMuon's settings (its tuned lrs): the paper compares them at
    NorMuon's hyperparameters too."""
    normuon = cfg.optimizers["normuon"]
    for name, options in ABLATIONS.items():  # muon-rownorm's beta2 = 0 is its definition
        beta2 = options.get("beta2", normuon.beta2)
        cfg.optimizers[name] = dataclasses.replace(normuon, beta2=beta2)
    return cfg


PRESETS: dict[str, RunConfig] = {k: _with_ablations(v) for k, v in _presets().items()}
DEFAULT_PRESET = "cpu-small"


def get_preset(name: str) -> RunConfig:
    """A fresh (deep) copy of a preset. Raises ValueError for an unknown name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# ------------------------------------------------------------------ command-line overrides

_SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def settable_fields() -> list[str]:
    """Every key ``--set KEY=VALUE`` accepts (``OPT``: one of :data:`OPTIMIZERS`)."""
    keys = [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)]
    keys += [f"OPT.{f.name}" for f in dataclasses.fields(OptimizerConfig)]
    return keys


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _parse_text(text: str, hint: Any, key: str) -> Any:
    """A command-line string -> the field's type; ValueError naming the key."""
    try:
        if hint is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        if typing.get_origin(hint) is tuple:  # betas: "0.9,0.95"
            items = tuple(float(x) for x in text.split(","))
            if len(items) != len(typing.get_args(hint)):
                raise ValueError
            return items
    except ValueError:
        pass
    else:
        raise TypeError(f"{key}: unsupported field type {hint!r}")
    raise ValueError(f"{key} expects {_type_name(hint)}, got {text!r}")


def _check_json_value(value: Any, hint: Any, key: str) -> Any:
    """A config-file value -> the field's type (ints accepted for floats); ValueError."""
    ok = False
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = _is_int(value)
    elif hint is float:
        ok = _is_number(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        ok = (isinstance(value, (list, tuple)) and len(value) == len(typing.get_args(hint))
              and all(_is_number(v) for v in value))  # fmt: skip
        value = tuple(float(v) for v in value) if ok else value
    if not ok:
        raise ValueError(f"{key} expects {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"{len(typing.get_args(hint))} comma-separated numbers"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _targets(cfg: RunConfig, key: str) -> list[tuple[Any, str, str]]:
    """(object, field name, qualified key) for a dotted key; ValueError if unknown."""
    parts = key.split(".")
    opt_fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    if len(parts) == 3 and parts[0] == "optimizers":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] in _SECTIONS:
        section, name = parts
        if name not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            raise ValueError(f"unknown field {key!r}; {section} fields: "
                             f"{', '.join(f.name for f in dataclasses.fields(_SECTIONS[section]))}")
        return [(getattr(cfg, section), name, key)]
    if len(parts) == 2 and parts[0] in OPTIMIZERS:
        opt, name = parts
        if name not in opt_fields:
            raise ValueError(f"unknown field {key!r}; optimizer fields: {', '.join(opt_fields)}")
        if opt not in cfg.optimizers:
            raise ValueError(f"{key}: preset {cfg.preset!r} has no {opt!r} settings")
        return [(cfg.optimizers[opt], name, key)]
    if len(parts) == 1:
        owners = [s for s, cls in _SECTIONS.items()
                  if key in {f.name for f in dataclasses.fields(cls)}]  # fmt: skip
        if len(owners) == 1:
            return [(getattr(cfg, owners[0]), key, f"{owners[0]}.{key}")]
        if key in opt_fields:
            raise ValueError(f"{key!r} is set per optimizer: write adamw.{key}, muon.{key} or "
                             f"normuon.{key}")  # fmt: skip
    raise ValueError(f"unknown field {key!r}; settable: model.FIELD, train.FIELD, OPT.FIELD "
                     f"(OPT: {', '.join(OPTIMIZERS)}); see normuon train --list-fields")


def apply_overrides(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """Apply ``KEY=VALUE`` strings (``--set``) to ``cfg`` in place.

    KEY is ``model.FIELD``, ``train.FIELD`` or ``OPT.FIELD`` (``adamw.lr``,
    ``muon.adamw_lr``...); a FIELD that exists in one section only may stand alone
    (``grad_clip=1``). Values are parsed to the field's type. ValueError names the key.
    Ranges and consistency are checked once, when the run is resolved
    (:func:`~normuon.harness.spec.resolve_spec`).
    """
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.grad_clip=1.0")
        for obj, name, qualified in _targets(cfg, key.strip()):
            setattr(obj, name, _parse_text(text.strip(), _hint(type(obj), name), qualified))
    return cfg


def apply_config_file(cfg: RunConfig, path: str | Path) -> RunConfig:
    """Apply a JSON file of settings to ``cfg`` in place (each value type-checked; ranges and
    consistency are checked once, by :func:`~normuon.harness.spec.resolve_spec`).

    The file holds ``{"model": {...}, "train": {...}, "optimizers": {"adamw": {...}}}`` with any
    subset of fields. A run's ``config.json`` works too (its ``config`` entry is used), and so
    does a comparison's or sweep's (its ``data``, ``stretch`` and ``budget`` entries are not
    settings and are skipped).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"--config {path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a JSON object of settings")
    for section, values in data.items():
        if section in ("preset", "description", "data", "stretch", "budget"):
            continue
        if section == "optimizers" and isinstance(values, dict):
            items = []
            for name, fields in values.items():
                if name not in OPTIMIZERS:
                    raise ValueError(f"--config {path}: unknown optimizer {name!r}; known: "
                                     f"{', '.join(OPTIMIZERS)}")  # fmt: skip
                if not isinstance(fields, dict):
                    raise ValueError(f"--config {path}: optimizers.{name} must be an object of "
                                     f"settings, got {fields!r}")  # fmt: skip
                items += [(f"{name}.{k}", v) for k, v in fields.items()]
        elif section in _SECTIONS and isinstance(values, dict):
            items = [(f"{section}.{k}", v) for k, v in values.items()]
        else:
            raise ValueError(f"--config {path}: unknown section {section!r}; sections: model, "
                             f"train, optimizers")  # fmt: skip
        for key, value in items:
            try:
                for obj, name, qualified in _targets(cfg, key):
                    setattr(obj, name, _check_json_value(value, _hint(type(obj), name),
                                                         qualified))  # fmt: skip
            except ValueError as exc:
                raise ValueError(f"--config {path}: {exc}") from None
    return cfg

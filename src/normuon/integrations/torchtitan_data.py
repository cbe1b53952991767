"""torchtitan's debug models on data that ships with normuon (torchtitan 0.3.0).

torchtitan's debug configs read a tokenizer folder and the ``c4_test`` dataset from a torchtitan
git checkout (neither is in its wheel) through Hugging Face ``datasets``. The configs here train
the same debug models on normuon's embedded Shakespeare corpus instead, read as UTF-8 bytes by
:class:`ByteTokenizer` and :class:`ShakespeareLoader`, so that torchtitan's stock trainer runs
with nothing but the installed packages::

    torchrun --nproc_per_node=1 -m torchtitan.train \\
        --module normuon.integrations.torchtitan_data --config llama3_debugmodel \\
        --override.imports normuon.integrations.torchtitan.normuon

(torchtitan's ``--module`` takes a dotted module path and ``--config`` one of its functions.)

Differences from torchtitan's own debug configs, and why:

- attention is causal SDPA instead of FlexAttention: torchtitan compiles FlexAttention with
  max-autotune and coordinate-descent tuning, a long warm-up for a model that trains in
  seconds, and FlexAttention has no CPU backward. Each row of the loader is one window of the
  corpus (one document), so torchtitan's block-causal mask would be the causal one anyway;
- no validation: torchtitan's validator reads ``c4_validation`` through ``datasets``;
- the ``partial_dtensor`` SPMD backend (DTensors on the model-parallel axes only): torchtitan's
  default, ``spmd_types``, stopped in FSDP's sharding at two data-parallel ranks with torch 2.13
  on CPU ("all parameters must be DTensors on the full SPMD mesh").

Everything else (model sizes, LR schedule, AdamW baseline, batch, sequence length, checkpoint
settings) is torchtitan's, and every field stays a command-line option (``--training.steps 20``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

try:
    from torchtitan.components.dataloader import BaseDataLoader
    from torchtitan.components.tokenizer import BaseTokenizer
except ImportError as err:  # pragma: no cover - exercised only without torchtitan
    raise ImportError(
        "normuon.integrations.torchtitan_data needs torchtitan 0.3.0: "
        "pip install --no-deps torchtitan==0.3.0 (then its dependencies, docs/integrations.md)"
    ) from err

from ..harness.data import load_data

__all__ = [
    "ByteTokenizer",
    "ShakespeareLoader",
    "corpus_rows",
    "debug_model_spec",
    "deepseek_v3_debugmodel",
    "llama3_debugmodel",
    "with_embedded_data",
]


class ByteTokenizer(BaseTokenizer):
    """UTF-8 bytes as tokens (ids 0-255; the debug models' vocabulary has 2048). Reads no files,
    so the config's ``hf_assets_path`` is not used."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config, tokenizer_path: str | None = None) -> None:
        super().__init__()
        self.eos_id = 0

    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, *args, **kwargs) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def get_vocab_size(self) -> int:
        return 256


def corpus_rows(tokens: torch.Tensor, first: int, count: int, seq_len: int, seed: int):
    """Rows ``first .. first + count - 1`` of the training stream: row ``j`` is the window of
    ``seq_len + 1`` tokens at a start drawn from a generator seeded by (seed, j) alone, split into
    (inputs, next-token labels), each (count, seq_len) int64."""
    starts = [
        int(torch.randint(0, tokens.numel() - seq_len - 1, (1,),
                          generator=torch.Generator().manual_seed(seed * 1_000_003 + j)))
        for j in range(first, first + count)
    ]  # fmt: skip
    windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class ShakespeareLoader(BaseDataLoader):
    """Windows of the embedded corpus as one stream of rows shared by all ranks
    (:func:`corpus_rows`): each call takes the next ``local_batch_size`` rows of this
    data-parallel rank, so a training step (one call, or one per pipeline microbatch) reads a
    contiguous block of the stream whatever the world size, microbatching or resumption."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        seed: int = 0

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer,
                 seq_len: int, local_batch_size: int, **_: object) -> None:  # fmt: skip
        self.tokens = load_data().train
        if self.tokens.numel() <= seq_len + 1:
            raise ValueError(f"seq_len {seq_len} needs a corpus longer than {seq_len + 1} "
                             f"tokens; the embedded one has {self.tokens.numel()}")  # fmt: skip
        self.seed = config.seed
        self.dp_world_size, self.dp_rank = dp_world_size, dp_rank
        self.seq_len, self.rows = seq_len, local_batch_size
        self.next_row = 0  # rows of the stream consumed by all ranks together

    def __iter__(self):
        while True:
            first = self.next_row + self.dp_rank * self.rows
            self.next_row += self.dp_world_size * self.rows
            inputs, labels = corpus_rows(self.tokens, first, self.rows, self.seq_len,
                                         self.seed)  # fmt: skip
            yield {"input": inputs}, labels

    # The same on every rank and at every world size, so a checkpoint resumes anywhere.
    def state_dict(self) -> dict:
        return {"next_row": self.next_row}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.next_row = int(state_dict["next_row"])


def debug_model_spec(model: str = "llama3", n_layers: int | None = None):
    """torchtitan's debug model of ``model`` (``"llama3"``, ``"deepseek_v3"``) with causal SDPA in
    place of FlexAttention (see the module docstring); ``n_layers`` keeps only the first
    layers."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    module = importlib.import_module(f"torchtitan.models.{model}")
    spec = module.model_registry("debugmodel")
    for _, _, parent, attr in list(spec.model.traverse(FlexAttention.Config)):
        if isinstance(parent, list):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    if n_layers is not None:
        spec.model.layers = spec.model.layers[:n_layers]
    return spec


def with_embedded_data(config, model: str, n_layers: int | None = None):
    """``config`` (a torchtitan debug config of ``model``) on the byte tokenizer and the embedded
    corpus, with SDPA attention, the partial_dtensor SPMD backend and without validation (the
    module docstring says why)."""
    config.model_spec = debug_model_spec(model, n_layers)
    config.tokenizer = ByteTokenizer.Config()
    config.dataloader = ShakespeareLoader.Config()
    # torchtitan checks that this folder exists; the byte tokenizer reads nothing from it.
    config.hf_assets_path = "."
    config.validator.enable = False
    config.parallelism.spmd_backend = "partial_dtensor"
    return config


# The configs: functions of no arguments returning a Trainer.Config, as --config names them.


def llama3_debugmodel():
    """torchtitan's Llama 3 debug model (6 layers, d=256, vocab 2048, 6.2M parameters) and its
    debug config, on the embedded corpus."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel as stock

    return with_embedded_data(stock(), "llama3")


def deepseek_v3_debugmodel():
    """torchtitan's DeepSeek-V3 debug model (MoE: routed experts as (E, F, D) stacks, a router,
    shared experts) and its debug config, on the embedded corpus."""
    from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_debugmodel as stock

    return with_embedded_data(stock(), "deepseek_v3")

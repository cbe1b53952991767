"""Tiny random-weight Hugging Face models built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64
CONTEXT = 16


def tiny_gpt2(seed: int = 0, n_embd: int = 16, n_layer: int = 2) -> nn.Module:
    """GPT2LMHeadModel, 2 layers of width 16: c_attn (16, 48), c_fc (16, 64) are HF Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=n_embd, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0, tied: bool = False) -> nn.Module:
    """LlamaForCausalLM, 2 layers of width 16, grouped-query attention (2 heads, 1 KV head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CONTEXT,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_mixtral(seed: int = 0) -> nn.Module:
    """MixtralForCausalLM, 1 layer of width 16, 4 experts (top 2): experts.gate_up_proj is a
    fused (4, 48, 16) stack and mlp.gate the (4, 16) router."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=16,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def build(kind: str, seed: int = 0) -> nn.Module:
    if kind == "gpt2":
        return tiny_gpt2(seed)
    if kind == "llama":
        return tiny_llama(seed)
    raise ValueError(f"unknown model kind {kind!r}")


def linear_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every HF Conv1D (weight (in, out)) replaced by an nn.Linear
    (weight (out, in)) holding the transposed weights: the same function, the usual layout."""
    import copy

    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.nx, child.nf)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())  # (nf, nx)
                    linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
    return twin


def token_batches(count: int, batch: int = 4, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=generator) for _ in range(count)]


class PatternTokens(torch.utils.data.Dataset):
    """Learnable synthetic sequences: token[t + 1] = (token[t] + stride) % VOCAB, random start and
    stride per sequence. Items are dicts as Trainer and Lightning collate them."""

    def __init__(self, count: int, seq: int = 12, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (count, 1), generator=generator)
        stride = torch.randint(1, 4, (count, 1), generator=generator)
        self.tokens = (start + stride * torch.arange(seq)) % VOCAB  # (count, seq)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}

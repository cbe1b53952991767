"""A small GPT in the style of modded-nanogpt, device-agnostic and in plain PyTorch.

Token embedding -> n_layer x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> rmsnorm -> lm_head.
Attention uses rotary position embeddings, RMS-normalised queries and keys (QK-norm), grouped
query heads and ``F.scaled_dot_product_attention(is_causal=True)``; the MLP is ReLU^2. The output
head is a separate (untied) ``nn.Linear`` named ``lm_head`` so that :func:`normuon.param_groups`
routes it, and the ``nn.Embedding``, to AdamW.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["GPT", "count_parameters"]


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm over the last dim, as in modded-nanogpt (no gain to tune).
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Rotary position embedding tables for ``max_seq_len`` positions of a ``head_dim`` head."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T_max, head_dim / 2)
        # Buffers, not parameters, and not saved: they are a function of the config.
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate pairs (first half, second half) of the last dim of x: (B, H, T, head_dim)."""
        T = x.size(-2)
        cos = self.cos[:T].to(x.dtype)  # (T, head_dim / 2), broadcast over (B, H)
        sin = self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        kv_dim = self.n_kv_head * self.head_dim
        # Separate Q, K, V projections: each is its own matrix for Muon/NorMuon.
        self.c_q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.c_k = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.c_v = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.max_seq_len, cfg.rope_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))  # QK-norm, then RoPE
        if self.n_kv_head != self.n_head:
            # Grouped-query attention: each KV head serves n_head / n_kv_head query heads.
            repeat = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns the mean cross-entropy."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Hidden matrices: uniform with std 1/sqrt(fan_in) (modded-nanogpt's CastedLinear).
        # Residual output projections and the head start at zero (modded-nanogpt), so every
        # block starts as the identity and the initial loss is exactly log(vocab).
        nn.init.normal_(self.embed.weight, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0) / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx, targets: (B, T) int64. Returns the loss (scalar) or the logits (B, T, vocab)."""
        x = rms_norm(self.embed(idx))  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(rms_norm(x)).float()  # (B, T, vocab); loss in float32
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """The parameters of :class:`GPT` with shape ``cfg``: ``{"all": ..., "non_embedding": ...}``
    (the conventions of :data:`~normuon.harness.config.PARAM_COUNTS`).

    ``all`` is every trainable parameter (a tensor shared by two modules counts once);
    ``non_embedding`` leaves out the token embedding and the output head (the head only when
    it is its own tensor; this GPT's is always untied, and it has no learned position
    embedding: rotary tables are buffers). The model is built on the ``meta`` device, so
    counting a 1B-parameter shape allocates nothing and the counts are the model's own.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    vocab = {id(p): p.numel() for p in (model.embed.weight, model.lm_head.weight)}
    return {"all": total, "non_embedding": total - sum(vocab.values())}

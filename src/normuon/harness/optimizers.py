"""The optimizers a harness run can train with, built from their
:class:`~normuon.harness.config.OptimizerConfig` through the library's public API."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normuon import Muon, NorMuon, param_groups

from .config import ABLATIONS, OPTIMIZERS, OptimizerConfig

__all__ = ["build_optimizer", "optimizer_state_bytes"]


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bfloat16 Newton-Schulz as the authors on GPUs; CPUs without bf16 matmul units run
        # float32 faster (and exactly), so the CPU presets use it.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_optimizer(
    name: str, model: nn.Module, ocfg: OptimizerConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`~normuon.harness.config.OPTIMIZERS`) over ``model`` with
    ``ocfg``'s settings.

    All use the same split from :func:`normuon.param_groups`: hidden matrices get weight
    decay (AdamW) or Muon/NorMuon; embeddings, head and vectors get AdamW without decay. The
    ablations (``muon-adam``, ``normuon-front``, ``normuon-tall-only``, ``muon-rownorm``) are
    :class:`~normuon.NorMuon` with the options of :data:`~normuon.harness.config.ABLATIONS`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        groups = param_groups(model)
        hidden = [p for g in groups if g.get("algorithm") != "adamw" for p in g["params"]]
        rest = [p for g in groups if g.get("algorithm") == "adamw" for p in g["params"]]
        if ocfg.cautious_weight_decay:  # torch.optim.AdamW has no cautious decay; ours does
            return NorMuon(
                [{"params": hidden, "algorithm": "adamw", "weight_decay": ocfg.weight_decay,
                  "cautious_weight_decay": True},
                 {"params": rest, "algorithm": "adamw", "weight_decay": 0.0}],
                adamw_lr=ocfg.lr, adamw_betas=ocfg.betas, adamw_eps=1e-8,
            )  # fmt: skip
        return torch.optim.AdamW(
            [{"params": hidden, "weight_decay": ocfg.weight_decay},
             {"params": rest, "weight_decay": 0.0}],
            lr=ocfg.lr, betas=ocfg.betas, eps=1e-8,
        )  # fmt: skip
    groups = param_groups(
        model, lr=ocfg.lr, weight_decay=ocfg.weight_decay, adamw_lr=ocfg.adamw_lr,
        adamw_betas=ocfg.betas, adamw_weight_decay=0.0,
        cautious_weight_decay=ocfg.cautious_weight_decay,
        state_dtype=None if ocfg.state_dtype == "auto" else ocfg.state_dtype,
    )  # fmt: skip
    common: dict[str, Any] = dict(
        momentum=ocfg.momentum,
        update_scale=ocfg.update_scale,
        ns_dtype=_ns_dtype(ocfg.ns_dtype, device),
        # The harness's promises (a resumed run equals the uninterrupted one, in whatever
        # process it resumes; seeds of a comparison or tuning differ only by their seed) need
        # the same arithmetic in every process: "auto" times the kernels per process and may
        # choose differently (within each kernel's error bound), so the shape rule is fixed.
        ns_kernel="shape",
    )
    if name == "muon":
        return Muon(groups, **common)
    # muon-rownorm's beta2 = 0 is checked against its config by RunConfig.validate
    return NorMuon(groups, **common, **{"beta2": ocfg.beta2, **ABLATIONS.get(name, {})})


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` that this rank holds: a DTensor (FSDP2)
    counts its local shard; under DDP NorMuon/Muon keep a matrix's state on its owner only,
    while ``torch.optim.AdamW`` keeps all of it on every rank (the table is rank 0's)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total

"""Hugging Face ``transformers.Trainer`` entry point.

``Trainer`` builds its own two weight-decay groups unless it is handed ready ones; this module
hands it :func:`normuon.param_groups` (hidden matrices to NorMuon/Muon, GPT-2's ``Conv1D`` in a
transposed group, embeddings, norms, biases and the LM head to AdamW)::

    from normuon.integrations.huggingface import optimizer_cls_and_kwargs

    trainer = Trainer(
        model=model, args=args, train_dataset=data,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, lr=0.02, adamw_lr=3e-4),
    )

Trainer's own scheduler, gradient clipping, mixed precision and checkpoints (``optimizer.pt``)
apply as for any torch optimizer, and ``resume_from_checkpoint`` continues exactly.
``TrainingArguments.learning_rate`` and ``weight_decay`` are not used: give ``lr``,
``adamw_lr``, ``weight_decay``, ``adamw_weight_decay`` here.

transformers is not imported by this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..grouping import TransposedSpec, param_groups
from ..optimizer import Muon, NorMuon

__all__ = ["optimizer_cls_and_kwargs", "create_optimizer"]

_OPTIMIZERS: dict[str, type[NorMuon] | type[Muon]] = {"normuon": NorMuon, "muon": Muon}


def _optimizer_class(algorithm: str) -> type[NorMuon] | type[Muon]:
    if algorithm not in _OPTIMIZERS:
        raise ValueError(f"algorithm must be one of {sorted(_OPTIMIZERS)}, got {algorithm!r}")
    return _OPTIMIZERS[algorithm]


def optimizer_cls_and_kwargs(
    model: nn.Module,
    algorithm: str = "normuon",
    *,
    extra_adamw: Iterable[str] = (),
    transposed: TransposedSpec = (),
    split_qkv: bool = False,
    **optimizer_options: Any,
) -> tuple[type[NorMuon] | type[Muon], dict[str, Any]]:
    """The ``optimizer_cls_and_kwargs`` argument of ``transformers.Trainer`` for ``model``.

    Args:
        model: the model given to the Trainer (the same object: groups hold its parameters).
            With ``model_init`` (hyperparameter search) Trainer builds new models; use
            :func:`create_optimizer` in a ``Trainer.create_optimizer`` override instead.
        algorithm: ``"normuon"`` or ``"muon"``.
        extra_adamw: as in :func:`normuon.param_groups`.
        transposed: as in :func:`normuon.param_groups`.
        split_qkv: as in :func:`normuon.param_groups`.
        optimizer_options: constructor options of :class:`~normuon.NorMuon` /
            :class:`~normuon.Muon` (``lr``, ``weight_decay``, ``adamw_lr``, ``adamw_betas``,
            ``ns_dtype``, ...); matrix options are the defaults of the matrix groups and
            ``adamw_*`` those of the AdamW group.

    Returns:
        ``(optimizer class, kwargs)``; kwargs carries the groups as ``"params"``, which Trainer
        uses in place of its own grouping (it pops the key: build a new tuple per Trainer).

    Raises:
        ValueError: for an unknown ``algorithm``, a model without hidden matrices or an invalid
            option (checked here by building the optimizer once, not at the first step).
    """
    cls = _optimizer_class(algorithm)
    groups = param_groups(
        model, extra_adamw=extra_adamw, transposed=transposed, split_qkv=split_qkv
    )
    # Validate options now: Trainer builds the optimizer only when training starts.
    cls(groups, **optimizer_options)
    return cls, {"params": groups, **optimizer_options}


def create_optimizer(
    model: nn.Module,
    algorithm: str = "normuon",
    *,
    extra_adamw: Iterable[str] = (),
    transposed: TransposedSpec = (),
    split_qkv: bool = False,
    **optimizer_options: Any,
) -> NorMuon | Muon:
    """A NorMuon or Muon optimizer over ``param_groups(model)``, for ``Trainer`` subclasses::

        class MyTrainer(Trainer):
            def create_optimizer(self, model=None):
                if self.optimizer is None:
                    self.optimizer = create_optimizer(model or self.model, lr=0.02)
                return self.optimizer
    """
    cls = _optimizer_class(algorithm)
    groups = param_groups(
        model, extra_adamw=extra_adamw, transposed=transposed, split_qkv=split_qkv
    )
    return cls(groups, **optimizer_options)

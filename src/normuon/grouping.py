"""Split a model's parameters between the matrix optimizer and AdamW."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["param_groups", "HEAD_NAMES", "EMBEDDING_NAME_HINTS"]

#: Module names (the last component of the qualified name) that mark an output head.
HEAD_NAMES = frozenset(
    {"lm_head", "head", "output", "output_layer", "output_projection", "classifier", "fc_out",
     "score", "logits"}
)  # fmt: skip
#: Name fragments of free-standing 2-D parameters that are embeddings, not hidden matrices.
EMBEDDING_NAME_HINTS = ("embed", "wte", "wpe", "pos_emb", "tok_emb", "position", "cls_token")

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Transposed convolutions store (in, out / groups, *k): dim 0 is not the output neuron, so the
# per-row statistics would be per input channel. They go to AdamW.
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def param_groups(
    model: nn.Module,
    *,
    extra_adamw: Iterable[str] = (),
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`~normuon.NorMuon` or :class:`~normuon.Muon` over a whole model.

    Hidden matrices go to the matrix algorithm: ``nn.Linear`` weights, convolution weights (in a
    group with ``layout="conv"``, one neuron per output channel) and any other parameter of two
    or more dims (3-D stacks such as MoE experts are a batch of matrices). Everything else goes to
    an ``algorithm="adamw"`` group:

    - every parameter with fewer than 2 dims (biases, norm gains, scalars);
    - embeddings (``nn.Embedding``/``nn.EmbeddingBag`` weights, and free 2-D parameters whose name
      contains one of :data:`EMBEDDING_NAME_HINTS`);
    - the output head: modules whose own name is in :data:`HEAD_NAMES` (``lm_head``, ``head``,
      ``output``, ``classifier``, ...), and any weight tied to an embedding;
    - transposed-convolution weights (their dim 0 is the input channel, not the neuron);
    - parameters whose qualified name contains a string of ``extra_adamw``.

    Matrix groups carry no ``algorithm`` key, so the same groups serve NorMuon and Muon.

    ``overrides`` set group options: ``lr=0.02, weight_decay=0.1`` go to the matrix groups;
    options prefixed ``adamw_`` (``adamw_lr=3e-4``, ``adamw_betas=...``) go to the AdamW group.
    Only parameters with ``requires_grad`` are included. Every one lands in exactly one group.

    Raises:
        ValueError: when the model has no parameter for the matrix optimizer.
    """
    extra_adamw = tuple(extra_adamw)
    matrix_opts = {k: v for k, v in overrides.items() if not k.startswith("adamw_")}
    adamw_opts = {k[len("adamw_") :]: v for k, v in overrides.items() if k.startswith("adamw_")}

    embedding_ids: set[int] = set()
    head_ids: set[int] = set()
    conv_ids: set[int] = set()
    transposed_ids: set[int] = set()
    for module_name, module in model.named_modules():
        own_name = module_name.rsplit(".", 1)[-1]
        if isinstance(module, _EMBEDDING_TYPES):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
        if own_name in HEAD_NAMES:
            head_ids.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, _CONV_TYPES):
            conv_ids.add(id(module.weight))
        if isinstance(module, _CONV_TRANSPOSE_TYPES):
            transposed_ids.add(id(module.weight))

    matrices: list[nn.Parameter] = []
    convs: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    # remove_duplicate=False lists a tied weight under every name, so a head tied to an
    # embedding is recognised whichever name comes first; ``seen`` keeps one entry.
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False))
    names_of: dict[int, list[str]] = {}
    for name, p in named:
        names_of.setdefault(id(p), []).append(name)
    for _name, p in named:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        all_names = [n.lower() for n in names_of[id(p)]]
        to_adamw = (
            p.ndim < 2
            or id(p) in embedding_ids
            or id(p) in head_ids
            or id(p) in transposed_ids
            or any(hint in n.rsplit(".", 1)[-1] for n in all_names for hint in EMBEDDING_NAME_HINTS)
            or any(s in n for n in names_of[id(p)] for s in extra_adamw)
        )
        if to_adamw:
            adamw.append(p)
        elif id(p) in conv_ids:
            convs.append(p)
        else:
            matrices.append(p)

    if not matrices and not convs:
        raise ValueError(
            f"{type(model).__name__} has no hidden matrix for NorMuon/Muon (every trainable "
            f"parameter is a vector, an embedding or an output head); use torch.optim.AdamW"
        )
    groups: list[dict[str, Any]] = []
    if matrices:
        groups.append({"params": matrices, **matrix_opts})
    if convs:
        groups.append({"params": convs, "layout": "conv", **matrix_opts})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw", **adamw_opts})
    return groups

"""Split a model's parameters between the matrix optimizer and AdamW, and show the split."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .geometry import matrix_geometry

__all__ = [
    "param_groups",
    "describe_groups",
    "matrix_layouts",
    "RouteRow",
    "RoutingSummary",
    "HEAD_NAMES",
    "OWN_HEAD_NAMES",
    "ROOT_HEAD_NAMES",
    "EMBEDDING_NAME_HINTS",
    "FUSED_QKV_NAMES",
    "FUSED_GATE_UP_NAMES",
    "ROUTER_NAMES",
]

#: Module names that mark an output head wherever they appear in a parameter's qualified name
#: (``lm_head.weight``, ``classifier.1.weight``, ``head.fc.weight``, ``heads.head.weight``).
HEAD_NAMES = frozenset(
    {"lm_head", "head", "classifier", "output_layer", "output_projection", "fc_out", "score",
     "logits"}
)  # fmt: skip
#: Head names that count only as the parameter's own module name: BERT-style encoders have
#: hidden ``attention.output.dense`` layers, so ``output`` must be the Linear itself.
OWN_HEAD_NAMES = frozenset({"output"})
#: Head names that count only at the top of the model (a child of the root, or of a chain of
#: single-child wrappers such as ``model.`` or ``module.``): ResNet's ``fc``, EfficientNet's
#: ``_fc``. The same names inside blocks (``blocks.0.mlp.fc``) are hidden matrices.
ROOT_HEAD_NAMES = frozenset({"fc", "_fc", "last_linear"})
#: Name fragments of free-standing 2-D parameters that are embeddings, not hidden matrices.
EMBEDDING_NAME_HINTS = ("embed", "wte", "wpe", "pos_emb", "tok_emb", "position", "cls_token")
#: Own names of fused query/key/value projections that ``split_qkv=True`` splits into equal
#: blocks along the output dim (GPT-2 ``c_attn``, timm ``qkv``, nn.MultiheadAttention).
FUSED_QKV_NAMES = frozenset({"c_attn", "qkv", "qkv_proj", "Wqkv", "query_key_value"})
#: Own names of fused gate/up projections of gated MLPs that ``split_gate_up=True`` splits into
#: their two halves: a Linear (Phi-3's ``gate_up_proj``) or the stacked experts of
#: transformers' MoE models (Mixtral, DeepSeek, Qwen-MoE: ``experts.gate_up_proj``).
FUSED_GATE_UP_NAMES = frozenset({"gate_up_proj", "gate_up", "w13"})

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Transposed convolutions store (in, out / groups, *k): dim 0 is not the output neuron, so the
# per-row statistics would be per input channel. They go to AdamW.
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)

TransposedSpec = Iterable[str] | Callable[[str, nn.Parameter], bool]


def is_transposed_linear(module: nn.Module) -> bool:
    """True for a Hugging Face ``Conv1D`` (GPT-2, GPT, ...): weight (nx, nf) used as ``x @ W``.

    Recognised by class name and attributes so that transformers need not be imported.
    """
    weight = getattr(module, "weight", None)
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 2
        and isinstance(nx, int)
        and isinstance(nf, int)
        and tuple(weight.shape) == (nx, nf)
    )


def _root_prefixes(model: nn.Module) -> set[str]:
    """Qualified names standing for the model's top: the root and single-child wrappers.

    A LightningModule holding ``self.model = resnet``, DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` put the real network one level down; its ``fc`` is still the head.
    """
    prefixes = {""}
    prefix, module = "", model
    while True:
        children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        if len(children) != 1 or any(True for _ in module.parameters(recurse=False)):
            return prefixes
        name, module = children[0]
        prefix = f"{prefix}{name}."
        prefixes.add(prefix)


def _is_patch_embedding(module_name: str, module: nn.Module) -> bool:
    """A convolution that embeds the input, named as such: ViT's
    ``embeddings.patch_embeddings.projection``, timm's ``patch_embed.proj``, CLIP's
    ``embeddings.patch_embedding``. Input embeddings go to AdamW, as token embeddings do (the
    Muon convention this routing follows: the matrix algorithm is for hidden layers)."""
    if not isinstance(module, _CONV_TYPES):
        return False
    return any("embed" in part.lower() for part in module_name.split("."))


#: Own names of an MoE layer's router when it sits beside the layer's ``experts``.
ROUTER_NAMES = frozenset({"gate", "router"})


def _is_moe_router(module_name: str, module: nn.Module, model: nn.Module) -> bool:
    """An MoE router: a module whose class is a router (transformers' ``MixtralTopKRouter``,
    ``...Router``), or one named ``gate``/``router`` beside an ``experts`` module.

    Routers go to AdamW: on a tiny transformers Mixtral trained on the embedded corpus
    (``examples/moe_router.py``, docs/moe-router.md, 6 seeds) the final loss was the same either
    way (AdamW - NorMuon: -0.003 +- 0.018) and AdamW spread the tokens over the experts more
    evenly in every seed (top-1 entropy 0.84 against 0.76 of its maximum on average): a
    router's few rows are per-expert logits, not hidden neurons.
    """
    if type(module).__name__.endswith("Router"):
        return True
    own = module_name.rsplit(".", 1)[-1]
    if own not in ROUTER_NAMES:
        return False
    parent_name = module_name[: -len(own)].rstrip(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return hasattr(parent, "experts")


def _is_head_module(module_name: str, root_prefixes: set[str]) -> bool:
    parts = module_name.split(".") if module_name else []
    if not parts:
        return False
    if any(part in HEAD_NAMES for part in parts):
        return True
    if parts[-1] in OWN_HEAD_NAMES:
        return True
    parent = module_name[: len(module_name) - len(parts[-1])]
    return parts[-1] in ROOT_HEAD_NAMES and parent in root_prefixes


def _qkv_split(name: str, module_name: str, out_dim: int, in_dim: int) -> tuple[int, ...] | None:
    """Equal blocks along the output dim of a fused projection, or None when it is not one."""
    own = module_name.rsplit(".", 1)[-1]
    is_mha = name.rsplit(".", 1)[-1] == "in_proj_weight"
    if own not in FUSED_QKV_NAMES and not is_mha:
        return None
    if out_dim % in_dim != 0 or out_dim // in_dim not in (2, 3):
        raise ValueError(
            f"split_qkv=True: {name} has {out_dim} outputs for {in_dim} inputs, not 2 or 3 equal "
            f"blocks (grouped-query fused projections differ); give it its own group with "
            f"explicit split_sizes, or leave split_qkv=False"
        )
    return (in_dim,) * (out_dim // in_dim)


def _gate_up_split(name: str, p: torch.Tensor, module_name: str, layout: str):
    """(layout, split_sizes) of a fused gate/up projection, or None when ``p`` is not one.

    A Linear weight (2 ff, d) splits its rows in half; stacked experts (E, 2 ff, d) too, and
    experts stored (E, d, 2 ff) (``layout="transposed"``, see :func:`_transposed_experts`)
    split their last dim, which holds their outputs.
    """
    own_param = name.rsplit(".", 1)[-1]
    own_module = module_name.rsplit(".", 1)[-1]
    if own_param not in FUSED_GATE_UP_NAMES and own_module not in FUSED_GATE_UP_NAMES:
        return None
    outputs = p.shape[-1] if layout == "transposed" else p.shape[-2]
    if outputs % 2:
        raise ValueError(
            f"split_gate_up=True: {name} of shape {tuple(p.shape)} has {outputs} outputs per "
            f"matrix, not two equal halves; give it its own group with explicit split_sizes, or "
            f"leave split_gate_up=False"
        )
    return layout, (outputs // 2, outputs // 2)


def _transposed_experts(named: list[tuple[str, torch.Tensor]]) -> set[int]:
    """ids of stacked expert weights stored (E, in, out), used as ``x @ W[e]``.

    Most of transformers' MoE models store experts (E, out, in): Mixtral's fused
    ``gate_up_proj`` (E, 2 ff, d) with ``down_proj`` (E, d, ff). Some (Aria) store both
    transposed: ``gate_up_proj`` (E, d, 2 ff) with ``down_proj`` (E, ff, d). The pair's shapes
    tell which, and both of a transposed pair have their output neurons on the last dim.
    """
    by_name = dict(named)
    found: set[int] = set()
    for name, p in named:
        own = name.rsplit(".", 1)[-1]
        if own not in FUSED_GATE_UP_NAMES or p.ndim != 3:
            continue
        down = by_name.get(name[: len(name) - len(own)] + "down_proj")
        if (down is not None and down.ndim == 3 and p.shape[-1] == 2 * down.shape[-2]
                and p.shape[-2] == down.shape[-1]):  # fmt: skip
            found |= {id(p), id(down)}
    return found


@dataclass
class _ModuleKinds:
    """Parameter ids by what their module says about them (filled by :func:`_module_kinds`)."""

    embeddings: set[int] = field(default_factory=set)
    heads: set[int] = field(default_factory=set)
    routers: set[int] = field(default_factory=set)
    convs: set[int] = field(default_factory=set)
    conv_transposes: set[int] = field(default_factory=set)
    transposed: set[int] = field(default_factory=set)
    #: parameter id -> qualified name of the module that owns it
    module_of: dict[int, str] = field(default_factory=dict)


def _module_kinds(model: nn.Module) -> _ModuleKinds:
    """Walk the modules once: embeddings, heads, convolutions, transposed (Conv1D) weights."""
    kinds = _ModuleKinds()
    root_prefixes = _root_prefixes(model)
    for module_name, module in model.named_modules():
        own = [id(p) for p in module.parameters(recurse=False)]
        for pid in own:
            kinds.module_of.setdefault(pid, module_name)
        if isinstance(module, _EMBEDDING_TYPES) or _is_patch_embedding(module_name, module):
            kinds.embeddings.update(own)
        if _is_head_module(module_name, root_prefixes):
            kinds.heads.update(own)
        if _is_moe_router(module_name, module, model):
            # All of the router's parameters, its children's too: torchtitan's
            # TokenChoiceTopKRouter keeps its weight in a child Linear (``router.gate``).
            kinds.routers.update(id(p) for p in module.parameters())
        if isinstance(module, _CONV_TYPES):
            kinds.convs.add(id(module.weight))
        if isinstance(module, _CONV_TRANSPOSE_TYPES):
            kinds.conv_transposes.add(id(module.weight))
        if is_transposed_linear(module):
            kinds.transposed.add(id(module.weight))
    output_embeddings = _output_embeddings(model)
    if output_embeddings is not None:
        kinds.heads.update(id(p) for p in output_embeddings.parameters(recurse=False))
    return kinds


def _declared_transposed_ids(named, transposed, is_declared_transposed) -> set[int]:
    """Ids of the weights the user declared (in, out); every declared name must match."""
    ids: set[int] = set()
    declared_hits: set[str] = set()
    for name, p in named:
        hit = is_declared_transposed(name, p)
        if hit:
            declared_hits.update(hit)
            if p.ndim != 2:
                raise ValueError(
                    f"transposed: {name} has shape {tuple(p.shape)}; only 2-D weights stored "
                    f"(in, out) can be declared transposed"
                )
            ids.add(id(p))
    if not callable(transposed):
        missing = [s for s in transposed if s not in declared_hits]
        if missing:
            raise ValueError(f"transposed: no parameter name contains {missing!r}")
    return ids


def _model_kinds(model: nn.Module, transposed, is_declared_transposed):
    """(module kinds with the declared transposed weights added, every (name, parameter) pair).

    The one walk behind :func:`param_groups` and :func:`matrix_layouts`, so the two agree.
    ``named`` lists a tied weight under every name (see :func:`_route`).
    """
    kinds = _module_kinds(model)
    named = list(model.named_parameters(remove_duplicate=False))
    kinds.transposed |= _declared_transposed_ids(named, transposed, is_declared_transposed)
    kinds.transposed |= _transposed_experts(named)
    return kinds, named


def _matrix_layout(p: torch.Tensor, kinds: _ModuleKinds) -> str:
    """The ``layout`` a matrix parameter gets: what its module says, else the shape decides.

    Convolution kernels are flattened per output channel (a 3-D Conv1d kernel would otherwise
    be read as a stack); Conv1D and declared (in, out) weights are read as their transpose.
    """
    if id(p) in kinds.convs:
        return "conv"
    if id(p) in kinds.transposed:
        return "transposed"
    return "auto"


def matrix_layouts(model: nn.Module, *, transposed: TransposedSpec = ()) -> dict[str, str]:
    """Qualified name -> the ``layout`` :func:`param_groups` gives each parameter of 2+ dims.

    ``"conv"`` for convolution kernels, ``"transposed"`` for Hugging Face ``Conv1D`` weights
    and the weights declared in ``transposed`` (as in :func:`param_groups`), ``"auto"`` for the
    rest. Parameters that :func:`param_groups` sends to AdamW (heads, embeddings) are listed
    too, so that anything viewing a weight as neurons (:mod:`normuon.diagnostics`) reads every
    matrix the way the optimizer would; a tied weight is listed under each of its names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"matrix_layouts expects an nn.Module, got {type(model).__name__}")
    transposed, is_declared_transposed = _transposed_predicate(transposed)
    kinds, named = _model_kinds(model, transposed, is_declared_transposed)
    return {name: _matrix_layout(p, kinds) for name, p in named if p.ndim >= 2}


def _route(named, kinds: _ModuleKinds, extra_adamw: tuple[str, ...], split_qkv: bool,
           split_gate_up: bool):  # fmt: skip
    """((layout, split_sizes) -> matrices in model order, AdamW parameters).

    ``named`` lists a tied weight under every name (remove_duplicate=False), so a head tied to
    an embedding is recognised whichever name comes first; each parameter lands once.
    """
    names_of: dict[int, list[str]] = {}
    for name, p in named:
        names_of.setdefault(id(p), []).append(name)
    matrix_groups: dict[tuple[str, tuple[int, ...] | None], list[nn.Parameter]] = {}
    adamw: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in named:
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        all_names = names_of[id(p)]
        to_adamw = (
            p.ndim < 2
            or id(p) in kinds.embeddings
            or id(p) in kinds.heads
            or id(p) in kinds.routers
            or id(p) in kinds.conv_transposes
            or any(hint in n.lower().rsplit(".", 1)[-1] for n in all_names
                   for hint in EMBEDDING_NAME_HINTS)
            or any(s in n for n in all_names for s in extra_adamw)
        )  # fmt: skip
        if to_adamw:
            adamw.append(p)
            continue
        module_name = kinds.module_of.get(id(p), "")
        layout = _matrix_layout(p, kinds)
        split: tuple[int, ...] | None = None
        if layout == "transposed":  # stored (in, out): the output dim is dim 1
            split = _qkv_split(name, module_name, p.shape[1], p.shape[0]) if split_qkv else None
        elif layout == "auto" and split_qkv and p.ndim == 2:
            split = _qkv_split(name, module_name, p.shape[0], p.shape[1])
        if split_gate_up and layout in ("auto", "transposed"):
            fused = _gate_up_split(name, p, module_name, layout)
            if fused is not None:
                layout, split = fused
        matrix_groups.setdefault((layout, split), []).append(p)
    return matrix_groups, adamw


def param_groups(
    model: nn.Module,
    *,
    extra_adamw: Iterable[str] = (),
    transposed: TransposedSpec = (),
    split_qkv: bool = False,
    split_gate_up: bool = False,
    allow_no_matrix: bool = False,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`~normuon.NorMuon` or :class:`~normuon.Muon` over a whole model.

    Hidden matrices go to the matrix algorithm: ``nn.Linear`` weights, convolution weights (in a
    group with ``layout="conv"``, one neuron per output channel), Hugging Face ``Conv1D`` weights
    (stored (in, out) and used as ``x @ W``: in a group with ``layout="transposed"``, handled as
    their transpose) and any other parameter of two or more dims (3-D stacks such as MoE experts
    are a batch of matrices). Everything else goes to an ``algorithm="adamw"`` group:

    - every parameter with fewer than 2 dims (biases, norm gains, scalars);
    - embeddings (``nn.Embedding``/``nn.EmbeddingBag`` weights, free 2-D parameters whose name
      contains one of :data:`EMBEDDING_NAME_HINTS`, and convolutions that embed the input,
      named so: ViT's ``embeddings.patch_embeddings.projection``, timm's ``patch_embed.proj``);
    - output heads: a module named in :data:`HEAD_NAMES` anywhere in the qualified name
      (``lm_head``, ``classifier.1``, ``head.fc``), a Linear whose own name is ``output``, a
      top-level ``fc`` (ResNet; :data:`ROOT_HEAD_NAMES`), the module returned by a Hugging Face
      model's ``get_output_embeddings()``, and any weight tied to an embedding. ``fc``, ``fc1``,
      ``fc2`` inside blocks stay hidden matrices;
    - transposed-convolution weights (their dim 0 is the input channel, not the neuron);
    - MoE routers (a ``...Router`` module, or ``gate``/``router`` beside ``experts``; the
      evidence is in docs/moe-router.md);
    - parameters whose qualified name contains a string of ``extra_adamw``.

    Args:
        model: the network.
        extra_adamw: substrings of qualified parameter names to send to AdamW.
        transposed: your own weights stored (in, out), declared as substrings of qualified
            parameter names or as a predicate ``fn(name, param) -> bool``; they join the
            ``layout="transposed"`` group with the ``Conv1D`` weights. Each must be 2-D.
        split_qkv: orthogonalize fused query/key/value projections (own name in
            :data:`FUSED_QKV_NAMES`, or ``nn.MultiheadAttention.in_proj_weight``) as 2 or 3 equal
            blocks along the output dim (``split_sizes``), as if they were separate Linears.
            The paper treats the fused matrix as one (False, the default).
        split_gate_up: orthogonalize fused gate/up projections of gated MLPs (own name in
            :data:`FUSED_GATE_UP_NAMES`: a Linear, or stacked MoE experts such as Mixtral's
            ``experts.gate_up_proj`` (E, 2 ff, d)) as their two halves, as if the gate and the
            up projection were separate matrices; ``describe_groups`` shows the split.
        allow_no_matrix: return the AdamW group alone when the model has no hidden matrix
            (a pipeline stage holding only an embedding or the head), instead of raising.
        overrides: group options: ``lr=0.02, weight_decay=0.1`` go to the matrix groups;
            options prefixed ``adamw_`` (``adamw_lr=3e-4``, ``adamw_betas=...``) go to the AdamW
            group.

    Matrix groups carry no ``algorithm`` key, so the same groups serve NorMuon and Muon. Only
    parameters with ``requires_grad`` are included; every one lands in exactly one group. Use
    :func:`describe_groups` to see the routing.

    Raises:
        ValueError: when the model has no parameter for the matrix optimizer (unless
            ``allow_no_matrix``), when a
            ``transposed`` name matches no parameter or a non-2-D one, or when ``split_qkv`` meets
            a fused projection that is not 2 or 3 equal blocks.
        TypeError: when ``transposed`` is neither strings nor a callable.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from normuon import NorMuon, param_groups
        >>> model = nn.ModuleDict({"embed": nn.Embedding(10, 8), "mlp": nn.Linear(8, 32),
        ...                        "lm_head": nn.Linear(32, 10)})
        >>> groups = param_groups(model, lr=0.02, adamw_lr=3e-3)
        >>> [(g.get("algorithm", "matrix"), [tuple(p.shape) for p in g["params"]]) for g in groups]
        [('matrix', [(32, 8)]), ('adamw', [(10, 8), (32,), (10, 32), (10,)])]
        >>> opt = NorMuon(groups)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups expects an nn.Module, got {type(model).__name__}")
    if isinstance(extra_adamw, str):
        raise TypeError(f"extra_adamw must be a list of name fragments, got the string "
                        f"{extra_adamw!r}")  # fmt: skip
    extra_adamw = tuple(extra_adamw)
    transposed, is_declared_transposed = _transposed_predicate(transposed)
    if not isinstance(split_qkv, bool):
        raise TypeError(f"split_qkv must be True or False, got {split_qkv!r}")
    if not isinstance(split_gate_up, bool):
        raise TypeError(f"split_gate_up must be True or False, got {split_gate_up!r}")
    if not isinstance(allow_no_matrix, bool):
        raise TypeError(f"allow_no_matrix must be True or False, got {allow_no_matrix!r}")
    matrix_opts = {k: v for k, v in overrides.items() if not k.startswith("adamw_")}
    adamw_opts = {k[len("adamw_") :]: v for k, v in overrides.items() if k.startswith("adamw_")}
    for key in ("layout", "split_sizes", "params", "algorithm"):
        if key in matrix_opts:
            raise ValueError(
                f"param_groups sets {key!r} per group itself; got {key}={matrix_opts[key]!r} "
                f"(declare transposed weights with transposed=..., fused QKV with split_qkv=True)"
            )

    kinds, named = _model_kinds(model, transposed, is_declared_transposed)
    matrix_groups, adamw = _route(named, kinds, extra_adamw, split_qkv, split_gate_up)

    if not matrix_groups and not allow_no_matrix:
        raise ValueError(
            f"{type(model).__name__} has no hidden matrix for NorMuon/Muon (every trainable "
            f"parameter is a vector, an embedding or an output head); use torch.optim.AdamW"
        )
    groups: list[dict[str, Any]] = []
    order = {"auto": 0, "conv": 1, "transposed": 2}
    for (layout, split), params in sorted(
        matrix_groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] is not None)
    ):
        group: dict[str, Any] = {"params": params}
        if layout != "auto":
            group["layout"] = layout
        if split is not None:
            group["split_sizes"] = split
        groups.append({**group, **matrix_opts})
    if adamw:
        groups.append({"params": adamw, "algorithm": "adamw", **adamw_opts})
    return groups


def _transposed_predicate(
    spec: TransposedSpec,
) -> tuple[TransposedSpec, Callable[[str, nn.Parameter], set[str]]]:
    """(the spec, a tuple if it was an iterable; fn(name, param) -> the declarations that match,
    an empty set when the parameter is not declared transposed)."""
    if callable(spec):
        return spec, lambda name, p: {"<predicate>"} if spec(name, p) else set()
    if isinstance(spec, str):
        raise TypeError(f"transposed must be a list of name fragments or a predicate, got the "
                        f"string {spec!r}")  # fmt: skip
    try:
        fragments = tuple(spec)
    except TypeError:
        raise TypeError(
            f"transposed must be a list of name fragments or a predicate fn(name, param) -> "
            f"bool, got {spec!r}"
        ) from None
    for fragment in fragments:
        if not isinstance(fragment, str) or not fragment:
            raise TypeError(f"transposed entries must be non-empty strings, got {fragment!r}")
    return fragments, lambda name, p: {s for s in fragments if s in name}


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output projection (``lm_head``, ``cls.predictions.decoder``...)."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        module = getter()
    except (NotImplementedError, AttributeError):  # models without an LM head
        return None
    return module if isinstance(module, nn.Module) else None


# ---------------------------------------------------------------------------- routing summary


@dataclass(frozen=True)
class RouteRow:
    """Where one parameter goes."""

    #: Qualified name; a tied parameter lists all its names joined by ``=``.
    name: str
    #: The parameter's shape as stored.
    shape: tuple[int, ...]
    #: ``"normuon"``, ``"muon"``, ``"adamw"``; ``"matrix"`` for a matrix group that has no
    #: ``algorithm`` key yet (param_groups output: NorMuon or Muon decides); ``"not optimized"``
    #: for a parameter in no group.
    algorithm: str
    #: Group layout: ``"auto"``, ``"conv"``, ``"stacked"``, ``"transposed"``; ``"-"`` for AdamW.
    layout: str
    #: Output neurons per matrix (one second-moment entry each under normalize="rows"), times
    #: the stack size for 3-D stacks; None for AdamW and parameters not optimized.
    neurons: int | None
    #: ``split_sizes`` of the group (blocks along the output dim), or None.
    split_sizes: tuple[int, ...] | None
    #: Index of the group in the list, or None when the parameter is in no group.
    group: int | None


@dataclass
class RoutingSummary:
    """Rows of :func:`describe_groups`; ``str()`` gives a table to print or log."""

    rows: list[RouteRow] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of elements per algorithm."""
        totals: dict[str, int] = {}
        for row in self.rows:
            numel = 1
            for s in row.shape:
                numel *= s
            totals[row.algorithm] = totals.get(row.algorithm, 0) + numel
        return totals

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (for JSON logs)."""
        return [
            {"name": r.name, "shape": list(r.shape), "algorithm": r.algorithm, "layout": r.layout,
             "neurons": r.neurons, "split_sizes": list(r.split_sizes) if r.split_sizes else None,
             "group": r.group}
            for r in self.rows
        ]  # fmt: skip

    def __str__(self) -> str:
        header = ("group", "name", "shape", "algorithm", "layout", "neurons", "split")
        cells = [header] + [
            (
                "-" if r.group is None else str(r.group),
                r.name,
                "x".join(str(s) for s in r.shape) or "scalar",
                r.algorithm,
                r.layout,
                "-" if r.neurons is None else str(r.neurons),
                "-" if r.split_sizes is None else "+".join(str(s) for s in r.split_sizes),
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        totals = ", ".join(f"{alg} {n:,}" for alg, n in self.counts().items())
        lines.append(f"elements: {totals}")
        return "\n".join(lines)


def _neurons(shape: Sequence[int], layout: str) -> int:
    # The optimizer's own geometry decides: m neurons per matrix, times the stack size.
    geometry = matrix_geometry(shape, layout)
    return geometry.batch * geometry.rows


def describe_groups(
    model: nn.Module, groups: Iterable[dict[str, Any]] | torch.optim.Optimizer
) -> RoutingSummary:
    """Which algorithm, layout and neuron count each parameter of ``model`` gets.

    ``groups`` is :func:`param_groups`' output (or any group list) or an optimizer built from it
    (then matrix groups show ``normuon``/``muon`` rather than ``matrix``). Every parameter of the
    model gets a row, in model order; one in no group shows ``"not optimized"``.

    >>> print(normuon.describe_groups(model, groups))  # doctest: +SKIP
    """
    if isinstance(groups, torch.optim.Optimizer):
        group_list = list(groups.param_groups)
    else:
        group_list = list(groups)
    where: dict[int, int] = {}
    for index, group in enumerate(group_list):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"group {index} is not a dict with 'params': {group!r}")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if id(p) in where:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in groups "
                                 f"{where[id(p)]} and {index}")  # fmt: skip
            where[id(p)] = index
    names_of: dict[int, list[str]] = {}
    order: list[nn.Parameter] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in names_of:
            order.append(p)
        names_of.setdefault(id(p), []).append(name)
    rows = []
    for p in order:
        index = where.get(id(p))
        shape = tuple(p.shape)
        name = "=".join(names_of[id(p)])
        if index is None:
            rows.append(RouteRow(name, shape, "not optimized", "-", None, None, None))
            continue
        group = group_list[index]
        algorithm = group.get("algorithm", "matrix")
        if algorithm == "adamw":
            rows.append(RouteRow(name, shape, "adamw", "-", None, None, index))
            continue
        layout = group.get("layout", "auto")
        split = group.get("split_sizes")
        rows.append(
            RouteRow(name, shape, algorithm, layout, _neurons(shape, layout),
                     tuple(split) if split is not None else None, index)
        )  # fmt: skip
    return RoutingSummary(rows)

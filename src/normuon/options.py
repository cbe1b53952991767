"""The options of every algorithm, declared once: default, validator and a one-line doc.

The optimizers' constructor signatures and docstrings, the set of keys a param group may carry,
group validation (at construction, in ``add_param_group`` and in ``load_state_dict``) and the
README's option table all come from the tables below. Adding an option is one :class:`Option`
line plus the code that uses it.

``python -m normuon.options`` prints the README table.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import newton_schulz as NS
from .geometry import LAYOUTS
from .ns_kernels import NS_KERNEL_MODES

__all__ = [
    "ADAMW_ALIAS_OPTIONS",
    "ADAMW_OPTIONS",
    "IGNORED_OPTIONS",
    "MUON_OPTIONS",
    "NORMUON_OPTIONS",
    "OPTIMIZER_OPTIONS",
    "Option",
    "ROUNDING_STEP",
    "check_rounding_step",
    "group_ns_dtype",
    "markdown_table",
    "validate_group",
]

#: Group keys any group may carry whatever its algorithm: ``algorithm`` routes the group,
#: ``initial_lr`` is added by torch.optim.lr_scheduler, ``param_names`` by named parameters,
#: ``name`` is a free label.
COMMON_KEYS = frozenset({"params", "algorithm", "initial_lr", "param_names", "name"})

#: Matrix-group key (with ``state_dtype="bfloat16"``): how many steps the group has taken, the
#: ``step`` from which :func:`normuon.functional.rounding_offset` picks the stochastic-rounding
#: bits of its bf16 momentum. Not an option but state; it lives in the group, not per
#: parameter, so that it is saved and loaded with the groups (state dicts, DCP) and every rank
#: agrees on it (every rank steps every group, even one that owns none of its matrices): a
#: resumed run rounds with the bits the uninterrupted one would have used.
ROUNDING_STEP = "rounding_step"


def check_rounding_step(value: Any, where: str | None = None) -> int:
    """``rounding_step`` as an int >= 0 (TypeError for a non-integer, ValueError below 0)."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}{ROUNDING_STEP} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{prefix}{ROUNDING_STEP} must be >= 0, got {value!r}")
    return int(value)


NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _number(name: str, value: Any, low: float, high: float | None = None, open_high=False):
    """A finite real number in [low, high] (or [low, high)); a 0-d tensor counts as a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a {value.dtype} tensor "
                f"of shape {tuple(value.shape)}"
            )
        if value.device.type == "meta":
            return value  # holds no value to check (a model built on the meta device)
        number = value.item()  # read once here, never in step()
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    else:
        number = value
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if number < low or (high is not None and (number >= high if open_high else number > high)):
        upper = "" if high is None else (f" and < {high}" if open_high else f" and <= {high}")
        raise ValueError(f"{name} must be >= {low}{upper}, got {value!r}")
    return value


def _nonnegative(name: str, value: Any) -> Any:
    return _number(name, value, 0.0)


def _unit_interval(name: str, value: Any) -> Any:
    """A decay factor in [0, 1)."""
    return _number(name, value, 0.0, 1.0, open_high=True)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        return value

    return check


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _ns_coefficients(name: str, value: Any) -> Any:
    """Lists become tuples (JSON-read state dicts); the value itself is checked together with
    ``ns_steps`` by :func:`validate_group`."""
    if isinstance(value, (tuple, list)):
        return tuple(tuple(v) if isinstance(v, (tuple, list)) else v for v in value)
    return value


def _ns_dtype(name: str, value: Any) -> str:
    """Stored by name ("bfloat16"): torch.distributed.checkpoint's full state dicts accept only
    plain values in param_groups, and a name reads the same in JSON."""
    dtype = value
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)
    if dtype not in NS_DTYPES:
        raise ValueError(
            f"{name} must be one of {[str(d) for d in NS_DTYPES]} (or their names), got {value!r}"
        )
    return str(dtype).removeprefix("torch.")


def group_ns_dtype(group: dict[str, Any]) -> torch.dtype | None:
    """The ``ns_dtype`` a param group asks for, as a torch.dtype (stored by name; a
    torch.dtype in state dicts of 0.1.0 betas); None for groups without one (AdamW)."""
    requested = group.get("ns_dtype")
    return getattr(torch, requested) if isinstance(requested, str) else requested


def _split_sizes(name: str, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not (
        isinstance(value, (tuple, list))
        and len(value) >= 1
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in value)
    ):
        raise ValueError(f"{name} must be None or a list of positive ints, got {value!r}")
    return tuple(value)


def _betas(name: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    _unit_interval(f"{name}[0]", value[0])
    _unit_interval(f"{name}[1]", value[1])
    return (value[0], value[1])


@dataclass(frozen=True)
class Option:
    """One option of an algorithm.

    Attributes:
        name: the param-group key (and constructor argument).
        default: value used when neither the group nor the constructor sets it.
        check: ``check(name, value) -> value``: raises ValueError/TypeError naming the value,
            returns the value to store (normalized, e.g. a dtype stored by name).
        doc: one line for docstrings and the README table.
        source: where the default comes from.
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    source: str = ""


_MATRIX_COMMON = (
    Option("lr", 0.02, _nonnegative, "learning rate of the matrices", "authors' code"),
    Option("momentum", 0.95, _unit_interval, "beta1 of the momentum EMA", "authors' code"),
    Option(
        "nesterov", True, _boolean, "Nesterov-style momentum U = G.lerp(M, beta1)", "authors' code"
    ),
    Option(
        "weight_decay",
        0.0,
        _nonnegative,
        "decoupled weight decay: W *= 1 - lr * weight_decay",
        "authors' code",
    ),
    Option("ns_steps", 5, _positive_int, "Newton-Schulz steps", "Muon"),
    Option(
        "ns_coefficients",
        "muon",
        _ns_coefficients,
        "'muon' (3.4445, -4.7750, 2.0315), 'polar_express', one (a, b, c) or one per step",
        "Muon; Polar Express (arXiv 2505.16932)",
    ),
    Option(
        "ns_dtype",
        "bfloat16",
        _ns_dtype,
        "dtype of the Newton-Schulz iteration (float32 on a CPU whose bf16 GEMMs measure slow)",
        "authors' code",
    ),
    Option(
        "update_scale",
        "preserve_norm",
        _choice("preserve_norm", "adam_rms"),
        "'preserve_norm' (Muon learning rates carry over) or 'adam_rms' (update RMS 0.2)",
        "authors' code / paper Algorithm 1",
    ),
    Option(
        "split_sizes",
        None,
        _split_sizes,
        "output-row counts of a fused projection (QKV), each block orthogonalized alone",
        "no split, as the paper",
    ),
    Option(
        "layout",
        "auto",
        _choice(*LAYOUTS),
        "'auto', 'conv' (flatten (out, in, *k)), 'stacked' ((E, m, n)) or 'transposed' ((in, out))",
        "",
    ),
)

def _state_dtype(name: str, value: Any) -> str | None:
    """None (float32 for half-precision parameters, the parameter's dtype otherwise), or a
    dtype's name: ``"float32"`` or ``"bfloat16"`` (stored by name, like ``ns_dtype``)."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{name} must be None, 'float32' or 'bfloat16', got {value!r}")
    return str(dtype).removeprefix("torch.")


_STATE_DTYPE = Option(
    "state_dtype",
    None,
    _state_dtype,
    "dtype of the momentum: None (float32 for bf16/fp16 parameters, else theirs), 'float32' or "
    "'bfloat16' (half the bytes; stochastically rounded, so unbiased)",
    "dion's bf16 momentum",
)

_CAUTIOUS = Option(
    "cautious_weight_decay",
    False,
    _boolean,
    "decay only the coordinates where the update and the weight have the same sign "
    "(update * W >= 0: a zero counts as agreeing)",
    "Cautious Weight Decay, arXiv 2510.12402",
)

#: Options of ``algorithm="normuon"`` groups.
NORMUON_OPTIONS: tuple[Option, ...] = (
    _MATRIX_COMMON[:2]
    + (
        Option(
            "beta2", 0.95, _unit_interval,
            "EMA factor of the per-neuron second moment (0: each row normalized afresh every "
            "step, the paper's 'Muon with normalization' ablation)",
            "authors' code",
        ),
    )
    + _MATRIX_COMMON[2:3]
    + (Option("eps", 1e-10, _nonnegative, "added to sqrt(v)", "authors' code"),)
    + _MATRIX_COMMON[3:]
    + (
        Option(
            "normalize",
            "rows",
            _choice("rows", "larger_dim", "elements"),
            "'rows' (one second-moment entry per output neuron), 'larger_dim', or 'elements' "
            "(one per weight, Adam's after orthogonalization: the paper's Muon+Adam ablation, "
            "state 2x Muon's)",
            "paper / modded-nanogpt",
        ),
        _CAUTIOUS,
        _STATE_DTYPE,
        Option(
            "normalize_input",
            False,
            _boolean,
            "rescale the Newton-Schulz input per neuron instead of its output, whose update is "
            "then scaled as Muon's (the paper's NorMuon (Front) ablation)",
            "paper Sec. 4.1.3",
        ),
        Option(
            "normalize_matrices",
            "all",
            _choice("all", "tall"),
            "'all', or 'tall': only matrices (row blocks) with more rows than columns are "
            "rescaled, the others get Muon's update (the paper's m > n ablation; their second "
            "moment stays 0)",
            "paper Sec. 4.1.3",
        ),
    )
)  # fmt: skip

#: Options of ``algorithm="muon"`` groups.
MUON_OPTIONS: tuple[Option, ...] = _MATRIX_COMMON + (_CAUTIOUS, _STATE_DTYPE)

#: Options of ``algorithm="adamw"`` groups (constructor arguments ``adamw_<name>``).
ADAMW_OPTIONS: tuple[Option, ...] = (
    Option("lr", 3e-4, _nonnegative, "learning rate of AdamW groups", ""),
    Option("betas", (0.9, 0.95), _betas, "AdamW (beta1, beta2)", "paper"),
    Option("eps", 1e-8, _nonnegative, "AdamW epsilon", "torch.optim.AdamW"),
    Option("weight_decay", 0.0, _nonnegative, "AdamW decoupled weight decay", ""),
    Option(
        "cautious_weight_decay", False, _boolean,
        "AdamW groups: decay only where AdamW's update and the weight have the same sign",
        "arXiv 2510.12402",
    ),
)  # fmt: skip

#: Keys AdamW groups also accept, validated like options but with no default: ``momentum`` is
#: written by schedulers with ``cycle_momentum`` and drives ``betas[0]`` (it must be a valid
#: beta1, or a state dict or group could smuggle in beta1 = 2).
ADAMW_ALIAS_OPTIONS: tuple[Option, ...] = (
    Option("momentum", None, _unit_interval, "alias of betas[0] (cycle_momentum schedulers)"),
)


def _orthogonalizer(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be None or callable, got {value!r}")
    return value


def _comm_dtype(name: str, value: Any) -> Any:
    if value == "auto" or value is None or isinstance(value, torch.dtype):
        return value
    raise ValueError(f"{name} must be 'auto', None or a torch.dtype, got {value!r}")


def _process_group(name: str, value: Any) -> Any:
    return value  # "auto", None or a ProcessGroup; checked when first used


def _ns_memory_budget(name: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be None or a non-negative int (bytes), got {value!r}")
    return value


def _optional_boolean(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be True, False or None, got {value!r}")
    return value


#: Group keys any group (matrix or AdamW) may carry that change nothing: torch.optim's
#: implementation switches. Frameworks that build torch optimizers generically put them into
#: every group (torchtitan's OptimizersContainer adds ``fused`` and ``foreach`` from its
#: ``implementation`` setting). normuon has one implementation, its own batched one (foreach
#: ops for AdamW, Newton-Schulz batched over same-shaped matrices), so there is nothing to
#: switch: a present key is validated (True, False or None), kept in the group and saved and
#: loaded with it, and never read by ``step()``. Not constructor arguments, and not filled in
#: when absent.
IGNORED_OPTIONS: tuple[Option, ...] = (
    Option("fused", None, _optional_boolean,
           "group key accepted and ignored (True, False or None): torch.optim's fused switch; "
           "normuon always runs its own batched step"),
    Option("foreach", None, _optional_boolean,
           "group key accepted and ignored (True, False or None): torch.optim's foreach switch; "
           "normuon always runs its own batched step"),
)  # fmt: skip


#: Optimizer-wide options (attributes of the optimizer, not of a group).
OPTIMIZER_OPTIONS: tuple[Option, ...] = (
    Option(
        "nonfinite_grads",
        "skip",
        _choice("skip", "raise"),
        "'skip': a NaN/Inf gradient leaves its parameter and state untouched (no host sync); "
        "'raise': FloatingPointError before any change",
    ),
    Option(
        "process_group",
        "auto",
        _process_group,
        "replicated (DDP) parameters: 'auto' (the default group), None (independent) or a group",
    ),
    Option(
        "comm_dtype",
        "auto",
        _comm_dtype,
        "dtype on the wire for sharded matrices: 'auto' (bf16 on CUDA), None (exact) or a dtype",
    ),
    Option(
        "orthogonalizer",
        None,
        _orthogonalizer,
        "fn(u, coefficients, dtype) replacing Newton-Schulz; None: normuon.newton_schulz's default",
    ),
    Option(
        "ns_memory_budget",
        32 * 2**20,
        _ns_memory_budget,
        "bytes of Newton-Schulz input per batch of same-shaped matrices; the step's workspace, "
        "kept and reused across steps, is about this (None: one batch per shape)",
    ),
    Option(
        "ns_kernel",
        "auto",
        _choice(*NS_KERNEL_MODES),
        "Newton-Schulz kernel per bucket of same-shaped matrices: 'auto' (candidates timed once "
        "per process when a bucket is first seen, the fastest kept), 'shape' (Gram from aspect "
        "2, else the batched loop; no timing), or 'standard', 'loop', 'gram' for every bucket",
    ),
    Option(
        "host_reads",
        "auto",
        _choice("auto", "never"),
        "'auto': on CPU tensors step() reads the finite-gradient flags back (free there) to drop "
        "skipped parameters; 'never': step() reads no tensor value on the host on any device "
        "(accelerators always behave so; for torch.compile / CUDA graphs)",
    ),
)


def _coefficients_with_steps(group: dict[str, Any]) -> None:
    NS.resolve_ns_coefficients(group["ns_coefficients"], group["ns_steps"])


def validate_group(group: dict[str, Any], options: Sequence[Option], where: str | None) -> None:
    """Check (and normalize in place) every option of ``group``; ``where`` names the group in
    error messages (None: the values are constructor arguments, named by themselves)."""
    prefix = f"{where}: " if where else ""
    for option in options:
        try:
            group[option.name] = option.check(option.name, group[option.name])
        except (ValueError, TypeError) as err:
            raise type(err)(f"{prefix}{err}") from None
    if "ns_coefficients" in group:
        try:
            _coefficients_with_steps(group)
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None


def _format_default(value: Any) -> str:
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"`{value:.0e}`"
    return f"`{value!r}`"


def markdown_table() -> str:
    """The README's table of options, generated from the declarations above."""
    lines = ["| option | NorMuon | Muon | default | meaning |", "| --- | --- | --- | --- | --- |"]
    muon = {o.name for o in MUON_OPTIONS}
    for option in NORMUON_OPTIONS:
        in_muon = "yes" if option.name in muon else "no"
        lines.append(
            f"| `{option.name}` | yes | {in_muon} | {_format_default(option.default)} | "
            f"{option.doc}{f' ({option.source})' if option.source else ''} |"
        )
    for option in ADAMW_OPTIONS:
        lines.append(
            f"| `adamw_{option.name}` | yes | yes | {_format_default(option.default)} | "
            f"{option.doc}{f' ({option.source})' if option.source else ''} |"
        )
    for option in OPTIMIZER_OPTIONS:
        lines.append(
            f"| `{option.name}` | yes | yes | {_format_default(option.default)} | {option.doc} |"
        )
    for option in IGNORED_OPTIONS:
        lines.append(f"| `{option.name}` | yes | yes | absent | {option.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())

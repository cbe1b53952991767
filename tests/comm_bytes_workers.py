"""Worker of tests/test_comm_bytes.py (spawned processes, gloo, CPU): the bytes that the
optimizer's collectives send under FSDP2, with float32 and with bf16 on the wire.

A small model is sharded by ``fully_shard`` on a 1-D mesh of 2 ranks and stepped by NorMuon
(and Muon) twice, ``comm_dtype=None`` and ``comm_dtype=torch.bfloat16``, on the gradients of
a single-process copy (laid out as each DTensor parameter by ``distribute_tensor``), beside that
single-process optimizer. Every collective that ``torch.distributed`` issues during
``opt.step()`` is recorded (kind, dtype, bytes of the input buffer); forward and backward are
run on the single-process model only, so FSDP2's own collectives never happen. Each rank writes
what it saw to ``rank{r}.json``; the test makes the assertions.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from dist_workers import Experts, copy_grads, free_port, full, loss_fn, make_opt, setup, teardown  # noqa: F401 - free_port re-export
from torch import nn

from normuon import Muon, NorMuon

STEPS = 4
WIRES = {"float32": None, "bfloat16": torch.bfloat16}

#: The torch.distributed collectives wrapped while a step runs, and the position of the buffer
#: that each sends (its input) among the positional arguments.
COLLECTIVES = {
    "all_to_all_single": 1,
    "all_reduce": 0,
    "all_gather_into_tensor": 1,
    "all_gather": 1,
    "reduce_scatter_tensor": 1,
    "broadcast": 0,
    "all_to_all": 1,
    "reduce": 0,
    "gather": 0,
    "scatter": 1,
}
_INPUT_KWARGS = ("input", "tensor", "input_tensor", "input_tensor_list")


class Net(nn.Module):
    """Matrices whose row blocks at W = 2 have awkward sizes: ``odd`` (5, 7) splits 3 / 2 rows,
    so one block of U / D holds 21 elements (42 bytes in bf16, 84 in float32: neither a multiple
    of the 8-byte alignment of the packed segments), and the second moments of ``mid`` and
    ``odd`` have 3-entry blocks (12 bytes).

    A nonlinearity follows every matrix: a linear bottleneck (``odd(mid(h))``) confines
    ``mid``'s gradient to ``odd``'s 5-dim row space, and a rank-deficient U rounded to bf16
    gets O(1) components along its null directions from Newton-Schulz (seen: 8% of the total
    movement, the same in one process with U rounded before Newton-Schulz)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.up = nn.Linear(8, 12)
        self.mid = nn.Linear(12, 7, bias=False)
        self.odd = nn.Linear(7, 5, bias=False)
        self.down = nn.Linear(5, 8, bias=False)
        self.experts = Experts(4, 8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, 16)
        h = self.embed(tokens)
        h = torch.tanh(self.mid(torch.relu(self.up(h)).square()))
        h = self.down(torch.tanh(self.odd(h)))
        b, t, d = h.shape
        h = h + self.experts(h.reshape(b * t, d)).reshape(b, t, d)
        return self.lm_head(h)


SHARDED = ("up", "mid", "odd", "down", "experts")


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def shard(model: Net, mesh) -> Net:
    from torch.distributed.fsdp import fully_shard

    for name in SHARDED:
        fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 16, (8, 16), generator=gen)


class Recorder:
    """While entered, every collective of :data:`COLLECTIVES` called through
    ``torch.distributed`` (or its ``distributed_c10d`` module) appends (kind, dtype, bytes of
    the input buffer) to ``log``; all_to_all_single also records its input split sizes."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.saved: list[tuple[object, str, object]] = []

    def _wrap(self, name: str, original, position: int):
        log = self.log

        def wrapper(*args, **kwargs):
            sent = args[position] if len(args) > position else None
            for key in _INPUT_KWARGS:
                if sent is None and key in kwargs:
                    sent = kwargs[key]
            tensors = sent if isinstance(sent, (list, tuple)) else [sent]
            tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
            entry = {
                "kind": name,
                "dtype": str(tensors[0].dtype).removeprefix("torch.") if tensors else None,
                "bytes": sum(t.numel() * t.element_size() for t in tensors),
            }
            if name == "all_to_all_single":
                splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
                entry["input_split_sizes"] = list(splits) if splits is not None else None
            log.append(entry)
            return original(*args, **kwargs)

        return wrapper

    def __enter__(self):
        for name, position in COLLECTIVES.items():
            original = getattr(c10d, name)
            wrapped = self._wrap(name, original, position)
            for module in (dist, c10d):
                if getattr(module, name, None) is original:
                    self.saved.append((module, name, original))
                    setattr(module, name, wrapped)
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self.saved):
            setattr(module, name, original)
        self.saved.clear()


def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank's block of a dim of size n chunked over ``world`` ranks (torch.chunk,
    as FSDP2's Shard(0))."""
    per = -(-n // world)
    return [max(0, min(per, n - r * per)) for r in range(world)]


def sent_segments(model: Net, opt, rank: int, world: int, neuron_norm: bool) -> list[dict]:
    """What this rank's all_to_alls of one step carry, from the shapes alone: for every matrix
    split over ranks (row-sharded: the 2-D ones; the experts stay whole), a non-owner sends
    its block of U and of the second moment v to the owner, and the owner sends every other
    rank its block of D and of v. U and D travel in the wire dtype, v in float32. The owner
    is the optimizer's choice (its plan); everything else is computed here."""
    owner_of = {
        id(group["params"][plan.index]): plan.owner
        for group, plans in zip(opt.param_groups, opt._plans())
        for plan in plans
        if plan.owner is not None
    }
    segments = []
    for name in SHARDED:
        p = getattr(model, name).weight
        if p.ndim != 2:  # stacked experts: whole matrices on each rank
            continue
        rows, cols = p.shape
        owner = owner_of[id(p)]
        blocks = _rows(rows, world)
        if rank == owner:
            to = [r for r in range(world) if r != owner and blocks[r]]
        else:
            to = [rank] if blocks[rank] else []
        for r in to:  # rank's own block (to the owner), or block r (from the owner)
            segments.append({"param": name, "what": "U/D", "numel": blocks[r] * cols})
            if neuron_norm:
                segments.append({"param": name, "what": "v", "numel": blocks[r]})
    return segments


def _rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def bytes_by_wire(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    setup(rank, world, port)
    mesh = init_device_mesh("cpu", (world,))
    report: dict = {}
    for cls in (NorMuon, Muon):
        init = make_model()
        ref = make_model()
        ref_opt = make_opt(ref, cls, process_group=None)
        models = {wire: shard(make_model(), mesh) for wire in WIRES}
        opts = {wire: make_opt(models[wire], cls, comm_dtype=WIRES[wire]) for wire in WIRES}
        logs: dict[str, list] = {wire: [] for wire in WIRES}
        for step in range(STEPS):
            loss_fn(ref, batch(step)).backward()
            for wire in WIRES:
                copy_grads(models[wire], ref)
                with Recorder(logs[wire]):
                    opts[wire].step()
                opts[wire].zero_grad(set_to_none=True)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
        result = {"log": logs, "segments": {}, "owners": {}, "param_errors": {},
                  "moved_errors": {}, "state_errors": {}}  # fmt: skip
        for wire in WIRES:
            model, opt = models[wire], opts[wire]
            result["segments"][wire] = sent_segments(model, opt, rank, world, cls is NorMuon)
            result["owners"][wire] = [
                [plan.kind, plan.owner] for plans in opt._plans() for plan in plans
            ]
            params, moved, states = {}, {}, {}
            named = zip(model.named_parameters(), ref.parameters(), init.parameters())
            for (name, p), q, p0 in named:
                a, b = full(p.detach()), q.detach()
                params[name] = _rel_max(a, b)
                moved_ref = b - p0.detach()
                moved[name] = ((a - p0.detach() - moved_ref).norm() / moved_ref.norm()).item()
                for key, value in ref_opt.state[q].items():
                    if key != "step":
                        states[f"{name}:{key}"] = _rel_max(full(opt.state[p][key]), value)
            result["param_errors"][wire] = params
            result["moved_errors"][wire] = moved
            result["state_errors"][wire] = states
        report[cls.__name__] = result
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    teardown()

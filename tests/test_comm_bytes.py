"""Bytes on the wire of the optimizer's collectives under FSDP2 (W = 2, gloo, CPU): float32
against bf16 (``comm_dtype``), counted at ``torch.distributed`` during ``opt.step()`` only.

- (a) the all_to_alls carry U (to each matrix's owner) and D (back) in the wire dtype, and
  NorMuon's second moment v in float32 both ways, each segment aligned to 8 bytes
  (``normuon.distributed.comm.exchange``): their bytes equal what the shapes give, for both
  wires, so the bf16 wire saves exactly half of U's and D's bytes, up to that alignment;
- (b) the small all_reduces (the finite-gradient flags) are the same with either wire, and the
  step issues no other collective;
- (c) on the single process's gradients, the float32 wire equals the single-process optimizer
  to float32 accuracy, and the bf16 wire moves every matrix within 5% of it.

The worker is tests/comm_bytes_workers.py (one spawn for every test here).
"""

from __future__ import annotations

import json

import comm_bytes_workers as W
import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD = 2
OPTIMIZERS = ["NorMuon", "Muon"]
#: Bytes per element on the wire of U and D; v always travels in float32.
ITEMSIZE = {"float32": 4, "bfloat16": 2}
#: Bytes each packed segment of ``exchange`` is aligned to.
ALIGN = 8
#: The 2-D matrices row-sharded at W = 2 (the stacked experts stay whole on their ranks).
TRAVELLING = {"up.weight", "mid.weight", "odd.weight", "down.weight"}


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _segment_bytes(segment: dict, wire: str) -> int:
    itemsize = ITEMSIZE[wire] if segment["what"] == "U/D" else 4
    return _padded(segment["numel"] * itemsize)


def _of(log: list, kind: str) -> list:
    return [entry for entry in log if entry["kind"] == kind]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm_bytes")
    mp.start_processes(W.bytes_by_wire, args=(WORLD, W.free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn")  # fmt: skip
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_all_to_all_bytes_are_those_of_the_shapes(reports, optimizer):
    saved_any, unaligned = False, False
    for rank, report in enumerate(reports):
        result = report[optimizer]
        # The same owners, so the same segments, with either wire.
        assert result["owners"]["float32"] == result["owners"]["bfloat16"], result["owners"]
        segments = result["segments"]["float32"]
        assert segments == result["segments"]["bfloat16"]
        assert all(s["what"] == "U/D" for s in segments) == (optimizer == "Muon"), segments
        sent = {}
        for wire in ITEMSIZE:
            calls = _of(result["log"][wire], "all_to_all_single")
            # One all_to_all to the owners and one back per step (one matrix group, one mesh).
            assert len(calls) == 2 * W.STEPS, (rank, wire, calls)
            for call in calls:
                assert call["dtype"] == "uint8", call  # byte-packed segments
                splits = call["input_split_sizes"]
                assert sum(splits) == call["bytes"] and splits[rank] == 0, (rank, call)
            sent[wire] = sum(call["bytes"] for call in calls)
            expected = W.STEPS * sum(_segment_bytes(s, wire) for s in segments)
            assert sent[wire] == expected, (rank, optimizer, wire, sent[wire], expected)
        # What the bf16 wire saves is half of U's and D's bytes (up to the alignment), and
        # nothing of v's.
        saving = W.STEPS * sum(
            _segment_bytes(s, "float32") - _segment_bytes(s, "bfloat16") for s in segments
        )
        assert sent["float32"] - sent["bfloat16"] == saving, (rank, sent, saving)
        saved_any |= saving > 0
        unaligned |= any(s["numel"] * 2 % ALIGN for s in segments if s["what"] == "U/D")
    assert saved_any
    # The model is built so that some bf16 block is not a multiple of the alignment (21 and 14
    # elements of odd.weight): the expectation above has to count the padding.
    assert unaligned


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_small_all_reduces_do_not_depend_on_the_wire(reports, optimizer):
    for rank, report in enumerate(reports):
        logs = report[optimizer]["log"]
        reduces = {wire: _of(logs[wire], "all_reduce") for wire in ITEMSIZE}
        assert reduces["float32"] == reduces["bfloat16"], (rank, reduces)
        # The finite-gradient flags of each group, agreed over the mesh: a few floats per step.
        assert len(reduces["float32"]) >= W.STEPS, reduces
        for entry in reduces["float32"]:
            assert entry["dtype"] == "float32" and entry["bytes"] <= 64, entry
        for wire in ITEMSIZE:
            kinds = {entry["kind"] for entry in logs[wire]}
            assert kinds == {"all_to_all_single", "all_reduce"}, (rank, wire, kinds)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_wire_dtypes_against_the_single_process(reports, optimizer):
    for rank, report in enumerate(reports):
        result = report[optimizer]
        exact, rounded = result["param_errors"]["float32"], result["param_errors"]["bfloat16"]
        assert set(exact) >= TRAVELLING, sorted(exact)
        # float32 wire: the single process's optimizer, to float32 accuracy.
        for name, err in exact.items():
            assert err < 2e-6, (rank, optimizer, "float32 wire", name, err)
        for key, err in result["state_errors"]["float32"].items():
            assert err < 5e-5, (rank, optimizer, "float32 wire state", key, err)
        # bf16 wire: U and D rounded to bf16; each matrix's total movement within 5%, and the
        # matrices that did not travel (stacked experts, AdamW parameters) exact.
        moved = result["moved_errors"]["bfloat16"]
        for name, err in moved.items():
            if name in TRAVELLING:
                assert 1e-5 < err < 0.05, (rank, optimizer, "bf16 wire", name, err)
            else:
                assert rounded[name] < 2e-6, (rank, optimizer, "bf16 wire", name, rounded[name])

"""Tensor parallelism and 2-D meshes against the single-process optimizer (gloo, CPU).

torch's own ``parallelize_module`` plans on a small transformer block: tp = 2 alone
(ColwiseParallel rows ``Shard(0)``, RowwiseParallel columns ``Shard(1)``) and FSDP2 on top of
it on a (dp 2, tp 2) mesh (``_StridedShard(0)`` x ``Shard(0)`` and ``Shard(0)`` x ``Shard(1)``).
Both normalizations, both update scales, Muon, ``split_sizes`` and uneven shards; Newton-Schulz
once per matrix in the mesh; traffic at the floor; DCP checkpoints across mesh shapes.
"""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp
import tp_workers as T

pytestmark = pytest.mark.distributed

#: Matrices of tp_workers.Block, counted as orthogonalized blocks: 9 whole matrices and the
#: fused projection, which is one matrix or three row blocks depending on the case.
MATRICES = 10


def spawn(fn, world, *args):
    mp.start_processes(fn, args=(world, T.free_port(), *args), nprocs=world, start_method="spawn")


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["tp2", "dp2xtp2"])
def test_tensor_parallel_matches_single_process(tmp_path, mesh_shape):
    world = 1
    for size in mesh_shape:
        world *= size
    spawn(T.tp_matches_single, world, list(mesh_shape), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    placements = reports[0]["placements"]
    if len(mesh_shape) == 1:
        assert placements["q.weight"] == ["Shard(dim=0)"]
        assert placements["o.weight"] == ["Shard(dim=1)"]
    else:
        assert placements["q.weight"][0].startswith("_StridedShard(dim=0"), placements
        assert placements["q.weight"][1] == "Shard(dim=0)"
        assert placements["o.weight"] == ["Shard(dim=0)", "Shard(dim=1)"]
    # Newton-Schulz once per matrix in the whole mesh, and every rank takes a share.
    counts = [r["ns_matrices"] for r in reports]
    assert sum(counts) == MATRICES, counts
    assert all(c > 0 for c in counts), counts
    # Traffic at the floor (aligned segments may add a few bytes), a bounded collective count.
    for r, report in enumerate(reports):
        sent, floor = report["sent_bytes"], report["floor_bytes"]
        assert floor > 0, report
        assert floor <= sent <= floor + 64 * MATRICES, (r, sent, floor)
        assert report["collectives"] <= 12, report


@pytest.mark.parametrize("opts", [{}, {"normalize": "elements"}], ids=["normuon", "muon_adam"])
def test_dcp_checkpoints_move_across_mesh_shapes(tmp_path, opts):
    """(dp 2, tp 2) -> one process -> (dp 4) FSDP2 -> (tp 2), each stage equal to the
    uninterrupted single process after it (Muon+Adam: a second moment placed as each
    parameter, resharded with it)."""
    stages = [([("dp", 2), ("tp", 2)], 2), ([], 1), ([("dp", 4)], 1), ([("tp", 2)], 1)]
    done, previous = 0, None
    for k, (mesh, steps) in enumerate(stages):
        world = 1
        for _, size in mesh:
            world *= size
        path = str(tmp_path / f"stage{k}")
        spawn(T.dcp_stage, world, mesh, previous, path, done, steps, opts)
        done, previous = done + steps, path


def test_nonfinite_gradient_in_one_block_skips_the_whole_matrix(tmp_path):
    """(dp 2, tp 2): a NaN in one rank's block of a split matrix leaves that matrix and its
    state untouched on every rank, like one process, with host flags and with device masks."""
    spawn(T.nonfinite_skip, 4, [2, 2], str(tmp_path))
    for r in range(4):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for mode in ("True", "False"):
            # Every rank counts the skipped matrix, as the single process does once.
            assert result[mode]["skips"] == result[mode]["ref_skips"] == 1, (r, result)


def test_no_host_reads_on_any_placement(tmp_path):
    """FSDP2, tp 4, (dp 2, tp 2) and DDP: no host read in any step of the device path, with
    Tensor hyperparameters and a NaN in one rank's block; equal to the single process."""
    spawn(T.no_host_reads, 4, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    for r, result in enumerate(results):
        # DTensors: every rank counts the skipped matrix, as the single process does once.
        assert {k: result[k] for k in ("dp4", "tp4", "dp2xtp2")} == {
            "dp4": 1, "tp4": 1, "dp2xtp2": 1
        }, (r, result)  # fmt: skip
    # DDP: only the matrix's owner updates it, so only the owner counts the skip.
    assert sorted(result["ddp"] for result in results) == [0, 0, 0, 1], results


def test_bf16_wire_on_a_2d_mesh_stays_within_bf16_accuracy(tmp_path):
    spawn(T.bf16_wire, 4, str(tmp_path))
    for r in range(4):
        errors = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert errors and max(errors.values()) < 0.1, (r, errors)  # U and D rounded to bf16
        assert max(errors.values()) > 0, errors  # the wire really was bf16

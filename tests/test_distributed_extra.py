"""More distributed cases (spawned gloo ranks on CPU): a dim-1 sharded DTensor is refused with a
clear error, and replicated (DDP) optimizer state, which lives only on each matrix's owner,
round-trips through a DCP checkpoint into other world sizes."""

from __future__ import annotations

import json
import time

import dist_extra_workers as X
import dist_workers as W
import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def spawn(fn, world, *args, timeout=150.0):
    """Run fn on ``world`` spawned ranks; fail (and kill the ranks) instead of hanging."""
    ctx = mp.start_processes(
        fn, args=(world, W.free_port(), *args), nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{fn.__name__} at W={world} did not finish within {timeout} s")


def read(tmp_path, world):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def test_partial_placement_is_a_clear_value_error_at_construction(tmp_path):
    spawn(X.partial_placement_error, 2, str(tmp_path))
    for result in read(tmp_path, 2):
        assert result["at"] == "constructor", result
        assert result["type"] == "ValueError", result
        assert "param_groups[0]['params'][0]" in result["message"], result
        assert "Partial" in result["message"], result


@pytest.fixture(scope="module")
def ddp_checkpoint(tmp_path_factory):
    """3 steps of replicated NorMuon at W=2 saved with DCP (owner-only optimizer state)."""
    path = tmp_path_factory.mktemp("ddp_ckpt") / "ckpt"
    spawn(X.ddp_dcp_save, 2, str(path), 3)
    return str(path)


@pytest.mark.parametrize("load_world", [1, 4])
def test_ddp_dcp_checkpoint_loads_into_other_world_sizes(ddp_checkpoint, tmp_path, load_world):
    """W=1: one process needs every matrix's state, gathered from both savers' shares.
    W=4: the owners change with the world size; each rank loads the state of its new share.
    torch's ``set_state_dict`` runs strict: ``state_dict()`` gathers the owners' shares so the
    checkpoint holds every parameter's state whatever the world size.
    """
    spawn(X.ddp_dcp_load, load_world, ddp_checkpoint, 3, 2, str(tmp_path))
    results = read(tmp_path, load_world)
    for result in results:
        assert result["param_err"] < 2e-6, results
        assert result["state_err"] < 1e-5, results
    # The state of every parameter is held (and was checked) on exactly one rank.
    # 6 NorMuon matrices x (momentum, v) + 5 AdamW tensors x (exp_avg, exp_avg_sq).
    assert sum(r["states"] for r in results) == 6 * 2 + 5 * 2, results
    assert all(r["strict_error"] is None for r in results), results


def test_bf16_state_under_fsdp2_and_ddp(tmp_path):
    spawn(X.bf16_state_sharded, 2, str(tmp_path))
    for r in range(2):
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        for label in ("fsdp2", "ddp"):
            # Matrices' momentum in bf16 (AdamW groups keep float32 state).
            assert "torch.bfloat16" in result[label]["momentum_dtypes"], result
            assert result[label]["max_rel_err"] < 2e-2, (label, result)
            # Every rank counted every step of the bf16 groups (AdamW groups have no counter),
            # whether it owned their matrices or not: the rounding bits' step agrees everywhere.
            counters = [c for c in result[label]["rounding_steps"] if c is not None]
            assert counters and set(counters) == {result[label]["steps"]}, result

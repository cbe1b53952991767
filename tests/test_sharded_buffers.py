"""The sharded data path with the optimizer's workspace buffers: the blocks returned for one
mesh stay valid while the next mesh's exchange runs (they are applied after the last)."""

from __future__ import annotations

import torch

import normuon.distributed.comm as comm
from normuon.distributed.layout import BlockLayout
from normuon.distributed.placement import SHARDED
from normuon.distributed.plan import ParamPlan
from normuon.distributed.sharded import scatter_from_owners
from normuon.step_plan import Workspace


def _plan(index: int, group) -> ParamPlan:
    """A (4, 4) matrix, rows split over 2 ranks, owned by rank 1; this process is rank 0."""
    layout = BlockLayout((4, 4), group, 0, 2,
                         ((range(0, 2), range(0, 4)), (range(2, 4), range(0, 4))))  # fmt: skip
    return ParamPlan(index, f"p{index}", SHARDED, None, owner=1, group=group, layout=layout)


def test_blocks_of_two_meshes_do_not_share_a_receive_buffer(monkeypatch):
    calls = []

    def owner_sends_its_call_number(recv, send, recv_sizes, send_sizes, group=None):
        calls.append(group)
        recv.view(torch.float32).fill_(float(len(calls)))

    monkeypatch.setattr(comm.dist, "all_to_all_single", owner_sends_its_call_number)
    plans = [_plan(0, object()), _plan(1, object())]  # two meshes (two process groups)
    workspace = Workspace()
    for _ in range(2):  # the second step reuses the buffers the first one grew
        calls.clear()
        out = scatter_from_owners(plans, {}, [((2, 4), None)] * 2,
                                  (torch.float32, torch.float32), workspace.flat)  # fmt: skip
        assert len(calls) == 2
        assert torch.all(out[0][0] == 1.0) and torch.all(out[1][0] == 2.0), out

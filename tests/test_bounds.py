"""The tolerance helpers of tests/bounds.py can fail: cautious decay's allowance covers only the
entries whose mask is ambiguous, so a wrong mask elsewhere is still caught."""

from __future__ import annotations

import dist_workers as W
import pytest
from bounds import CautiousAllowance, excess_error

from normuon import Muon, NorMuon


def _run(opts, ref_opts, steps=5):
    """A model stepped with ``opts`` on the gradients of a reference stepped with ``ref_opts``
    (recorded by a CautiousAllowance); returns the worst excess error over parameters."""
    ref, model = W.make_model(), W.make_model()
    ref_opt = W.make_opt(ref, NorMuon, process_group=None, **ref_opts)
    opt = W.make_opt(model, NorMuon, process_group=None, **opts)
    with CautiousAllowance(ref.named_parameters()) as allowance:
        W.train_on_reference_grads(model, opt, ref, ref_opt, steps)
    pairs = zip(model.named_parameters(), ref.named_parameters())
    errors = {name: excess_error(p.detach(), q.detach(), allowance.of(name))
              for (name, p), (_, q) in pairs}  # fmt: skip
    return errors, allowance


CAUTIOUS = dict(cautious_weight_decay=True, adamw_cautious_weight_decay=True,
                adamw_weight_decay=0.1)  # fmt: skip


def test_the_same_optimizer_is_within_the_bound_and_the_allowance_is_sparse():
    errors, allowance = _run(CAUTIOUS, CAUTIOUS)
    assert max(errors.values()) == 0.0, errors
    assert allowance.calls > 0
    flagged = sum(int((a > 0).sum()) for a in allowance.allowance.values())
    total = sum(a.numel() for a in allowance.allowance.values())
    assert flagged < 0.01 * total, (flagged, total)


@pytest.mark.parametrize("wrong", ["plain decay", "no decay"])
def test_a_wrong_mask_exceeds_the_bound(wrong):
    opts = dict(weight_decay=0.1, cautious_weight_decay=False) if wrong == "plain decay" else \
        dict(weight_decay=0.0)  # fmt: skip
    errors, _ = _run(opts, CAUTIOUS)
    # Matrices decayed where the reference's mask says not (or never): far above rounding.
    assert max(errors[n] for n in ("up.weight", "mid.weight", "conv.weight")) > 1e-4, errors


def test_allowance_ignores_other_optimizers_in_the_process():
    ref, other = W.make_model(), W.make_model()
    ref_opt = W.make_opt(ref, Muon, process_group=None, cautious_weight_decay=True)
    other_opt = W.make_opt(other, Muon, process_group=None, cautious_weight_decay=True)
    with CautiousAllowance(ref.named_parameters()) as allowance:
        W.train(other, other_opt, 1)
        assert allowance.calls == 0
        W.train(ref, ref_opt, 1)
    assert allowance.calls > 0

"""`normuon tune`: the search, the protocol's choices on a known loss surface, the ledger and
resume, the tables, and the command end to end on a tiny preset."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil

import pytest

from normuon.cli import main
from normuon.harness import tune as tune_mod
from normuon.harness.compare import Diverged
from normuon.harness.config import get_preset
from normuon.harness.train import RunResult
from normuon.harness.transfer import parabola_vertex, scaling_exponent, transfer_report
from normuon.harness.tune import (
    SearchEdge,
    TuneProtocol,
    analyse_finals,
    ladder_report,
    resolve_tune,
    run_tune,
    search_edges,
    search_next,
    tune_tables,
)

# ------------------------------------------------------------------ the 1-D search


def _run_search(f, center, **kw):
    """Drive search_next on the score function f to the end; (best, values scored)."""
    scores: dict[float, float] = {}
    for _ in range(100):
        missing, best = search_next(center, scores, **kw)
        if not missing:
            return best, scores
        for v in missing:
            scores[v] = f(v)
    raise AssertionError("the search did not end")


def _bowl(at: float):
    return lambda x: (math.log2(x) - math.log2(at)) ** 2


SEARCH = {"factor": 2.0, "points": 3, "max_extend": 3, "refine": math.sqrt(2)}


def test_search_finds_the_best_grid_value_then_refines():
    # Optimum at 0.045: the x2 grid around 0.04 keeps 0.04, refinement tries 0.0283 and 0.0566.
    best, scores = _run_search(_bowl(0.045), 0.04, **SEARCH)
    assert sorted(scores) == [0.02, 0.0282843, 0.04, 0.0565685, 0.08]
    assert best == 0.04
    best, _ = _run_search(_bowl(0.055), 0.04, **SEARCH)  # nearer sqrt(2) x 0.04
    assert best == 0.0565685


def test_search_steps_past_an_edge_only_while_the_best_is_there():
    best, scores = _run_search(_bowl(0.3), 0.04, **SEARCH)
    grid = [v for v in scores if math.log2(v / 0.04) == round(math.log2(v / 0.04))]
    assert sorted(grid) == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64]  # up until 0.32 wins inside
    assert best == 0.32  # nearer 0.3 than 0.32 / sqrt(2) and 0.32 * sqrt(2)
    # At most max_extend steps: an optimum far above stays on the edge, refined there.
    best, scores = _run_search(_bowl(100.0), 0.04, **{**SEARCH, "max_extend": 2})
    assert max(scores) == 0.452548 and 0.64 not in scores and best == 0.452548
    # Downwards too.
    best, _ = _run_search(_bowl(0.004), 0.04, **SEARCH)
    assert best == pytest.approx(0.005 / math.sqrt(2), rel=1e-5)


def test_search_has_its_own_steps_on_each_side():
    # A ledger rescored another way: the old score stepped up twice (0.16, 0.32), the new one's
    # optimum lies far below the grid. The steps up do not spend those down.
    far_below = _bowl(0.0001)
    scores = {v: far_below(v) for v in (0.02, 0.04, 0.08, 0.16, 0.32)}
    best = None
    for _ in range(10):
        missing, best = search_next(0.04, scores, **{**SEARCH, "refine": 1.0})
        if not missing:
            break
        scores.update({v: far_below(v) for v in missing})
    assert best == min(scores) == 0.0025  # 3 steps down, as a fresh search takes


def test_search_all_diverged_goes_down_and_ties_go_to_the_smaller_value():
    best, scores = _run_search(lambda x: math.inf, 0.04, **SEARCH)
    assert 0.0025 in scores and 0.00125 not in scores  # 3 steps down, then refined
    assert best == min(scores) == pytest.approx(0.0025 / math.sqrt(2), rel=1e-5)
    best, _ = _run_search(lambda x: 1.0, 0.04, **{**SEARCH, "refine": 1.0, "max_extend": 0})
    assert best == 0.02


def test_search_one_point_grid_only_refines():
    best, scores = _run_search(_bowl(1.0), 0.04, factor=2.0, points=1, max_extend=3,
                               refine=math.sqrt(2))  # fmt: skip
    assert sorted(scores) == [0.0282843, 0.04, 0.0565685] and best == 0.0565685


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tune_seeds": (0,)}, "tune_seeds must be at least 2"),
        ({"final_seeds": (5, 5)}, "final_seeds must be at least 2 distinct"),
        ({"final_seeds": (1, 2)}, "must be fresh"),
        ({"grid_points": 2}, "grid_points must be an odd"),
        ({"grid_factor": 1.0}, "grid_factor must be a number > 1"),
        ({"refine_factor": 2.0}, "refine_factor must be in"),
        ({"max_extend": -1}, "max_extend must be"),
        ({"tune_aux": False}, "separate_aux=True needs tune_aux=True"),
        ({"grid_points": 1, "refine_factor": 1.0}, "a check needs grid_points >= 3"),
        ({"score": "best"}, "score must be one of final, lowest, got 'best'"),
    ],
)
def test_protocol_validation_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        TuneProtocol(**change).validate()


# ------------------------------------------------------------------ the protocol on a known surface

#: Synthetic final loss of (optimizer, lr, embeddings/head lr): bowls in log2 with known optima.
OPTIMA = {"adamw": (0.02, None), "muon": (0.04, 0.004), "normuon": (0.06, 0.016)}
#: "always": optimizers the fake training makes diverge at every setting.
DIVERGE: dict[str, frozenset[str]] = {"always": frozenset()}


#: Optimizers whose best lr the surface moves with width, as (d_model / 32) ** exponent.
WIDTH_EXPONENT: dict[str, float] = {}
#: Optimizers whose validation curve dips mid-run (step 5) to a bowl 1.0 lower than the final
#: one, centred on this lr instead: the lowest point and the final loss disagree on the best lr.
EARLY_OPTIMA: dict[str, float] = {}


def _loss(name: str, lr: float, aux: float | None, seed: int, d_model: int = 32,
          best_lr: float | None = None, floor: float = 2.0) -> float:  # fmt: skip
    own_lr, best_aux = OPTIMA[name]
    best_lr = (best_lr or own_lr) * (d_model / 32) ** WIDTH_EXPONENT.get(name, 0.0)
    value = floor + 0.1 * (math.log2(lr) - math.log2(best_lr)) ** 2 + 0.001 * seed
    if aux is not None:
        value += 0.05 * (math.log2(aux) - math.log2(best_aux)) ** 2
    return value


@pytest.fixture
def fake_training(monkeypatch):
    """Replace training by the synthetic surface (instant); records every training asked for.
    lr >= 0.5 diverges."""
    trained: list[tuple] = []

    def fake_train_all(runs, data, options, *, on_result, diverged_ok, held_out, **_):
        assert diverged_ok
        # The log names the split each final loss is read on: finals read the test half.
        assert held_out == ("test" if "test half" in data.source else "val")
        for run in runs:
            opt = run.spec.optimizers[run.name]
            aux = None if run.name == "adamw" else opt.adamw_lr
            trained.append((run.name, opt.lr, aux, run.seed, data.source))
            if opt.lr >= 0.5 or run.name in DIVERGE["always"]:
                on_result(run, Diverged("diverged: validation loss nan"))
                continue
            final = _loss(run.name, opt.lr, aux, run.seed, run.spec.model.d_model)
            middle = final + 0.5
            if run.name in EARLY_OPTIMA:
                middle = _loss(run.name, opt.lr, aux, run.seed, run.spec.model.d_model,
                               best_lr=EARLY_OPTIMA[run.name], floor=1.0)  # fmt: skip
            if "test half" in data.source:
                final += 0.01  # the test half reads a little higher
                middle += 0.01
            steps = [0, 5, 10]
            on_result(run, RunResult(
                optimizer=run.name, seed=run.seed, steps=10, final_val_loss=final,
                val_steps=steps, val_losses=[5.5, middle, final], val_times=[0, 1, 2],
                train_time_s=2.0, optimizer_time_s=0.5, optimizer_share=0.25,
                optimizer_state_bytes=0, tokens_per_s=1000.0, n_params=123,
                device="cpu", out_dir=str(run.run_dir)))  # fmt: skip

    monkeypatch.setattr(tune_mod, "_train_all", fake_train_all)
    return trained


def _specs(protocol, optimizers=("adamw", "muon", "normuon"), d_model=32, n_head=2, aux=0.008,
           lrs=None):  # fmt: skip
    cfg = get_preset("cpu-smoke")
    cfg.model.d_model, cfg.model.n_head, cfg.model.n_kv_head = d_model, n_head, n_head
    lrs = {"adamw": 0.01, "muon": 0.04, "normuon": 0.04, **(lrs or {})}
    cfg.optimizers["adamw"].lr = lrs["adamw"]
    for name in ("muon", "normuon"):
        cfg.optimizers[name].lr, cfg.optimizers[name].adamw_lr = lrs[name], aux
    return resolve_tune(cfg, None, optimizers=list(optimizers), protocol=protocol)


def test_protocol_choices_on_a_known_surface(tmp_path, fake_training):
    protocol = TuneProtocol()
    spec, final_spec, data, final_data = _specs(protocol)
    assert "validation half" in data.source and "test half" in final_data.source
    assert final_spec.seeds == (100, 101, 102) and spec.seeds == (0, 1)
    summary = run_tune(spec, final_spec, data, final_data, protocol, out=tmp_path / "t",
                       log=lambda *_: None)  # fmt: skip
    shared, separate = summary["settings"]["shared"], summary["settings"]["separate"]
    # AdamW: its own optimum; the matrix lrs refined at the shared embeddings/head lr.
    assert shared["adamw"]["lr"] == 0.02 and shared["adamw"]["adamw_lr"] is None
    assert shared["muon"]["lr"] == 0.04
    assert shared["normuon"]["lr"] == 0.0565685  # 0.06 lies nearer 0.04 x sqrt 2
    # Shared: the x2 value minimizing the judges' mean. Muon's optimum 0.004 and NorMuon's
    # 0.016 make log2-distances (1, 1) at 0.008 against (0, 2) at 0.004 and (2, 0) at 0.016:
    # 0.008 wins (1 + 1 < 0 + 4). Separate: each one's own.
    assert summary["shared_aux"] == 0.008
    assert shared["muon"]["adamw_lr"] == shared["normuon"]["adamw_lr"] == 0.008
    assert separate["muon"]["adamw_lr"] == 0.004 and separate["normuon"]["adamw_lr"] == 0.016
    # Tuning on the validation half with the tuning seeds; finals on the test half with fresh
    # seeds only.
    tuning = [t for t in fake_training if "validation half" in t[4]]
    finals = [t for t in fake_training if "test half" in t[4]]
    assert {t[3] for t in tuning} == {0, 1} and {t[3] for t in finals} == {100, 101, 102}
    # Every final setting trained once per seed: adamw (shared = separate), 2 x muon, 2 x normuon.
    assert len(finals) == 5 * 3 and len(set(finals)) == len(finals)
    # Each tuning point has both seeds, and no training ran twice.
    assert len(set(fake_training)) == len(fake_training) == summary["trainings"]
    # The ledger holds every training, one line each.
    lines = (tmp_path / "t" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == summary["trainings"]
    # The analysis: NorMuon's loss is known exactly from the surface.
    fair = summary["finals"]["shared"]["optimizers"]
    expect = [_loss("normuon", 0.0565685, 0.008, s) + 0.01 for s in (100, 101, 102)]
    assert fair["normuon"]["losses"] == pytest.approx(expect)
    assert set(summary["finals"]["shared"]["vs_muon"]) == {"normuon"}
    md = (tmp_path / "t" / "tune.md").read_text()
    assert "shared embeddings/head/gains lr" in md and "own embeddings/head/gains lr" in md


def test_resume_from_the_ledger_alone_trains_nothing_more(tmp_path, fake_training):
    protocol = TuneProtocol(separate_aux=False)
    specs = _specs(protocol)
    first = run_tune(*specs, protocol, out=tmp_path / "a", log=lambda *_: None)
    n = len(fake_training)
    # Another machine: only config.json and ledger.jsonl travel.
    (tmp_path / "b").mkdir()
    for name in ("config.json", "ledger.jsonl"):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    again = run_tune(*specs, protocol, out=tmp_path / "b", resume=True, log=lambda *_: None)
    assert len(fake_training) == n
    assert again["settings"] == first["settings"] and again["finals"] == first["finals"]
    # A ledger line cut by a kill (the last one) is dropped and that training done again.
    ledger = tmp_path / "b" / "ledger.jsonl"
    text = ledger.read_text()
    ledger.write_text(text[: text.rstrip("\n").rfind("\n") + 1] + '{"optimizer": "mu')
    run_tune(*specs, protocol, out=tmp_path / "b", resume=True, log=lambda *_: None)
    assert len(fake_training) == n + 1
    # A damaged line in the middle is an error naming the file and line.
    ledger.write_text("garbage\n" + text)
    with pytest.raises(ValueError, match="line 1 is not a ledger record"):
        run_tune(*specs, protocol, out=tmp_path / "b", resume=True, log=lambda *_: None)
    # More final seeds on resume: only their trainings are added.
    more = TuneProtocol(separate_aux=False, final_seeds=(100, 101, 102, 103, 104))
    before = len(fake_training)
    final = dataclasses.replace(specs[1], seeds=more.final_seeds)
    five = run_tune(specs[0], final, *specs[2:], more, out=tmp_path / "a", resume=True,
                    log=lambda *_: None)  # fmt: skip
    assert len(fake_training) == before + 3 * 2
    assert five["settings"] == first["settings"]
    assert five["finals"]["shared"]["optimizers"]["muon"]["seeds"] == [100, 101, 102, 103, 104]
    # Another protocol in the same folder is refused.
    with pytest.raises(ValueError, match="another config"):
        run_tune(*_specs(TuneProtocol(grid_points=5)), TuneProtocol(grid_points=5),
                 out=tmp_path / "a", resume=True, log=lambda *_: None)  # fmt: skip


def test_a_search_ending_on_its_edge_is_named_and_a_wider_resume_looks_beyond(
        tmp_path, monkeypatch, fake_training):  # fmt: skip
    # Both judges' embeddings/head optimum at 0.001, below the grid 0.004, 0.008, 0.016: with no
    # steps past the edge allowed, the search ends on 0.004, the lowest value it tried.
    monkeypatch.setitem(OPTIMA, "muon", (0.04, 0.001))
    monkeypatch.setitem(OPTIMA, "normuon", (0.06, 0.001))
    narrow = TuneProtocol(separate_aux=False, max_extend=0)
    summary = run_tune(*_specs(narrow), narrow, out=tmp_path / "e", log=lambda *_: None)
    assert summary["shared_aux"] == 0.004
    # NorMuon's optimum 0.06 also lies past its x2 grid (0.02, 0.04, 0.08): its search ends on
    # 0.08 (its sqrt 2 refinement then takes 0.0566, which is not an edge of a x2 search).
    assert search_edges(summary) == [SearchEdge("lr", "normuon", 0.08, "highest"),
                                     SearchEdge("aux", None, 0.004, "lowest")]
    md = (tmp_path / "e" / "tune.md").read_text()
    assert ("Searches that ended on their edge (a value beyond the best was not tried, so it may "
            "score better): normuon's lr search ended on its highest value, 0.08; the shared "
            "embeddings/head lr search ended on its lowest value, 0.004.") in md
    assert "(this run: 0); `--resume` with a larger one continues it." in md
    first = list(fake_training)
    report = ladder_report([summary])
    assert "| 0.0565685 (edge) | 0.004 (edge) |" in report and "(edge): the x2 search" in report
    # A narrower search on resume is refused: it could pass over values already trained.
    wider = dataclasses.replace(narrow, max_extend=3)
    run_tune(*_specs(wider), wider, out=tmp_path / "w", log=lambda *_: None)
    with pytest.raises(ValueError, match="--max-extend 0 is smaller than the 3"):
        run_tune(*_specs(narrow), narrow, out=tmp_path / "w", resume=True, log=lambda *_: None)
    # The first folder resumed with a wider search: the ledger's trainings stand, both searches
    # step on to their optima and bracket them, and the config records the new width.
    n = len(fake_training)
    again = run_tune(*_specs(wider), wider, out=tmp_path / "e", resume=True, log=lambda *_: None)
    assert again["shared_aux"] == 0.001 and search_edges(again) == []
    added = fake_training[n:]
    assert added and len(set(added)) == len(added) and not set(added) & set(first)
    saved = json.loads((tmp_path / "e" / "config.json").read_text())
    assert saved["protocol"]["max_extend"] == 3
    assert "ended on their edge" not in (tmp_path / "e" / "tune.md").read_text()


def test_search_edges_reads_each_search_apart():
    def run(name, lr, aux, loss):
        return {"optimizer": name, "lr": lr, "adamw_lr": aux, "final_loss": loss,
                "diverged": False}  # fmt: skip

    summary = {
        "settings": {"shared": {"adamw": {"lr": 0.0566}, "muon": {"lr": 0.04}}},
        "judges": ["muon"], "aux_start": 0.008, "shared_aux": 0.016,
        "tuning_runs": [
            # AdamW: best on the x2 grid's top (0.04), but its refinement tried 0.0566 above
            # it and that won: the top value tried is the best, an edge.
            run("adamw", 0.01, None, 2.3), run("adamw", 0.02, None, 2.2),
            run("adamw", 0.04, None, 2.1), run("adamw", 0.0283, None, 2.15),
            run("adamw", 0.0566, None, 2.05),
            # Muon at the starting embeddings/head lr: best 0.04 inside (0.02, 0.08).
            run("muon", 0.02, 0.008, 2.2), run("muon", 0.04, 0.008, 2.0),
            run("muon", 0.08, 0.008, 2.1),
            # The aux search at Muon's 0.04: 0.016 best, the highest tried.
            run("muon", 0.04, 0.004, 2.1), run("muon", 0.04, 0.016, 1.9),
            # The refinement at 0.016 brackets 0.04.
            run("muon", 0.0283, 0.016, 1.95), run("muon", 0.0566, 0.016, 1.97),
        ],
    }  # fmt: skip
    assert search_edges(summary) == [SearchEdge("lr", "adamw", 0.0566, "highest"),
                                     SearchEdge("aux", None, 0.016, "highest")]
    # A diverged seed scores its point infinite: Muon's 0.08, diverged in one seed, is not
    # its best; at a finite score it would be, an edge.
    summary["tuning_runs"].append(run("muon", 0.08, 0.008, 1.5) | {"diverged": True})
    assert all(e.optimizer != "muon" for e in search_edges(summary))
    summary["tuning_runs"][-1]["diverged"] = False
    assert SearchEdge("lr", "muon", 0.08, "highest") in search_edges(summary)
    # A value tried beyond the aux value removes that edge; a one-point search has none.
    summary["tuning_runs"].append(run("muon", 0.04, 0.032, 2.0))
    assert all(e.search != "aux" for e in search_edges(summary))
    summary["tuning_runs"] = [r for r in summary["tuning_runs"] if r["optimizer"] != "adamw"]
    summary["tuning_runs"].append(run("adamw", 0.0566, None, 2.0))
    assert all(e.optimizer != "adamw" for e in search_edges(summary))


def test_divergence_scores_infinite_and_the_search_moves_away(tmp_path, fake_training):
    protocol = TuneProtocol(separate_aux=False)
    cfg_specs = _specs(protocol)
    spec = cfg_specs[0].with_options("muon", lr=0.5)  # the grid 0.25, 0.5, 1: two diverge
    final = cfg_specs[1].with_options("muon", lr=0.5)
    summary = run_tune(spec, final, *cfg_specs[2:], protocol, out=tmp_path / "d",
                       log=lambda *_: None)  # fmt: skip
    muon_runs = [r for r in summary["tuning_runs"] if r["optimizer"] == "muon"]
    assert any(r["diverged"] for r in muon_runs)
    # Three steps down (0.125, 0.0625, 0.03125), then refined: 0.03125 * sqrt 2 is nearest 0.04.
    assert summary["settings"]["shared"]["muon"]["lr"] == 0.0441942
    assert "diverged" in (tmp_path / "d" / "tune.md").read_text()


def test_a_judge_that_diverges_everywhere_does_not_choose_the_shared_lr(tmp_path, monkeypatch,
                                                                        fake_training):
    # Muon diverges at every setting: NorMuon alone chooses the shared embeddings/head lr (its
    # own optimum, 0.016), instead of the smallest value tried (every joint score infinite).
    monkeypatch.setitem(DIVERGE, "always", frozenset({"muon"}))
    protocol = TuneProtocol(separate_aux=False)
    summary = run_tune(*_specs(protocol), protocol, out=tmp_path / "j", log=lambda *_: None)
    assert summary["judges"] == ["normuon"]
    assert summary["shared_aux"] == 0.016


def test_analysis_statistics_by_hand():
    def rec(seed, final, curve):
        return {"seed": seed, "diverged": False, "final_loss": final, "val_steps": [0, 10, 20],
                "val_losses": curve}  # fmt: skip

    runs = {
        "adamw": [rec(1, 3.0, [5, 4, 3.0]), rec(2, 3.2, [5, 4, 3.2])],
        "muon": [rec(1, 2.0, [5, 3, 2.0]), rec(2, 2.2, [5, 3, 2.2])],
        "normuon": [rec(1, 1.9, [5, 2.1, 1.9]), rec(2, 2.0, [5, 2.1, 2.0])],
    }
    a = analyse_finals(runs)
    # Muon's mean final 2.1: Muon's mean curve (5, 3, 2.1) reaches it at step 20; NorMuon's
    # (5, 2.1, 1.95) at step 10: a 50% saving.
    vs = a["optimizers"]["normuon"]["vs_muon"]
    assert vs["target"] == pytest.approx(2.1) and vs["steps"] == pytest.approx(10.0)
    assert vs["ref_steps"] == pytest.approx(20.0) and vs["saving"] == pytest.approx(0.5)
    paired = a["vs_muon"]["normuon"]["paired"]  # differences -0.1 and -0.2
    assert paired["mean_diff"] == pytest.approx(-0.15) and paired["df"] == 1
    assert a["optimizers"]["muon"]["mean"] == pytest.approx(2.1)
    # AdamW's mean final 3.1: its own curve reaches it at 10 + 10 * (4 - 3.1) / (4 - 3.1) = 20.
    assert a["optimizers"]["muon"]["vs_adamw"]["ref_steps"] == pytest.approx(20.0)


def test_on_repeated_data_the_tables_show_where_curves_bottom_out(tmp_path, fake_training):
    protocol = TuneProtocol(separate_aux=False)
    summary = run_tune(*_specs(protocol), protocol, out=tmp_path / "t", log=lambda *_: None)
    assert summary["budget"]["passes"] < 1
    assert "lowest during training" not in tune_tables(summary)
    # Read three times, NorMuon's test curve falls to 1.2 at step 5 and climbs back to its final
    # loss; AdamW's still falls at its last step.
    summary["budget"]["passes"] = 3.0
    fair = summary["finals"]["shared"]["optimizers"]
    fair["normuon"]["val_mean"] = [5.5, 1.2, fair["normuon"]["mean"]]
    text = tune_tables(summary)
    header = next(r for r in text.splitlines() if r.startswith("| optimizer | lr | emb/head"))
    assert "(mean ± 95% CI) | lowest during training (step) | saving vs AdamW" in header
    row = next(r for r in text.splitlines() if r.startswith("| normuon | "))
    assert row.split(" | ")[5] == "1.2000 (5)"
    row = next(r for r in text.splitlines() if r.startswith("| adamw | "))
    assert row.split(" | ")[5] == f"{fair['adamw']['val_mean'][-1]:.4f} (10)"
    assert text.count("On repeated data the final loss also counts") == 1
    # The ladder report gives the same cells in a table of its own, for such rungs only.
    ladder = ladder_report([summary])
    row = next(r for r in ladder.splitlines() if "| cpu-smoke | 3.00 | " in r)
    assert row.endswith(f"| {fair['adamw']['val_mean'][-1]:.4f} (10) | "
                        f"{fair['muon']['val_mean'][-1]:.4f} (10) | 1.2000 (5) |")
    summary["budget"]["passes"] = 0.5
    assert "lowest (step)" not in ladder_report([summary])


def test_scoring_by_the_lowest_point_tunes_for_early_stopping_and_rescores_a_ledger(
        tmp_path, monkeypatch, fake_training):  # fmt: skip
    # Muon's curve is lowest mid-run at lr 0.16 (four times its final optimum, 0.04).
    monkeypatch.setitem(EARLY_OPTIMA, "muon", 0.16)
    final = TuneProtocol(separate_aux=False)
    lowest = TuneProtocol(separate_aux=False, score="lowest")
    by_final = run_tune(*_specs(final), final, out=tmp_path / "a", log=lambda *_: None)
    assert by_final["settings"]["shared"]["muon"]["lr"] == 0.04
    n = len(fake_training)
    fresh = run_tune(*_specs(lowest), lowest, out=tmp_path / "b", log=lambda *_: None)
    muon = fresh["settings"]["shared"]["muon"]
    # The x2 search steps up past its grid (0.02, 0.04, 0.08) to 0.16, brackets it with 0.32,
    # and the refinement keeps it; the score is the mean of the two seeds' lowest points.
    assert muon["lr"] == 0.16
    expect = [_loss("muon", 0.16, fresh["shared_aux"], s, best_lr=0.16, floor=1.0)
              for s in (0, 1)]  # fmt: skip
    assert muon["validation_score"] == pytest.approx(sum(expect) / 2)
    # NorMuon's curve has no dip: its lowest point is its final loss, so its setting stays.
    assert fresh["settings"]["shared"]["normuon"] == {
        **by_final["settings"]["shared"]["normuon"],
        "validation_score": fresh["settings"]["shared"]["normuon"]["validation_score"]}
    runs = sorted((r["seed"], r["lowest_loss"]) for r in fresh["tuning_runs"]
                  if r["optimizer"] == "muon" and r["lr"] == 0.16
                  and r["adamw_lr"] == muon["adamw_lr"])  # fmt: skip
    assert [loss for _, loss in runs] == pytest.approx(expect)
    text = tune_tables(fresh)
    assert "scored each seed by the lowest point" in text
    assert "| seeds' lowest losses | score |" in text
    # The lowest-point column shows though the text was read less than once.
    assert fresh["budget"]["passes"] < 1 and "lowest during training (step)" in text
    assert "On repeated data" not in text
    # Rescoring: the first folder resumed with --score lowest keeps every training it has and
    # trains only what the new searches ask for, to the same settings as the fresh run.
    trained_fresh = len(fake_training) - n
    before = len(fake_training)
    again = run_tune(*_specs(lowest), lowest, out=tmp_path / "a", resume=True,
                     log=lambda *_: None)  # fmt: skip
    assert again["settings"] == fresh["settings"]
    assert 0 < len(fake_training) - before < trained_fresh
    assert json.loads((tmp_path / "a" / "config.json").read_text())["protocol"]["score"] == (
        "lowest")
    # A width sweep does not mix scores: the two summaries are two groups, not one point twice.
    report = transfer_report([by_final, again])
    assert report.count("scored by each curve's lowest point") == 1
    lowest_group = report.split("scored by each curve's lowest point")[1]
    assert "| muon | 0.16 | **" in lowest_group  # the best of the lowest-point scores
    # The ladder tables mark a rung tuned by the lowest point, and keep it out of the lr spread
    # of the rungs tuned by the final loss.
    ladder = ladder_report([by_final, again])
    assert "| cpu-smoke (`--score lowest`) |" in ladder
    assert "(`--score lowest`): tuned lr max/min" not in ladder


def test_ladder_report_tables_and_figure(tmp_path, fake_training):
    protocol = TuneProtocol(separate_aux=False)
    summary = run_tune(*_specs(protocol), protocol, out=tmp_path / "t", log=lambda *_: None)
    other = json.loads(json.dumps(summary))
    other["n_params"], other["preset"] = 1234, "bigger"
    text = ladder_report([summary, other], plot=tmp_path / "ladder.png")
    rows = [r for r in text.splitlines() if r.startswith("| embedded Shakespeare")]
    assert len(rows) == 4  # two summaries, two tables
    other_lr = other["settings"]["shared"]["normuon"]
    assert "tuned lr max/min across 2 sizes: adamw 1.00x, muon 1.00x, normuon 1.00x" in text
    other_lr["lr"] *= 2
    assert "normuon 2.00x" in ladder_report([summary, other])
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ learning-rate transfer


def test_parabola_vertex_recovers_a_quadratic_minimum_and_refuses_without_a_bracket():
    def bowl(lrs, best):  # exactly quadratic in log2 lr: any three points give its vertex
        return {lr: 1.0 + (math.log2(lr) - math.log2(best)) ** 2 for lr in lrs}

    # Uneven spacing (x2 grid plus a sqrt 2 refinement point) still finds it exactly.
    assert parabola_vertex(bowl([0.01, 0.02, 0.0282843, 0.04, 0.08], 0.03)) == pytest.approx(0.03)
    assert parabola_vertex(bowl([0.01, 0.02, 0.04], 0.015)) == pytest.approx(0.015)
    assert parabola_vertex(bowl([0.01, 0.02, 0.04], 0.005)) is None  # best on the edge
    assert parabola_vertex({0.01: 2.0, 0.02: 1.0, 0.04: math.inf}) is None  # a neighbour diverged
    assert parabola_vertex({0.01: 2.0, 0.02: 1.0}) is None  # two points
    # A tie: the smaller lr is the best, and the vertex lies halfway to the other (in log2).
    assert parabola_vertex({0.01: 2.0, 0.02: 1.0, 0.04: 1.0}) == pytest.approx(0.02 * 2**0.5)
    assert parabola_vertex({0.01: 1.0, 0.02: 1.0, 0.04: 1.0}) is None  # flat: no minimum


def test_scaling_exponent_is_the_log_log_slope():
    widths = [16, 32, 64, 128]
    assert scaling_exponent(widths, [0.1 * (w / 16) ** -0.5 for w in widths]) == pytest.approx(
        -0.5)
    assert scaling_exponent(widths, [0.02] * 4) == pytest.approx(0.0)
    assert scaling_exponent([32, 32], [0.01, 0.02]) is None


def _sweep(tmp_path, widths=(16, 32, 64), aux=0.032, optimizers=("adamw", "muon", "normuon")):
    """Summaries of a width sweep on the synthetic surface, head dimension 16."""
    protocol = TuneProtocol(separate_aux=False)
    return [run_tune(*_specs(protocol, optimizers, d_model=w, n_head=w // 16, aux=aux),
                     protocol, out=tmp_path / f"w{w}-{aux}", log=lambda *_: None)
            for w in widths]  # fmt: skip


def test_transfer_report_finds_the_width_rule_of_a_known_surface(tmp_path, fake_training,
                                                                 monkeypatch):
    # On the synthetic surface Muon's best lr stays put and NorMuon's falls as width^-0.75;
    # a width sweep through the real protocol must read exponents 0 and -0.75 off the
    # vertices (the best grid values, 0.08, 0.08, 0.04, would say -0.5).
    monkeypatch.setitem(WIDTH_EXPONENT, "normuon", -0.75)
    summaries = _sweep(tmp_path)
    assert summaries[0]["model"] == {"n_layer": 2, "d_model": 16, "n_head": 1}
    assert summaries[0]["update_scale"] == {"muon": "preserve_norm", "normuon": "preserve_norm"}
    # The searches start at embeddings/head lr 0.032; the shared value moves to 0.008.
    assert {s["aux_start"] for s in summaries} == {0.032}
    assert {s["shared_aux"] for s in summaries} == {0.008}
    text = transfer_report(summaries[::-1], plot=tmp_path / "transfer.png")
    assert ("**embedded Shakespeare, 2 layers, head dim 16, 40 steps; update scale: muon "
            "`preserve_norm`, normuon `preserve_norm`.**") in text
    assert "| optimizer | lr | width 16 | width 32 | width 64 |" in text
    assert "muon: best lr max/min 1.00x, vertices ∝ width^+0.00 (3 points)" in text
    assert "normuon: best lr max/min 2.00x, vertices ∝ width^-0.75 (3 points)" in text
    assert "| adamw |" not in text and "adamw best" not in text  # AdamW has no matrix lr
    rows = [r for r in text.splitlines() if r.startswith("| 2 x ")]
    # NorMuon at width 16: optimum 0.06 x 2^0.75 = 0.1009 between grid values 0.08 and 0.16;
    # the search at the starting 0.032 is read, not the refinement at the shared 0.008.
    assert rows[0].startswith("| 2 x 16 (1) | 40 | ")
    assert "| 0.032 | 0.04 (0.04) | 0.08 (0.101) | 0.008 |" in rows[0]
    assert "| 0.04 (0.04) | 0.04 (0.0357) |" in rows[2]  # width 64: 0.06 / 2^0.75
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"


def test_transfer_report_reads_each_search_apart_and_refuses_mixed_sweeps(
        tmp_path, fake_training):  # fmt: skip
    summaries = _sweep(tmp_path, optimizers=("muon", "normuon"))
    # Started at the shared value, a search's table leaves the sqrt 2 refinement out.
    [same] = _sweep(tmp_path, widths=(16,), aux=0.008, optimizers=("muon", "normuon"))
    assert any(r["phase"] == "refine" and r["adamw_lr"] == 0.008 for r in same["tuning_runs"])
    search = transfer_report([same]).split("\n\n")[1]
    assert "| muon | 0.0282843 |" not in search and "| muon | 0.04 |" in search
    # Two summaries at one point of a sweep are refused.
    with pytest.raises(ValueError, match="two summaries of one sweep at width 16"):
        transfer_report([summaries[0], same])
    # Another depth, update scale or head dimension is another sweep, never one table.
    deeper = json.loads(json.dumps(summaries[1]))
    deeper["model"]["n_layer"] = 3
    rescaled = json.loads(json.dumps(summaries[1]))
    rescaled["update_scale"]["normuon"] = "adam_rms"
    text = transfer_report(summaries + [deeper, rescaled])
    assert text.count("Along width") == 3 and "normuon `adam_rms`" in text
    assert "3 layers, head dim 16" in text
    # A search whose best lies on its edge is marked and has no vertex; one that only
    # diverged has no best, and the exponent names the points it could not use.
    edged = [json.loads(json.dumps(s)) for s in summaries]
    runs = edged[0]["tuning_runs"]
    edged[0]["tuning_runs"] = [r for r in runs if not (r["optimizer"] == "muon"
                                                       and r["lr"] < 0.04)]  # fmt: skip
    for r in edged[1]["tuning_runs"]:
        if r["optimizer"] == "normuon":
            r["diverged"], r["final_loss"] = True, None
    text = transfer_report(edged, plot=tmp_path / "edged.png")
    rows = [r for r in text.splitlines() if r.startswith("| 2 x ")]
    assert "| 0.04 (edge) |" in rows[0]
    assert "| — |" in rows[1].split("| 0.032 |")[1]  # NorMuon's best at width 32
    assert "muon: best lr max/min 1.00x, vertices ∝ width^+0.00 (2 points) (no vertex at " \
           "width 16:" in text
    assert "normuon: best lr max/min 1.00x, vertices ∝ width^+0.00 (2 points) (no vertex at " \
           "width 32:" in text
    assert (tmp_path / "edged.png").read_bytes()[:4] == b"\x89PNG"  # a curve left out
    # Along another axis the same summaries hold the width: one point per sweep.
    steps_text = transfer_report(summaries, axis="steps")
    assert steps_text.count("| optimizer | lr | steps 40 |") == 3
    assert "embedded Shakespeare, 2 layers, width 32, 2 heads" in steps_text
    with pytest.raises(ValueError, match="axis must be one of width, depth, steps, got 'heads'"):
        transfer_report(summaries, axis="heads")
    # A summary without the model shape (written before the field existed) is named.
    old = json.loads(json.dumps(summaries[0]))
    del old["model"]
    with pytest.raises(ValueError, match="records no model shape.*--resume"):
        transfer_report([old])


def test_a_check_carries_settings_over_and_joins_the_sweep(tmp_path, fake_training,
                                                           monkeypatch):  # fmt: skip
    # NorMuon's optimum falls as width^-0.75, Muon's stays at 0.04, AdamW's at 0.02. Full
    # searches at widths 16 and 32; at width 64 a sqrt 2 check around the width-32 settings.
    monkeypatch.setitem(WIDTH_EXPONENT, "normuon", -0.75)
    full = _sweep(tmp_path, widths=(16, 32))
    tuned = {n: st["lr"] for n, st in full[1]["settings"]["shared"].items()}
    assert tuned == {"adamw": 0.02, "muon": 0.04, "normuon": 0.0565685}
    check = TuneProtocol.check()
    assert (check.grid_factor, check.refine_factor, check.tune_aux, check.separate_aux) == (
        math.sqrt(2), 1.0, False, False)
    n = len(fake_training)
    summary = run_tune(*_specs(check, d_model=64, n_head=4, aux=0.008, lrs=tuned), check,
                       out=tmp_path / "check", log=lambda *_: None)  # fmt: skip
    trained = fake_training[n:]
    tuning = [t for t in trained if "validation half" in t[4]]
    # Every matrix run at the carried embeddings/head lr: no search of it, no refinement.
    assert {t[2] for t in tuning} == {None, 0.008} and summary["shared_aux"] == 0.008
    assert {r["phase"] for r in summary["tuning_runs"]} == {"lr"}
    lrs = {name: sorted({t[1] for t in tuning if t[0] == name}) for name in tuned}
    # AdamW and Muon: their value and one sqrt 2 step either side, the value held. NorMuon
    # (optimum 0.06 / 2^0.75 = 0.0357): 0.04 is the check's lowest and best, so it steps once
    # more, to 0.0282842, which scores worse. (Steps of sqrt 2 from the carried 0.0565685, each
    # rounded to 6 digits: 0.0799999, not the 0.08 a search centred on 0.04 reaches.)
    assert lrs == {"adamw": [0.0141421, 0.02, 0.0282843], "muon": [0.0282843, 0.04, 0.0565685],
                   "normuon": [0.0282842, 0.04, 0.0565685, 0.0799999]}
    assert len(tuning) == 2 * (3 + 3 + 4)
    shared = summary["settings"]["shared"]
    assert {n: st["lr"] for n, st in shared.items()} == {
        "adamw": 0.02, "muon": 0.04, "normuon": 0.04}
    assert list(summary["settings"]) == ["shared"] and search_edges(summary) == []
    md = (tmp_path / "check" / "tune.md").read_text()
    assert "shared embeddings/head lr 0.008 (carried over, not searched)" in md
    # NorMuon's move: 0.1 x ((log2 0.0565685/0.0357)^2 - (log2 0.04/0.0357)^2) lower, per the
    # surface (the seeds' offsets cancel).
    assert ("A sqrt 2 check of carried-over settings (`--check`): each lr scored at its "
            "configured value and one grid step either side, the embeddings/head lr kept. "
            "adamw 0.02 held; muon 0.04 held; normuon 0.0565685 moved to 0.04 (x0.707, scoring "
            "0.0415 lower).") in md
    # The checked width joins the full searches' sweep, its search marked; its vertices count.
    text = transfer_report([*full, summary])
    assert text.count("Along width") == 1
    rows = [r for r in text.splitlines() if r.startswith("| 2 x ")]
    assert "| x2 | 0.032 |" in rows[0] and "| sqrt 2 check | 0.008 |" in rows[2]
    assert "muon: best lr max/min 1.00x, vertices ∝ width^+0.00 (3 points)" in text
    assert "normuon: best lr max/min 2.00x, vertices ∝ width^-0.7" in text
    # The check's 0.0799999 shares the full searches' row of 0.08: one row, every width scored.
    assert "| normuon | 0.0799999 |" not in text
    [row] = [r for r in text.splitlines() if r.startswith("| normuon | 0.08 |")]
    assert row.count("·") == 0 and row.count("|") == 6


def test_a_check_that_diverges_or_trains_adamw_alone_says_so(tmp_path, monkeypatch,
                                                             fake_training):  # fmt: skip
    # NorMuon diverges at every lr: its verdict says so (no "moved", no score difference).
    monkeypatch.setitem(DIVERGE, "always", frozenset({"normuon"}))
    check = TuneProtocol.check()
    summary = run_tune(*_specs(check), check, out=tmp_path / "d", log=lambda *_: None)
    md = (tmp_path / "d" / "tune.md").read_text()
    assert "adamw 0.01 moved to 0.02 (x2, scoring " in md
    assert "muon 0.04 held; normuon 0.04 diverged at every lr tried." in md and "nan" not in md
    # Five grid points: two steps either side.
    wide = TuneProtocol.check(grid_points=5)
    run_tune(*_specs(wide), wide, out=tmp_path / "w", log=lambda *_: None)
    text = (tmp_path / "w" / "tune.md").read_text()
    assert "its configured value and 2 grid steps either side" in text
    # AdamW alone: one table, and no embeddings/head lr to speak of.
    alone = run_tune(*_specs(check, optimizers=("adamw",)), check, out=tmp_path / "a",
                     log=lambda *_: None)  # fmt: skip
    assert list(alone["settings"]) == ["shared"] and alone["shared_aux"] is None
    assert "shared embeddings/head lr — (no matrix optimizer)" in alone["tables"]
    assert summary["settings"]["shared"]["normuon"]["validation_score"] == math.inf


def test_a_folder_from_before_a_protocol_field_resumes(tmp_path, fake_training):
    protocol = TuneProtocol(separate_aux=False)
    specs = _specs(protocol)
    run_tune(*specs, protocol, out=tmp_path / "a", log=lambda *_: None)
    n = len(fake_training)
    config = tmp_path / "a" / "config.json"
    saved = json.loads(config.read_text())
    del saved["protocol"]["tune_aux"]  # as written before the field existed
    config.write_text(json.dumps(saved))
    run_tune(*specs, protocol, out=tmp_path / "a", resume=True, log=lambda *_: None)
    assert len(fake_training) == n
    assert json.loads(config.read_text())["protocol"]["tune_aux"] is True
    # Not when the missing field's default differs from what the resume asks for.
    config.write_text(json.dumps(saved))
    fixed = TuneProtocol(separate_aux=False, tune_aux=False)
    with pytest.raises(ValueError, match="another config"):
        run_tune(*_specs(fixed), fixed, out=tmp_path / "a", resume=True, log=lambda *_: None)


def test_tune_check_command(tmp_path, capsys, monkeypatch, fake_training):
    # Muon's curve is lowest mid-run at 0.08, twice its final optimum (the carried 0.04).
    monkeypatch.setitem(EARLY_OPTIMA, "muon", 0.08)
    out = tmp_path / "check"
    args = ["tune", "--preset", "cpu-smoke", "--check", "--optimizers", "muon,normuon",
            "--set", "muon.lr=0.04", "--set", "normuon.lr=0.06", "--set",
            "muon.adamw_lr=0.004", "--set", "normuon.adamw_lr=0.016", "--seeds", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--score", "lowest"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["tune_aux"] is False and summary["lr_start"] == {
        "muon": 0.04, "normuon": 0.06}
    # NorMuon's carried value is its optimum: 3 values; Muon's check steps on twice to 0.08 and
    # brackets it with 0.113; 2 seeds each, then 2 x 2 finals.
    assert summary["trainings"] == (3 + 5) * 2 + 2 * 2
    printed = capsys.readouterr().out
    # Scored by the lowest point, Muon's check moves two sqrt 2 steps up; NorMuon's curve has
    # no dip, so its check holds.
    assert "muon 0.04 moved to 0.08 (x2, scoring 0.1000 lower)" in printed
    assert "normuon 0.06 held." in printed
    assert summary["protocol"]["score"] == "lowest"
    # One embeddings/head lr for both: NorMuon's own setting is named as unused.
    assert ("note: every matrix optimizer trains at embeddings/head lr 0.004 (muon.adamw_lr); "
            "normuon.adamw_lr=0.016 is not used") in printed
    assert {r["adamw_lr"] for r in summary["tuning_runs"]} == {0.004}
    # A resume that names no --score keeps the folder's (and trains nothing); one that names
    # another rescores: Muon's check returns to 0.04, whose final seeds are all it trains.
    n = len(fake_training)
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["protocol"]["score"] == "lowest"
    assert len(fake_training) == n
    assert main([*args, "--resume", "--score", "final"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["score"] == "final"
    assert summary["settings"]["shared"]["muon"]["lr"] == 0.04
    assert fake_training[n:] == [("muon", 0.04, 0.004, s, fake_training[-1][4]) for s in
                                 (100, 101)]  # fmt: skip
    # What a folder ran with: "final" from before the field, None without a config.json.
    config = json.loads((out / "config.json").read_text())
    del config["protocol"]["score"]
    (out / "config.json").write_text(json.dumps(config))
    assert tune_mod.saved_score(out) == "final"
    assert tune_mod.saved_score(tmp_path / "nowhere") is None


# ------------------------------------------------------------------ the command, for real


def test_tune_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", "--preset", "cpu-smoke", "--steps", "4", "--set", "train.val_every=2",
            "--grid-points", "1", "--max-extend", "0", "--seeds", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "Final test loss, shared embeddings/head/gains lr" in printed
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    # grid of 1 point: AdamW 3 values (1 + refinement), each matrix optimizer 1 + 2 refinement
    # values, 2 tuning seeds each; 3 optimizers x 2 final seeds.
    assert summary["trainings"] == 3 * 3 * 2 + 3 * 2
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == summary["trainings"]
    assert all(math.isfinite(r["final_loss"]) and r["steps"] == 4 for r in ledger)
    assert {r["seed"] for r in ledger if r["split"] == "test"} == {100, 101}
    assert "test half" in summary["data"]
    # Re-running without --resume refuses the folder; with it, nothing is trained again.
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["finals"] == summary["finals"]
    # The ladder report of the summary.
    assert main(["tune", "--report", str(out / "summary.json")]) == 0
    assert "NorMuon saving vs Muon" in capsys.readouterr().out
    # Read as a width sweep (one width here): the search scores and the best lr per width.
    assert main(["tune", "--report", str(out / "summary.json"), "--transfer"]) == 0
    assert "search by lr and width" in capsys.readouterr().out
    assert main(["tune", "--report", str(out / "summary.json"), "--transfer", "steps"]) == 0
    assert "search by lr and steps" in capsys.readouterr().out
    # Files that are not tune summaries, or too old for a transfer report, are named.
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert main(["tune", "--report", str(tmp_path / "other.json")]) == 2
    assert "other.json is not a summary.json of normuon tune" in capsys.readouterr().err
    old = json.loads((out / "summary.json").read_text())
    del old["model"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["tune", "--report", str(tmp_path / "old.json"), "--transfer"]) == 2
    assert "old.json records no model shape" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tune-seeds", "1"], "expected an integer >= 2"),
        (["--first-seed", "1"], "must be fresh"),
        (["--set", "train.val_fraction=0.3"], "val_fraction"),
        (["--optimizers", "adamw,sgd"], "sgd"),
        (["--report", "/nonexistent/summary.json"], "no such summary file"),
        (["--transfer"], "--transfer only goes with --report"),
        (["--plot", "x.png"], "--plot only goes with --report"),
    ],
)
def test_tune_command_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if args[0] == "--tune-seeds" else contextlib.nullcontext():
        code = main(["tune", "--preset", "cpu-smoke", "--out", str(tmp_path / "x"), *args])
        assert code == 2
    assert message in capsys.readouterr().err

"""Reporting statistics (checked against closed forms) and the plotting-free path."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from normuon.harness.report import (
    mean_ci,
    neuron_table,
    paired_t_test,
    student_t_cdf,
    sweep_table,
    welch_t_test,
)


@pytest.mark.parametrize("t", [-7.0, -1.3, 0.0, 0.4, 2.5, 30.0])
def test_student_t_cdf_matches_closed_forms(t):
    # df = 1 is the Cauchy distribution, df = 2 has a closed form too.
    assert student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # Large df: the normal distribution.
    normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert student_t_cdf(t, 1e7) == pytest.approx(normal, abs=1e-6)


def test_mean_ci_uses_the_t_quantile():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # sd 1, n 3, t_{0.975, 2} = 4.302653 (2-dof closed form: t = sqrt(2) q / sqrt(1 - q^2)
    # with q = 2 * 0.975 - 1).
    q = 0.95
    t975 = math.sqrt(2) * q / math.sqrt(1 - q * q)
    assert mean == 2.0 and half == pytest.approx(t975 / math.sqrt(3), rel=1e-9)
    assert math.isnan(mean_ci([5.0])[1])


def test_welch_and_paired_t_tests():
    w = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert w["t"] == pytest.approx(-3 / math.sqrt(2 / 3))
    assert w["df"] == pytest.approx(4.0)
    # Two-sided p of |t| with 4 dof: closed form 1 - I(4/(4+t^2); 2, 1/2) = ... checked
    # through the cdf identity below and against the tabulated value 0.0213.
    assert w["p"] == pytest.approx(2 * (1 - student_t_cdf(abs(w["t"]), 4)))
    assert w["p"] == pytest.approx(0.0213, abs=2e-4)
    # Unequal variances: Welch-Satterthwaite degrees of freedom below n1 + n2 - 2.
    w2 = welch_t_test([1.0, 1.1, 0.9, 1.0], [2.0, 4.0, 3.0, 5.0])
    assert 3 <= w2["df"] < 6
    p = paired_t_test([1.0, 2.0, 3.5], [0.5, 1.0, 2.0])
    assert p["mean_diff"] == pytest.approx(1.0) and p["df"] == 2
    assert p["t"] == pytest.approx(1.0 / (0.5 / math.sqrt(3)))
    with pytest.raises(ValueError):
        welch_t_test([1.0], [2.0, 3.0])
    with pytest.raises(ValueError):
        paired_t_test([1.0, 2.0], [1.0])


def test_sweep_table_marks_the_best():
    table, best = sweep_table({"adamw": [{"lr": 0.02, "final_val_loss": 2.0},
                                         {"lr": 0.01, "final_val_loss": 1.5}]})  # fmt: skip
    assert best == {"adamw": 0.01}
    assert table.splitlines()[2] == "| adamw | 0.01 | 1.5000 | **best** |"


def test_compare_prints_results_before_it_needs_matplotlib(tmp_path):
    # matplotlib made unimportable: the table and results.json still come, then one note
    # naming the extra that installs plotting, and exit status 0.
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from normuon.cli import main\n"
        f"sys.exit(main(['compare', '--preset', 'cpu-smoke', '--steps', '4', '--no-progress', "
        f"'--out', {str(tmp_path / 'cmp')!r}]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "| optimizer | final val loss (mean ± 95% CI) |" in done.stdout
    assert "(1 seed)" in done.stdout and "±" not in done.stdout.split("(mean ± 95% CI)")[1]
    assert "normuon[harness]" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "cmp" / "results.json").is_file()
    assert not (tmp_path / "cmp" / "loss.png").exists()


def test_fair_comparison_example_end_to_end(tmp_path):
    """The ladder example: normuon tune per rung (here one, tiny), a Gutenberg file trimmed to
    the book, then the ladder report."""
    script = pathlib.Path(__file__).parents[1] / "examples" / "fair_comparison.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "fair"
    book = "".join(f"Chapter {i}. Alice was beginning to get very tired.\n" for i in range(400))
    corpus = tmp_path / "alice.txt"
    corpus.write_text("The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK "
                      f"ALICE ***\n{book}\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\nlicence")
    run = subprocess.run([sys.executable, str(script), "--corpus", str(corpus), "--sizes", "xs",
                          "--tokens-per-param", "0", "--jobs", "1", "--out", str(out), "--",
                          "--steps", "3", "--grid-points", "1", "--max-extend", "0",
                          "--seeds", "2", "--set", "train.val_every=3",
                          "--set", "train.val_batches=1"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "alice.txt").read_text() == book.strip()  # header and licence dropped
    summary = json.loads((out / "xs" / "summary.json").read_text())
    assert summary["preset"] == "ladder-xs" and summary["budget"]["steps"] == 3
    assert str(out / "alice.txt") in summary["data"]
    report = subprocess.run([sys.executable, str(script), "--report",
                             str(out / "xs" / "summary.json"), "--plot",
                             str(tmp_path / "ladder.png")], capture_output=True, text=True,
                            env=env, timeout=120)  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    assert "NorMuon saving vs Muon" in report.stdout and "| alice.txt |" in report.stdout
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"


def test_ladder_presets_are_the_experiment_configs():
    # The presets carry the recipe of docs/results.md (batch 16 x 64, 300 steps, 20 warmup
    # steps, half the run decaying, clipping at 1.0; AdamW decays its matrices by 0.1) and the
    # lrs the earlier protocol tuned; the -20tpp rungs the same recipe, longer.
    from normuon.harness.config import ABLATIONS, LADDER_SHAPES, LADDER_TUNED, get_preset

    for size, (n_layer, d_model, n_head) in LADDER_SHAPES.items():
        preset = get_preset(f"ladder-{size}")
        m, t = preset.model, preset.train
        assert (m.n_layer, m.d_model, m.n_head, m.n_kv_head) == (n_layer, d_model, n_head, n_head)
        assert (t.batch_size, t.seq_len, t.steps, t.warmup_steps) == (16, 64, 300, 20)
        assert (t.cooldown_frac, t.grad_clip, t.schedule) == (0.5, 1.0, "wsd")
        long = get_preset(f"ladder-{size}-20tpp")
        assert long.model == m and long.train.tokens_per_param == 20.0
        assert dataclasses.replace(long.train, steps=300, tokens_per_param=0.0,
                                   val_every=20, log_every=20, checkpoint_every=0) == t
        assert preset.optimizers["adamw"].weight_decay == 0.1
        for name in LADDER_TUNED[size]:
            opt = preset.optimizers[name]
            assert (opt.lr, opt.adamw_lr) == LADDER_TUNED[size][name] or name == "adamw"
            assert opt.weight_decay == (0.1 if name == "adamw" else 0.0), (size, name)
        # The ablations run at NorMuon's tuned settings (muon-rownorm: beta2 = 0).
        for name in ABLATIONS:
            expected = dataclasses.replace(preset.optimizers["normuon"],
                                           beta2=0.0 if name == "muon-rownorm" else 0.95)
            assert preset.optimizers[name] == expected, (size, name)
    small = get_preset("cpu-small")
    assert small.model == get_preset("ladder-m").model
    assert small.train == get_preset("ladder-m").train


def _neuron_table_cells(diag_runs) -> dict[str, list[str]]:
    lines = neuron_table(diag_runs).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["optimizer", "neuron-norm CV", "neuron-norm p95/p5", "dead neurons",
                      "effective rank", "2nd-moment CV"]  # fmt: skip
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {r[0]: r[1:] for r in rows}


def test_neuron_table_averages_the_percentile_ratio_geometrically():
    def record(step, ratio, dead, frac, cv):
        return {"step": step, "layer_types": {}, "matrices": {},
                "overall": {"neuron_cv": cv, "neuron_p95_p5": ratio, "neuron_dead": dead,
                            "neuron_dead_frac": frac, "neurons": 1000.0,
                            "neuron_max_min": 1e6, "effective_rank": 60.0}}  # fmt: skip

    # Two seeds; the ratio 2 then 50 averages to 10 (geometric), not 26 (arithmetic).
    runs = [[record(10, 2.0, 1.0, 0.001, 0.1)], [record(10, 50.0, 0.0, 0.0, 0.3)]]
    cells = _neuron_table_cells({"muon": runs})["muon"]
    assert cells == ["0.200", "10.000", "0.5 (0.05%)", "60.000", "n/a"]


def test_neuron_table_reads_records_written_before_the_robust_spread():
    # An older diagnostics.jsonl: max/min (null where infinite), no p95/p5 nor dead count.
    old = [{"step": 20, "layer_types": {}, "matrices": {},
            "overall": {"neuron_cv": 0.5, "neuron_max_min": None, "effective_rank": 30.0}},
           {"step": 40, "layer_types": {}, "matrices": {},
            "overall": {"neuron_cv": 0.3, "neuron_max_min": 12.0, "effective_rank": 32.0,
                        "second_moment_cv": 0.2}}]  # fmt: skip
    cells = _neuron_table_cells({"normuon": [old], "none": [[]]})
    assert cells["normuon"] == ["0.400", "n/a", "n/a", "31.000", "0.200"]
    assert cells["none"] == ["n/a"] * 5


def test_neurons_png_from_old_and_new_records(tmp_path):
    pytest.importorskip("matplotlib")
    from normuon.harness.report import plot_neurons

    lt = {"blocks.*.mlp.c_fc.weight": {"neuron_cv": 0.4}}
    old = [{"step": 10, "layer_types": lt, "overall": {"neuron_cv": 0.4, "neuron_max_min": None,
                                                       "effective_rank": 30.0}}]  # fmt: skip
    new = [{"step": 10, "layer_types": lt, "overall": {"neuron_cv": 0.2, "neuron_p95_p5": 3.0,
                                                       "effective_rank": 60.0}}]  # fmt: skip
    for name, runs in (("old", {"muon": [old]}), ("mixed", {"muon": [old], "normuon": [new]})):
        path = tmp_path / f"{name}.png"
        plot_neurons(runs, path, name)
        assert path.read_bytes()[:4] == b"\x89PNG"

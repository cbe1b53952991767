"""Reporting: tables, statistics and plots from finished runs (nothing here trains).

- :func:`summarize` / :func:`format_table`: the comparison table (steps to AdamW's loss,
  savings, wall time, optimizer share and state);
- :func:`mean_ci`, :func:`welch_t_test`: seed statistics (Student-t confidence interval, Welch's
  unequal-variance t-test), written here with a regularized incomplete beta function so that the
  harness needs no SciPy;
- :func:`plot_compare`, :func:`plot_sweep`, :func:`plot_neurons`: figures (matplotlib, a
  ``harness`` extra, imported only when a figure is drawn).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OptimizerSummary",
    "TABLE_COLUMNS",
    "STRETCH_COLUMN",
    "muon_extra_steps",
    "stretch_points",
    "steps_to_reach",
    "summarize",
    "format_table",
    "sweep_table",
    "mean_ci",
    "welch_t_test",
    "paired_t_test",
    "student_t_cdf",
    "neuron_table",
    "plot_compare",
    "plot_sweep",
    "plot_neurons",
    "PlottingUnavailable",
    "PLOT_INSTALL_HINT",
]

TABLE_COLUMNS = (
    "optimizer",
    "final val loss (mean ± 95% CI)",
    "steps to AdamW loss",
    "saving vs AdamW (at AdamW's final loss)",
    "saving vs Muon (at Muon's final loss)",
    "time to AdamW loss (s)",
    "wall time (s)",
    "opt step share",
    "opt state (bytes)",
)
#: The extra column when Muon was also trained on stretched schedules (``--stretch``).
STRETCH_COLUMN = "Muon's extra steps to match (stretched runs)"

PLOT_INSTALL_HINT = (
    "plots need matplotlib, which the harness extra installs: pip install 'normuon[harness]' "
    "(or: bash scripts/install.sh --harness)"
)


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed (the results themselves were written)."""


@dataclass
class OptimizerSummary:
    """One table row: an optimizer aggregated over its seeds."""

    optimizer: str
    seeds: list[int]
    final_val_mean: float
    final_val_min: float
    final_val_max: float
    final_val_ci: float
    """Half-width of the 95% Student-t interval of the mean over seeds (nan for one seed)."""
    steps_to_target: float | None
    """Steps for the seed-mean curve to reach the target (AdamW's mean final val loss)."""
    time_to_target: float | None
    saving_vs_adamw: float | None
    """1 - steps / AdamW's steps to AdamW's mean final loss (fraction; positive = fewer)."""
    saving_vs_muon: float | None
    """1 - steps / Muon's steps to Muon's mean final loss (the paper's target against Muon;
    None where the seed-mean curve does not stay there to the end)."""
    wall_time_s: float
    optimizer_share: float
    optimizer_state_bytes: int
    val_steps: list[int]
    val_mean: list[float]
    val_min: list[float]
    val_max: list[float]
    val_time_mean: list[float]
    muon_extra_steps: float | None = None
    """With stretched Muon runs: the steps Muon needs to reach this optimizer's mean final
    loss, as a fraction more than the configured steps (negative: Muon's own run gets there
    earlier); None when even the longest stretch does not (see ``muon_max_stretch``)."""
    muon_max_stretch: float | None = None
    """The longest stretch factor trained (None: no stretched runs)."""


def steps_to_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The x from which the piecewise-linear curve (xs, losses) stays at or below ``target``
    (or None when its last point is above it).

    A curve that dips below the target and climbs back above it by the end (a model that
    overfits repeated data, or a noisy plateau) has not reached it: a step saving counts only
    if it still holds when the run ends. Within 1e-9 (relative) counts as at the target, so a
    reference curve whose mean final loss *is* the target reaches it despite rounding.
    """
    tol = 1e-9 * abs(target)
    above = [i for i, loss in enumerate(losses) if loss > target + tol]
    if not above:
        return float(xs[0]) if len(losses) else None
    i = above[-1]
    if i == len(losses) - 1:
        return None
    x0, x1, l0, l1 = xs[i], xs[i + 1], losses[i], losses[i + 1]
    # Linear interpolation between the last point above and the first at/below for good.
    return float(x0 + (x1 - x0) * (l0 - target) / (l0 - l1)) if l0 != l1 else float(x1)


def summarize(
    results: dict[str, list[Any]], stretch_runs: dict[float, list[Any]] | None = None
) -> list[OptimizerSummary]:
    """Aggregate runs (RunResult) per optimizer into rows: steps to AdamW's mean final loss and
    the saving against AdamW there, the saving against Muon at Muon's own mean final loss, and
    (``stretch_runs``: {factor: Muon's runs on a schedule that many times longer}) the steps
    Muon needs to match each optimizer's final loss (:func:`muon_extra_steps`)."""
    rows: list[OptimizerSummary] = []
    for name, runs in results.items():
        if not runs:
            continue
        steps = runs[0].val_steps
        if any(r.val_steps != steps for r in runs):
            raise ValueError(f"{name}: seeds were validated at different steps; cannot average")
        curves = torch.tensor([r.val_losses for r in runs], dtype=torch.float64)  # (seeds, P)
        times = torch.tensor([r.val_times for r in runs], dtype=torch.float64)
        finals = curves[:, -1]
        rows.append(OptimizerSummary(
            optimizer=name,
            seeds=[r.seed for r in runs],
            final_val_mean=float(finals.mean()),
            final_val_min=float(finals.min()),
            final_val_max=float(finals.max()),
            final_val_ci=mean_ci(finals.tolist())[1],
            steps_to_target=None, time_to_target=None, saving_vs_adamw=None, saving_vs_muon=None,
            wall_time_s=sum(r.train_time_s for r in runs) / len(runs),
            optimizer_share=sum(r.optimizer_share for r in runs) / len(runs),
            optimizer_state_bytes=runs[0].optimizer_state_bytes,
            val_steps=list(steps),
            val_mean=curves.mean(0).tolist(),
            val_min=curves.min(0).values.tolist(),
            val_max=curves.max(0).values.tolist(),
            val_time_mean=times.mean(0).tolist(),
        ))  # fmt: skip
    by_name = {r.optimizer: r for r in rows}
    adamw, muon = by_name.get("adamw"), by_name.get("muon")
    if adamw is not None:
        target = adamw.final_val_mean
        ref_steps = steps_to_reach(adamw.val_steps, adamw.val_mean, target)
        for row in rows:
            row.steps_to_target = steps_to_reach(row.val_steps, row.val_mean, target)
            row.time_to_target = steps_to_reach(row.val_time_mean, row.val_mean, target)
            if row.steps_to_target is not None and ref_steps:
                row.saving_vs_adamw = 1.0 - row.steps_to_target / ref_steps
    if muon is not None:
        target = muon.final_val_mean
        ref_steps = steps_to_reach(muon.val_steps, muon.val_mean, target)
        for row in rows:
            reached = steps_to_reach(row.val_steps, row.val_mean, target)
            if reached is not None and ref_steps:
                row.saving_vs_muon = 1.0 - reached / ref_steps
        if stretch_runs:
            points = stretch_points(muon, stretch_runs)
            for row in rows:
                row.muon_extra_steps = muon_extra_steps(muon, points, row.final_val_mean)
                row.muon_max_stretch = max(stretch_runs)
    return rows


def stretch_points(
    muon: OptimizerSummary, stretch_runs: dict[float, list[Any]]
) -> list[tuple[float, float]]:
    """(steps, Muon's mean final loss) of the base run and of every stretched schedule."""
    base = muon.val_steps[-1]
    points = [(float(base), muon.final_val_mean)]
    for _, runs in sorted(stretch_runs.items()):
        if not runs:
            continue
        finals = [r.val_losses[-1] for r in runs]
        points.append((float(runs[0].steps), sum(finals) / len(finals)))
    return points


def muon_extra_steps(
    muon: OptimizerSummary, points: Sequence[tuple[float, float]], target: float
) -> float | None:
    """How many more steps than its configured run Muon needs to reach ``target`` (the
    paper's "Muon needs X% more iterations"), as a fraction of the configured steps.

    When Muon's own seed-mean curve reaches ``target`` (and stays there: the rule of the
    savings, :func:`steps_to_reach`) that step says when (<= 0); otherwise the final losses of
    the stretched schedules are interpolated linearly in steps. None when the longest stretch
    does not reach ``target``.
    """
    base = points[0][0]
    reached = steps_to_reach(muon.val_steps, muon.val_mean, target)
    if reached is not None:
        return reached / base - 1.0
    reached = steps_to_reach([p[0] for p in points], [p[1] for p in points], target)
    return None if reached is None else reached / base - 1.0


def _fmt_pct(x: float | None, missing: str = "n/a") -> str:
    return missing if x is None else f"{100 * x:+.1f}%"


def _fmt_steps(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def _fmt_time(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}"


def _fmt_loss(row: OptimizerSummary) -> str:
    """Mean ± the 95% interval's half-width; one seed has no interval."""
    if len(row.seeds) < 2:
        return f"{row.final_val_mean:.4f} (1 seed)"
    return f"{row.final_val_mean:.4f} ± {row.final_val_ci:.4f}"


def format_table(rows: Sequence[OptimizerSummary], header: str | None = None) -> str:
    """Markdown table with :data:`TABLE_COLUMNS` (and :data:`STRETCH_COLUMN` when Muon was
    trained on stretched schedules); ``header``, a line printed above it (a comparison's
    budget: :meth:`Budget.describe <normuon.harness.spec.Budget.describe>`)."""
    names = {r.optimizer for r in rows}
    stretch = any(r.muon_max_stretch is not None for r in rows)
    columns = TABLE_COLUMNS + ((STRETCH_COLUMN,) if stretch else ())
    lines = [header, ""] if header else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            r.optimizer,
            _fmt_loss(r),
            _fmt_steps(r.steps_to_target) if "adamw" in names else "n/a",
            _fmt_pct(r.saving_vs_adamw, "not reached" if "adamw" in names else "n/a"),
            _fmt_pct(r.saving_vs_muon, "not reached" if "muon" in names else "n/a"),
            _fmt_time(r.time_to_target) if "adamw" in names else "n/a",
            f"{r.wall_time_s:.1f}",
            f"{100 * r.optimizer_share:.1f}%",
            f"{r.optimizer_state_bytes:,}",
        ]
        if stretch:
            longest = f"> +{100 * (r.muon_max_stretch - 1):.0f}%"
            cells.append(_fmt_pct(r.muon_extra_steps, longest))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(points: dict[str, list[dict[str, float]]]) -> tuple[str, dict[str, float]]:
    """Markdown table of a learning-rate sweep and the best lr per optimizer."""
    lines = ["| optimizer | lr | final val loss | best |", "|---|---|---|---|"]
    best: dict[str, float] = {}
    for name, pts in points.items():
        pts.sort(key=lambda p: p["lr"])
        top = min(pts, key=lambda p: p["final_val_loss"])
        best[name] = top["lr"]
        for p in pts:
            mark = "**best**" if p is top else ""
            lines.append(f"| {name} | {p['lr']:g} | {p['final_val_loss']:.4f} | {mark} |")
    return "\n".join(lines), best


# ------------------------------------------------------------------ statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):  # fmt: skip
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))  # fmt: skip
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def _t_quantile(p: float, df: float) -> float:
    lo, hi = -1e3, 1e3
    for _ in range(200):  # bisection: the cdf is monotone
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval); half-width nan for n < 2."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_ci of no values")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, _t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's t-test of mean(a) != mean(b): t, Welch-Satterthwaite df, two-sided p."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("welch_t_test needs at least 2 values per sample")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    sa, sb = va / len(a), vb / len(b)
    if sa + sb == 0:
        p = 1.0 if ma == mb else 0.0
        return {"t": 0.0 if ma == mb else math.copysign(math.inf, ma - mb), "df": math.nan,
                "p": p, "mean_diff": ma - mb}  # fmt: skip
    t = (ma - mb) / math.sqrt(sa + sb)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1))
    p = 2.0 * (1.0 - student_t_cdf(abs(t), df))
    return {"t": t, "df": df, "p": p, "mean_diff": ma - mb}


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of mean(a - b) != 0 (a[i], b[i] share seed i: same init and batches)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_t_test needs two samples of the same length >= 2")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return {"t": 0.0 if mean == 0 else math.copysign(math.inf, mean), "df": n - 1,
                "p": 1.0 if mean == 0 else 0.0, "mean_diff": mean}  # fmt: skip
    t = mean / (sd / math.sqrt(n))
    return {"t": t, "df": n - 1, "p": 2.0 * (1.0 - student_t_cdf(abs(t), n - 1)),
            "mean_diff": mean}  # fmt: skip


# ------------------------------------------------------------------ neuron diagnostics


def _geometric_mean(values: list[float]) -> float | None:
    """Geometric mean of the finite positive values, None when there are none.

    The neuron-norm percentile ratio is scale-like: over training it drifts by factors (Muon's
    grows several-fold through the learning-rate decay), so an arithmetic mean over steps is
    dominated by the last few records, and a mean of 2 and 50 would read 26 where the ratio is
    typically 10. The geometric mean averages the ratio's logarithm: the typical step's spread.
    """
    logs = [math.log(v) for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None


def _arithmetic_mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def neuron_table(diag_runs: dict[str, list[list[dict[str, Any]]]]) -> str:
    """Markdown table of the neuron-balance statistics averaged over all recorded steps.

    ``diag_runs``: optimizer -> one list of diagnostics records (JSONL lines) per seed. Each
    cell averages the records' ``overall`` value over steps and seeds: the percentile ratio
    ``neuron_p95_p5`` geometrically (it is a ratio, see :func:`_geometric_mean`), the others
    arithmetically. ``dead neurons`` is the mean count per record over all tracked matrices,
    with the share of their neurons. Records written before a statistic existed (older
    ``diagnostics.jsonl`` files) give ``n/a`` for it.
    """
    columns = ("neuron-norm CV", "neuron-norm p95/p5", "dead neurons", "effective rank",
               "2nd-moment CV")  # fmt: skip
    lines = ["| optimizer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, runs in diag_runs.items():
        overall = [r.get("overall", {}) for recs in runs for r in recs]

        def mean(key: str, overall=overall) -> float | None:
            return _arithmetic_mean([o.get(key) for o in overall])

        ratio = _geometric_mean([o.get("neuron_p95_p5") for o in overall])
        dead, frac = mean("neuron_dead"), mean("neuron_dead_frac")
        cells = [
            _fmt(mean("neuron_cv")),
            _fmt(ratio),
            _fmt_dead(dead, frac),
            _fmt(mean("effective_rank")),
            _fmt(mean("second_moment_cv")),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _fmt_dead(count: float | None, frac: float | None) -> str:
    if count is None:
        return "n/a"
    # Two significant digits: a share of 0.009% must not print as 0.00%.
    return f"{count:.1f}" + ("" if frac is None else f" ({100 * frac:.2g}%)")


# ------------------------------------------------------------------ figures


def _pyplot():
    try:
        import matplotlib  # lazy: plotting is a harness extra, not a library dependency
    except ImportError:
        raise PlottingUnavailable(PLOT_INSTALL_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_compare(rows: Sequence[OptimizerSummary], path: Path, title: str) -> None:
    """Two panels: validation loss vs step and vs training wall time; seeds shaded min-max."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        for ax, xs in ((axes[0], r.val_steps), (axes[1], r.val_time_mean)):
            seeds = f"{len(r.seeds)} seed" + ("s" if len(r.seeds) != 1 else "")
            (line,) = ax.plot(xs, r.val_mean, label=f"{r.optimizer} ({seeds})")
            ax.fill_between(xs, r.val_min, r.val_max, color=line.get_color(), alpha=0.25)
    finals = [v for r in rows for v in r.val_min[len(r.val_min) // 4 :]]
    highs = [v for r in rows for v in r.val_max[len(r.val_max) // 4 :]]
    for ax, xlabel in ((axes[0], "step"), (axes[1], "training wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        # Zoom on the last three quarters of training, where the optimizers differ.
        ax.set_ylim(min(finals) - 0.02, max(highs) + 0.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(points: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    """Final validation loss vs learning rate (log axis), one line per optimizer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, pts in points.items():
        ok = [p for p in pts if math.isfinite(p["final_val_loss"])]
        ax.plot([p["lr"] for p in ok], [p["final_val_loss"] for p in ok], "o-", label=name)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels overlap on a log axis
    ax.set_xlabel("learning rate (AdamW: all params; Muon/NorMuon: hidden matrices)")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_neurons(diag_runs: dict[str, list[list[dict[str, Any]]]], path: Path, title: str) -> None:
    """``neurons.png``: how evenly each optimizer's update spreads over the neurons.

    Panels: per-neuron update-norm coefficient of variation vs step, p95/p5 ratio of the live
    neurons' update norms vs step (log scale; the geometric mean over seeds), effective rank of
    the update vs step (seed means over all hidden matrices), and the CV per layer type
    averaged over the run. Records without the p95/p5 ratio (older files) leave its panel empty.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("neuron_cv", "per-neuron update norm: CV (std/mean)", False),
              ("neuron_p95_p5", "update norm p95/p5 (live neurons)", True),
              ("effective_rank", "update effective rank (mean over matrices)", False))
    for ax, (key, label, log) in zip(axes.flat, panels):
        for name, runs in diag_runs.items():
            by_step: dict[int, list[float]] = {}
            for recs in runs:
                for r in recs:
                    v = r["overall"].get(key)
                    if v is not None and math.isfinite(v):
                        by_step.setdefault(r["step"], []).append(v)
            steps = sorted(by_step)
            # Ratios (log axis) average geometrically, as in neuron_table.
            average = _geometric_mean if log else _arithmetic_mean
            ax.plot(steps, [average(by_step[s]) for s in steps], "o-", ms=3, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[3]
    types = sorted({t for runs in diag_runs.values() for recs in runs for r in recs
                    for t in r["layer_types"]})  # fmt: skip
    width = 0.8 / max(1, len(diag_runs))
    for i, (name, runs) in enumerate(diag_runs.items()):
        means = []
        for t in types:
            vals = [r["layer_types"][t]["neuron_cv"] for recs in runs for r in recs
                    if t in r["layer_types"] and r["layer_types"][t].get("neuron_cv") is not None]
            means.append(sum(vals) / len(vals) if vals else 0.0)
        ax.bar([j + i * width for j in range(len(types))], means, width, label=name)
    short = [t.replace("blocks.*.", "").replace(".weight", "") for t in types]
    ax.set_xticks([j + width * (len(diag_runs) - 1) / 2 for j in range(len(types))], short,
                  rotation=30, ha="right")  # fmt: skip
    ax.set_ylabel("per-neuron update norm CV (run mean)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

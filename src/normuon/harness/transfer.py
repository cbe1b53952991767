"""Learning-rate transfer along one axis (width, depth or steps), read from
:func:`~normuon.harness.tune.run_tune` summaries.

The question a user asks before tuning a larger model: does an optimizer's best matrix lr stay
put when the model grows? The size ladder cannot answer it, because its rungs add width and
layers at once and, at a fixed number of tokens per parameter, train for more steps; each moves
the best lr. A sweep changes one of them (the width, with the head dimension fixed; the number
of layers; the number of steps) and holds the rest, running the same protocol at each point.
Each matrix optimizer's x2 search, at the embeddings/head lr every point starts from (the
search's own runs, not the sqrt 2 refinement that may follow there), gives a curve of
validation score against lr per point: the curve's minimum staying put is transfer. Once it
does, a larger point needs no full search: ``normuon tune --check`` scores the carried-over lr
and sqrt 2 either side, and such a point joins the sweep with its search marked.

:func:`transfer_report` turns such summaries into tables and, optionally, the figure. The best
lr of a search is the tried value of lowest score; between grid points the minimum is estimated
by the vertex of the parabola through the best value and its nearest tried neighbours (in
log2 lr), which resolves moves smaller than the grid's factor of 2. How the best lr scales
along the axis is a least-squares fit of ``log lr = a log x + c`` over the points whose vertex
exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .tune import (
    _best_of,
    _corpus,
    _final_cell,
    _grid_name,
    _is_check,
    _run_scores,
    _score_rule,
    _trainings_line,
)

__all__ = ["transfer_report", "parabola_vertex", "scaling_exponent", "model_shape", "AXES"]

#: What a sweep may vary, and how each is read from a summary.
AXES = {
    "width": lambda s: model_shape(s)["d_model"],
    "depth": lambda s: model_shape(s)["n_layer"],
    "steps": lambda s: s["budget"]["steps"],
}
#: What a sweep along each axis holds fixed besides the data, batch, preset, update scales and
#: tuning seeds (a width sweep: the head dimension, so attention scales alike at every width).
HELD = {
    "width": ("layers", "head dim", "steps"),
    "depth": ("width", "heads", "steps"),
    "steps": ("layers", "width", "heads"),
}
_HELD_FORMAT = {"layers": "{} layers", "head dim": "head dim {}", "steps": "{:,} steps",
                "width": "width {}", "heads": "{} heads"}  # fmt: skip


def _finite_best(scores: dict[float, float]) -> float | None:
    """The lr of lowest finite score (ties to the smaller lr); None when every run diverged."""
    finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
    return _best_of(finite) if finite else None


def parabola_vertex(scores: dict[float, float]) -> float | None:
    """The lr at the vertex of the parabola, in log2 lr, through the best-scoring lr and its
    nearest tried neighbours on either side; None when no score is finite, the best lr is the
    lowest or highest tried (no bracket), or a nearest neighbour diverged (inf: no parabola).
    The best has the lowest score (ties to the smaller lr), so the three points are convex.
    """
    best = _finite_best(scores)
    if best is None:
        return None
    below = [lr for lr in scores if lr < best]
    above = [lr for lr in scores if lr > best]
    if not below or not above:
        return None
    lrs = (max(below), best, min(above))
    if not all(math.isfinite(scores[lr]) for lr in lrs):
        return None
    (x0, y0), (x1, y1), (x2, y2) = [(math.log2(lr), scores[lr]) for lr in lrs]
    # Divided differences: y = y0 + d01 (x - x0) + d012 (x - x0)(x - x1); y0 > y1 <= y2, so
    # d012 > 0 and the vertex is a minimum between x0 and x2.
    d01 = (y1 - y0) / (x1 - x0)
    d012 = ((y2 - y1) / (x2 - x1) - d01) / (x2 - x0)
    return 2.0 ** ((x0 + x1) / 2 - d01 / (2 * d012))


def scaling_exponent(xs: Sequence[float], lrs: Sequence[float]) -> float | None:
    """Slope ``a`` of the least-squares line ``log lr = a log x + c``; None with fewer than two
    distinct ``xs``. ``a = 0``: the lr transfers; ``a = -1``: it falls as 1/x."""
    pairs = [(math.log(x), math.log(lr)) for x, lr in zip(xs, lrs, strict=True)]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx


def model_shape(summary: dict[str, Any], source: str | Path | None = None) -> dict[str, int]:
    """The model shape a summary records (``n_layer``, ``d_model``, ``n_head``, ...).
    ValueError, naming ``source`` (the summary's file) when given, for a summary written before
    summaries recorded it."""
    model = summary.get("model")
    if not model:
        where = (f"{source}" if source is not None else
                 f"the summary of preset {summary.get('preset')!r} on {summary.get('data')!r}")
        raise ValueError(f"{where} records no model shape (summaries do since 2026-12-07): "
                         f"rebuild it with the normuon tune command that made it and "
                         f"--resume, which trains nothing new")  # fmt: skip
    return model


def _held(summary: dict[str, Any], axis: str) -> tuple[tuple[str, int], ...]:
    model = model_shape(summary)
    values = {"layers": model["n_layer"], "width": model["d_model"], "heads": model["n_head"],
              "head dim": model["d_model"] // model["n_head"],
              "steps": summary["budget"]["steps"]}  # fmt: skip
    return tuple((name, values[name]) for name in HELD[axis])


class _SweepGroup(NamedTuple):
    """What a sweep along an axis holds fixed, so summaries that agree on it are one sweep.
    (Not the grid: a point may be a full x2 search or a sqrt 2 check of the lr carried over
    from the others.)"""

    data: str
    preset: str
    tokens_per_step: int
    update_scale: tuple[tuple[str, str], ...]
    tune_seeds: tuple[int, ...]
    score: str  # final or lowest validation loss: scores of one kind only are compared
    held: tuple[tuple[str, int], ...]  # :data:`HELD` of the axis, (name, value) pairs


def _group_key(summary: dict[str, Any], axis: str) -> _SweepGroup:
    return _SweepGroup(data=summary["data"], preset=summary["preset"],
                       tokens_per_step=summary["budget"]["tokens_per_step"],
                       update_scale=tuple(sorted(summary.get("update_scale", {}).items())),
                       tune_seeds=tuple(summary.get("protocol", {}).get("tune_seeds", ())),
                       score=_score_rule(summary), held=_held(summary, axis))  # fmt: skip


def _search_kind(summary: dict[str, Any]) -> str:
    protocol = summary.get("protocol", {})
    grid = _grid_name(protocol.get("grid_factor", 2.0))
    return f"{grid} check" if _is_check(summary) else grid


def _on_one_lattice(curves: list[dict[float, float]]) -> list[dict[float, float]]:
    """The curves with each lr that differs from one of another curve only by rounding (a
    check's grid steps from a rounded value: 0.0799999 against 0.08) written as that one, so the
    score table has one row per lr."""
    seen: list[float] = []

    def same(lr: float) -> float:
        match = next((v for v in seen if math.isclose(v, lr, rel_tol=1e-5)), None)
        if match is None:
            seen.append(lr)
            return lr
        return match

    return [{same(lr): score for lr, score in sorted(c.items())} for c in curves]


def _matrix_optimizers(rows: Sequence[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for s in rows:
        for name in s["settings"].get("shared", {}):
            if name != "adamw" and name not in names:
                names.append(name)
    return names


def _fmt_score(score: float | None, best: bool) -> str:
    if score is None:
        return "·"
    text = "diverged" if not math.isfinite(score) else f"{score:.4f}"
    return f"**{text}**" if best else text


def _best_cell(scores: dict[float, float]) -> str:
    """The best lr of a search, marked (edge) when it is the lowest or highest value tried,
    with its parabola vertex in brackets."""
    best = _finite_best(scores)
    if best is None:
        return "—"
    text = f"{best:g}" + (" (edge)" if best in (min(scores), max(scores)) else "")
    vertex = parabola_vertex(scores)
    return text + ("" if vertex is None else f" ({vertex:.3g})")


def transfer_report(summaries: Sequence[dict[str, Any]], axis: str = "width",
                    plot: str | Path | None = None) -> str:  # fmt: skip
    """Markdown tables of a sweep along ``axis`` (one of :data:`AXES`; module docstring): per
    group of summaries that hold the same settings but ``axis`` (:func:`_group_key`), each
    matrix optimizer's search scores by lr and point, the best lr and its vertex per point, the
    tuned settings, the final test losses, and the exponent of the vertices along the axis.
    ``plot``: score against lr, a line per point; a row of panels per group, a panel per matrix
    optimizer. ValueError for an unknown axis, a summary without the model shape, or two
    summaries at the same point of one group."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    if not summaries:
        raise ValueError("transfer_report needs at least one summary")
    read = AXES[axis]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(_group_key(s, axis), []).append(s)
    lines: list[str] = []
    panels: list[tuple[list[str], list, list[str], dict]] = []  # per group, for the figure
    for key, rows in groups.items():
        rows = sorted(rows, key=read)
        points = [read(s) for s in rows]
        if len(set(points)) < len(points):
            twice = sorted({x for x in points if points.count(x) > 1})
            raise ValueError(f"two summaries of one sweep at {axis} {twice[0]}: give each point "
                             f"once")  # fmt: skip
        names = _matrix_optimizers(rows)
        scales = dict(key.update_scale)
        scale_text = ", ".join(f"{n} `{v}`" for n, v in scales.items()) or "—"
        held = ", ".join(_HELD_FORMAT[name].format(v) for name, v in key.held)
        corpus_held = f"{_corpus(rows[0])}, {held}"
        title = f"{corpus_held}; update scale: {scale_text}"
        if key.score != "final":
            title += f"; scored by each curve's {key.score} point"
        if lines:
            lines.append("")
        lines += [f"**{title}.** Validation score (mean of the tuning seeds) of each matrix lr "
                  f"search by lr and {axis}, at the embeddings/head lr each point started "
                  f"from; bold: the best of a point.",
                  "", "| optimizer | lr | " + " | ".join(f"{axis} {x:,}" for x in points) + " |",
                  "|---|---|" + "---|" * len(points)]  # fmt: skip
        curves = {name: _on_one_lattice([_run_scores(s["tuning_runs"], name, s["aux_start"],
                                                     phase="lr", score=key.score)
                                         for s in rows])
                  for name in names}  # fmt: skip
        for name in names:
            bests = [_finite_best(c) for c in curves[name]]
            for lr in sorted({lr for c in curves[name] for lr in c}):
                cells = [_fmt_score(c.get(lr), lr == b) for c, b in zip(curves[name], bests)]
                lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + " |")
        others = [n for n in names if n != "muon"]
        header = (["layers x width (heads)", "steps", "params", "tokens/param", "search",
                   "starting emb/head lr"] + [f"{n} best lr (vertex)" for n in names]
                  + ["shared emb/head lr"] + [f"{n} tuned lr" for n in names]
                  + [f"{n} test loss" for n in names]
                  + [f"{n} − muon (Welch p)" for n in others])  # fmt: skip
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, s in enumerate(rows):
            model = model_shape(s)
            shared = s["settings"].get("shared", {})
            fair = s["finals"].get("shared", {"optimizers": {}, "vs_muon": {}})
            cells = [f"{model['n_layer']} x {model['d_model']} ({model['n_head']})",
                     f"{s['budget']['steps']:,}", f"{s['n_params']:,}",
                     f"{s['budget']['achieved_tokens_per_param']:.2f}", _search_kind(s),
                     f"{s['aux_start']:g}"]
            cells += [_best_cell(curves[n][i]) for n in names]
            cells.append(f"{s['shared_aux']:g}")
            cells += [f"{shared[n]['lr']:g}" if n in shared else "—" for n in names]
            cells += [_final_cell(fair["optimizers"].get(n)) for n in names]
            for n in others:
                w = fair["vs_muon"].get(n, {}).get("welch")
                cells.append("—" if not w else f"{w['mean_diff']:+.4f} ({w['p']:.3f})")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Along {axis}: " + "; ".join(
            _exponent_text(name, axis, points, curves[name]) for name in names)
            + ". (A best lr that moves by less than its search's grid factor is within one "
            "grid step; the vertices resolve less.)", "", _trainings_line(rows)]  # fmt: skip
        scored = "" if key.score == "final" else f", {key.score}"
        panels.append(([f"{n}, {scales.get(n, '?')}\n{corpus_held}{scored}" for n in names],
                       rows, names, curves))  # fmt: skip
    if plot:
        _plot_transfer(panels, axis, Path(plot))
    return "\n".join(lines)


def _exponent_text(name: str, axis: str, points: Sequence[int],
                   curves: Sequence[dict[float, float]]) -> str:  # fmt: skip
    """How an optimizer's best lr moves along the sweep: the spread of the best values, the
    exponent fitted to the vertices, and the points without one."""
    bests = [b for c in curves if (b := _finite_best(c)) is not None]
    if len(bests) < 2:
        return f"{name}: fewer than two points with a finite best"
    text = f"{name}: best lr max/min {max(bests) / min(bests):.2f}x"
    vertices = [parabola_vertex(c) for c in curves]
    at = [(x, v) for x, v in zip(points, vertices) if v is not None]
    slope = scaling_exponent([x for x, _ in at], [v for _, v in at]) if at else None
    if slope is not None:
        text += f", vertices ∝ {axis}^{slope:+.2f} ({len(at)} points)"
    missing = [f"{x:,}" for x, v in zip(points, vertices) if v is None]
    if missing:
        text += (f" (no vertex at {axis} {', '.join(missing)}: best on the edge of its search, "
                 f"a diverged neighbour, or no finite score)")
    return text


def _plot_transfer(panels, axis: str, path: Path) -> None:
    from .report import _pyplot

    plt = _pyplot()
    ncols = max(len(names) for _, _, names, _ in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(5.5 * ncols, 4.0 * len(panels)),
                             squeeze=False)  # fmt: skip
    for row, (titles, rows, names, curves) in zip(axes, panels):
        for ax in row[len(names):]:
            ax.set_visible(False)
        for ax, name, title in zip(row, names, titles):
            _plot_panel(ax, rows, curves[name], axis, title)
    fig.suptitle(f"Learning rate along {axis} (dotted: parabola vertex)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_panel(ax, rows, curves, axis: str, title: str) -> None:
    """Validation score against matrix lr, a line per point of the sweep, each less its own
    best score (the points' losses differ far more than the scores along one curve)."""
    for s, scores in zip(rows, curves):
        if not any(math.isfinite(v) for v in scores.values()):
            continue  # the optimizer did not train (or only diverged) at this point
        xs = sorted(scores)
        low = min(scores.values())
        ys = [scores[x] - low if math.isfinite(scores[x]) else float("nan") for x in xs]
        line = ax.plot(xs, ys, marker="o", label=f"{axis} {AXES[axis](s):,}")[0]
        v = parabola_vertex(scores)
        if v is not None:
            ax.axvline(v, color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("matrix lr")
    ax.set_ylabel("validation loss above the point's best")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)

"""Learning-rate transfer along one axis (width, depth or steps), read from
:func:`~normuon.harness.tune.run_tune` summaries.

The question a user asks before tuning a larger model: does an optimizer's best matrix lr stay
put when the model grows? The size ladder cannot answer it, because its rungs add width and
layers at once and, at a fixed number of tokens per parameter, train for more steps; each moves
the best lr. A sweep changes one of them (the width, with the head dimension fixed; the number
of layers; the number of steps) and holds the rest, running the same protocol at each point.
Each matrix optimizer's x2 search, at the embeddings/head lr every point starts from, gives a
curve of validation score against lr per point: the curve's minimum staying put is transfer.

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
from typing import Any

from .tune import _best_of, _corpus, _run_scores

__all__ = ["transfer_report", "parabola_vertex", "scaling_exponent", "AXES"]

#: What a sweep may vary, and how each is read from a summary.
AXES = {
    "width": lambda s: _model(s)["d_model"],
    "depth": lambda s: _model(s)["n_layer"],
    "steps": lambda s: s["budget"]["steps"],
}


def parabola_vertex(scores: dict[float, float]) -> float | None:
    """The lr at the vertex of the parabola, in log2 lr, through the best-scoring lr and its
    nearest tried neighbours on either side; None when the best lr is the lowest or highest
    tried (no bracket), a neighbour's score is not finite, or the three points are not convex.
    """
    finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
    if len(finite) < 3:
        return None
    best = _best_of(finite)
    below = [lr for lr in finite if lr < best]
    above = [lr for lr in finite if lr > best]
    if not below or not above:
        return None
    points = [(math.log2(lr), finite[lr]) for lr in (max(below), best, min(above))]
    (x0, y0), (x1, y1), (x2, y2) = points
    # Divided differences: y = y0 + d01 (x - x0) + d012 (x - x0)(x - x1).
    d01 = (y1 - y0) / (x1 - x0)
    d12 = (y2 - y1) / (x2 - x1)
    d012 = (d12 - d01) / (x2 - x0)
    if d012 <= 0:
        return None  # not convex: the three scores do not bracket a minimum
    x = (x0 + x1) / 2 - d01 / (2 * d012)
    return 2.0**x


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


def _model(summary: dict[str, Any]) -> dict[str, int]:
    model = summary.get("model")
    if not model:
        raise ValueError(f"summary of {summary.get('preset')!r} on {summary.get('data')!r} "
                         f"records no model shape (written since 2026-12-07): rebuild it with "
                         f"the same normuon tune command and --resume, which trains nothing "
                         f"new")  # fmt: skip
    return model


def _group_key(summary: dict[str, Any], axis: str) -> tuple:
    """What a sweep along ``axis`` holds fixed: the corpus, the update scales, and the other
    axes' values."""
    held = tuple((name, read(summary)) for name, read in AXES.items() if name != axis)
    scales = tuple(sorted(summary.get("update_scale", {}).items()))
    return (_corpus(summary), scales, held)


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


def _held_text(held: tuple) -> str:
    parts = {"width": "width {}", "depth": "{} layers", "steps": "{:,} steps"}
    return ", ".join(parts[name].format(value) for name, value in held)


def transfer_report(summaries: Sequence[dict[str, Any]], axis: str = "width",
                    plot: str | Path | None = None) -> str:  # fmt: skip
    """Markdown tables of a sweep along ``axis`` (one of :data:`AXES`; module docstring): per
    group of summaries that share corpus, update scales and the other axes, each matrix
    optimizer's search scores by lr and point, the best lr and its vertex per point, the tuned
    settings, the final test losses, and the exponent of the best lr along the axis. ``plot``:
    score against lr, a line per point; a row of panels per group, a panel per matrix
    optimizer."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    if not summaries:
        raise ValueError("transfer_report needs at least one summary")
    read = AXES[axis]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(_group_key(s, axis), []).append(s)
    lines: list[str] = []
    panels: list[tuple[str, list, list[str], dict]] = []  # per group, for the figure
    for (corpus, scales, held), rows in groups.items():
        rows = sorted(rows, key=read)
        names = _matrix_optimizers(rows)
        points = [read(s) for s in rows]
        scale_text = ", ".join(f"{n} `{v}`" for n, v in scales) or "—"
        title = f"{corpus}, {_held_text(held)}; update scale: {scale_text}"
        if lines:
            lines.append("")
        lines += [f"**{title}.** Validation score (mean of the tuning seeds) by matrix lr and "
                  f"{axis}, at the embeddings/head lr each point started from; bold: the best "
                  f"of a point.",
                  "", "| optimizer | lr | " + " | ".join(f"{axis} {x:,}" for x in points) + " |",
                  "|---|---|" + "---|" * len(points)]  # fmt: skip
        curves = {name: [_run_scores(s["tuning_runs"], name, s["aux_start"]) for s in rows]
                  for name in names}  # fmt: skip
        best: dict[str, list[float | None]] = {}
        vertex: dict[str, list[float | None]] = {}
        for name in names:
            best[name] = [_best_of(c) if c else None for c in curves[name]]
            vertex[name] = [parabola_vertex(c) for c in curves[name]]
            for lr in sorted({lr for c in curves[name] for lr in c}):
                cells = [_fmt_score(c.get(lr), lr == b)
                         for c, b in zip(curves[name], best[name])]  # fmt: skip
                lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + " |")
        others = [n for n in names if n != "muon"]
        header = (["layers x width (heads)", "steps", "params", "tokens/param",
                   "starting emb/head lr"] + [f"{n} best lr (vertex)" for n in names]
                  + ["shared emb/head lr"] + [f"{n} tuned lr" for n in names]
                  + [f"{n} test loss" for n in names]
                  + [f"{n} − muon (Welch p)" for n in others])  # fmt: skip
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, s in enumerate(rows):
            model = _model(s)
            shared = s["settings"].get("shared", {})
            fair = s["finals"].get("shared", {"optimizers": {}, "vs_muon": {}})
            cells = [f"{model['n_layer']} x {model['d_model']} ({model['n_head']})",
                     f"{s['budget']['steps']:,}", f"{s['n_params']:,}",
                     f"{s['budget']['achieved_tokens_per_param']:.2f}", f"{s['aux_start']:g}"]
            cells += [("—" if best[n][i] is None else f"{best[n][i]:g}")
                      + ("" if vertex[n][i] is None else f" ({vertex[n][i]:.3g})")
                      for n in names]  # fmt: skip
            cells.append(f"{s['shared_aux']:g}")
            cells += [f"{shared[n]['lr']:g}" if n in shared else "—" for n in names]
            for n in names:
                o = fair["optimizers"].get(n)
                cells.append("—" if o is None else "diverged" if o.get("diverged")
                             else f"{o['mean']:.4f} ± {o['ci95']:.4f}")  # fmt: skip
            for n in others:
                w = fair["vs_muon"].get(n, {}).get("welch")
                cells.append("—" if not w else f"{w['mean_diff']:+.4f} ({w['p']:.3f})")
            lines.append("| " + " | ".join(cells) + " |")
        spreads = []
        for name in names:
            known = [b for b in best[name] if b is not None]
            if len(known) < 2:
                continue
            text = f"{name}: best lr max/min {max(known) / min(known):.2f}x"
            at = [(x, v) for x, v in zip(points, vertex[name]) if v is not None]
            slope = scaling_exponent([x for x, _ in at], [v for _, v in at]) if at else None
            if slope is not None:
                text += f", vertices ∝ {axis}^{slope:+.2f} ({len(at)} points)"
            spreads.append(text)
        if spreads:
            lines += ["", f"Along {axis}: " + "; ".join(spreads) + ". (Grid factor 2: a best "
                          "lr that moves by less than 2x is within one grid step.)"]  # fmt: skip
        hours = sum(s["train_time_s"] for s in rows) / 3600
        lines += ["", f"{sum(s['trainings'] for s in rows)} trainings, {hours:.2f} CPU-thread "
                      f"hours of training (evaluation excluded)."]  # fmt: skip
        panels.append(([f"{n}, {dict(scales).get(n, '?')}\n{corpus}, {_held_text(held)}"
                        for n in names], rows, names, curves))  # fmt: skip
    if plot:
        _plot_transfer(panels, axis, Path(plot))
    return "\n".join(lines)


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

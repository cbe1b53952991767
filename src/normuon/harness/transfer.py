"""Learning-rate transfer across widths, read from :func:`~normuon.harness.tune.run_tune`
summaries.

The question a user asks before tuning a larger model: does an optimizer's best matrix lr stay
put when only the width grows? The size ladder cannot answer it, because its rungs also add
layers and, at a fixed number of tokens per parameter, train for more steps; both move the best
lr. A width sweep holds the depth, the head dimension, the batch and the number of steps fixed
and runs the same protocol at each width. Each matrix optimizer's x2 search, at the
embeddings/head lr every width starts from, gives a curve of validation score against lr per
width: the curve's minimum staying put is transfer.

:func:`transfer_report` turns such summaries into tables and, optionally, the figure. The best
lr of a search is the tried value of lowest score; between grid points the minimum is estimated
by the vertex of the parabola through the best value and its nearest tried neighbours (in
log2 lr), which resolves moves smaller than the grid's factor of 2. How the best lr scales with
width is a least-squares fit of ``log lr = a log width + c`` over the widths whose vertex exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .tune import _best_of, _corpus, _run_scores

__all__ = ["transfer_report", "parabola_vertex", "width_exponent"]


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


def width_exponent(widths: Sequence[float], lrs: Sequence[float]) -> float | None:
    """Slope ``a`` of the least-squares line ``log lr = a log width + c``; None with fewer than
    two distinct widths. ``a = 0``: the lr transfers; ``a = -1``: it falls as 1/width."""
    pairs = [(math.log(w), math.log(lr)) for w, lr in zip(widths, lrs, strict=True)]
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


def _group_key(summary: dict[str, Any]) -> tuple:
    model = _model(summary)
    scales = tuple(sorted(summary.get("update_scale", {}).items()))
    return (_corpus(summary), model["n_layer"], summary["budget"]["steps"], scales)


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


def transfer_report(summaries: Sequence[dict[str, Any]], plot: str | Path | None = None) -> str:
    """Markdown tables of a width sweep (module docstring): per group of summaries that share
    corpus, depth, steps and update scales, each matrix optimizer's search scores by lr and
    width, the best lr and its vertex per width, the tuned settings, the final test losses, and
    the width exponent of the best lr. ``plot``: score against lr, a line per width, a panel per
    matrix optimizer (the first group)."""
    if not summaries:
        raise ValueError("transfer_report needs at least one summary")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault(_group_key(s), []).append(s)
    lines: list[str] = []
    for (corpus, n_layer, steps, scales), rows in groups.items():
        rows = sorted(rows, key=lambda s: _model(s)["d_model"])
        names = _matrix_optimizers(rows)
        widths = [_model(s)["d_model"] for s in rows]
        scale_text = ", ".join(f"{n} `{v}`" for n, v in scales) or "—"
        if lines:
            lines.append("")
        lines += [f"**{corpus}**, {n_layer} layers, {steps:,} steps; update scale: {scale_text}. "
                  f"Validation score (mean of the tuning seeds) by matrix lr and width, at the "
                  f"embeddings/head lr each width started from; bold: the best of a width.",
                  "", "| optimizer | lr | " + " | ".join(f"width {w}" for w in widths) + " |",
                  "|---|---|" + "---|" * len(widths)]  # fmt: skip
        curves = {name: [_run_scores(s["tuning_runs"], name, s["aux_start"]) for s in rows]
                  for name in names}  # fmt: skip
        best: dict[str, list[float | None]] = {}
        vertex: dict[str, list[float | None]] = {}
        for name in names:
            best[name] = [_best_of(c) if c else None for c in curves[name]]
            vertex[name] = [parabola_vertex(c) for c in curves[name]]
            for lr in sorted({lr for c in curves[name] for lr in c}):
                cells = [_fmt_score(c.get(lr), lr == b) for c, b in zip(curves[name],
                                                                        best[name])]
                lines.append(f"| {name} | {lr:g} | " + " | ".join(cells) + " |")
        lines += ["", "| width | heads | params | tokens/param | starting emb/head lr | "
                  + " | ".join(f"{n} best lr (vertex)" for n in names)
                  + " | shared emb/head lr | "
                  + " | ".join(f"{n} tuned lr" for n in names)
                  + " | " + " | ".join(f"{n} test loss" for n in names) + " | "
                  + " | ".join(f"{n} − muon (Welch p)" for n in names if n != "muon") + " |"]
        cols = 5 + 3 * len(names) + 1 + sum(n != "muon" for n in names)
        lines.append("|" + "---|" * cols)
        for i, s in enumerate(rows):
            model = _model(s)
            shared = s["settings"].get("shared", {})
            fair = s["finals"].get("shared", {"optimizers": {}, "vs_muon": {}})
            found = [("—" if best[n][i] is None else f"{best[n][i]:g}")
                     + ("" if vertex[n][i] is None else f" ({vertex[n][i]:.3g})")
                     for n in names]  # fmt: skip
            tuned = [f"{shared[n]['lr']:g}" if n in shared else "—" for n in names]
            losses = []
            for n in names:
                o = fair["optimizers"].get(n)
                losses.append("—" if o is None else "diverged" if o.get("diverged")
                              else f"{o['mean']:.4f} ± {o['ci95']:.4f}")  # fmt: skip
            diffs = []
            for n in names:
                if n == "muon":
                    continue
                w = fair["vs_muon"].get(n, {}).get("welch")
                diffs.append("—" if not w else f"{w['mean_diff']:+.4f} ({w['p']:.3f})")
            lines.append(
                f"| {model['d_model']} | {model['n_head']} | {s['n_params']:,} | "
                f"{s['budget']['achieved_tokens_per_param']:.2f} | {s['aux_start']:g} | "
                + " | ".join(found) + f" | {s['shared_aux']:g} | " + " | ".join(tuned) + " | "
                + " | ".join(losses) + " | " + " | ".join(diffs) + " |"
            )
        spreads = []
        for name in names:
            known = [(w, b) for w, b in zip(widths, best[name]) if b is not None]
            if len(known) < 2:
                continue
            spread = max(b for _, b in known) / min(b for _, b in known)
            text = f"{name}: best lr max/min {spread:.2f}x"
            at = [(w, v) for w, v in zip(widths, vertex[name]) if v is not None]
            slope = width_exponent([w for w, _ in at], [v for _, v in at]) if at else None
            if slope is not None:
                text += f", vertices ∝ width^{slope:+.2f} ({len(at)} widths)"
            spreads.append(text)
        if spreads:
            lines += ["", "Across widths: " + "; ".join(spreads) + ". (Grid factor 2: a best "
                          "lr that moves by less than 2x is within one grid step.)"]
        hours = sum(s["train_time_s"] for s in rows) / 3600
        lines += ["", f"{sum(s['trainings'] for s in rows)} trainings, {hours:.2f} CPU-thread "
                      f"hours of training (evaluation excluded)."]
        if plot:
            _plot_transfer(rows, names, curves, Path(plot),
                           f"{corpus}, {n_layer} layers, {steps:,} steps; {scale_text}")
            plot = None  # one figure: the first group
    return "\n".join(lines)


def _plot_transfer(rows, names, curves, path: Path, title: str) -> None:
    from .report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for s, scores in zip(rows, curves[name]):
            xs = sorted(scores)
            ys = [scores[x] if math.isfinite(scores[x]) else float("nan") for x in xs]
            line = ax.plot(xs, ys, marker="o", label=f"width {_model(s)['d_model']}")[0]
            v = parabola_vertex(scores)
            if v is not None:
                ax.axvline(v, color=line.get_color(), ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{name} matrix lr")
        ax.set_ylabel("validation loss, mean of tuning seeds")
        ax.set_title(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Learning rate against width: {title} (dotted: parabola vertex)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

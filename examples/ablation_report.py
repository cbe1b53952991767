"""The ablation table and figure of docs/results.md from `normuon compare` folders.

Each folder is a comparison of adamw, muon, normuon and the paper's ablations (muon-adam,
normuon-front, normuon-tall-only, muon-rownorm) over the same seeds, ideally with
``--stretch`` (Muon trained on longer schedules). For every optimizer the table gives its final
validation loss (mean ± 95% interval over seeds), the paired difference from NorMuon and from
Muon (same seed = same initial model and batches; mean ± 95% interval and the paired t-test's
p), its difference from Muon early in training (a third of the way), the savings of the
comparison table, the optimizer step's share of the training time and the optimizer state.
The figure has one panel per folder: seed-mean validation loss against step.

Usage (docs/results.md, "Ablations")::

    python examples/ablation_report.py runs/ablation/shakespeare runs/ablation/alice \\
        --names "embedded Shakespeare" "Alice (wordcloud 1.9.6)" --plot docs/ablation.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from normuon.harness.report import PLOT_INSTALL_HINT, mean_ci, paired_t_test

ORDER = ("adamw", "muon", "normuon", "muon-adam", "normuon-front", "normuon-tall-only",
         "muon-rownorm")  # fmt: skip
COLUMNS = (
    "corpus", "optimizer", "final val loss", "− NorMuon (paired)", "p", "− Muon (paired)", "p",
    "− Muon at 1/3", "saving vs AdamW", "saving vs Muon (at Muon's loss)",
    "Muon's extra steps to match", "opt step share", "opt state (bytes)",
)  # fmt: skip


def _pct(x: float | None, missing: str = "not reached") -> str:
    return missing if x is None else f"{100 * x:+.1f}%"


def _interval(values: list[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:+.4f}" if math.isnan(half) else f"{mean:+.4f} ± {half:.4f}"


def _paired(a: list[float], b: list[float]) -> tuple[str, str]:
    """(mean difference ± 95% interval, two-sided p) of a - b over paired seeds."""
    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2:
        return _interval(diffs), "n/a"
    return _interval(diffs), f"{paired_t_test(a, b)['p']:.3f}"


def load(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    for name, runs in results["runs"].items():
        seeds = [r["seed"] for r in runs]
        if seeds != [r["seed"] for r in results["runs"]["muon"]]:
            raise SystemExit(f"ablation_report: {folder}: {name} ran other seeds than muon")
    return results


def table_rows(results: dict, corpus: str) -> list[list[str]]:
    runs, rows = results["runs"], {r["optimizer"]: r for r in results["rows"]}
    finals = {name: [r["final_val_loss"] for r in rs] for name, rs in runs.items()}
    steps = runs["muon"][0]["val_steps"]
    early = min(range(len(steps)), key=lambda i: abs(steps[i] - steps[-1] / 3))
    early_losses = {name: [r["val_losses"][early] for r in rs] for name, rs in runs.items()}
    out = []
    for name in [n for n in ORDER if n in runs]:
        row = rows[name]
        mean, half = mean_ci(finals[name])
        loss = f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")
        vs_normuon = _paired(finals[name], finals["normuon"]) if name != "normuon" else ("—", "")
        vs_muon = _paired(finals[name], finals["muon"]) if name != "muon" else ("—", "")
        at_early = (_interval([a - b for a, b in zip(early_losses[name], early_losses["muon"])])
                    + f" (step {steps[early]})") if name != "muon" else "—"  # fmt: skip
        extra = row.get("muon_extra_steps")
        longest = row.get("muon_max_stretch")
        extra_text = "n/a" if longest is None else _pct(extra, f"> +{100 * (longest - 1):.0f}%")
        out.append([corpus, name, loss, *vs_normuon, *vs_muon, at_early,
                    _pct(row["saving_vs_adamw"]), _pct(row["saving_vs_muon"]), extra_text,
                    f"{100 * row['optimizer_share']:.1f}%",
                    f"{row['optimizer_state_bytes']:,}"])  # fmt: skip
    return out


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(all_results: list[tuple[str, dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"ablation_report: {PLOT_INSTALL_HINT}") from None
    fig, axes = plt.subplots(1, len(all_results), figsize=(6.5 * len(all_results), 4.5),
                             squeeze=False)  # fmt: skip
    for ax, (corpus, results) in zip(axes[0], all_results):
        rows = {r["optimizer"]: r for r in results["rows"]}
        names = [n for n in ORDER if n in rows]
        finals = [rows[n]["final_val_mean"] for n in names]
        low, high = min(finals), max(finals)
        for name in names:
            r = rows[name]
            style = "--" if name not in ("adamw", "muon", "normuon") else "-"
            seeds = len(r["seeds"])
            ax.plot(r["val_steps"], r["val_mean"], style,
                    label=f"{name} ({seeds} seed{'s' if seeds != 1 else ''})")  # fmt: skip
        # The second half of training, where the variants separate.
        ax.set_xlim(r["val_steps"][-1] / 3, r["val_steps"][-1])
        ax.set_ylim(low - 0.1 * (high - low + 0.05), high + 0.6 * (high - low + 0.05))
        ax.set_title(corpus)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (seed mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="normuon compare --out folders")
    parser.add_argument("--names", nargs="+", default=None, help="one corpus name per folder")
    parser.add_argument("--plot", type=Path, default=None, help="write the figure here")
    args = parser.parse_args(argv)
    names = args.names or [str(f) for f in args.folders]
    if len(names) != len(args.folders):
        raise SystemExit("ablation_report: give one --names entry per folder")
    loaded = [(name, load(folder)) for name, folder in zip(names, args.folders)]
    rows = [row for name, results in loaded for row in table_rows(results, name)]
    print(markdown(rows))
    if args.plot is not None:
        plot(loaded, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

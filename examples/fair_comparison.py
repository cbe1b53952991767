"""Fair AdamW / Muon / NorMuon comparison with an equal tuning budget, and a model-size ladder.

Protocol (docs/results.md reports what it produced):

- Data: a byte-level corpus split into train (first ``1 - 2f``), validation (next ``f``: used
  for tuning only) and test (last ``f``: used for the reported numbers only).
- Recipe: the same for all three optimizers (batch, length, steps, warmup-stable-decay
  schedule, global gradient clipping at 1.0). AdamW decays its hidden matrices with weight
  decay 0.1 (the GPT recipe); Muon and NorMuon use no weight decay.
- Tuning budget: ``--budget`` runs per optimizer on seed 0, scored by the final validation loss.
  AdamW: its learning rate on a x2 grid. Muon and NorMuon: their matrix learning rate on a x2
  grid with the embeddings/head AdamW lr at ``--aux-lr``, then the embeddings/head lr at half
  and twice that value with the best matrix lr (coordinate descent). Each optimizer may spend
  up to ``--extend`` more runs, only to step past a grid edge where its best value lies
  (AdamW: its lr; Muon/NorMuon: once the matrix lr, then the embeddings/head lr).
- Reporting: the tuned settings retrained on seeds 1..``--seeds`` (fresh seeds, never used in
  tuning) and evaluated on the test split.

Every run is a :func:`normuon.harness.train.train_run` in its own folder; a folder that already
holds a finished ``result.json`` is reused, so an interrupted experiment continues where it
stopped. ``--sizes`` picks rungs of the ladder (``xs``, ``s``, ``m``, ``l``). ``--report`` trains
nothing: it reads the ``summary.json`` files under the given folders and prints the tables
(final test loss with 95% confidence intervals, Welch's t-test of NorMuon vs Muon, step
savings) and draws the ladder figure.

Example (the numbers in docs/results.md)::

    nice -n 10 python examples/fair_comparison.py --corpus shakespeare --sizes m --seeds 5 \\
        --out runs/fair/shakespeare
    nice -n 10 python examples/fair_comparison.py --corpus shakespeare --sizes xs,s \\
        --out runs/fair/shakespeare
    python examples/fair_comparison.py --report runs/fair/shakespeare runs/fair/alice \\
        --plot docs/fair-ladder.png
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from pathlib import Path

import torch

from normuon.harness.config import get_preset
from normuon.harness.data import BYTE_VOCAB, TokenData, load_shakespeare
from normuon.harness.report import mean_ci, paired_t_test, steps_to_reach, welch_t_test
from normuon.harness.train import train_run

#: Ladder rungs: (n_layer, d_model, n_head). Parameters (vocab 256): 14,336 (xs), 40,960 (s),
#: 180,224 (m), 491,520 (l). docs/results.md uses xs, s and m (12.6x): an l rung did not fit the
#: hour of shared 2-core CPU time the experiments were given.
SIZES = {"xs": (2, 16, 2), "s": (2, 32, 2), "m": (3, 64, 2), "l": (4, 96, 3)}


def load_corpus(name: str) -> tuple[bytes, str]:
    """``shakespeare`` (embedded) or a UTF-8 text file; Gutenberg header and licence dropped."""
    if name == "shakespeare":
        return load_shakespeare().encode("utf-8"), "embedded Shakespeare"
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"fair_comparison: error: {path}: no such text file")
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    # Keep the book only: Project Gutenberg files wrap it in "*** START OF ..." / "*** END OF".
    match = re.search(r"\*\*\* ?START OF[^\n]*\n(.*)\n\*\*\* ?END OF", text, flags=re.S)
    if match:
        text = match.group(1)
    return text.strip().encode("utf-8"), f"text file {path.name} (Gutenberg header removed)"


def splits(blob: bytes, fraction: float, source: str) -> tuple[TokenData, TokenData]:
    """(tuning data: train + validation, reporting data: the same train + test)."""
    tokens = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)  # (N,)
    n_hold = int(round(tokens.numel() * fraction))
    train = tokens[: -2 * n_hold]
    val, test = tokens[-2 * n_hold : -n_hold], tokens[-n_hold:]
    return (TokenData(train, val, BYTE_VOCAB, f"{source}, validation split"),
            TokenData(train, test, BYTE_VOCAB, f"{source}, test split"))  # fmt: skip


def base_config(size: str, steps: int):
    n_layer, d_model, n_head = SIZES[size]
    cfg = get_preset("cpu-smoke")  # every field that matters is set below
    cfg.preset = f"fair-{size}"
    cfg.description = "fair comparison rung"
    cfg.model.n_layer, cfg.model.d_model = n_layer, d_model
    cfg.model.n_head = cfg.model.n_kv_head = n_head
    cfg.model.max_seq_len = 64
    t = cfg.train
    t.batch_size, t.seq_len, t.steps = 16, 64, steps
    t.warmup_steps, t.cooldown_frac, t.grad_clip = min(20, steps), 0.5, 1.0
    t.val_every, t.val_batches, t.log_every = 20, 8, 20
    cfg.optimizers["adamw"].weight_decay = 0.1
    return cfg


def run_once(cfg, name: str, data: TokenData, seed: int, out: Path) -> float:
    """Final validation loss of one run (reused if ``out/result.json`` exists); inf if diverged."""
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())["final_val_loss"]
    if out.exists():  # an unfinished run: start it again from scratch
        for f in out.iterdir():
            f.unlink()
    try:
        r = train_run(cfg, name, data, seed=seed, out_dir=out, progress=False)
    except FloatingPointError:
        return math.inf
    return r.final_val_loss


def tune(cfg, name: str, data: TokenData, out: Path, budget: int, aux_lr: float,
         extra: int) -> dict:
    """Spend ``budget`` seed-0 runs (+ up to ``extra`` edge extensions) on ``name``'s lrs."""
    trials: list[dict] = []

    def trial(lr: float, aux: float) -> None:
        c = copy.deepcopy(cfg)
        c.optimizers[name].lr, c.optimizers[name].adamw_lr = lr, aux
        loss = run_once(c, name, data, 0, out / f"lr{lr:g}_aux{aux:g}")
        trials.append({"lr": lr, "adamw_lr": aux, "val_loss": loss})
        print(f"  tune {name:8s} lr {lr:<8g} aux {aux:<8g} val {loss:.4f}", flush=True)

    def best() -> dict:
        return min(trials, key=lambda t: t["val_loss"])

    def beyond_edge(key: str, fixed: dict) -> float | None:
        # A best value at the edge of the values tried (others fixed): the next x2 step out.
        tried = sorted({t[key] for t in trials if all(t[k] == v for k, v in fixed.items())})
        value = best()[key]
        if value == tried[-1]:
            return value * 2
        if value == tried[0] and len(tried) > 1:
            return value / 2
        return None

    if name == "adamw":
        for i in range(budget):
            trial(0.002 * 2**i, aux_lr)
        while extra and (nxt := beyond_edge("lr", {})) is not None:
            trial(nxt, aux_lr)
            extra -= 1
    else:
        n_matrix = max(1, budget - 2)
        for i in range(n_matrix):
            trial(0.01 * 2**i, aux_lr)
        if extra and (nxt := beyond_edge("lr", {"adamw_lr": aux_lr})) is not None:
            trial(nxt, aux_lr)
            extra -= 1
        best_lr = best()["lr"]
        for aux in (aux_lr / 2, aux_lr * 2)[: budget - n_matrix]:
            trial(best_lr, aux)
        while extra and (nxt := beyond_edge("adamw_lr", {"lr": best_lr})) is not None:
            trial(best_lr, nxt)
            extra -= 1
    return {"best": best(), "trials": trials}


def _curves(final: dict) -> tuple[list[int], dict[int, list[float]]]:
    runs = [r for r in final["runs"] if r.get("val_losses")]
    return runs[0]["val_steps"], {r["seed"]: r["val_losses"] for r in runs}


def _mean_curve(curves: dict[int, list[float]]) -> list[float]:
    rows = list(curves.values())
    return [sum(col) / len(col) for col in zip(*rows)]


def analyse(summary: dict) -> dict:
    """Statistics of one rung: test losses with CIs, NorMuon vs Muon test, step savings."""
    out: dict = {"corpus": summary["corpus"], "size": summary["size"], "optimizers": {}}
    finals = {}
    for name, final in summary["final"].items():
        losses = [r["final_val_loss"] for r in final["runs"]]
        if any(v is None for v in losses):
            out["optimizers"][name] = {"diverged": True, "settings": final["settings"]}
            continue
        finals[name] = losses
        mean, half = mean_ci(losses)
        out["optimizers"][name] = {"mean": mean, "ci95": half, "losses": losses,
                                   "settings": final["settings"],
                                   "n_params": final["runs"][0]["n_params"]}  # fmt: skip
    out["n_params"] = next(iter(out["optimizers"].values())).get("n_params")
    if "muon" in finals and "normuon" in finals:
        out["welch_normuon_vs_muon"] = welch_t_test(finals["normuon"], finals["muon"])
        # Seed i gives both optimizers the same initial model and batches: a paired test.
        out["paired_normuon_vs_muon"] = paired_t_test(finals["normuon"], finals["muon"])
    # Step savings: steps for a curve to reach a reference optimizer's mean final test loss.
    for ref in ("adamw", "muon"):
        if ref not in finals:
            continue
        target = sum(finals[ref]) / len(finals[ref])
        steps, ref_curves = _curves(summary["final"][ref])
        ref_steps = steps_to_reach(steps, _mean_curve(ref_curves), target)
        for name in finals:
            if name == ref:
                continue
            steps_n, curves = _curves(summary["final"][name])
            mean_steps = steps_to_reach(steps_n, _mean_curve(curves), target)
            per_seed = [steps_to_reach(steps_n, c, target) for c in curves.values()]
            entry = {"steps": mean_steps, "ref_steps": ref_steps,
                     "saving": None if mean_steps is None or not ref_steps
                     else 1 - mean_steps / ref_steps}  # fmt: skip
            if ref_steps and all(x is not None for x in per_seed):
                entry["saving_seeds_ci95"] = mean_ci([1 - x / ref_steps for x in per_seed])
            out["optimizers"][name][f"vs_{ref}"] = entry
    return out


def _pct(entry: dict | None) -> str:
    if not entry or entry.get("saving") is None:
        return "not reached"
    text = f"{100 * entry['saving']:+.1f}%"
    ci = entry.get("saving_seeds_ci95")
    if ci and ci[1] == ci[1]:  # not nan
        text += f" (seeds: {100 * ci[0]:+.1f} ± {100 * ci[1]:.1f})"
    return text


def report(folders: list[str], plot: str | None) -> None:
    """Print the markdown tables of every ``summary.json`` under ``folders``; draw the ladder."""
    analyses = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*/summary.json")):
            analyses.append(analyse(json.loads(path.read_text())))
    if not analyses:
        raise SystemExit(f"fair_comparison: error: no */summary.json under {', '.join(folders)}")
    analyses.sort(key=lambda a: (a["corpus"], a["n_params"]))
    print("| corpus | params | optimizer | tuned lr | tuned emb/head lr | seeds | final test "
          "loss (mean ± 95% CI) | saving vs AdamW | saving vs Muon |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a in analyses:
        for name, o in a["optimizers"].items():
            st = o["settings"]
            aux = "(same)" if name == "adamw" else f"{st['adamw_lr']:g}"
            loss = "diverged" if o.get("diverged") else f"{o['mean']:.4f} ± {o['ci95']:.4f}"
            print(f"| {a['corpus'].split(' (')[0].split(',')[0]} | {a['n_params']:,} | {name} | "
                  f"{st['lr']:g} | {aux} | {len(o.get('losses', []))} | {loss} | "
                  f"{'—' if name == 'adamw' else _pct(o.get('vs_adamw'))} | "
                  f"{'—' if name in ('adamw', 'muon') else _pct(o.get('vs_muon'))} |")
    print()
    print("| corpus | params | NorMuon − Muon final test loss | Welch t (df) | Welch p | "
          "paired t (df) | paired p |")
    print("|---|---|---|---|---|---|---|")
    for a in analyses:
        w, pt = a.get("welch_normuon_vs_muon"), a.get("paired_normuon_vs_muon")
        if w:
            print(f"| {a['corpus'].split(' (')[0].split(',')[0]} | {a['n_params']:,} | "
                  f"{w['mean_diff']:+.4f} | {w['t']:.2f} ({w['df']:.1f}) | {w['p']:.3f} | "
                  f"{pt['t']:.2f} ({pt['df']}) | {pt['p']:.3f} |")
    if plot:
        _plot_ladder([a for a in analyses if a["corpus"] == analyses[0]["corpus"]]
                     if len({a["corpus"] for a in analyses}) > 1 else analyses, plot)
        print(f"\nwrote {plot}")


def _plot_ladder(analyses: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = [a for a in analyses if a["corpus"].startswith("embedded Shakespeare")] or analyses
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    params = [a["n_params"] for a in ladder]
    for name in ("adamw", "muon", "normuon"):
        ys = [a["optimizers"][name].get("mean") for a in ladder]
        es = [a["optimizers"][name].get("ci95") for a in ladder]
        axes[0].errorbar(params, ys, yerr=es, marker="o", capsize=4, label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters")
    axes[0].set_ylabel("final test loss (mean, 95% CI)")
    for name, ref, label in (("normuon", "muon", "NorMuon vs Muon"),
                             ("normuon", "adamw", "NorMuon vs AdamW"),
                             ("muon", "adamw", "Muon vs AdamW")):  # fmt: skip
        ys, es = [], []
        for a in ladder:
            entry = a["optimizers"][name].get(f"vs_{ref}") or {}
            ys.append(100 * entry["saving"] if entry.get("saving") is not None else float("nan"))
            ci = entry.get("saving_seeds_ci95")
            es.append(100 * ci[1] if ci else 0.0)
        if any(y == y for y in ys):  # some rung reached the reference's loss
            axes[1].errorbar(params, ys, yerr=es, marker="o", capsize=4, label=label)
    axes[1].axhline(0, color="gray", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlim(min(params) / 1.5, max(params) * 1.5)
    axes[1].set_xlabel("parameters")
    axes[1].set_ylabel("fewer steps to the reference's final loss (%)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"size ladder, {ladder[0]['corpus'].split(',')[0]}: tuned per size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="shakespeare", help="'shakespeare' or a UTF-8 text file")
    p.add_argument("--sizes", default="m", help="comma-separated ladder rungs: xs, s, m, l")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--budget", type=int, default=6, help="tuning runs per optimizer")
    p.add_argument("--extend", type=int, default=2,
                   help="extra tuning runs per optimizer, spent only on moving past a grid "
                        "edge when the best value is at one (x2 steps)")
    p.add_argument("--aux-lr", type=float, default=4e-3,
                   help="starting embeddings/head AdamW lr of Muon and NorMuon")
    p.add_argument("--seeds", type=int, default=3, help="reporting seeds (1..N)")
    p.add_argument("--hold-fraction", type=float, default=0.05,
                   help="fraction of the corpus in each of the validation and test splits")
    p.add_argument("--out", default="runs/fair")
    p.add_argument("--report", nargs="+", default=None, metavar="DIR",
                   help="train nothing: print the tables of the experiments in these folders")
    p.add_argument("--plot", default=None, help="with --report: write the ladder figure here")
    args = p.parse_args()
    if args.report:
        report(args.report, args.plot)
        return
    torch.set_num_threads(1)
    blob, source = load_corpus(args.corpus)
    tune_data, test_data = splits(blob, args.hold_fraction, source)
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size not in SIZES:
            raise SystemExit(f"fair_comparison: error: unknown size {size!r}; known: "
                             f"{', '.join(SIZES)}")
        out = Path(args.out) / size
        cfg = base_config(size, args.steps)
        print(f"size {size}: {SIZES[size]}", flush=True)
        summary = {"corpus": source, "size": size, "shape": SIZES[size], "steps": args.steps,
                   "budget": args.budget, "extend": args.extend, "tuning": {},
                   "final": {}}  # fmt: skip
        for name in ("adamw", "muon", "normuon"):
            summary["tuning"][name] = tune(cfg, name, tune_data, out / "tune" / name,
                                           args.budget, args.aux_lr, args.extend)  # fmt: skip
        for name in ("adamw", "muon", "normuon"):
            best = summary["tuning"][name]["best"]
            c = copy.deepcopy(cfg)
            c.optimizers[name].lr, c.optimizers[name].adamw_lr = best["lr"], best["adamw_lr"]
            runs = []
            for seed in range(1, args.seeds + 1):
                # The folder names the settings: a change of tuned values means new runs.
                run_dir = (out / "final" / name / f"lr{best['lr']:g}_aux{best['adamw_lr']:g}"
                           / f"seed{seed}")  # fmt: skip
                loss = run_once(c, name, test_data, seed, run_dir)
                done = run_dir / "result.json"
                # A diverged run has no result.json: it is recorded with a null loss.
                runs.append(json.loads(done.read_text()) if done.is_file()
                            else {"seed": seed, "final_val_loss": None})  # fmt: skip
                print(f"  final {name:8s} seed {seed} test {loss:.4f}", flush=True)
            summary["final"][name] = {"settings": best, "runs": runs}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

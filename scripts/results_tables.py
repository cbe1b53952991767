"""Regenerate the tables of docs/results.md from the experiment records under docs/results/.

Each generated block of docs/results.md sits between ``<!-- tables: GROUP -->`` and
``<!-- end tables -->``: the ladder report (:func:`normuon.harness.tune.ladder_report`) of every
``docs/results/GROUP/*/summary.json``; for the groups of :data:`PER_OPTIMIZER` (runs with more
optimizers than the ladder's columns, the ablations) each summary's own tables
(:func:`normuon.harness.tune.tune_tables`) up to the list of tuning runs; for the sweeps of
:data:`TRANSFER` (width, steps, depth) the transfer report
(:func:`normuon.harness.transfer.transfer_report`). ``--write`` rewrites the blocks (with
``--plot`` the figure of the ``fair20`` group, and always the figures of :data:`TRANSFER`);
without it the script exits 1 if a block is stale (CI's check that the page says what the
committed records say).

    python scripts/results_tables.py            # check
    python scripts/results_tables.py --write --plot docs/fair-ladder-20tpp.png
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from normuon.harness.transfer import transfer_report
from normuon.harness.tune import ladder_report, tune_tables

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
RECORDS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- tables: (?P<group>[\w-]+) -->\n)(?P<body>.*?)(<!-- end tables -->)",
                   flags=re.S)  # fmt: skip
#: Groups shown optimizer by optimizer (final test loss, savings, tests against Muon): the
#: ablations, and rungs retuned for early stopping (``--score lowest``).
PER_OPTIMIZER = {"ablations", "early-stop"}
#: Sweeps (:func:`normuon.harness.transfer.transfer_report`): the axis of each group and the
#: figure ``--write`` draws for it.
TRANSFER = {
    "width-transfer": ("width", ROOT / "docs" / "lr-width-transfer.png"),
    "steps-transfer": ("steps", ROOT / "docs" / "lr-steps-transfer.png"),
    "depth-transfer": ("depth", ROOT / "docs" / "lr-depth-transfer.png"),
}
#: Where a summary's tables turn to the list of every tuning run (left out of the page).
TUNING_RUNS = "Every tuning run"


def report(group: str, plot: str | None = None) -> str:
    paths = sorted((RECORDS / group).glob("*/summary.json"))
    if not paths:
        raise SystemExit(f"results_tables: no {RECORDS / group}/*/summary.json")
    summaries = [json.loads(p.read_text()) for p in paths]
    if group in TRANSFER:
        return transfer_report(summaries, axis=TRANSFER[group][0], plot=plot) + "\n"
    if group in PER_OPTIMIZER:
        tables = [tune_tables(s).split(TUNING_RUNS)[0].rstrip() for s in summaries]
        return "\n\n".join(tables) + "\n"
    return ladder_report(summaries, plot=plot) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the blocks")
    p.add_argument("--plot", default=None, help="with --write: the fair20 ladder figure")
    args = p.parse_args(argv)
    text = PAGE.read_text()
    stale = []

    def fill(match: re.Match) -> str:
        group = match["group"]
        plot = args.plot if group == "fair20" else TRANSFER.get(group, (None, None))[1]
        body = report(group, plot if args.write else None)
        if body != match["body"]:
            stale.append(group)
        return match.group(1) + body + match.group(4)

    new = BLOCK.sub(fill, text)
    if not BLOCK.search(text):
        raise SystemExit(f"results_tables: {PAGE} has no '<!-- tables: GROUP -->' block")
    if args.write:
        PAGE.write_text(new)
        print(f"rewrote {', '.join(stale) or 'nothing (up to date)'}")
        return 0
    if stale:
        print(f"docs/results.md is stale for {', '.join(stale)}: run "
              f"python scripts/results_tables.py --write", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

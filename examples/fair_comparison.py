"""The size ladder under the fair tuning protocol: ``normuon tune`` per rung, then one report.

For each rung of ``--sizes`` (the ``ladder-<size>`` presets trained on ``--tokens-per-param``
tokens per parameter, 20 by default: the ``ladder-<size>-20tpp`` presets; 0: their 300 steps)
this runs ``normuon tune``
(docs/harness.md, "Fair tuning") into ``OUT/<size>``, continuing a rung that has a ledger, and
``--report`` prints the ladder tables of the summaries and draws the saving-vs-parameters
figure. A Project Gutenberg text file is trimmed to the book (its header and licence would
otherwise end up in the held-out text) and written to ``OUT/<its name>`` first.

Example (docs/results.md)::

    python examples/fair_comparison.py --sizes xs,s,m --jobs 2 --out runs/fair20/shakespeare
    python examples/fair_comparison.py --corpus alice.txt --sizes xs,s,m --jobs 2 \\
        --out runs/fair20/alice -- --set train.val_fraction=0.1
    python examples/fair_comparison.py --report runs/fair20/*/*/summary.json \\
        --plot docs/fair-ladder-20tpp.png

Arguments after ``--`` go to every ``normuon tune`` unchanged (``--seeds 5``, ``--set ...``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from normuon.cli import main as normuon
from normuon.harness.config import LADDER_SHAPES, LADDER_TOKENS_PER_PARAM


def book_text(path: Path, out: Path) -> Path:
    """``path`` itself, or (a Gutenberg file) the text between its START and END markers
    written to ``out/<its name>``."""
    if not path.is_file():
        raise SystemExit(f"fair_comparison: error: {path}: no such text file")
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    match = re.search(r"\*\*\* ?START OF[^\n]*\n(.*)\n\*\*\* ?END OF", text, flags=re.S)
    if not match:
        return path
    out.mkdir(parents=True, exist_ok=True)
    book = out / path.name
    book.write_text(match.group(1).strip())
    return book


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="shakespeare",
                   help="'shakespeare' (embedded) or a UTF-8 text file")
    p.add_argument("--sizes", default="xs,s,m", help="ladder rungs: xs, s, m, l")
    p.add_argument("--tokens-per-param", type=float, default=20.0, metavar="R",
                   help="the -<R>tpp presets (default 20; 0: the 300-step presets)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--out", default="runs/fair20/shakespeare")
    p.add_argument("--report", nargs="+", default=None, metavar="SUMMARY",
                   help="train nothing: the ladder tables of these summary.json files")
    p.add_argument("--plot", default=None, help="with --report: the figure's path")
    args = p.parse_args(argv)
    if args.report:
        return normuon(["tune", "--report", *args.report,
                        *(["--plot", args.plot] if args.plot else [])])  # fmt: skip
    out = Path(args.out)
    data = [] if args.corpus == "shakespeare" else ["--data",
                                                    str(book_text(Path(args.corpus), out))]
    for size in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if size not in LADDER_SHAPES:
            raise SystemExit(f"fair_comparison: error: unknown size {size!r}; known: "
                             f"{', '.join(LADDER_SHAPES)}")  # fmt: skip
        tpp = args.tokens_per_param
        if tpp == LADDER_TOKENS_PER_PARAM:  # its presets also space evaluations to the length
            length = ["--preset", f"ladder-{size}-{tpp:g}tpp"]
        elif tpp:
            length = ["--preset", f"ladder-{size}", "--tokens-per-param", f"{tpp:g}"]
        else:
            length = ["--preset", f"ladder-{size}"]
        rung = out / size
        resume = ["--resume"] if (rung / "ledger.jsonl").is_file() else []
        code = normuon(["tune", *length, *data, "--jobs", str(args.jobs), "--out", str(rung),
                        "--no-progress", *resume, *extra])  # fmt: skip
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

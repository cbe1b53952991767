"""Release packaging: the sdist and the wheel built from it carry LICENSE, py.typed, the corpus,
and (the sdist) a test suite that pytest collects and runs from the unpacked archive."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import normuon

pytest.importorskip("build")

ROOT = Path(__file__).resolve().parents[1]
PROJECT_VERSION = re.search(
    r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M
).group(1)
# Not part of a source release: local environments, caches and build outputs.
_SKIP = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "runs", "__pycache__", "*.egg-info",
    ".pytest_cache", ".ruff_cache", ".hypothesis", "*.pyc",
)  # fmt: skip


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{cmd}\n{output}"
    return proc.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """sdist, then the wheel built from the unpacked sdist (python -m build's default), from a
    copy of the tree so that the build leaves nothing in the working copy."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_SKIP)
    # Without isolation: uses the installed setuptools, so no package index is needed.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), "."],
         cwd=source)  # fmt: skip
    sdist = tmp / "dist" / f"normuon-{PROJECT_VERSION}.tar.gz"
    wheel = tmp / "dist" / f"normuon-{PROJECT_VERSION}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), sorted(os.listdir(tmp / "dist"))
    return tmp, sdist, wheel


def test_one_version(dists):
    _, _, wheel = dists
    assert normuon.__version__ == metadata.version("normuon") == PROJECT_VERSION
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"normuon-{PROJECT_VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {PROJECT_VERSION}\n" in meta
    # The version is written once: no release number in the package sources.
    for path in (ROOT / "src" / "normuon").rglob("*.py"):
        assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d+", path.read_text()), path


def test_wheel_contents_and_metadata(dists):
    _, _, wheel = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"normuon-{PROJECT_VERSION}.dist-info/METADATA").decode()
    info = f"normuon-{PROJECT_VERSION}.dist-info"
    for required in ["normuon/py.typed", "normuon/data/shakespeare.txt.xz",
                     "normuon/integrations/huggingface.py", "normuon/grouping.py",
                     f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"]:  # fmt: skip
        assert required in names, required
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: MIT" in meta
    assert "Classifier: Typing :: Typed" in meta
    assert "Project-URL: Homepage, https://github.com/normuon/normuon" in meta
    assert "Provides-Extra: integrations" in meta
    assert re.search(r'Requires-Dist: transformers>=[\d.]+; extra == "integrations"', meta)
    assert re.search(r'Requires-Dist: lightning>=[\d.]+; extra == "dev"', meta)
    assert "Requires-Dist: torch>=2.6\n" in meta  # torch: no upper pin, no CUDA extra
    # The torchtitan extra never asks for torch itself (an installed CUDA torch must stay).
    assert "Provides-Extra: torchtitan" in meta
    assert re.search(r'Requires-Dist: torchtitan==0\.3\.0; python_version >= "3\.11" and '
                     r'extra == "torchtitan"', meta)  # fmt: skip
    extra = [line for line in meta.splitlines() if 'extra == "torchtitan"' in line]
    assert not [line for line in extra if re.match(r"Requires-Dist: torch\b(?![-_])", line)]
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "normuon contributors" in license_text


@pytest.fixture(scope="module")
def unpacked_sdist(dists):
    tmp, sdist, _ = dists
    with tarfile.open(sdist) as tf:
        # The "data" filter (Python >= 3.10.12 / 3.11.4) refuses links and absolute paths.
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(tmp / "unpacked", **safe)
    return tmp / "unpacked" / f"normuon-{PROJECT_VERSION}"


def test_sdist_contents(unpacked_sdist):
    tests = unpacked_sdist / "tests"
    repo_tests = {p.name for p in (ROOT / "tests").glob("*.py")}
    assert {p.name for p in tests.glob("*.py")} == repo_tests
    for helper in ["conftest.py", "reference.py", "dist_workers.py", "hf_models.py"]:
        assert (tests / helper).is_file(), helper
    for path in ["LICENSE", "README.md", "pyproject.toml", "src/normuon/py.typed",
                 "src/normuon/data/shakespeare.txt.xz", "examples/lightning_train.py",
                 "examples/fsdp2_train.py", "benchmarks/distributed_step.py"]:  # fmt: skip
        assert (unpacked_sdist / path).is_file(), path
    assert not list(unpacked_sdist.rglob("__pycache__"))


@pytest.mark.slow
def test_tests_collect_and_run_from_the_sdist(unpacked_sdist):
    # The sdist's own package is imported (PYTHONPATH), not the working copy.
    env = dict(os.environ, PYTHONPATH=str(unpacked_sdist / "src"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")  # fmt: skip
    where = _run([sys.executable, "-c", "import normuon; print(normuon.__file__)"],
                 cwd=unpacked_sdist, env=env)  # fmt: skip
    assert Path(where.strip()).is_relative_to(unpacked_sdist), where
    # One run: every test file is collected (a collection error fails the run: exit code 2),
    # and the param_groups tests are executed.
    ran = _run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                "tests", "-k", "test_param_groups"], cwd=unpacked_sdist, env=env)  # fmt: skip
    summary = ran.strip().splitlines()[-1]
    assert re.search(r"^\d+ passed, \d+ deselected in ", summary), ran[-3000:]

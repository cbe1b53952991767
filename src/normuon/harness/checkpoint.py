"""Run folders and checkpoints: atomic writes, safe loading, and who may write where.

A run folder belongs to one run. A fresh run refuses a folder that already holds files (unless
told to overwrite the harness's own outputs), so two runs' configs and metrics never mix, and
``--resume`` checks that the checkpoint, ``config.json`` and every metrics line carry the same
run id. Checkpoints load with ``weights_only=True`` only; a file that does not load is reported
as damaged, never with advice to load it unsafely.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from .config import OPTIMIZERS

__all__ = [
    "CHECKPOINT_NAME",
    "HARNESS_OUTPUTS",
    "is_harness_output",
    "stretch_folder",
    "STRETCH_BASELINE",
    "atomic_save",
    "write_json",
    "load_checkpoint",
    "same_json",
    "check_checkpoint_identity",
    "prepare_out_dir",
    "remove_orphaned_temp_files",
]

CHECKPOINT_NAME = "checkpoint.pt"
#: Files and folders the harness writes into an output folder (what ``--overwrite`` removes).
HARNESS_OUTPUTS = (
    CHECKPOINT_NAME, "config.json", "metrics.jsonl", "result.json", "results.json",
    "sweep.json", "diagnostics.jsonl", "loss.png", "sweep.png", "neurons.png", "tensorboard",
    "runs", "ledger.jsonl", "summary.json", "tune.md", "tune.png",  # normuon tune
    *OPTIMIZERS,
)  # fmt: skip
#: The optimizer ``compare --stretch`` trains on longer schedules (the paper's "Muon-rescale").
STRETCH_BASELINE = "muon"
_STRETCH_FOLDER = re.compile(rf"{STRETCH_BASELINE}-x[0-9][0-9.]*")


def stretch_folder(factor: float) -> str:
    """The folder of the baseline's runs on a schedule ``factor`` times longer: ``muon-x1.1``."""
    return f"{STRETCH_BASELINE}-x{factor:g}"


def is_harness_output(name: str) -> bool:
    """Whether ``name`` (an entry of an output folder) is one the harness writes."""
    return name in HARNESS_OUTPUTS or _STRETCH_FOLDER.fullmatch(name) is not None


#: Keys every harness checkpoint holds.
_CHECKPOINT_KEYS = ("step", "model", "optimizer", "scheduler", "rng_cpu", "run_json")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace (atomic rename)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temp file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def remove_orphaned_temp_files(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` files that a killed write left behind (ours only: harness names)."""
    removed = []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob("*.tmp"):
        # Temp names: "<output name>.<random or pid>.tmp" (atomic_save, write_json).
        if any(tmp.name.startswith(name + ".") for name in HARNESS_OUTPUTS):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A harness checkpoint as a dict; ValueError (one line) when missing, empty or damaged."""
    if not path.exists():
        raise ValueError(f"--resume: no checkpoint at {path}; start a fresh run without --resume")
    if not path.is_file():
        raise ValueError(f"--resume: {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"--resume: {path} is empty (0 bytes; its write was cut off); the run cannot "
            f"continue from it: start again with --overwrite"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError, KeyError, AttributeError, TypeError):  # fmt: skip
        # torch's own message suggests weights_only=False, i.e. running code from the file:
        # never pass that on. A harness checkpoint always loads with weights_only=True.
        raise ValueError(
            f"--resume: {path} is not a readable normuon checkpoint ({size:,} bytes, damaged or "
            f"of another program); start again with --overwrite"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(
            f"--resume: {path} loads but is not a normuon harness checkpoint (missing "
            f"{', '.join(missing)}); start again with --overwrite"
        )
    return ckpt


def same_json(saved: Any, expected: Any) -> bool:
    """Whether ``saved`` (read back from JSON) is ``expected`` as JSON writes it (tuples become
    lists): how ``--resume`` compares a saved spec with the resolved one."""
    return saved == json.loads(json.dumps(expected))


def check_checkpoint_identity(ckpt: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """ValueError unless the checkpoint ``ckpt`` (from ``path``) was written by the training
    whose :meth:`~normuon.harness.spec.RunSpec.identity` is ``identity`` (same settings,
    optimizer, seed, data and world size)."""
    if not same_json(json.loads(ckpt["run_json"]), identity):
        raise ValueError(
            f"--resume: {path} was written by a different run (config, optimizer, seed, data or "
            f"world size differ); start a fresh run in another --out folder"
        )


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Create ``out`` for a run; ValueError when it cannot hold one.

    A fresh run needs an empty (or new) folder; ``overwrite`` first removes the harness's own
    outputs (:data:`HARNESS_OUTPUTS`, stretched-run folders) and nothing else. ``resume``
    needs the folder to exist.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder path")
    if resume:
        if not out.is_dir():
            raise ValueError(f"--resume: no checkpoint at {out / CHECKPOINT_NAME} (the folder "
                             f"does not exist); start a fresh run without --resume")
    else:
        if out.is_dir():
            entries = sorted(p.name for p in out.iterdir())
            if entries and overwrite:
                for target in [p for p in out.iterdir() if is_harness_output(p.name)]:
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    elif target.exists() or target.is_symlink():
                        target.unlink()
            elif entries:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                hint = (
                    "pass --resume to continue the run there, --overwrite to replace it, or "
                    "choose another --out"
                )
                raise ValueError(f"--out {out} is not empty (holds {shown}); {hint}")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {out}: cannot create the folder ({exc.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable; choose a folder you can write to")
    remove_orphaned_temp_files(out)

"""Train with torchtitan's trainer, train again from a checkpoint in the middle, compare losses.

    python scripts/torchtitan_resume.py FOLDER --steps 20 --resume-at 10 --rtol 1e-2 -- TRAIN...

TRAIN is a torchtitan training command without its output folder, step count and checkpoint
options, e.g. ``torchrun --nproc_per_node=1 -m torchtitan.train --module
normuon.integrations.torchtitan_data --config llama3_debugmodel --override.imports
normuon.integrations.torchtitan.normuon``. The first run trains STEPS steps in FOLDER, saving a
checkpoint every RESUME_AT steps; the last checkpoint is then deleted and the same command runs
again, so torchtitan resumes from step RESUME_AT (weights, the optimizer's state, the LR
schedule and the data loader's position) and trains the remaining steps. It passes when

- both runs exit 0 and the first logs normuon's container building its optimizer (the
  ``NorMuon (model_part=0)`` / ``Muon (model_part=0)`` routing line), so the override took;
- the first run logs a loss for every step and the resumed one for exactly the steps after
  RESUME_AT (it started from the checkpoint, not from scratch);
- those losses agree with the first run's to RTOL (relative).

scripts/device_check.sh runs it as its torchtitan stage. Each run's output is shown and kept in
FOLDER/first.log and FOLDER/resumed.log.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torchtitan's metrics line, once per logging rank: "step: 11  loss:  5.43210  grad_norm: ..."
_LOSS = re.compile(r"step:\s*(\d+)\s+loss:\s*([-+0-9.eE]+)")
_ROUTING = re.compile(r"\b(?:NorMuon|Muon) \(model_part=0\)")


def run(cmd: list[str], log: Path) -> str:
    """Run ``cmd``, echoing its output (stderr included) and keeping it in ``log``."""
    print("$", " ".join(cmd), flush=True)
    with (
        open(log, "w") as f,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
    if proc.returncode != 0:
        sys.exit(f"exit {proc.returncode}: {' '.join(cmd)}")
    return _ANSI.sub("", log.read_text(errors="replace"))


def losses(text: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in _LOSS.findall(text)}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        usage="%(prog)s FOLDER [--steps N] [--resume-at K] [--rtol R] -- TRAIN...",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("folder", type=Path, help="torchtitan's dump folder (emptied first)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resume-at", type=int, default=10)
    parser.add_argument("--rtol", type=float, default=1e-2)
    # Split by hand: the training command has options of its own, which argparse would take.
    if "--" not in argv:
        parser.error("give the training command after --")
    split = argv.index("--")
    args, train = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not train:
        parser.error("give the training command after --")
    if not 0 < args.resume_at < args.steps:
        parser.error(f"--resume-at must be in 1..{args.steps - 1}, got {args.resume_at}")

    shutil.rmtree(args.folder, ignore_errors=True)
    args.folder.mkdir(parents=True)
    options = [
        "--dump_folder",
        str(args.folder),
        "--training.steps",
        str(args.steps),
        "--checkpoint.enable",
        "--checkpoint.interval",
        str(args.resume_at),
    ]

    print(f"== first run: steps 1-{args.steps}, checkpoints every {args.resume_at}", flush=True)
    first_log = run(train + options, args.folder / "first.log")
    if not _ROUTING.search(first_log):
        sys.exit("the first run does not log normuon's container (NorMuon/Muon (model_part=0))")
    checkpoints = args.folder / "checkpoint"
    for step in (args.resume_at, args.steps):
        if not (checkpoints / f"step-{step}").is_dir():
            sys.exit(f"the first run saved no checkpoint {checkpoints / f'step-{step}'}")
    shutil.rmtree(checkpoints / f"step-{args.steps}")

    print(
        f"== resumed run: from step-{args.resume_at}, steps {args.resume_at + 1}-{args.steps}",
        flush=True,
    )
    first, resumed = losses(first_log), losses(run(train + options, args.folder / "resumed.log"))
    every, after = set(range(1, args.steps + 1)), set(range(args.resume_at + 1, args.steps + 1))
    if set(first) != every:
        sys.exit(f"the first run logged losses for steps {sorted(first)}, not 1-{args.steps}")
    if set(resumed) != after:
        sys.exit(
            f"the resumed run logged losses for steps {sorted(resumed)}, not "
            f"{args.resume_at + 1}-{args.steps}: it did not start from the checkpoint"
        )
    worst = 0.0
    for step in sorted(after):
        diff = abs(resumed[step] - first[step]) / abs(first[step])
        worst = max(worst, diff)
        print(f"step {step}: loss {first[step]:.5f} first run, {resumed[step]:.5f} resumed")
    print(
        f"loss {first[1]:.5f} at step 1, {first[args.steps]:.5f} at step {args.steps}; "
        f"resumed vs first run: largest relative difference {worst:.1e} (rtol {args.rtol:g})"
    )
    if worst > args.rtol:
        sys.exit(
            f"the resumed run's losses differ from the first run's by {worst:.1e} > {args.rtol:g}"
        )


if __name__ == "__main__":
    main()

"""Rerun every single-process benchmark and write the dated result files, in one command.

    python benchmarks/run_all.py [--threads 1] [--out benchmarks/results] [--distributed]

Runs, one after another (about 10 minutes on a 2-core CPU):

1. ``step_time.py`` at the default Newton-Schulz dtype (bfloat16 where this CPU multiplies it
   natively, float32 otherwise) -> ``step_time-DATE.md``;
2. ``step_time.py --ns-dtype fp32`` (float32 Newton-Schulz for every implementation)
   -> ``step_time-fp32ns-DATE.md``;
3. ``ns_quality.py`` -> ``ns_quality-DATE.md``;
4. with ``--distributed``: ``distributed_step.py --world 1,2 --shapes small``
   -> ``distributed_step-small-DATE.md`` (spawns gloo processes; a few more minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is steadiest on a shared machine)")  # fmt: skip
    ap.add_argument("--out", default=None, help="result folder (default: benchmarks/results)")
    ap.add_argument("--reps", type=int, default=None, help="override every script's --reps")
    ap.add_argument("--distributed", action="store_true", help="also run distributed_step.py")
    args = ap.parse_args(argv)
    common = ["--out", args.out] if args.out else []
    reps = ["--reps", str(args.reps)] if args.reps else []
    threads = ["--threads", str(args.threads)]
    runs = [
        ["step_time.py", *threads, *reps, *common],
        ["step_time.py", "--ns-dtype", "fp32", *threads, *reps, *common],
        ["ns_quality.py", *threads, *reps, *common],
    ]
    if args.distributed:
        runs.append(["distributed_step.py", "--world", "1,2", "--shapes", "small", *reps,
                     *common])  # fmt: skip
    for run in runs:
        t0 = time.time()
        print(f"== {' '.join(run)}", flush=True)
        res = subprocess.run([sys.executable, str(HERE / run[0]), *run[1:]],
                             stdout=subprocess.DEVNULL)  # fmt: skip
        if res.returncode != 0:
            print(f"failed with exit code {res.returncode}", file=sys.stderr)
            return res.returncode
        print(f"   {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

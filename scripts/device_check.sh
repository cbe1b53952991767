#!/usr/bin/env bash
# One command for a machine with a GPU: the CUDA tests, `normuon check --device cuda` and a
# short AdamW/Muon/NorMuon comparison at GPT-2 124M scale on the embedded corpus. Everything it
# produces goes under OUT (default: device-check/); a stage that fails is recorded and the next
# one still runs; every stage has its own time limit (30 + 120 + 120 + 150 s, and at most 15 s each to stop), so the whole
# script stays under 8 minutes.
#
#   bash scripts/device_check.sh [OUT]
#
# It runs the project from this working tree (PYTHONPATH=src) with the machine's own PyTorch and
# installs nothing from a registry; a missing Python package is taken from wheels in
# shared/wheels/ (or $WHEELS) when there are some.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-device-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WHEELS="${WHEELS:-shared/wheels}"
SUMMARY="$OUT/summary.md"
echo "# device check $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$SUMMARY"

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.txt
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "- $name: exit $rc in $((SECONDS - start)) s (limit $limit s): \`$*\`" >> "$SUMMARY"
  echo "$name: exit $rc"
}

for pkg in pytest; do
  if ! python -c "import $pkg" 2>/dev/null && [ -d "$WHEELS" ]; then
    python -m pip install --no-index --find-links "$WHEELS" "$pkg" >> "$OUT/install.txt" 2>&1
  fi
done

stage environment 30 bash -c 'nvidia-smi; python -c "import sys, torch; print(sys.version);
print(torch.__version__, torch.version.cuda, torch.cuda.is_available());
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")"'
stage pytest-cuda 120 python -m pytest -q -rs -m cuda tests/test_cuda.py -p no:cacheprovider
stage check 120 python -m normuon check --device cuda --quick --out "$OUT"
# GPT-2 124M shape, one short run per optimizer: 60 steps of 32 x 1024 bytes, eager (no
# compile, whose warm-up would take most of the budget), validation every 20 steps.
stage compare 150 python -m normuon compare --preset gpt2-124m --device cuda --steps 60 \
  --optimizers adamw,muon,normuon --out "$OUT/compare" --no-progress --overwrite \
  --set train.batch_size=32 --set train.grad_accum=1 --set train.val_every=20 \
  --set train.val_batches=4 --set train.compile=false --set train.checkpoint_every=0
cat "$SUMMARY"

#!/usr/bin/env bash
# One command for a machine with a GPU: the CUDA tests, `normuon check --device cuda --quick`, a
# short AdamW/Muon/NorMuon comparison at GPT-2 124M scale on the embedded corpus, and NorMuon
# inside torchtitan's own trainer (the command of docs/integrations.md, saved and resumed).
#
#   bash scripts/device_check.sh [--device cuda|cpu] [OUT]
#
# Everything it produces goes under OUT (default: device-check/ in the repository; a relative OUT
# is taken from the directory it is called from): each stage's output in OUT/STAGE.txt, and
# OUT/summary.md (one line per stage: exit code, seconds, limit, command) and OUT/summary.json
# (a list of {stage, exit_code, seconds, limit_s, command, skipped_reason}), both rewritten after
# every stage, so they are there however far it gets. A stage that fails or times out is recorded
# and the next one still runs. The exit code is 0 when every stage that ran exited 0, 1 when one
# did not (or the script was interrupted), 2 for a usage error.
#
# Stages: environment (nvidia-smi when there is one, Python, torch, CUDA), pytest-cuda
# (tests/test_cuda.py), check (`normuon check --quick --out OUT`), compare (60 steps per
# optimizer of the gpt2-124m preset, eager), torchtitan (`torchrun -m torchtitan.train` on one
# GPU, two when there are more, with the NorMuon override: torchtitan's Llama 3 debug model on the
# embedded corpus (normuon.integrations.torchtitan_data), 20 steps saving checkpoints at 10 and
# 20, then the run again from step 10's checkpoint, whose losses of steps 11-20 must match the
# first run's: scripts/torchtitan_resume.py; torchtitan's folder is OUT/torchtitan).
#
# Time limits on cuda: a 10 s probe of the interpreter, then 25 + 120 + 120 + 150 + 150 s for the
# stages; whatever still runs at its limit gets SIGINT (the probe SIGTERM) and, 10 s later (the
# probe 5 s), SIGKILL. Worst case: 15 + 35 + 130 + 130 + 160 + 160 = 630 s, under 11 minutes.
#
# --device cpu is a dry run of the same stages on a machine without a GPU (the CUDA tests are
# collected and skip with their reason; the check runs its correctness section only, the
# comparison is the small cpu-smoke preset, torchtitan runs 6 steps resumed from step 3 in one
# process through tests/torchtitan_cpu.py, which patches what stops torchtitan on a CPU: a few
# seconds to half a minute each; its limit is 90 s, so the worst case stays under 10 minutes).
#
# Environment:
#   PYTHON               the interpreter to use; default: the active virtualenv's
#                        ($VIRTUAL_ENV/bin/python), else python3, else python on PATH. The summary
#                        names the one used and its torch version.
#   DEVICE_CHECK_STAGES  comma-separated stages to run (default: all five); the others are
#                        listed as skipped, e.g. DEVICE_CHECK_STAGES=environment,check.
#
# It runs the project from this working tree (PYTHONPATH=src) with the machine's own PyTorch and
# installs nothing. When pytest cannot be imported, the pytest-cuda stage is skipped with that
# reason; likewise the torchtitan stage when torchtitan cannot be imported (install it as
# docs/integrations.md says, or pip install "normuon[torchtitan]").
set -uo pipefail

ALL_STAGES="environment pytest-cuda check compare torchtitan"

usage() {
  cat <<'EOF'
usage: bash scripts/device_check.sh [--device cuda|cpu] [OUT]

  --device cuda|cpu  where to run the stages (default cuda; cpu is a dry run)
  OUT                output folder (default: device-check/ in the repository)
  -h, --help         show this help

environment: PYTHON (interpreter), DEVICE_CHECK_STAGES (comma-separated subset of
environment,pytest-cuda,check,compare,torchtitan)
EOF
}

die_usage() {
  echo "device_check.sh: $1" >&2
  usage >&2
  exit 2
}

DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --device)
      [ $# -ge 2 ] || die_usage "--device needs a value (cuda or cpu)"
      DEVICE=$2
      shift 2
      ;;
    --device=*)
      DEVICE=${1#--device=}
      shift
      ;;
    --)
      shift
      [ $# -le 1 ] || die_usage "more than one OUT folder given"
      [ $# -eq 0 ] || OUT=$1
      break
      ;;
    -*)
      die_usage "unknown option: $1"
      ;;
    *)
      [ -z "$OUT" ] || die_usage "more than one OUT folder given: $OUT, $1"
      OUT=$1
      shift
      ;;
  esac
done
case "$DEVICE" in
  cuda | cpu) ;;
  *) die_usage "--device must be cuda or cpu, got '$DEVICE'" ;;
esac

STAGES="${DEVICE_CHECK_STAGES:-}"
STAGES=${STAGES//,/ }
if [ -z "${STAGES// /}" ]; then
  STAGES=$ALL_STAGES
fi
for s in $STAGES; do
  case " $ALL_STAGES " in
    *" $s "*) ;;
    *) die_usage "DEVICE_CHECK_STAGES: unknown stage '$s' (stages: ${ALL_STAGES// /,})" ;;
  esac
done

# Paths given relative to the caller's directory are resolved before moving to the repository.
CALLER_DIR=$PWD
if [ -n "$OUT" ] && [ "${OUT#/}" = "$OUT" ]; then
  OUT="$CALLER_DIR/$OUT"
fi

# The interpreter: $PYTHON, else the active virtualenv's, else python3, else python.
PY=""
PY_FROM=""
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  PY_FROM="\$PYTHON"
  case "$PY" in
    /*) ;;
    */*) PY="$CALLER_DIR/$PY" ;;
    *) PY=$(command -v "$PY" 2>/dev/null || echo "$PY") ;;
  esac
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  PY_FROM="active virtualenv"
elif command -v python3 >/dev/null 2>&1; then
  PY=$(command -v python3)
  PY_FROM="python3 on PATH"
elif command -v python >/dev/null 2>&1; then
  PY=$(command -v python)
  PY_FROM="python on PATH"
else
  PY=python3
  PY_FROM="none found: no \$PYTHON, virtualenv, python3 or python"
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-$PWD/device-check}"
mkdir -p "$OUT" || {
  echo "device_check.sh: cannot create $OUT" >&2
  exit 1
}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
SUMMARY_JSON="$OUT/summary.json"

# ------------------------------------------------------------------ results
S_NAME=()
S_RC=()
S_SECS=()
S_LIMIT=()
S_CMD=()
S_REASON=()

json_str() {  # json_str TEXT: TEXT as a JSON string
  local LC_ALL=C
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  s=${s//[$'\001'-$'\037']/}
  printf '"%s"' "$s"
}

write_json() {  # rewrite OUT/summary.json from the stages recorded so far (plain bash)
  local i sep="" rc reason
  {
    printf '['
    for ((i = 0; i < ${#S_NAME[@]}; i++)); do
      rc=${S_RC[i]:-null}
      if [ -n "${S_REASON[i]}" ]; then reason=$(json_str "${S_REASON[i]}"); else reason=null; fi
      printf '%s\n  {"stage": %s, "exit_code": %s, "seconds": %s, "limit_s": %s, "command": %s, "skipped_reason": %s}' \
        "$sep" "$(json_str "${S_NAME[i]}")" "$rc" "${S_SECS[i]}" "${S_LIMIT[i]}" \
        "$(json_str "${S_CMD[i]}")" "$reason"
      sep=","
    done
    printf '\n]\n'
  } > "$SUMMARY_JSON.tmp" && mv -f "$SUMMARY_JSON.tmp" "$SUMMARY_JSON"
}

record() {  # record NAME EXIT_CODE(empty: skipped) SECONDS LIMIT COMMAND SKIPPED_REASON [NOTE]
  S_NAME+=("$1")
  S_RC+=("$2")
  S_SECS+=("$3")
  S_LIMIT+=("$4")
  S_CMD+=("$5")
  S_REASON+=("$6")
  if [ -n "$6" ]; then
    echo "- $1: skipped ($6): \`$5\`" >> "$SUMMARY"
    echo "$1: skipped ($6)"
  else
    echo "- $1: exit $2 in $3 s (limit $4 s)${7:+ ($7)}: \`$5\`" >> "$SUMMARY"
    echo "$1: exit $2${7:+ ($7)}"
  fi
  write_json
}

quote() {  # quote ARGS...: a shell-readable, one-line rendering of a command
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=" $a"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  out=${out# }
  printf '%s' "${out//$'\n'/ }"
}

selected() {
  case " $STAGES " in
    *" $1 "*) return 0 ;;
    *) return 1 ;;
  esac
}

CHILD=""
CUR_NAME=""
CUR_LIMIT=""
CUR_CMD=""
CUR_START=0

stage() {  # stage NAME LIMIT SKIP_REASON COMMAND...: run with a time limit, log to OUT/NAME.txt
  local name=$1 limit=$2 reason=$3
  shift 3
  local cmd
  cmd=$(quote "$@")
  if ! selected "$name"; then
    record "$name" "" 0 "$limit" "$cmd" "not in DEVICE_CHECK_STAGES"
    return
  fi
  if [ -n "$reason" ]; then
    record "$name" "" 0 "$limit" "$cmd" "$reason"
    return
  fi
  CUR_NAME=$name CUR_LIMIT=$limit CUR_CMD=$cmd CUR_START=$SECONDS
  # In the background so that a signal to this script is handled at once (see on_signal);
  # timeout runs the command in its own process group and signals all of it at the limit.
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1 &
  CHILD=$!
  wait "$CHILD" 2>/dev/null
  local rc=$?
  CHILD=""
  CUR_NAME=""
  local note=""
  [ "$rc" -eq 124 ] && note="timed out"
  [ "$rc" -eq 137 ] && note="killed after the time limit"
  [ "$rc" -eq 127 ] && note="command not found"
  record "$name" "$rc" "$((SECONDS - CUR_START))" "$limit" "$cmd" "" "$note"
}

# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {  # the script was interrupted: stop the running stage, record it, exit 1
  local rc=$1
  trap - INT TERM
  if [ -n "$CHILD" ]; then
    kill -TERM "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
    record "$CUR_NAME" "$rc" "$((SECONDS - CUR_START))" "$CUR_LIMIT" "$CUR_CMD" "" "interrupted"
  fi
  echo "- interrupted (signal $((rc - 128)))" >> "$SUMMARY"
  write_json
  cat "$SUMMARY"
  exit 1
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# ------------------------------------------------------------------ the interpreter
PROBE='import sys
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "(CUDA %s)" % torch.version.cuda)
except Exception as e:
    print("torch-missing", f"{type(e).__name__}: {e}")
try:
    import pytest
    print("pytest", pytest.__version__)
except Exception as e:
    print("pytest-missing", f"{type(e).__name__}: {e}")
try:
    import torchtitan
    print("torchtitan", getattr(torchtitan, "__version__", "unknown"))
except Exception as e:
    print("torchtitan-missing", f"{type(e).__name__}: {e}")
try:
    print("gpus", torch.cuda.device_count())
except Exception:
    print("gpus", 0)'
probe_out=$(timeout --kill-after=5 10 "$PY" -c "$PROBE" 2>&1)
probe_rc=$?
printf '%s\n' "$probe_out" > "$OUT/interpreter.txt"
PY_VERSION="unknown"
TORCH="torch: unknown (probe exit $probe_rc, see interpreter.txt)"
NO_PYTEST=""
NO_TORCHTITAN="not probed (probe exit $probe_rc, see interpreter.txt)"
GPUS=0
while IFS= read -r line; do
  case "$line" in
    "python "*) PY_VERSION=${line#python } ;;
    "torch "*) TORCH="torch ${line#torch }" ;;
    "torch-missing "*) TORCH="torch not importable (${line#torch-missing })" ;;
    "pytest-missing "*) NO_PYTEST=${line#pytest-missing } ;;
    "torchtitan "*) NO_TORCHTITAN="" ;;
    "torchtitan-missing "*) NO_TORCHTITAN=${line#torchtitan-missing } ;;
    "gpus "*) GPUS=${line#gpus } ;;
  esac
done <<< "$probe_out"
case "$GPUS" in '' | *[!0-9]*) GPUS=0 ;; esac

{
  echo "# device check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "device: $DEVICE$([ "$DEVICE" = cpu ] && echo " (dry run)")"
  echo "python: $PY ($PY_FROM), Python $PY_VERSION, $TORCH"
  echo
} > "$SUMMARY"
write_json

PYTEST_SKIP=""
if [ -n "$NO_PYTEST" ]; then
  PYTEST_SKIP="pytest is not importable by $PY: $NO_PYTEST"
fi
TORCHTITAN_SKIP=""
if [ -n "$NO_TORCHTITAN" ]; then
  TORCHTITAN_SKIP="torchtitan is not importable by $PY: $NO_TORCHTITAN"
fi

# ------------------------------------------------------------------ the stages
# shellcheck disable=SC2016  # expanded by the inner bash
ENV_SH='if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi; exec "$1" -c "$2" "$3"'
ENV_PY='import sys, torch; ok = torch.cuda.is_available(); print(sys.executable); print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", ok); print(torch.cuda.get_device_name() if ok else "no GPU"); sys.exit("--device cuda but CUDA is not available" if sys.argv[1] == "cuda" and not ok else 0)'

if [ "$DEVICE" = cuda ]; then
  CHECK_LIMIT=120
  CHECK_ARGS=(--quick)
  # GPT-2 124M shape, one short run per optimizer: 60 steps of 32 x 1024 bytes, eager (no
  # compile, whose warm-up would take most of the budget), validation every 20 steps.
  COMPARE_ARGS=(--preset gpt2-124m --device cuda --steps 60
    --optimizers "adamw,muon,normuon" --out "$OUT/compare" --no-progress --overwrite
    --set train.batch_size=32 --set train.grad_accum=1 --set train.val_every=20
    --set train.val_batches=4 --set train.compile=false --set train.checkpoint_every=0)
else
  CHECK_LIMIT=120
  # The dry run checks the plumbing: the correctness section only (the whole quick check,
  # torch.compile included, runs in the test suite: tests/test_check.py).
  CHECK_ARGS=(--quick --sections correctness)
  # The dry run: the tiny cpu-smoke model, 40 steps per optimizer (a few seconds).
  COMPARE_ARGS=(--preset cpu-smoke --device cpu --steps 40
    --optimizers "adamw,muon,normuon" --out "$OUT/compare" --no-progress --overwrite
    --set train.val_every=10 --set train.checkpoint_every=0)
fi

# The torchtitan stage (scripts/torchtitan_resume.py): STEPS steps with checkpoints every
# RESUME_AT, then the same command again from the middle checkpoint, whose losses must match.
if [ "$DEVICE" = cuda ]; then
  # docs/integrations.md's command (torchrun as "$PY -m torch.distributed.run", so that it is
  # this interpreter's): the stock trainer on one GPU (two when there are more, so that FSDP
  # shards NorMuon's state), torchtitan's Llama 3 debug model and batch (8 x 2048 bytes) on the
  # embedded corpus. bf16 compute and CUDA kernels that need not be deterministic:
  # the resumed losses match to 1e-2.
  TT_LIMIT=150
  TT_ARGS=(--steps 20 --resume-at 10 --rtol 1e-2 -- "$PY" -m torch.distributed.run --standalone
    --nproc_per_node "$((GPUS >= 2 ? 2 : 1))" -m torchtitan.train
    --module normuon.integrations.torchtitan_data --config llama3_debugmodel)
else
  # The dry run: the tests' CPU launcher (torchtitan patched from outside; float32, 4 x 64
  # bytes per step), one process, which resumes to the same losses.
  TT_LIMIT=90
  TT_ARGS=(--steps 6 --resume-at 3 --rtol 1e-5 -- "$PY" -m torch.distributed.run --standalone
    --nproc_per_node 1 tests/torchtitan_cpu.py --module torchtitan_cpu
    --config llama3_debugmodel_cpu)
fi

stage environment 25 "" bash -c "$ENV_SH" environment "$PY" "$ENV_PY" "$DEVICE"
stage pytest-cuda 120 "$PYTEST_SKIP" "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py \
  -p no:cacheprovider
stage check "$CHECK_LIMIT" "" "$PY" -m normuon check --device "$DEVICE" "${CHECK_ARGS[@]}" \
  --out "$OUT"
stage compare 150 "" "$PY" -m normuon compare "${COMPARE_ARGS[@]}"
stage torchtitan "$TT_LIMIT" "$TORCHTITAN_SKIP" "$PY" scripts/torchtitan_resume.py \
  "$OUT/torchtitan" "${TT_ARGS[@]}" --override.imports normuon.integrations.torchtitan.normuon

trap - INT TERM
status=0
for ((i = 0; i < ${#S_NAME[@]}; i++)); do
  if [ -z "${S_REASON[i]}" ] && [ "${S_RC[i]}" != 0 ]; then
    status=1
  fi
done
echo "- result: $([ "$status" -eq 0 ] && echo "every stage that ran passed" || echo FAILED)" \
  >> "$SUMMARY"
echo
cat "$SUMMARY"
exit "$status"

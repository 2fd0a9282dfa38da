#!/usr/bin/env bash
# Stage 1 and the feature visualization on a GPU box: one command, one table (step, result, seconds).
#
#   benchmarks/gpu_suite.sh                 # on a CUDA machine, about 7 minutes on one H200
#   SMALL=1 benchmarks/gpu_suite.sh         # dry run with tiny sizes (works without CUDA: CUDA rows skipped)
#
# Steps (each under its own deadline; a failing step never stops the others; the whole suite stops
# starting steps after SUITE_SECONDS, default 480): install the wheels in .whl/ if there are any
# (nvImageCodec), generate ImageNet-sized JPEGs, the CUDA tests, the model step alone (float32, TF32,
# bfloat16), the whole stage 1 with each decoder (CPU workers, torchvision nvJPEG, nvImageCodec) with
# --tf32 --channels_last and with --autocast_bf16 (and CPU workers with --fast_resize), a CUDA store against a CPU store of the same images,
# two --deterministic runs (and two default runs), torchrun with one process against a plain run, and
# the paper-size feature visualization (S=512, 256 steps, 32 crops, 3 targets), and 8 channels' visualizations
# one by one against batched (per channel at 256 steps, timed over 16).
# Environment: PYTHON (default python3, or .venv/bin/python where it exists), OUT (a folder: the table
# goes to $OUT/gpu_suite.txt, the steps' output to $OUT/logs.txt), WORK (scratch folder, default a new
# one under /tmp, removed at the end unless KEEP=1), SITE (where the wheels go, default /tmp/site), SUITE_SECONDS, ONLY (a space-separated subset of
# the steps setup tests model stage1 compare deterministic torchrun featurevis; setup always runs).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
SMALL=${SMALL:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WORK=${WORK:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
mkdir -p "$WORK"
LOG="$WORK/logs.txt"
ROWS="$WORK/rows.tsv"
: > "$LOG"
: > "$ROWS"
BUDGET=${SUITE_SECONDS:-480}
START=$(date +%s)
CORES=$(nproc 2>/dev/null || echo 4)
WORKERS=$(( CORES < 16 ? CORES : 16 ))
STEPS="$PYTHON -m benchmarks.gpu_steps"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5

publish() {  # the table so far (and the logs) into $OUT
  table > "$WORK/gpu_suite.txt"
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$WORK/gpu_suite.txt" "$OUT/gpu_suite.txt"
    cp "$LOG" "$OUT/logs.txt"
  fi
}

table() {
  echo "gpu_suite: $(date -u '+%Y-%m-%d %H:%M UTC'), SMALL=$SMALL, $(( $(date +%s) - START )) s in all"
  awk -F'\t' 'BEGIN { printf "%-52s | %-7s | %s\n", "step", "seconds", "result" }
              { printf "%-52s | %7s | %s\n", $1, $3, $2 }' "$ROWS"
}

add_row() {  # name result seconds
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$ROWS"
}

want() {  # the step KEY is part of this run (ONLY: a space-separated list of keys; empty: every step)
  [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]
}

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    add_row "$name" "skipped: suite deadline (SUITE_SECONDS=$BUDGET)" ""
    publish
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "===== $name (limit ${limit} s): $*" >> "$LOG"
  local t0 t1 rc secs out="$WORK/step.out"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }')
  cat "$out" >> "$LOG"
  echo "===== $name: exit $rc after $secs s" >> "$LOG"
  local first=1
  while IFS=$'\t' read -r _ rname rresult; do
    add_row "$rname" "$rresult" "$([ $first = 1 ] && echo "$secs")"
    first=0
  done < <(grep $'^ROW\t' "$out")
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    add_row "$name" "TIMEOUT after ${limit} s (rows above, if any, are complete)" "$secs"
  elif [ "$rc" -ne 0 ]; then
    add_row "$name" "FAILED (exit $rc): $(grep -v '^ROW' "$out" | grep -E 'Error|error|FAILED|failed' | tail -1 | cut -c1-150)" "$secs"
  elif [ $first = 1 ]; then
    add_row "$name" "$(grep -v '^\s*$' "$out" | tail -1 | cut -c1-150)" "$secs"
  fi
  publish
}

# ---------------------------------------------------------------- carried wheels (nvImageCodec, nvJPEG)
SITE=${SITE:-/tmp/site}
if ls .whl/*.whl > /dev/null 2>&1; then
  t0=$(date +%s)
  if timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
       --target "$SITE" .whl/*.whl >> "$LOG" 2>&1; then
    # 'nvidia' also holds the CUDA libraries of the installed torch: one package spanning both folders
    echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)" > "$SITE/nvidia/__init__.py"
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    add_row "install .whl" "installed: $(cd .whl && ls *.whl | cut -d- -f1,2 | tr '\n' ' ')" "$(( $(date +%s) - t0 ))"
  else
    add_row "install .whl" "FAILED (see logs); going on without" "$(( $(date +%s) - t0 ))"
  fi
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>>"$LOG" || echo 0)

if [ "$SMALL" = 1 ]; then
  step "setup" 120 $STEPS setup "$WORK" --images 24 --mid 8 --few 4 --processes 2 --batch_size 8 --workers 2
else
  step "setup" 150 $STEPS setup "$WORK" --images 8000 --mid 512 --few 64 --processes "$CORES" --batch_size 256 --workers "$WORKERS"
fi

if want tests; then
  if [ "$HAS_CUDA" = 1 ]; then
    step "CUDA tests" 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_gpu_pipeline.py tests/test_devices.py
  else
    add_row "CUDA tests" "skipped: no CUDA" ""
  fi
fi

if want model; then
  if [ "$SMALL" = 1 ]; then
    step "model step" 120 $STEPS model "$WORK" --steps 1 --batch_size 2
  else
    step "model step" 120 $STEPS model "$WORK" --steps 30
  fi
fi

for dec in nvimgcodec nvjpeg cpu; do
  for prec in tf32 bf16; do
    want stage1 || continue
    if [ "$HAS_CUDA" != 1 ] && [ "$dec" != cpu ]; then
      add_row "stage 1 $dec decoding, $([ $prec = bf16 ] && echo bfloat16 || echo TF32)" "skipped: no CUDA" ""
      continue
    fi
    if [ "$SMALL" = 1 ] && [ "$prec" = bf16 ] && [ "$HAS_CUDA" != 1 ]; then
      continue  # bfloat16 on a CPU: slow and says nothing about the GPU
    fi
    step "stage 1 $dec $prec" 90 $STEPS stage1 "$WORK" --decoder "$dec" --precision "$prec"
  done
done

if want stage1 && [ "$SMALL" != 1 ]; then
  step "stage 1 cpu --fast_resize tf32" 90 $STEPS stage1 "$WORK" --decoder cpu --precision tf32 --fast_resize
fi

want compare && step "store vs CPU store" 120 $STEPS compare "$WORK"
want deterministic && step "deterministic" 120 $STEPS deterministic "$WORK"
want torchrun && step "torchrun" 90 $STEPS torchrun "$WORK"
if want featurevis; then
  if [ "$SMALL" = 1 ]; then
    step "feature visualization" 120 $STEPS featurevis "$WORK" --size 64 --steps 1 --crops 2
    step "feature visualization, many channels" 120 $STEPS featurevis_many "$WORK" --channels 2 --size 64 --steps 1 --crops 2
  else
    step "feature visualization" 120 $STEPS featurevis "$WORK" --size 512 --steps 256 --crops 32
    step "feature visualization, many channels" 120 $STEPS featurevis_many "$WORK" --channels 8 --size 512 --steps 16 --crops 32
  fi
fi

publish
table
if [ "${KEEP:-0}" != 1 ]; then
  case "$WORK" in /tmp/gpu_suite.*) rm -rf "$WORK" ;; esac
fi

#!/usr/bin/env bash
# One prepared command for a leased H200 (see benchmarks/README.md): the whole study's wall time
# first, then the KD step and an epoch against the PyTorch reference, then a short protocol
# against the reference. Most important first, each piece under its own timeout and all of them
# inside BUDGET_S (540 s), because the lease is short and a hang must not eat the rest.
#
#   bash benchmarks/gpu.sh [DATA_DIR]           # on the H200, from anywhere; results in $OUT
#   SMOKE=1 bash benchmarks/gpu.sh [DATA_DIR]   # the same pieces on CPU at toy sizes (plumbing)
#
# DATA_DIR: an ImageFolder tree, default $KDJAX_GPU_DATA or .gpu/data/hymenoptera_data (the
# device machine has no ../shared; carry .gpu). Wheels in .gpu/wheels (benchmarks/fetch_wheels.sh)
# are installed into /tmp/site first (INSTALL_WHEELS=1, the default except in smoke mode).
# PYTHON picks the interpreter (default python3, the image's). Files written to $OUT (at most 8):
#   gpu.jsonl       every benchmarks.run record, one JSON line each
#   pieces.jsonl    per piece: command, exit code, wall seconds, timeout (the study's wall time)
#   paper_phases.json  the study's epoch seconds summed per role, read from its metrics.json files
#   paper_summary.md, paper_summary.json   the study's tables
#   tables.md       benchmarks.run's ratio table over gpu.jsonl
#   env.txt         GPU, driver, package versions;   gpu.log  everything printed
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
SMOKE=${SMOKE:-0}
OUT=${OUT:-$REPO/runs/gpu$([ "$SMOKE" = 1 ] && echo _smoke)}
DATA=${1:-${KDJAX_GPU_DATA:-$REPO/.gpu/data/hymenoptera_data}}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-540}
WORK=${WORK:-/tmp/kdjax-gpu}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu.log
JSONL=$OUT/gpu.jsonl
PIECES=$OUT/pieces.jsonl
START=$(date +%s)
export PYTHONUNBUFFERED=1
export KDJAX_CACHE=$WORK/cache  # decode caches and downloads stay out of the repo

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; DTYPE=float32; SIZE=32; RUNS=1; EPOCHS=1; STEP_BATCHES="4"; STEP_MODES="fc"
  ROUNDS=1; EPOCH_ROUNDS=1; WORKERS=0; THREADS=2; INSTALL_WHEELS=${INSTALL_WHEELS:-0}
  CAP_PAPER=${CAP_PAPER:-300}; CAP_STEPS=${CAP_STEPS:-150}; CAP_EPOCH=${CAP_EPOCH:-150}
  BUDGET_S=${BUDGET_S_SMOKE:-900}
else
  DEVICE=gpu; DTYPE=bfloat16; SIZE=224; RUNS=4; EPOCHS=25; STEP_BATCHES="32 256"; STEP_MODES="fc all"
  ROUNDS=5; EPOCH_ROUNDS=3; WORKERS=8; THREADS=8; INSTALL_WHEELS=${INSTALL_WHEELS:-1}
  CAP_PAPER=${CAP_PAPER:-280}; CAP_STEPS=${CAP_STEPS:-150}; CAP_EPOCH=${CAP_EPOCH:-90}
fi

log() { echo "[gpu.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# piece NAME CAP CMD...: CMD under `timeout` of min(CAP, budget left); its wall time and exit
# code become a line of pieces.jsonl. A piece with under 20 s left is skipped, and said so.
piece() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 20 )); then
    log "skip $name: ${left} s of the budget left"
    printf '{"piece": "%s", "skipped": true, "budget_left_s": %d}\n' "$name" "$left" >>"$PIECES"
    return
  fi
  log "start $name (timeout ${limit} s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local wall
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  printf '{"piece": "%s", "rc": %d, "wall_s": %s, "timeout_s": %d, "timed_out": %s, "command": "%s"}\n' \
    "$name" "$rc" "$wall" "$limit" "$([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false)" "$*" >>"$PIECES"
  log "end $name: rc $rc, ${wall} s"
}

if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/val" ]; then
  log "no ImageFolder tree at $DATA (train/ and val/); pass DATA_DIR or set KDJAX_GPU_DATA"
  exit 2
fi

export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
if [ "$INSTALL_WHEELS" = 1 ] && compgen -G "$REPO/.gpu/wheels/*.whl" >/dev/null; then
  # the recipe of the device notes: only what the image lacks, without touching its packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$REPO"/.gpu/wheels/*.whl >>"$LOG" 2>&1 || { log "wheel install failed"; exit 3; }
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

# 0. what ran where
{
  date -u; uname -m; nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0])
for n in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
          "torchvision", "tensorflow-datasets", "array-record", "tensorboardX"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "missing")
import jax
print("jax devices", jax.devices())
EOF
  echo "data $DATA: $(find "$DATA" -type f | wc -l) files, $(du -sh "$DATA" | cut -f1)"
} >"$OUT/env.txt" 2>&1
log "env: $(grep -E '^(python|jax |torch |jax devices)' "$OUT/env.txt" | tr '\n' ';')"

# 1. the study's wall time, compilation and the teacher's fine-tuning included (scratch init)
PAPER_OUT=$WORK/paper$SIZE
rm -rf "$PAPER_OUT"
PAPER_FLAGS=()
PAPER_HELP=$("$PY" -m experiments.paper --help 2>/dev/null)  # not piped into grep -q: pipefail
# a persistent compilation cache would hide compile time from the wall time, where it has one
[[ $PAPER_HELP == *--compile_cache* ]] && PAPER_FLAGS+=(--compile_cache none)
piece paper "$CAP_PAPER" "$PY" -m experiments.paper --init scratch --data_dir "$DATA" --image_size "$SIZE" \
  --n_exp "$RUNS" --num_epochs "$EPOCHS" --dtype "$DTYPE" --out "$PAPER_OUT" "${PAPER_FLAGS[@]}" ${PAPER_ARGS:-}
cp "$PAPER_OUT/summary.md" "$OUT/paper_summary.md" 2>/dev/null
cp "$PAPER_OUT/summary.json" "$OUT/paper_summary.json" 2>/dev/null
"$PY" - "$PAPER_OUT" >"$OUT/paper_phases.json" 2>>"$LOG" <<'EOF'
import json, pathlib, sys
root = pathlib.Path(sys.argv[1])
phases = {}
for path in sorted(root.glob("**/metrics.json")):
    role = "teacher" if "teacher" in path.parts[len(root.parts):] else "students"
    history = json.loads(path.read_text())["history"]
    p = phases.setdefault(role, {"runs": 0, "epochs": 0, "epoch_s": 0.0})
    p["runs"] += 1
    p["epochs"] += len(history)
    p["epoch_s"] += sum(r["seconds"] for r in history)
print(json.dumps(phases, indent=1))
EOF

# 2. the KD step alone, kdjax against both reference variants, compile times (cases in order)
BENCH=("$PY" -m benchmarks.run --device "$DEVICE" --dtype "$DTYPE" --image_size "$SIZE" --threads "$THREADS"
       --workers "$WORKERS" --data_dir "$DATA" --out "$JSONL")
# jax and torch share the GPU in one process: no 75% preallocation for jax
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
# shellcheck disable=SC2086
piece steps "$CAP_STEPS" "${BENCH[@]}" --skip epoch --batch $STEP_BATCHES --mode $STEP_MODES --rounds "$ROUNDS"

# 3. one epoch including data, kdjax against both reference variants
piece epoch "$CAP_EPOCH" "${BENCH[@]}" --skip step --epoch_rounds "$EPOCH_ROUNDS"

# 4. a short study against the reference's (its DataLoader too), with what budget is left
piece protocol_vs_torch "$BUDGET_S" "${BENCH[@]}" --skip step epoch --protocol --protocol_runs 1 \
  --protocol_epochs "$([ "$SMOKE" = 1 ] && echo 1 || echo 2)"

"$PY" - "$JSONL" >"$OUT/tables.md" 2>>"$LOG" <<'EOF'
import json, sys
from benchmarks import run
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()] if len(sys.argv) > 1 else []
print(run.markdown_table(records))
EOF
cat "$OUT/tables.md" "$OUT/paper_phases.json" "$PIECES" >&2
log "done in $(( $(date +%s) - START )) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"

#!/usr/bin/env bash
# Everything that needs a GPU, in one go (at most ~6 minutes on one H100/H200-class GPU):
#   1. every GPU-only test (pytest -m gpu; they skip without CUDA)
#   2. bf16/fp16 features against fp32 (mean cosine >= 0.999)
#   3. finetune-lrf, one epoch in bf16, on phantoms
#   4. the throughput benchmark (benchmarks/gpu_embed.py: bare bf16 forward vs mavl end to end)
# One summary line per check, then one overall line. `--dry-run` runs the same steps on CPU with a
# tiny model (what can be checked without a GPU: the script and the code paths, not the speed).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
DRY=""
[ "${1:-}" = "--dry-run" ] && DRY="--dry-run"
PY=${PYTHON:-python}
LOG=$(mktemp -d)
fails=0
summary=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the last summary-looking line
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$@" >"$LOG/$name.out" 2>&1; then rc=0; else rc=$?; fi
    local line
    line=$(grep -E "^(precision|finetune-lrf|gpu_embed):|passed|skipped|failed|error" "$LOG/$name.out" | tail -1)
    [ $rc -eq 124 ] && line="timed out after ${limit}s"
    if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fails=$((fails + 1)); fi
    summary+=("$name: $status ($((SECONDS - t0))s): ${line:-no output, see $LOG/$name.out}")
    echo "${summary[-1]}"
}

if [ -n "$DRY" ]; then
    step gpu-tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_fastpath.py
else
    step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
fi
step precision 90 "$PY" benchmarks/device_check.py precision $DRY
step finetune 90 "$PY" benchmarks/device_check.py finetune $DRY
step throughput 150 "$PY" benchmarks/gpu_embed.py $DRY
echo "device_check${DRY:+ (dry run, CPU)}: $((4 - fails))/4 checks passed in ${SECONDS}s (logs in $LOG)"
[ $fails -eq 0 ]

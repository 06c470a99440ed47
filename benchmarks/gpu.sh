#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU, in one call that fits 15 minutes of GPU time with
# room for a second try. Each step has a time limit; the plan adds up to under 9 minutes:
#   build   240 s  pip install -e . against this machine's own torch and Triton, sm_90a only,
#                  MAX_JOBS=16 (TORCH_CUDA_ARCH_LIST and MAX_JOBS may be set to override)
#   info     20 s  nvidia-smi, fastdl info
#   tests   150 s  the CUDA tests (pytest -m cuda), one process per test file, 4 at a time
#   bench   120 s  the quick benchmarks on CUDA, with the device's two ceilings measured in the
#                  same run (device-to-device copy GB/s, bf16 matmul TFLOP/s); each case is also
#                  reported as a fraction of its ceiling
#   summary  10 s  $OUT/summary.json: device, versions, commit, date, each step's status and
#                  seconds, the tests' counts, the ceilings and every benchmark case
# Logs go to $OUT too: build.log info.txt tests-<file>.log/.xml bench-cuda.log bench-cuda.json.
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
#
# Without a CUDA device (this project's CI machines) every step still runs and pytest skips each
# CUDA test and benchmark with its reason: a dry run of the plan. Exits 0 when every step passed.
# Environment: PYTHON (default: python3 if it imports torch, else .venv/bin/python); FASTDL_COMMIT
# (the commit recorded where this copy of the repo has no .git).
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs and results}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    python3 -c "import torch" 2>/dev/null || PYTHON=.venv/bin/python
fi
STEPS="$OUT/steps.tsv"
: >"$STEPS"

# run NAME LIMIT CMD...: CMD (a command or an exported function) under `timeout LIMIT`, its status
# and seconds appended to steps.tsv.
run() {
    local name=$1 limit=$2 start status
    shift 2
    echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S))"
    start=$(date +%s)
    timeout -s INT -k 20 "$limit" bash -c '"$@"' _ "$@"
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - start))" >>"$STEPS"
    [[ $status -eq 124 ]] && echo "$name: over its ${limit}s limit (interrupted)"
    return $status
}
skip() {
    echo "== $1: skipped, $2"
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$STEPS"
}

build() { "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 ||
    { tail -n 40 "$OUT/build.log"; return 1; }; }
info() { { nvidia-smi; "$PYTHON" -m fastdl info; } >"$OUT/info.txt" 2>&1; tail -n 5 "$OUT/info.txt"; }
cuda_tests() {
    # The files holding CUDA tests, each its own process (their GPU memory is small): 4 at a time.
    grep -l "mark.cuda" tests/*.py tests/*/*.py | xargs -P 4 -I{} sh -c \
        'f={}; n=$(basename "$f" .py); "$0" -m pytest -m cuda -q -p no:cacheprovider "$f" \
         --junitxml="$1/tests-$n.xml" >"$1/tests-$n.log" 2>&1; s=$?; [ $s -eq 5 ] && s=0; \
         echo "$f: exit $s"; exit $s' "$PYTHON" "$OUT"
}
bench() { "$PYTHON" -m pytest benchmarks --device cuda --quick --json-out "$OUT/bench-cuda.json" \
    --benchmark-max-time=0.2 -q -p no:cacheprovider 2>&1 | tee "$OUT/bench-cuda.log"; }

export -f build info cuda_tests bench
export PYTHON OUT
failed=0
run build "${BUILD_LIMIT:-240}" build || failed=1
if [[ $failed -eq 0 ]]; then
    # Without a CUDA device the steps still run (a dry run of their command lines): pytest skips
    # each CUDA test and benchmark, saying why.
    "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null ||
        echo "no CUDA device visible to $PYTHON's torch: a dry run, every GPU test and benchmark skips"
    run info 20 info || true
    run tests 150 cuda_tests || failed=1
    run bench 120 bench || failed=1
else
    for s in info tests bench; do skip "$s" "the build failed (see build.log)"; done
fi
run summary 10 "$PYTHON" benchmarks/gpu_summary.py "$OUT" || failed=1
echo "== done: $(cut -f1,2 "$STEPS" | tr '\t\n' '= ')"
exit $failed

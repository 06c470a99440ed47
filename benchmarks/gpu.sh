#!/usr/bin/env bash
# Everything that needs a GPU, in one call: build fastdl against this machine's torch, run the CUDA
# tests, run the benchmarks on CUDA. Logs and results go to $OUT:
#   build.log  info.txt  tests-cuda.log  bench-cuda.log  bench-cuda.json
#
#   OUT=/tmp/out bash benchmarks/gpu.sh
#
# Exits with the CUDA tests' status, or when they pass, the benchmarks' (a failed build exits 1).
# Environment:
#   PYTHON         the interpreter holding torch (default: python3)
#   BENCH_ARGS     extra pytest arguments for the benchmarks, e.g. "--quick" or "-k fp32"
#   BENCH_TIMEOUT  seconds after which the benchmarks are interrupted (they still write the JSON of
#                  what they measured); default: none
#   FASTDL_COMMIT  the commit recorded in the JSON when this copy of the repo has no .git
set -euo pipefail
: "${OUT:?set OUT to the folder for the logs and results}"
PYTHON=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() { echo "== $* ($(date -u +%H:%M:%S))"; }

step "build: pip install --no-build-isolation --no-deps -e ."
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "build failed: see $OUT/build.log"
    exit 1
fi

step "info"
{
    nvidia-smi || true
    "$PYTHON" -m fastdl info ||
        "$PYTHON" -c 'import fastdl, json; print(json.dumps(fastdl.info(), indent=1))'
} >"$OUT/info.txt" 2>&1 || true
grep -iE "extension|loaded|error" "$OUT/info.txt" | head -n 5 || true

step "CUDA tests: pytest -m cuda tests"
tests=0
"$PYTHON" -m pytest -m cuda tests -q 2>&1 | tee "$OUT/tests-cuda.log" || tests=$?

step "benchmarks on CUDA"
bench=0
limit=()
if [[ -n "${BENCH_TIMEOUT:-}" ]]; then
    limit=(timeout -s INT -k 30 "$BENCH_TIMEOUT")
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
"${limit[@]}" "$PYTHON" -m pytest benchmarks --device cuda --json-out "$OUT/bench-cuda.json" \
    --benchmark-max-time=0.2 -q ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench-cuda.log" || bench=$?
if [[ $bench -eq 124 ]]; then  # timeout's status; report pytest's own "interrupted" instead
    echo "benchmarks interrupted after BENCH_TIMEOUT=${BENCH_TIMEOUT}s: the JSON holds what was measured"
    bench=2
fi

step "done: CUDA tests exit $tests, benchmarks exit $bench"
if [[ $tests -ne 0 ]]; then
    exit "$tests"
fi
exit "$bench"

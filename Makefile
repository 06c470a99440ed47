# fastdl: `make test` (the CI command), `make demo` (the main job), `make bench`.
# Each target sets everything up itself: a .venv with the pinned dev dependencies, then the
# extension (C++ kernels, plus CUDA objects when a CUDA toolkit is found) built in place.
# demo: fastdl info, fastdl check (every op and model against its reference), one epoch of the cnn,
# then fastdl bench --quick (runs/bench/: bench.json, bench.md, bench.png), ending on its table.
# bench: every case of benchmarks/bench_*.py (pytest-benchmark; benchmarks/results/latest-<device>.json).
# gpu-ready: every Triton kernel compiled for sm_80 / sm_90 and every CUDA kernel's ptxas report, with
# no GPU; rewrites docs/gpu-resources.md and fastdl/triton/attention_resources.json (commit both).
# gpu-check: on a GPU machine, with its own torch: build for sm_90a, CUDA tests, quick benchmarks and
# the device's ceilings in under 9 minutes (benchmarks/gpu.sh; OUT= where logs go, default runs/gpu-check).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MAX_JOBS ?= 2

.PHONY: build test demo bench gpu-ready gpu-check clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

build: $(VENV)/.deps
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

test: build
	$(BIN)/python -m pytest tests

demo: build
	$(BIN)/python -m fastdl info
	$(BIN)/python -m fastdl check
	$(BIN)/python -m fastdl train cnn --epochs 1 --out runs
	$(BIN)/python -m fastdl bench --quick --out runs/bench

bench: build
	$(BIN)/python -m pytest benchmarks --benchmark-enable

gpu-ready: build
	$(BIN)/python -m fastdl.gpu_ready

gpu-check:
	OUT=$${OUT:-runs/gpu-check} bash benchmarks/gpu.sh

clean:
	rm -rf build *.egg-info fastdl/*.so .pytest_cache .benchmarks

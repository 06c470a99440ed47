# fastdl: `make test` (the CI command), `make demo` (the main job), `make bench`.
# Each target sets everything up itself: a .venv with the pinned dev dependencies, then the
# extension (C++ kernels, plus CUDA objects when a CUDA toolkit is found) built in place.
# demo: fastdl info, fastdl check (every op and model against its reference), one epoch of the cnn,
# then fastdl bench --quick (runs/bench/: bench.json, bench.md, bench.png), ending on its table.
# bench: every case of benchmarks/bench_*.py (pytest-benchmark; benchmarks/results/latest-<device>.json).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MAX_JOBS ?= 2

.PHONY: build test demo bench clean

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

clean:
	rm -rf build *.egg-info fastdl/*.so .pytest_cache .benchmarks

"""pytest-benchmark entry points of fastdl.bench (`make bench`): options, timing, one JSON file of results per run.

Each benchmarks/bench_<stem>.py names its stem module of fastdl.bench as BENCH and holds one test
taking `case` and `impl`, parametrized here from BENCH.cases and BENCH.IMPLS, and calling
`measure(BENCH, case, impl)`. pytest-benchmark times the step and prints its table, grouped by
case; on CUDA the step synchronizes, and the number kept is triton.testing.do_bench's median. The
harness (fastdl/bench/harness.py) describes the steps, the timing and the peak memory. At the end
of the session the medians of the impls of each case are set side by side and written, with the
conditions of the run (device, versions, commit, date, threads), to one JSON file, and their table
is printed.

    python -m pytest benchmarks/bench_batch_norm_act.py [--quick] [--device cuda] [--json-out PATH]
"""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fastdl.bench import harness, report

HERE = Path(__file__).parent


@dataclass
class Run:
    """What a session measured: per (op, case name), the case, a median and the peak memory per impl."""
    records: dict = field(default_factory=dict)
    out: dict = None  # the JSON written at the end of the session, and where
    path: Path = None


RUN = pytest.StashKey[Run]()


def pytest_addoption(parser):
    group = parser.getgroup("fastdl benchmarks")
    group.addoption("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    group.addoption("--quick", action="store_true", help="a few small cases, to try the harness")
    group.addoption("--json-out", metavar="PATH",
                    help="where to write the results (default: benchmarks/results/latest-<device>.json)")


def pytest_configure(config):
    config.stash[RUN] = Run()


def pytest_collect_file(file_path, parent):
    """Collects benchmarks/bench_*.py (pytest itself collects only test_*.py unless a file is named)."""
    if file_path.match("bench_*.py") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_generate_tests(metafunc):
    """Parametrizes a benchmark with its stem's cases (for --device and --quick) and impls."""
    bench = getattr(metafunc.module, "BENCH", None)
    if bench is not None and {"case", "impl"} <= set(metafunc.fixturenames):
        cs = bench.cases(metafunc.config.getoption("--device"), metafunc.config.getoption("--quick"))
        metafunc.parametrize("case", cs, ids=[c["name"] for c in cs])
        metafunc.parametrize("impl", bench.IMPLS)


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device visible")
    return torch.device(name)


@pytest.fixture
def measure(benchmark, pytestconfig, device):
    """measure(bench, case, impl): builds the impl's step (skipped where it does not apply), warms it
    up, times it, and records its median and peak memory for the summary."""
    records = pytestconfig.stash[RUN].records

    def run(bench, case, impl):
        try:
            step = harness.build_step(bench, case, impl, device)
        except harness.Unsupported as e:
            if not benchmark.disabled:
                harness.record_of(records, case)["skipped"][impl] = str(e)
            pytest.skip(str(e))
        benchmark.group = case["name"]
        benchmark.extra_info.update(case, impl=impl)
        timed = harness.synchronized(step, device)
        harness.warm_up(timed)
        benchmark(timed)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        record = harness.record_of(records, case)
        record["seconds"][impl] = harness.cuda_median(step) if device.type == "cuda" else benchmark.stats.stats.median
        record["peak_bytes"][impl] = harness.peak_memory(step, device)
    return run


def pytest_sessionfinish(session):
    """Writes the run's conditions and a row per case to the JSON file, when anything was timed."""
    config = session.config
    run = config.stash[RUN]
    if not run.records:
        return
    device = torch.device(config.getoption("--device"))
    run.out = harness.results(run.records, device, "pytest-benchmark median (wall clock)")
    run.path = Path(config.getoption("--json-out") or HERE / "results" / f"latest-{device.type}.json")
    report.write_json(run.out, run.path)


def pytest_terminal_summary(terminalreporter, config):
    """The table of medians, speed-ups (eager / fastdl, compile / fastdl) and peak memory, and where
    the JSON went."""
    run = config.stash[RUN]
    if run.out is None:
        return
    terminalreporter.section(report.title(run.out))
    for line in report.render(run.out).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"results: {run.path}")

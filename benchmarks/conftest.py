"""The benchmark harness: options, timing, and one JSON file of results per run.

Each benchmark is a pytest test taking `case` (a dict describing what is measured: op, name,
shape, dtype, mode, pass, bytes: the traffic its GB/s are counted from, or flops: the work its
TFLOP/s are counted from) and `impl` ("fastdl", "eager", "compile", or another baseline's name),
and calling `measure(step, case, impl)`. pytest-benchmark times the step and
prints its table, grouped by case; on CUDA the step synchronizes, and the number kept is
triton.testing.do_bench's median (CUDA events, L2 flushed between calls). One more call, outside the
timing, measures the step's peak memory: the most bytes it has allocated at once beyond what was
allocated before it (on CUDA from the caching allocator's counters, on CPU from torch.profiler's
record of every allocation and free). At the end of the session
the medians of the impls of each case are set side by side and written, with the conditions of the
run (device, versions, commit, date, threads), to one JSON file.

    python -m pytest benchmarks/bench_batch_norm_act.py [--quick] [--device cuda] [--json-out PATH]
"""
import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import fastdl

HERE = Path(__file__).parent
IMPLS = ("fastdl", "eager", "compile")


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


@pytest.fixture(scope="session")
def device(pytestconfig):
    name = pytestconfig.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device visible")
    return torch.device(name)


def synchronized(fn, device):
    """fn followed by a wait for the device, so that a wall-clock timer sees the kernels' time."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def peak_memory(fn, device):
    """Bytes allocated on the device by one call of fn beyond what was allocated before it."""
    if device.type != "cuda":
        return cpu_peak_memory(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_peak_memory(fn):
    """Bytes allocated on the CPU by one call of fn beyond what was allocated before it: the highest
    running sum, in time order, of the allocations (+bytes) and frees (-bytes) that torch.profiler
    (profile_memory=True) records during the call. fn runs twice under the profiler and the second
    call is the one counted, so that what it frees of the first call's allocations (a training
    step's gradients, set to None and allocated again) is known to the profiler and subtracted,
    as the CUDA counters do (the free of a block allocated before profiling began is not recorded)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("cpu_peak_memory"):
            fn()
    events = prof.profiler.kineto_results.events()  # signed sizes, which prof.events() drops inside ops
    [mark] = [e for e in events if e.name() == "cpu_peak_memory"]
    memory = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
                     and mark.start_ns() <= e.start_ns() <= mark.end_ns()), key=lambda e: e.start_ns())
    peak = total = 0
    for e in memory:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


@pytest.fixture
def measure(benchmark, pytestconfig, device):
    """measure(step, case, impl): warms step up, times it, and records its median for the summary."""
    def run(step, case, impl):
        benchmark.group = case["name"]
        benchmark.extra_info.update(case, impl=impl)
        timed = synchronized(step, device)
        for _ in range(3):  # the allocator, Triton's JIT and torch.compile do their work here
            timed()
        benchmark(timed)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        key = (case["op"], case["name"])
        record = pytestconfig.stash[RUN].records.setdefault(key, dict(case=case, seconds={}, peak_bytes={}))
        if device.type == "cuda":
            import triton.testing

            record["seconds"][impl] = triton.testing.do_bench(step, return_mode="median") / 1e3
        else:
            record["seconds"][impl] = benchmark.stats.stats.median
        record["peak_bytes"][impl] = peak_memory(step, device)
    return run


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy_, counting bytes read and bytes written."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    return 2 * src.nbytes / seconds


def summarize(record, copy_bps):
    """One JSON row: the case, its medians and peak memory, each baseline's time over fastdl's
    (fastdl / eager / compile first, then any other baselines the benchmark measured, e.g. SDPA's
    backends), and on CUDA GB/s; TFLOP/s when the case counts its flops."""
    case, sec = record["case"], record["seconds"]
    fast = sec.get("fastdl")
    impls = list(IMPLS) + sorted(set(sec) - set(IMPLS))
    row = dict(case, median_s={impl: sec.get(impl) for impl in impls},
               peak_bytes={impl: record["peak_bytes"].get(impl) for impl in impls})
    for impl in impls[1:]:
        row[f"{impl}_over_fastdl"] = sec[impl] / fast if fast and sec.get(impl) else None
    if case.get("flops"):
        row["tflops"] = {impl: case["flops"] / t / 1e12 for impl, t in sec.items() if t}
    if copy_bps is not None:
        row["fastdl_gbps"] = case["bytes"] / fast / 1e9 if fast and case.get("bytes") else None
        row["fastdl_fraction_of_copy"] = case["bytes"] / fast / copy_bps if fast and case.get("bytes") else None
    return row


def git_commit():
    """HEAD's short hash, '-dirty' when tracked files differ from it; else $FASTDL_COMMIT or 'unknown'."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTDL_COMMIT", "unknown")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(device):
    """What a reader needs to compare two result files: device, versions, commit, date, threads."""
    info = fastdl.info()
    return dict(
        device=device.type, device_name=device_name(device), versions=info["versions"],
        commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        threads=torch.get_num_threads(), extension_build=info["extension"]["build"],
        timer=("triton.testing.do_bench median (CUDA events, L2 flushed)" if device.type == "cuda"
               else "pytest-benchmark median (wall clock)"),
    )


def pytest_sessionfinish(session):
    """Writes the run's conditions and a row per case to the JSON file, when anything was timed."""
    config = session.config
    run = config.stash[RUN]
    if not run.records:
        return
    device = torch.device(config.getoption("--device"))
    copy_bps = copy_bandwidth(device) if device.type == "cuda" else None
    run.out = dict(conditions(device), copy_gbps=copy_bps / 1e9 if copy_bps else None,
                   cases=[summarize(r, copy_bps) for r in run.records.values()])
    run.path = Path(config.getoption("--json-out") or HERE / "results" / f"latest-{device.type}.json")
    run.path.parent.mkdir(parents=True, exist_ok=True)
    run.path.write_text(json.dumps(run.out, indent=1) + "\n")


def _ms(seconds):
    return f"{seconds * 1e3:9.3f}" if seconds else f"{'-':>9}"


def _x(ratio):
    return f"{ratio:7.2f}x" if ratio else f"{'-':>8}"


def _mib(peaks):
    """fastdl/eager/compile peak memory in MiB, e.g. '12.5/14/14'."""
    return "/".join(f"{peaks[impl] / 2**20:.3g}" if peaks.get(impl) is not None else "-" for impl in IMPLS)


def pytest_terminal_summary(terminalreporter, config):
    """A table of medians, speed-ups (eager / fastdl, compile / fastdl) and peak memory, and where
    the JSON went."""
    run = config.stash[RUN]
    if run.out is None:
        return
    out, tr = run.out, terminalreporter
    cuda = out["copy_gbps"] is not None
    tr.section(f"fastdl vs eager vs torch.compile on {out['device_name']} ({out['threads']} threads)")
    width = max([44] + [len(row["name"]) for row in out["cases"]])
    head = (f"{'case':{width}} {'fastdl ms':>9} {'eager ms':>9} {'compile':>9} {'eager/':>8} {'compile/':>8} "
            f"{'peak MiB f/e/c':>17}")
    tr.write_line(head + (f" {'GB/s':>7} {'of copy':>7}" if cuda else ""))
    for row in out["cases"]:
        m = row["median_s"]
        line = (f"{row['name']:{width}} {_ms(m['fastdl'])} {_ms(m['eager'])} {_ms(m['compile'])} "
                f"{_x(row['eager_over_fastdl'])} {_x(row['compile_over_fastdl'])} {_mib(row['peak_bytes']):>17}")
        if cuda and row["fastdl_gbps"]:
            line += f" {row['fastdl_gbps']:7.0f} {row['fastdl_fraction_of_copy']:7.0%}"
        tr.write_line(line)
        others = [impl for impl in m if impl not in IMPLS and m[impl]]
        if others:
            tr.write_line(" " * 4 + "  ".join(f"{impl} {_ms(m[impl]).strip()} ms ({_x(row[f'{impl}_over_fastdl']).strip()})"
                                              for impl in others))
    if cuda:
        tr.write_line(f"device-to-device copy: {out['copy_gbps']:.0f} GB/s (bytes read + written)")
    tr.write_line(f"results: {run.path}")

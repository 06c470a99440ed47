"""The benchmark harness: building a step, timing it, its peak memory, and the conditions of a run.

A stem module (fastdl.bench.batch_norm_act, ...) gives `cases(device, quick, dtypes)`: dicts
describing what is measured (op, name, shape, dtype, mode, pass, bytes: the traffic its GB/s are
counted from, or flops: the work its TFLOP/s are counted from), `IMPLS`: the implementations it
compares ("fastdl", "eager", "compile", or another baseline's name), and `make_step(case, impl,
device)`: a function running one forward (and backward, or training step) of that impl on inputs
made once. Each step is warmed up (the allocator, Triton's JIT and torch.compile do their work
there), then timed: on CUDA by triton.testing.do_bench's median (CUDA events, L2 flushed between
calls), on CPU by a wall-clock median (`fastdl bench`) or pytest-benchmark's (`make bench`). One
more call, outside the timing, measures the step's peak memory: the most bytes it has allocated at
once beyond what was allocated before it (on CUDA from the caching allocator's counters, on CPU
from torch.profiler's record of every allocation and free). The medians of the impls of each case
are then set side by side (`summarize`) with the conditions of the run (device, versions, commit,
date, threads).
"""
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fastdl
from fastdl import _backends
from fastdl._info import cpu_model

IMPLS = ("fastdl", "eager", "compile")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Unsupported(Exception):
    """make_step's answer when an impl does not apply to a case (the message says why)."""


def dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def fallback(op, device, dtype):
    """Why fastdl would run op's pure-PyTorch reference rather than a kernel for (device, dtype),
    as fastdl.info() reports it; None when a kernel runs (or `op` is not a registered op)."""
    if op not in _backends.OPS:
        return None
    backend = _backends.choose(op, device, dtype)
    return backend.reason if backend.name == "reference" else None


def build_step(stem, case, impl, device):
    """stem.make_step(case, impl, device), with torch.compile's caches emptied first for "compile"
    (a fresh cache for each case: no recompile limit, no dynamic-shape kernels)."""
    if impl == "compile":
        torch._dynamo.reset()
    return stem.make_step(case, impl, device)


def grad_step(forward, inputs, case):
    """The step of a case: forward() under no_grad when case["pass"] is "fwd" (inference), else
    forward() and torch.autograd.grad of `inputs` for a random output gradient drawn once."""
    if case["pass"] == "fwd":
        def step():
            with torch.no_grad():
                return forward()
        return step
    with torch.no_grad():
        grad = torch.randn_like(forward())

    def step():
        return torch.autograd.grad(forward(), inputs, grad)
    return step


def synchronized(fn, device):
    """fn followed by a wait for the device, so that a wall-clock timer sees the kernels' time."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)
    return run


def warm_up(fn, calls=3):
    for _ in range(calls):
        fn()


def cuda_median(step):
    """Seconds: triton.testing.do_bench's median (CUDA events, L2 flushed between calls)."""
    import triton.testing

    return triton.testing.do_bench(step, return_mode="median") / 1e3


def median_seconds(step, device, budget, runs=(5, 200)):
    """The step's median time in seconds: on CUDA cuda_median; on CPU the median of wall-clock
    runs, at least runs[0] of them and more while `budget` seconds last, at most runs[1]."""
    if device.type == "cuda":
        return cuda_median(step)
    least, most = runs
    times = []
    start = time.perf_counter()
    while len(times) < least or (len(times) < most and time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # no log lines from the profiler each call, unless asked
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


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy_, counting bytes read and bytes written."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * src.nbytes / cuda_median(lambda: dst.copy_(src))


def matmul_flops(device, n=8192):
    """FLOP/s of a large bf16 matmul (n x n by n x n, 2 n^3 flops): the device's tensor-core ceiling."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / cuda_median(lambda: a @ b)


def record_of(records, case):
    """The record of `case` in `records` (keyed by (op, name)), made on first use: the case, and per
    impl its median seconds, its peak bytes, or why it was not measured."""
    return records.setdefault((case["op"], case["name"]), dict(case=case, seconds={}, peak_bytes={}, skipped={}))


def summarize(record, copy_bps, matmul_fps=None):
    """One JSON row: the case, its medians and peak memory, each baseline's time over fastdl's
    (fastdl / eager / compile first, then any other baselines the benchmark measured, e.g. SDPA's
    backends), the impls not measured and why, and on CUDA GB/s and its fraction of the copy
    ceiling; TFLOP/s when the case counts its flops (on CUDA with its fraction of the bf16 matmul
    ceiling)."""
    case, sec = record["case"], record["seconds"]
    fast = sec.get("fastdl")
    impls = list(IMPLS) + sorted(set(sec) - set(IMPLS))
    row = dict(case, median_s={impl: sec.get(impl) for impl in impls},
               peak_bytes={impl: record["peak_bytes"].get(impl) for impl in impls}, skipped=record["skipped"])
    for impl in impls[1:]:
        row[f"{impl}_over_fastdl"] = sec[impl] / fast if fast and sec.get(impl) else None
    if case.get("flops"):
        row["tflops"] = {impl: case["flops"] / t / 1e12 for impl, t in sec.items() if t}
        if matmul_fps and fast:
            row["fastdl_fraction_of_matmul"] = case["flops"] / fast / matmul_fps
    if copy_bps is not None:
        row["fastdl_gbps"] = case["bytes"] / fast / 1e9 if fast and case.get("bytes") else None
        row["fastdl_fraction_of_copy"] = case["bytes"] / fast / copy_bps if fast and case.get("bytes") else None
    return row


def git_commit():
    """HEAD's short hash, '-dirty' when tracked files differ from it; else $FASTDL_COMMIT or 'unknown'."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FASTDL_COMMIT", "unknown")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


# The x86 vector extensions the CPU kernels' speed depends on, as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")


def cpu_isa():
    """The ISA_FLAGS this CPU reports (empty where /proc/cpuinfo is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ISA_FLAGS if f in have]
    except OSError:
        pass
    return []


def conditions(device, cpu_timer):
    """What a reader needs to compare two result files: device (and the CPU's model and vector
    extensions: the CPU kernels' speed differs between AVX2 and AVX-512), versions, commit, date,
    threads, and how times were taken (`cpu_timer` describes the CPU timer)."""
    info = fastdl.info()
    return dict(
        device=device.type, device_name=device_name(device), cpu=device_name(torch.device("cpu")),
        cpu_isa=cpu_isa(), kernel_isa={k: info["cpu"].get(k) for k in ("active", "reason", "supported")},
        versions=info["versions"],
        commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        threads=torch.get_num_threads(), extension_build=info["extension"]["build"],
        timer="triton.testing.do_bench median (CUDA events, L2 flushed)" if device.type == "cuda" else cpu_timer,
    )


def results(records, device, cpu_timer, **about):
    """The results of a run: its conditions, `about` it, the device's two ceilings on CUDA (copy
    GB/s, bf16 matmul TFLOP/s, measured in the same run), and a row per case."""
    cuda = device.type == "cuda"
    copy_bps = copy_bandwidth(device) if cuda else None
    matmul_fps = matmul_flops(device) if cuda else None
    return dict(conditions(device, cpu_timer), **about, copy_gbps=copy_bps / 1e9 if copy_bps else None,
                matmul_tflops=matmul_fps / 1e12 if matmul_fps else None,
                cases=[summarize(r, copy_bps, matmul_fps) for r in records.values()])

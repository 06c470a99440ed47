"""ptxas's resource report for every CUDA kernel of csrc/cuda, per target, without a GPU.

Each .cu file is compiled to an object with `nvcc -Xptxas -v` (the kernels include no torch
header, so the toolkit alone builds them); ptxas prints, per kernel instantiation, its registers,
spills and static shared memory. Dynamic shared memory is sized at launch by the host code: the
host's own checks bound it (see csrc/cuda/*_api.cpp).
"""
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = ("csrc/cuda/depthwise_conv2d.cu", "csrc/cuda/rnn.cu")
ARCHS = {"sm_80": "80", "sm_90": "90"}
# Spill bytes per thread (stores + loads) a CUDA kernel may have: 128. ptxas spills a few values
# (8-120 B) of some depthwise kernels with a runtime kernel size (K = 0) or fp64, where it chose
# 40-64 registers for occupancy; beyond that, a spill means a kernel's registers grew.
SPILL_LIMIT = 128

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclasses.dataclass
class Row:
    source: str
    kernel: str  # demangled
    target: str
    registers: int
    spills: int  # bytes per thread, stores + loads
    shared: int  # static bytes per block


def nvcc():
    """The nvcc to run: $CUDA_HOME/bin/nvcc, else the one on PATH (None: no toolkit)."""
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def parse(source, log):
    """Rows from one ptxas -v log."""
    rows, entry = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = [m.group(1), m.group(2), 0]
        elif entry and (m := _SPILL.search(line)):
            entry[2] = int(m.group(1)) + int(m.group(2))
        elif entry and (m := _USED.search(line)):
            rows.append(Row(source, entry[0], entry[1], int(m.group(1)), entry[2], int(m.group(2) or 0)))
            entry = None
    for row, name in zip(rows, _demangle([r.kernel for r in rows])):
        row.kernel = name
    return rows


def compile_report(source, target, exe=None):
    """Compiles ROOT/source for target (sm_80 / sm_90); returns its rows. Raises CalledProcessError
    (with nvcc's output) when it does not compile."""
    exe = exe or nvcc()
    arch = ARCHS[target]
    with tempfile.TemporaryDirectory() as d:
        cmd = [exe, "-std=c++17", "-O3", "-c", os.path.join(ROOT, source), "-o", os.path.join(d, "k.o"),
               "-I", os.path.join(ROOT, "csrc"), f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return parse(source, done.stderr)


def run(targets=tuple(ARCHS), sources=SOURCES, processes=None):
    """Rows of every (source, target), compiled in parallel."""
    exe = nvcc()
    if exe is None:
        raise FileNotFoundError("nvcc: no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    jobs = [(s, t) for s in sources for t in targets]
    with concurrent.futures.ThreadPoolExecutor(processes or os.cpu_count() or 1) as pool:
        done = list(pool.map(lambda j: compile_report(*j, exe=exe), jobs))
    return [r for rows in done for r in rows]


def failures(rows):
    return [f"{r.source} {r.kernel} {r.target}: spills {r.spills} B per thread over {SPILL_LIMIT}"
            for r in rows if r.spills > SPILL_LIMIT]

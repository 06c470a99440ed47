"""Compile a Triton kernel ahead of time for a GPU target, with no GPU, from a real wrapper's launch.

`record(module, names)` swaps the module's kernels for recorders while a wrapper runs on "meta"
tensors (shapes and strides, no memory): each launch is kept as (kernel, grid, args, kwargs).
`compile_launch` then specializes those arguments exactly as Triton's JIT does at a launch on a GPU
(int sizes and strides to i32 / i64, 16-byte alignment, the value 1 as a constant) and compiles the
kernel for a `GPUTarget`, one autotune config at a time. `Resources` is what came out: registers
and spills from ptxas's report, shared memory from the kernel's metadata, and whether each
`tt.dot` runs on tensor cores (its input precision and operand types in the TTGIR).
"""
import contextlib
import dataclasses
import io
import re
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

# Per-target limits a launch must respect (CUDA C programming guide, compute capabilities table):
# the largest dynamic shared memory a block can opt into, and the grid's axis limits.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
GRID_LIMIT = (2**31 - 1, 65535, 65535)
TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


@dataclasses.dataclass
class Launch:
    """One launch a wrapper made: the kernel (an Autotuner or a JITFunction), its grid (a tuple, or
    a callable of the meta-parameters) and its arguments."""
    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict

    @property
    def jit(self):
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    @property
    def name(self):
        return self.jit.__name__

    def named_args(self):
        """The positional arguments by parameter name, as the autotuner's pruner receives them."""
        return dict(zip(self.jit.arg_names, self.args))

    def configs(self):
        """The autotune configs (each a dict of meta-parameters and compile options), or the single
        set the launch names."""
        if isinstance(self.kernel, Autotuner):
            return [dict(c.all_kwargs()) for c in self.kernel.configs]
        return [{}]

    def grid_for(self, config):
        meta = dict(self.kwargs, **config)
        return tuple(self.grid(meta)) if callable(self.grid) else tuple(self.grid)


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, grid, args, kwargs))


@contextlib.contextmanager
def record(module, names):
    """Within the block, module.<name>[grid](...) launches are appended to the yielded list instead
    of running."""
    launches = []
    saved = {n: getattr(module, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(module, n, _Recorder(k, launches))
        yield launches
    finally:
        for n, k in saved.items():
            setattr(module, n, k)


@dataclasses.dataclass
class Resources:
    registers: int
    spill_stores: int  # bytes per thread
    spill_loads: int
    shared: int        # bytes per block
    dots: str          # each tt.dot's input precision and operand type, e.g. "tf32:f32" (none: "-")
    cores: str         # where the dots run: "wgmma" / "mma" (tensor cores), "fma" (CUDA cores), "-"
    i32_addptr: int    # pointer additions with a 32-bit offset (0: every offset is formed in int64)


_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers", re.S)
_DOT = re.compile(r"tt\.dot %[^\s,]+, %[^\s,]+, %[^\s,]+(?:, (inputPrecision = \w+))?.*?: tensor<[^>]*x(\w+)>")
_ADDPTR = re.compile(r"tt\.addptr %\S+, %\S+ : [^\n]*?, (?:tensor<[^>]*x)?i32>? loc")


def _ptxas_report(ptx, arch):
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src = f"{d}/k.ptx"
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a"
                               if arch >= 90 else f"--gpu-name=sm_{arch}", src, "-o", f"{d}/k.cubin"],
                              capture_output=True, text=True, check=True)
    return done.stderr


def compile_launch(launch, config, target):
    """Compiles launch's kernel with `config` (meta-parameters and options) for `target`; returns
    (compiled kernel, Resources). Raises what Triton raises on a compile error."""
    jit = launch.jit
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(launch.kwargs, **config)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        ck = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
    report = log.getvalue()
    if "Used" not in report:  # from Triton's cache: ptxas did not run in this process
        report = _ptxas_report(ck.asm["ptx"], target.arch)
    stores, loads, regs = (int(x) for x in _PTXAS.search(report).groups())
    ttgir = ck.asm["ttgir"]
    # The IR leaves out the default precision, ieee (which fp16 / bf16 operands ignore).
    dots = sorted({f"{(p or 'inputPrecision = ieee').split()[-1]}:{t}" for p, t in _DOT.findall(ck.asm["ttir"])})
    cores = "wgmma" if "warp_group_dot" in ttgir else "mma" if "#mma" in ttgir else "fma" if dots else "-"
    return ck, Resources(regs, stores, loads, ck.metadata.shared, " ".join(dots) or "-", cores,
                         len(_ADDPTR.findall(ck.asm["ttir"])))

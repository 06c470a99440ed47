"""fastdl.info(): versions, devices, the extension's build, and each op's backend per device and why."""
import platform
from pathlib import Path

import torch

import fastdl.triton as _triton
from fastdl import _backends, _extension


def info() -> dict:
    """A JSON-able description of what fastdl will run on this machine.

    Keys: versions (fastdl, torch, triton, cuda, python), devices, threads, cpu (model, and the C++
    kernels' ISA: supported, compiled, features, active, reason; see fastdl.cpu_isa()), extension
    (loaded, error, build), distributed (whether torch.distributed and its gloo / NCCL backends are built in: what
    `fastdl train --nproc` and synchronized batch norm run on), ops: a list of {op, device, dtype,
    backend, reason}.
    """
    import torch.distributed as dist

    import fastdl

    triton_version = None
    if _triton.AVAILABLE:
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    ops = [dict(op=op, device=dev, dtype=dtype, backend=backend, reason=reason)
           for dev in ("cpu", "cuda") for op, dtype, backend, reason in _backends.table(dev)]
    return dict(
        versions=dict(fastdl=fastdl.__version__, torch=torch.__version__, triton=triton_version,
                      cuda=torch.version.cuda, python=platform.python_version()),
        triton_error=_triton.ERROR,
        devices=devices,
        threads=torch.get_num_threads(),
        cpu=dict(model=cpu_model(), **_extension.cpu_isa()),
        extension=dict(loaded=_extension.loaded(), error=_extension.LOAD_ERROR, build=_extension.build_info()),
        distributed=dict(available=dist.is_available(), gloo=dist.is_available() and dist.is_gloo_available(),
                         nccl=dist.is_available() and dist.is_nccl_available()),
        ops=ops,
    )


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

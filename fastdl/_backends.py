"""Which backend runs each op for a device and dtype, and why: the one place that decides fallbacks.

Backends: "cpp" (fastdl._C's CPU kernels), "triton" / "cuda" (GPU kernels), "reference" (the
pure-PyTorch composition in fastdl/reference, used when no kernel applies; fastdl.info() says why).
"""
from dataclasses import dataclass

import torch

import fastdl.triton as _triton
from fastdl import _extension


@dataclass(frozen=True)
class OpSpec:
    name: str
    gpu: str  # what runs it on CUDA tensors: "triton" or "cuda"
    cpu_dtypes: tuple
    gpu_dtypes: tuple


@dataclass(frozen=True)
class Backend:
    name: str  # "cpp", "triton", "cuda", "reference" or "unavailable"
    reason: str


OPS: dict = {}


def register(spec: OpSpec) -> OpSpec:
    OPS[spec.name] = spec
    return spec


def _names(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


_CHOSEN: dict = {}


def choose(op: str, device_type: str, dtype: torch.dtype) -> Backend:
    """The backend that runs `op` on tensors of `device_type` and `dtype` (a device assumed present),
    decided once per (op, device type, dtype) and cached: what it depends on (the extension and
    Triton loaded or not) is fixed at import. A dict lookup, so torch.compile traces through it
    without a graph break."""
    key = (op, device_type, dtype)
    backend = _CHOSEN.get(key)
    if backend is None:
        backend = _CHOSEN[key] = _decide(OPS[op], device_type, dtype)
    return backend


def _decide(spec: OpSpec, device_type: str, dtype: torch.dtype) -> Backend:
    if not _extension.loaded():
        return Backend("reference", f"fastdl._C is not loaded ({_extension.LOAD_ERROR})")
    if device_type in ("cpu", "meta"):
        if dtype not in spec.cpu_dtypes:
            return Backend("reference", f"the C++ CPU kernel takes {_names(spec.cpu_dtypes)}")
        if _extension.cpu_isa()["supported"] == "none":
            return Backend("reference", "the C++ kernels need an x86-64-v2 CPU (SSE4.2, POPCNT)")
        return Backend("cpp", "C++ kernel")
    if device_type != "cuda":
        return Backend("reference", f"fastdl has no kernels for {device_type} devices")
    if dtype not in spec.gpu_dtypes:
        return Backend("reference", f"the GPU kernel takes {_names(spec.gpu_dtypes)}")
    if spec.gpu == "triton":
        if not _triton.AVAILABLE:
            return Backend("reference", f"Triton is not importable ({_triton.ERROR})")
        return Backend("triton", "Triton kernel")
    if not _extension.has_cuda_objects():
        return Backend("reference", "fastdl._C was built without CUDA objects")
    return Backend("cuda", "CUDA C++ kernel")


def table(device_type: str):
    """Rows (op, dtype, backend, reason) for every registered op on `device_type`."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    rows = []
    for op in sorted(OPS):
        for dtype in dtypes:
            b = choose(op, device_type, dtype)
            if b.name == "triton" and op == "attention" and dtype == torch.float32:  # read per call, as torch's
                tf32 = torch.backends.cuda.matmul.allow_tf32
                b = Backend(b.name, f"{b.reason}, {'TF32' if tf32 else 'IEEE fp32'} dots "
                                    f"(torch.backends.cuda.matmul.allow_tf32={tf32})")
            if device_type == "cuda" and not torch.cuda.is_available():
                b = Backend("unavailable", f"no CUDA device visible; with one: {b.name} ({b.reason})")
            if b.name == "cpp":  # the ISA copy is chosen per call: read it now, not from the cache
                isa = _extension.cpu_isa()
                b = Backend("cpp", f"{b.reason}, {isa['active']} copy ({isa['reason']})")
            rows.append((op, str(dtype).replace("torch.", ""), b.name, b.reason))
    return rows

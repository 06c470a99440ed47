"""Loads the compiled kernels (fastdl._C) once and records why, when it cannot; the CPU kernels' ISA."""
import torch

try:
    from fastdl import _C  # noqa: F401  (importing it registers the fastdl:: ops)

    LOAD_ERROR = None
except ImportError as e:  # not built, or built against another torch
    LOAD_ERROR = f"{type(e).__name__}: {e}"


# How fastdl._C was compiled: openmp, cuda (version or "none"), cuda_archs.
BUILD_INFO = {} if LOAD_ERROR else dict(kv.split("=", 1) for kv in torch.ops.fastdl._build_info().split(";"))

ISAS = ("baseline", "avx2", "avx512")


def loaded() -> bool:
    return LOAD_ERROR is None


def build_info() -> dict:
    return dict(BUILD_INFO)


def has_cuda_objects() -> bool:
    return build_info().get("cuda", "none") != "none"


def cpu_isa() -> dict:
    """The CPU kernels' instruction set (csrc/cpu/isa.h), {} without the extension:
    supported (the best this CPU runs: "baseline", "avx2", "avx512", or "none" below x86-64-v2),
    compiled (the copies built), features (the CPU's vector extensions), active (the copy the
    kernels run now) and reason (why that one)."""
    if LOAD_ERROR:
        return {}
    isa = dict(kv.split("=", 1) for kv in torch.ops.fastdl._cpu_isa().split(";"))
    isa["compiled"] = isa["compiled"].split(",")
    isa["features"] = [f for f in isa["features"].split(",") if f]
    return isa


def cpu_isas() -> list:
    """The ISAs the kernels can run with here: the copies built, up to what the CPU supports."""
    isa = cpu_isa()
    if not isa or isa["supported"] == "none":
        return []
    return [i for i in isa["compiled"] if ISAS.index(i) <= ISAS.index(isa["supported"])]


def set_cpu_isa(isa):
    """Runs the CPU kernels' `isa` copy from now on ("baseline", "avx2", "avx512": at most what the
    CPU supports, else ValueError), or for None / "auto" the start-up choice again (FASTDL_CPU_ISA
    if set, else the best the CPU supports). Returns the ISA that was active."""
    if LOAD_ERROR:
        raise RuntimeError(f"set_cpu_isa: fastdl._C is not loaded ({LOAD_ERROR})")
    return torch.ops.fastdl._set_cpu_isa(isa or "auto")


if not LOAD_ERROR:
    cpu_isa()  # an unknown or unsupported FASTDL_CPU_ISA fails here, at import, with its reason

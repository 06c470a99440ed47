"""Loads the compiled kernels (fastdl._C) once and records why, when it cannot."""
import torch

try:
    from fastdl import _C  # noqa: F401  (importing it registers the fastdl:: ops)

    LOAD_ERROR = None
except ImportError as e:  # not built, or built against another torch
    LOAD_ERROR = f"{type(e).__name__}: {e}"


# How fastdl._C was compiled: cpu_arch, openmp, cuda (version or "none"), cuda_archs.
BUILD_INFO = {} if LOAD_ERROR else dict(kv.split("=", 1) for kv in torch.ops.fastdl._build_info().split(";"))


def loaded() -> bool:
    return LOAD_ERROR is None


def build_info() -> dict:
    return dict(BUILD_INFO)


def has_cuda_objects() -> bool:
    return build_info().get("cuda", "none") != "none"

"""Triton kernels, one module per op. Importing this package never fails: AVAILABLE says whether
Triton could be imported, ERROR why not."""
try:
    import triton  # noqa: F401

    AVAILABLE, ERROR = True, None
except ImportError as e:
    AVAILABLE, ERROR = False, f"{type(e).__name__}: {e}"

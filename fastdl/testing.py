"""One tolerance table, one comparison helper and the test layouts, shared by the tests and `fastdl check`.

Results are compared with a float64 reference. Tolerances per dtype are torch.testing's defaults,
except float64, held much tighter (a float64 kernel must agree to ~1e-10, not 1e-7); for reductions over `n` terms (weight and bias gradients, batch statistics) the absolute tolerance
grows as sqrt(n), the expected growth of rounding error in a sum of n terms.
"""
import math

import torch

TOLERANCES = {  # dtype: (atol, rtol)
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-5, 1e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| in float64 (inf on a shape mismatch, nan if either has NaN)."""
    if actual.shape != expected.shape:
        return math.inf
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - expected.double()).abs().max().item()


def check_close(actual, expected, dtype, n=1, rtol_scale=1.0, noise=0.0):
    """(ok, message): is every element of actual within atol * sqrt(n) + 2 * noise + rtol * |expected|
    of the float64 `expected`, with (atol, rtol) = TOLERANCES[dtype] (rtol times rtol_scale)? noise:
    the absolute error `expected` itself carries, measured (e.g. as the largest difference between
    the reference computed two ways): a result may be off by twice that."""
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    atol, rtol = TOLERANCES[dtype]
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    allowed = atol * math.sqrt(n) + 2 * noise + rtol * rtol_scale * e.abs()
    bad = ~(err <= allowed)  # NaN is bad
    if not bad.any():
        return True, f"max abs error {err.max().item() if err.numel() else 0.0:.3g}"
    i = tuple(int(k) for k in torch.nonzero(bad)[0])
    return False, (f"{int(bad.sum())} of {a.numel()} elements off; first at {i}: got {a[i].item():.8g}, "
                   f"expected {e[i].item():.8g} (error {err[i].item():.3g}, allowed {allowed[i].item():.3g}); "
                   f"max abs error {err.nan_to_num(math.inf).max().item():.3g}")


def assert_close(name, actual, expected, dtype=None, n=1, rtol_scale=1.0, noise=0.0):
    """Raises AssertionError naming `name`, where and by how much, if check_close fails."""
    ok, msg = check_close(actual, expected, dtype or actual.dtype, n, rtol_scale, noise)
    if not ok:
        raise AssertionError(f"{name}: {msg}")


def lay_out(t, layout):
    """t in the given layout: contiguous, channels_last, or a non-contiguous strided view."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a twice-as-wide tensor
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()

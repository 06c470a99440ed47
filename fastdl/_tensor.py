"""Small tensor helpers shared by the op wrappers and the Triton launchers."""
import torch


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output of x keeps: channels_last for a 4-D x whose channels vary fastest
    (dense or a strided view of such), else contiguous (as Tensor.suggest_memory_format)."""
    if x.dim() != 4 or x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


# Whether autocast is on for any device: a cheap test, where torch.is_autocast_enabled(device_type)
# costs a string parse and the caller a torch.device; conservative (True sends callers to their
# autocast-aware path, which asks per device).
any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda")))


def device_type(t: torch.Tensor) -> str:
    """t.device.type, without making a torch.device in the common CPU case (a microsecond or more
    a call, which counts at small shapes)."""
    return "cpu" if t.is_cpu else t.device.type


def same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a.device == b.device, cheaply when both are on the CPU."""
    return (a.is_cpu and b.is_cpu) or a.device == b.device


def autocast_dtype(device_type: str):
    """The dtype torch.autocast runs lower-precision ops in on device_type (as it runs nn.Conv2d,
    nn.LSTM), or None when autocast is off there."""
    if not any_autocast():
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast_all(dtype, *tensors):
    """tensors (None kept) in dtype; unchanged when dtype is None."""
    return tensors if dtype is None else tuple(None if t is None else t.to(dtype) for t in tensors)

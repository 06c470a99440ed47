"""depthwise_conv2d: y = act((conv2d(x, weight, groups=C) + bias) * scale + shift).

The fastdl::depthwise_conv2d_forward / _backward schemas have C++ kernels for CPU
(csrc/cpu/depthwise_conv2d_api.cpp) and CUDA (csrc/cuda/depthwise_conv2d_api.cpp); the dispatcher
picks one. The forward op's autograd is C++ (csrc/autograd/depthwise_conv2d.cpp). This module adds
their fake impls, the backward op's autograd (reached only by a create_graph=True backward), and
the entry point `depthwise_conv2d`, which resolves padding ('same', 'valid', int, pair) and routes
to the reference only when fastdl._backends says no kernel applies.
"""
import torch
import torch.nn.functional as tF

from fastdl import _backends, _extension
from fastdl._tensor import autocast_dtype, cast_all, device_type, memory_format_of, same_device
from fastdl.reference import depthwise_conv2d as reference

ACTIVATIONS = ("none", "relu", "relu6")
SPEC = _backends.register(_backends.OpSpec(
    "depthwise_conv2d", gpu="cuda",
    cpu_dtypes=(torch.float32, torch.float64),
    gpu_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)))


def _pair(name, v, minimum):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) and i >= minimum for i in v):
        raise ValueError(f"{name}: expected an int or a pair of ints >= {minimum}, got {v!r}")
    return v


def resolve_padding(padding, kernel_size, stride, dilation):
    """(symmetric padding pair, extra (right, bottom) zeros) for an int, pair, 'same' or 'valid'.
    'same' pads dilation * (k - 1) in all, the odd one out on the right / bottom, as F.conv2d does."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return (total[0] // 2, total[1] // 2), (total[1] % 2, total[0] % 2)
    return _pair("padding", padding, 0), (0, 0)


def check_args(x, weight, bias, scale, shift, activation):
    """Raises ValueError / TypeError naming the offending argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f"{x.dim()}-D" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"input: expected a 4-D (N, C, H, W) tensor, got {got}")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point dtype, got {x.dtype}")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] == 0 or weight.shape[0] % C:
        raise ValueError(f"weight: expected shape (C * multiplier, 1, KH, KW) with C = {C} (input's channels; "
                         f"groups = in_channels), got {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if name != "weight" and tuple(t.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: expected shape ({weight.shape[0]},), one value per output channel, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (input's), got {t.dtype}")
        if not same_device(t, x):
            raise ValueError(f"{name}: expected device {x.device} (input's), got {t.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def output_size(x, weight, stride, padding, dilation):
    """(OH, OW) of the convolution, or a ValueError naming input when the kernel does not fit."""
    out = []
    for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation):
        if size + 2 * p < d * (k - 1) + 1:
            raise ValueError(f"input: spatial size {tuple(x.shape[2:])} (padded by {padding}) is smaller than "
                             f"the dilated kernel {tuple(d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation))}")
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return out


def depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, scale=None, shift=None,
                     activation="none"):
    """act((conv2d(x, weight, bias, groups=C) * scale + shift)).

    x: (N, C, H, W); weight: (C * multiplier, 1, KH, KW); bias, scale, shift: (C * multiplier,) or
    None; padding: int, pair, 'same' or 'valid'. Returns (N, C * multiplier, OH, OW) in x's memory
    format. Differentiable in x, weight and bias; with scale / shift / an activation and a gradient
    to take, the epilogue runs as separate differentiable PyTorch ops after the kernel. Under
    torch.autocast it runs in autocast's lower-precision dtype, as nn.Conv2d does.
    """
    x, weight, bias, scale, shift = cast_all(autocast_dtype(device_type(x)), x, weight, bias, scale, shift)
    check_args(x, weight, bias, scale, shift, activation)
    stride, dilation = _pair("stride", stride, 1), _pair("dilation", dilation, 1)
    padding, extra = resolve_padding(padding, tuple(weight.shape[2:]), stride, dilation)
    if extra != (0, 0):  # 'same' with an even dilated kernel: the odd zero row / column first
        x = tF.pad(x, (0, extra[0], 0, extra[1]))
    output_size(x, weight, stride, padding, dilation)
    if _backends.choose(SPEC.name, device_type(x), x.dtype).name == "reference":
        return reference.depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale, shift, activation)
    epilogue = scale is not None or shift is not None or activation != "none"
    if epilogue and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, scale, shift)):
        z = torch.ops.fastdl.depthwise_conv2d_forward.default(x, weight, bias, None, None, stride, padding,
                                                              dilation, "none")
        return reference.epilogue(z, scale, shift, activation)
    return torch.ops.fastdl.depthwise_conv2d_forward.default(x, weight, bias, scale, shift, stride, padding,
                                                             dilation, activation)


def _fake_forward(x, weight, bias, scale, shift, stride, padding, dilation, activation):
    OH, OW = output_size(x, weight, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], OH, OW)).contiguous(memory_format=memory_format_of(x))


def _fake_backward(grad_out, x, weight, stride, padding, dilation, output_mask):
    grad_x = torch.empty_like(x, memory_format=memory_format_of(x)) if output_mask[0] else x.new_empty(0)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] else x.new_empty(0)
    return grad_x, grad_weight


def _conv(x, weight, conv):
    """conv(x, weight) with conv = (stride, padding, dilation); differentiable."""
    return torch.ops.fastdl.depthwise_conv2d_forward.default(x, weight, None, None, None, *conv, "none")


def _setup_backward(ctx, inputs, output):
    grad_out, x, weight, stride, padding, dilation, output_mask = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_out, x, weight)
    ctx.conv, ctx.output_mask = (stride, padding, dilation), output_mask


def _backward_backward(ctx, gg_x, gg_w):
    """The backward op's derivatives (create_graph=True). grad_x is bilinear in (grad_out, weight)
    and grad_weight in (grad_out, x), so their derivatives are the convolution and its two
    gradients again (<gg_x, grad_x> = <grad_out, conv(gg_x, weight)>, <gg_w, grad_weight> =
    <grad_out, conv(x, gg_w)>), each differentiable in turn: every order is exact."""
    grad_out, x, weight = ctx.saved_tensors
    needs, conv, backward = ctx.needs_input_grad, ctx.conv, torch.ops.fastdl.depthwise_conv2d_backward
    gg_x = gg_x if ctx.output_mask[0] else None
    gg_w = gg_w if ctx.output_mask[1] else None
    d_out = d_x = d_w = None
    if gg_x is not None:
        d_out = _conv(gg_x, weight, conv) if needs[0] else None
        d_w = backward(grad_out, gg_x, weight, *conv, [False, True])[1] if needs[2] else None
    if gg_w is not None:
        if needs[0]:
            d_out = _conv(x, gg_w, conv) if d_out is None else d_out + _conv(x, gg_w, conv)
        d_x = backward(grad_out, x, gg_w, *conv, [True, False])[0] if needs[1] else None
    return d_out, d_x, d_w, None, None, None, None


if _extension.loaded():
    torch.library.register_fake("fastdl::depthwise_conv2d_forward")(_fake_forward)
    torch.library.register_fake("fastdl::depthwise_conv2d_backward")(_fake_backward)
    torch.library.register_autograd("fastdl::depthwise_conv2d_backward", _backward_backward,
                                    setup_context=_setup_backward)

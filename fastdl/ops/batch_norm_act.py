"""batch_norm_act: y = act(batch_norm(x) + residual).

Registers, for the fastdl::batch_norm_act_forward / _backward and batch_norm_stats schemas of
fastdl._C, fake impls and the Triton launchers as CUDA kernels (the CPU kernels are C++); the
dispatcher picks CPU or CUDA. The forward op's autograd is C++ (csrc/autograd/batch_norm_act.cpp);
the backward op's, which only a create_graph=True backward reaches, is registered here: its
derivative formula (reference.batch_norm_act_backward). With a process group, training runs
batch_norm_act_sync instead. `batch_norm_act` routes to the reference only when fastdl._backends
says no kernel applies.
"""
import torch

import fastdl.triton as _triton
from fastdl import _autograd, _backends, _extension
from fastdl._tensor import device_type, memory_format_of, same_device
from fastdl.reference import batch_norm_act as reference

ACTIVATIONS = ("none", "relu", "relu6", "leaky_relu")
SPEC = _backends.register(_backends.OpSpec(
    "batch_norm_act", gpu="triton",
    cpu_dtypes=(torch.float32, torch.float64),
    gpu_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)))


def _check_input(x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got {x.dim()}D input")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point dtype, got {x.dtype}")


def _check_per_channel(name, t, x):
    """t: None or (C,) on x's device, of x's dtype (or float32 for a reduced-precision x)."""
    if t is None:
        return
    C = x.shape[1]
    if t.shape == (C,) and t.dtype == x.dtype and same_device(t, x):  # the common case, in three reads
        return
    dtypes = (x.dtype,) if x.dtype in (torch.float32, torch.float64) else (x.dtype, torch.float32)
    if tuple(t.shape) != (C,):
        raise ValueError(f"{name}: expected shape ({C},), one value per channel of input, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} (input's), got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))} for {x.dtype} input, got {t.dtype}")


def _check_like_input(name, t, x):
    if not isinstance(t, torch.Tensor) or t.shape != x.shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected shape {tuple(x.shape)} (input's), got {got}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (input's), got {t.dtype}")
    if not same_device(t, x):
        raise ValueError(f"{name}: expected device {x.device} (input's), got {t.device}")


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def check_args(x, running_mean, running_var, weight, bias, residual, training, activation):
    """Raises ValueError / TypeError naming the offending argument."""
    _check_input(x)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_per_channel(name, t, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither")
    if not training and running_mean is None:
        raise ValueError("running_mean: required when training=False (eval normalizes with the running statistics)")
    if residual is not None:
        _check_like_input("residual", residual, x)
    _check_activation(activation)
    if training and x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(f"input: expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def batch_norm_act(x, running_mean, running_var, weight, bias, residual, training, momentum, eps,
                   activation, slope, process_group=None):
    """y = act(batch_norm(x) + residual); updates running_mean / running_var in place when training.

    x: (N, C, *); weight, bias, running_mean, running_var: (C,) or None; residual: x's shape or None.
    activation: "none", "relu", "relu6" or "leaky_relu" (negative slope `slope`). process_group: when
    training, the batch statistics are those of the whole group's batch (nn.SyncBatchNorm's
    semantics). Returns y, x's shape and memory format.
    """
    check_args(x, running_mean, running_var, weight, bias, residual, training, activation)
    backend = _backends.choose(SPEC.name, device_type(x), x.dtype).name
    if training and process_group is not None:
        from fastdl.ops import batch_norm_act_sync

        return batch_norm_act_sync.batch_norm_act(x, running_mean, running_var, weight, bias, residual,
                                                  momentum, eps, activation, slope, process_group, backend)
    if backend == "reference":
        return reference.batch_norm_act(x, running_mean, running_var, weight, bias, residual, training,
                                        momentum, eps, activation, slope)
    # The op's Autograd kernel (csrc/autograd/batch_norm_act.cpp) records the node, and saves the
    # mask, only when a gradient is to be taken.
    return torch.ops.fastdl.batch_norm_act_forward.default(x, weight, bias, residual, running_mean, running_var,
                                                           training, momentum, eps, activation, slope, False)[0]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                  activation, slope, save_mask):
    fmt = memory_format_of(x)
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    mask = (torch.empty_like(x, dtype=torch.bool, memory_format=fmt) if save_mask and activation != "none"
            else x.new_empty(0, dtype=torch.bool))
    return (torch.empty_like(x, memory_format=fmt), x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc), mask)


def _fake_stats(x):
    C, acc = x.shape[1], _acc_dtype(x.dtype)
    return x.new_empty(C, dtype=acc), x.new_empty(C, dtype=acc)


def _fake_backward(grad_out, x, weight, mean, invstd, mask, training, activation, slope, residual_grad):
    fmt = memory_format_of(x)
    C = x.shape[1]
    dres = (torch.empty_like(x, memory_format=fmt) if residual_grad and activation != "none"
            else x.new_empty(0))
    return (torch.empty_like(x, memory_format=fmt), x.new_empty(C, dtype=mean.dtype),
            x.new_empty(C, dtype=mean.dtype), dres)


def _setup_backward(ctx, inputs, output):
    grad_y, x, weight, mean, invstd, mask, training, activation, slope, residual_grad = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_y, x, weight, mean, invstd, mask)
    ctx.options = (training, activation, slope)
    ctx.residual_grad = residual_grad and activation != "none"  # else its output is empty


def _backward_backward(ctx, gg_x, gg_weight, gg_bias, gg_residual):
    """The backward op's derivatives (create_graph=True), from reference.batch_norm_act_backward's
    formula: in training, through x's batch statistics too."""
    grad_y, x, weight, mean, invstd, mask = ctx.saved_tensors
    formula = lambda g, x, w: reference.batch_norm_act_backward(g, x, w, mean, invstd, mask, *ctx.options)
    gg_residual = gg_residual if ctx.residual_grad else None
    return _autograd.vjp(formula, (grad_y, x, weight), (gg_x, gg_weight, gg_bias, gg_residual)) + (None,) * 7


def _check_then(kernel, check):
    def run(*args):
        check(*args)
        return kernel(*args)
    return run


def _check_forward(x, weight, bias, residual, running_mean, running_var, training, momentum, eps,
                   activation, slope, save_mask):
    check_args(x, running_mean, running_var, weight, bias, residual, training, activation)


def _check_stats(x):
    _check_input(x)
    if x.numel() == 0:
        raise ValueError(f"input: expected at least one value per channel, got input size {tuple(x.shape)}")


def _check_backward(grad_out, x, weight, mean, invstd, mask, training, activation, slope, residual_grad):
    _check_input(x)
    _check_like_input("grad_out", grad_out, x)
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        _check_per_channel(name, t, x)
    _check_activation(activation)
    if activation != "none" and (mask.shape != x.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask: expected a bool tensor of shape {tuple(x.shape)} (forward with save_mask=True), "
                         f"got {mask.dtype} {tuple(mask.shape)}")


if _extension.loaded():
    torch.library.register_fake("fastdl::batch_norm_act_forward")(_fake_forward)
    torch.library.register_fake("fastdl::batch_norm_act_backward")(_fake_backward)
    torch.library.register_fake("fastdl::batch_norm_stats")(_fake_stats)
    torch.library.register_autograd("fastdl::batch_norm_act_backward", _backward_backward,
                                    setup_context=_setup_backward)
    if _triton.AVAILABLE:
        from fastdl.triton import batch_norm_act as _kernels

        torch.library.register_kernel("fastdl::batch_norm_act_forward", "cuda",
                                      _check_then(_kernels.forward, _check_forward))
        torch.library.register_kernel("fastdl::batch_norm_act_backward", "cuda",
                                      _check_then(_kernels.backward, _check_backward))
        torch.library.register_kernel("fastdl::batch_norm_stats", "cuda", _check_then(_kernels.stats, _check_stats))

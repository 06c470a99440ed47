"""Functional forms of fastdl's fused ops (the torch.nn.functional of fastdl)."""
from fastdl.ops import batch_norm_act as _bna


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5, *, residual=None, activation=None, negative_slope=0.01):
    """act(F.batch_norm(input, ...) + residual) in one fused kernel.

    The arguments before `*` are those of torch.nn.functional.batch_norm, with the same meaning
    (running statistics updated in place when training). input: (N, C, *); residual: input's shape;
    activation: None, "relu", "relu6" or "leaky_relu" (with `negative_slope`). Returns a tensor of
    input's shape and memory format.
    """
    return _bna.batch_norm_act(input, running_mean, running_var, weight, bias, residual, training,
                               momentum, eps, "none" if activation is None else activation, negative_slope)

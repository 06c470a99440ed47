"""Reference y = act(batch_norm(x) + residual), composed of torch.nn.functional ops."""
import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "relu6": lambda z, slope: F.relu6(z),
    "leaky_relu": lambda z, slope: F.leaky_relu(z, slope),
}


def batch_norm_act(x, running_mean, running_var, weight, bias, residual, training, momentum, eps,
                   activation, slope):
    """Same arguments and running-statistics updates as fastdl.functional.batch_norm_act."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        z = z + residual
    return ACTIVATIONS[activation](z, slope)


def _per_channel(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def batch_norm_act_backward(grad_out, x, weight, mean, invstd, mask, training, activation, slope):
    """(grad_x, grad_weight, grad_bias, grad_residual) of y = act(batch_norm(x) + residual), what
    fastdl::batch_norm_act_backward returns, as differentiable PyTorch ops: its derivative formula.

    mean, invstd, mask: those fastdl::batch_norm_act_forward returned (mask: act'(z) > 0; empty for
    "none"). Differentiable in grad_out, x and weight. In training, mean and invstd are x's batch
    statistics: they keep their saved values and carry the derivatives of mean(x) and
    (var(x) + eps)^-1/2 (eps enters only through invstd), so x's second derivative includes the
    terms through the statistics, as torch's batch norm double backward does. mask is constant
    (the activations are piecewise linear). Computed in mean's dtype; grad_x and grad_residual in
    x's, grad_weight and grad_bias in mean's.
    """
    acc, dims = mean.dtype, [0, *range(2, x.dim())]
    xa = x.to(acc)
    if training:
        m = xa.mean(dims)
        var = (xa - _per_channel(m, x)).square().mean(dims)
        mean = mean + (m - m.detach())
        invstd = (invstd.pow(-2) + (var - var.detach())).rsqrt()
    gz = grad_out.to(acc)
    if activation == "leaky_relu":
        gz = torch.where(mask, gz, gz * slope)
    elif activation != "none":
        gz = gz * mask
    xhat = (xa - _per_channel(mean, x)) * _per_channel(invstd, x)
    grad_bias, grad_weight = gz.sum(dims), (gz * xhat).sum(dims)
    k = invstd if weight is None else weight.to(acc) * invstd
    if training:
        n = x.numel() // x.shape[1]
        gz_centered = gz - _per_channel(grad_bias / n, x) - xhat * _per_channel(grad_weight / n, x)
        grad_x = gz_centered * _per_channel(k, x)
    else:
        grad_x = gz * _per_channel(k, x)
    return grad_x.to(x.dtype), grad_weight, grad_bias, gz.to(x.dtype)

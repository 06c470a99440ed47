"""Reference y = act(batch_norm(x) + residual), composed of torch.nn.functional ops."""
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

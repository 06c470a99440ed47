"""Reference depthwise conv2d with its epilogue, composed of torch.nn.functional ops."""
import torch.nn.functional as F

ACTIVATIONS = {"none": lambda z: z, "relu": F.relu, "relu6": F.relu6}


def epilogue(z, scale, shift, activation):
    """act(z * scale + shift), scale and shift per channel (dim 1) or None."""
    if scale is not None:
        z = z * scale.view(1, -1, 1, 1)
    if shift is not None:
        z = z + shift.view(1, -1, 1, 1)
    return ACTIVATIONS[activation](z)


def depthwise_conv2d(x, weight, bias, stride, padding, dilation, scale, shift, activation):
    """act((F.conv2d(x, weight, bias, groups=C) * scale + shift)): same arguments as
    fastdl.ops.depthwise_conv2d.depthwise_conv2d (padding: two ints, zeros on both sides)."""
    return epilogue(F.conv2d(x, weight, bias, stride, padding, dilation, groups=x.shape[1]), scale, shift, activation)

"""DepthwiseConv2d (drop-in for a depthwise nn.Conv2d) and DepthwiseSeparableConv2d (MobileNetV1's block)."""
import torch
import torch.nn.functional as tF
from torch import nn

from fastdl import functional as F
from fastdl.nn.batch_norm import FusedBatchNorm2d

ACTIVATIONS_INPLACE = {None: lambda t: t, "relu": torch.relu_, "relu6": lambda t: tF.hardtanh_(t, 0.0, 6.0)}


class DepthwiseConv2d(nn.Conv2d):
    """Drop-in for nn.Conv2d(C, C * multiplier, kernel_size, groups=C, ...) on fastdl's kernels.

    Same constructor, parameters and state_dict as nn.Conv2d; `groups` defaults to in_channels and
    must equal it (a ValueError names `groups` otherwise). padding: int, pair, 'same' or 'valid';
    padding modes other than 'zeros' pad first, as nn.Conv2d does, then convolve with no padding.
    forward(x): x (N, C, H, W) -> (N, C * multiplier, OH, OW), in x's memory format.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=None,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        groups = in_channels if groups is None else groups
        if groups != in_channels:
            raise ValueError(f"groups: expected in_channels ({in_channels}) for a depthwise convolution, got {groups}")
        if out_channels % in_channels:
            raise ValueError(f"out_channels: expected a multiple of in_channels ({in_channels}), got {out_channels}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)

    @classmethod
    def from_module(cls, conv: nn.Conv2d):
        """A DepthwiseConv2d with conv's configuration and parameters (shared, not copied)."""
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
        m.weight, m.bias = conv.weight, conv.bias
        return m

    def forward(self, input, *, scale=None, shift=None, activation=None):
        """conv(input); scale, shift, activation: an epilogue fused into the kernel (see
        fastdl.functional.depthwise_conv2d)."""
        padding = self.padding
        if self.padding_mode != "zeros":
            input, padding = tF.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return F.depthwise_conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                                  scale=scale, shift=shift, activation=activation)


def _folded(bn):
    """(scale, shift) of an eval-mode batch norm: bn(z) = z * scale + shift."""
    invstd = torch.rsqrt(bn.running_var + bn.eps)
    scale = invstd if bn.weight is None else bn.weight * invstd
    shift = -bn.running_mean * scale + (0 if bn.bias is None else bn.bias)
    return scale, shift


class DepthwiseSeparableConv2d(nn.Module):
    """MobileNetV1's block: depthwise conv -> BN -> act -> pointwise (1x1) conv -> BN -> act.

    Its state_dict is that of nn.Sequential(nn.Conv2d(C, C, k, stride, padding, groups=C,
    bias=False), nn.BatchNorm2d(C), act, nn.Conv2d(C, out, 1, bias=False), nn.BatchNorm2d(out), act):
    submodules "0", "1", "3", "4" (the activations, at 2 and 5, are fused into the batch norms).
    Training runs DepthwiseConv2d, then FusedBatchNorm2d(activation=...) twice around the 1x1 conv.
    Without gradients to take (inference, eval mode), the first batch norm and the activation run
    inside the depthwise kernel and the second batch norm is folded into the 1x1 conv's weights.
    forward(x): (N, C, H, W) -> (N, out_channels, OH, OW), in x's memory format.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1,
                 activation="relu", eps=1e-5, momentum=0.1, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS_INPLACE:
            raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS_INPLACE)}, got {activation!r}")
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2 if isinstance(kernel_size, int) else \
                tuple(dilation * (k - 1) // 2 for k in kernel_size)
        kw = dict(device=device, dtype=dtype)
        self.activation = activation
        self.add_module("0", DepthwiseConv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                             bias=False, **kw))
        self.add_module("1", FusedBatchNorm2d(in_channels, eps, momentum, activation=activation, **kw))
        self.add_module("3", nn.Conv2d(in_channels, out_channels, 1, bias=False, **kw))
        self.add_module("4", FusedBatchNorm2d(out_channels, eps, momentum, activation=activation, **kw))

    def __getitem__(self, index):
        """The submodule at nn.Sequential's index: 0 depthwise conv, 1 its BN, 3 the 1x1 conv, 4 its BN."""
        return self._modules[str(index)]

    def _needs_grad(self, x):
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x):
        dw, bn1, pw, bn2 = (self[i] for i in (0, 1, 3, 4))
        if self.training or self._needs_grad(x) or not (bn1.track_running_stats and bn2.track_running_stats):
            return bn2(pw(bn1(dw(x))))
        scale, shift = _folded(bn1)
        y = dw(x, scale=scale, shift=shift, activation=self.activation)
        scale, shift = _folded(bn2)
        y = tF.conv2d(y, pw.weight * scale.view(-1, 1, 1, 1), shift)
        return ACTIVATIONS_INPLACE[self.activation](y)

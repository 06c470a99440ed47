"""MobileNetV2 (Sandler et al., 2018; torchvision's names and state_dict) and MobileNetV1 (Howard et
al., 2017) on fastdl's DepthwiseConv2d, DepthwiseSeparableConv2d and FusedBatchNorm2d.

Batch norms run with their ReLU6 fused in; in MobileNetV2's inverted residual blocks the last batch
norm also takes the shortcut, so BN + residual add is one kernel. MobileNetV2's module names are
torchvision's, so `model.load_state_dict(torchvision.models.mobilenet_v2().state_dict())` works
with strict=True: the parameter-free activations torchvision keeps at index 2 of each
Conv2dNormActivation are simply absent (their work is inside the batch norms).
"""
from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn.batch_norm import FusedBatchNorm2d
from fastdl.nn.depthwise import DepthwiseConv2d, DepthwiseSeparableConv2d

V2_SETTING = (  # expand ratio t, output channels c, blocks n, stride of the first block s
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
V1_SETTING = (  # output channels, stride of each depthwise separable block
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


@dataclass
class MobileNetV2Config:
    num_classes: int = 1000
    width_mult: float = 1.0  # scales every layer's channels (rounded to a multiple of round_nearest)
    round_nearest: int = 8
    dropout: float = 0.2
    setting: tuple = V2_SETTING


@dataclass
class MobileNetV1Config:
    num_classes: int = 1000
    width_mult: float = 1.0
    round_nearest: int = 8
    dropout: float = 0.001  # TF-slim's keep_prob = 0.999


def make_divisible(v, divisor, min_value=None):
    """v rounded to the nearest multiple of divisor, not below min_value (default divisor) nor 90% of v."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """conv -> BN + activation: torchvision's Conv2dNormActivation with the activation fused into the
    batch norm (submodules 0 and 1, no bias on the conv). The conv is a DepthwiseConv2d when
    groups == in_channels > 1."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, groups=1, activation="relu6"):
        padding = (kernel_size - 1) // 2
        if groups == in_channels > 1:
            conv = DepthwiseConv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        else:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        super().__init__(conv, FusedBatchNorm2d(out_channels, activation=activation))


class InvertedResidual(nn.Module):
    """1x1 expansion (BN + ReLU6) -> 3x3 depthwise (BN + ReLU6) -> 1x1 projection -> BN (+ x when the
    stride is 1 and the channels match; the add runs inside the last batch norm)."""

    def __init__(self, in_channels, out_channels, stride, expand_ratio):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride: expected 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = [ConvBNAct(in_channels, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, out_channels, 1, bias=False),
                   FusedBatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        *body, bn = self.conv
        y = x
        for m in body:
            y = m(y)
        return bn(y, residual=x if self.use_res_connect else None)


class MobileNetV2(nn.Module):
    """features (stem, inverted residual blocks, 1x1 conv to last_channel) -> global average pool ->
    classifier (dropout, linear). forward(x): (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(self, config: MobileNetV2Config):
        super().__init__()
        self.config = config
        width = lambda c: make_divisible(c * config.width_mult, config.round_nearest)  # noqa: E731
        in_channels = width(32)
        self.last_channel = make_divisible(1280 * max(1.0, config.width_mult), config.round_nearest)
        features = [ConvBNAct(3, in_channels, stride=2)]
        for t, c, n, s in config.setting:
            for i in range(n):
                features.append(InvertedResidual(in_channels, width(c), s if i == 0 else 1, expand_ratio=t))
                in_channels = width(c)
        features.append(ConvBNAct(in_channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(self.last_channel, config.num_classes))
        reset_parameters(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class MobileNetV1(nn.Module):
    """features (3x3 stride-2 conv + BN + ReLU, then 13 DepthwiseSeparableConv2d blocks) -> global
    average pool -> classifier (dropout, linear). forward(x): (N, 3, H, W) -> logits (N, num_classes).
    features.0 is [conv, bn]; features.1..13 are [0 depthwise conv, 1 bn, 3 1x1 conv, 4 bn]."""

    def __init__(self, config: MobileNetV1Config):
        super().__init__()
        self.config = config
        width = lambda c: make_divisible(c * config.width_mult, config.round_nearest)  # noqa: E731
        in_channels = width(32)
        features = [ConvBNAct(3, in_channels, stride=2, activation="relu")]
        for c, s in V1_SETTING:
            features.append(DepthwiseSeparableConv2d(in_channels, width(c), 3, s, activation="relu"))
            in_channels = width(c)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(in_channels, config.num_classes))
        reset_parameters(self)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def reset_parameters(model):
    """torchvision's MobileNet initialisation: He-normal convs (fan_out), batch norms at weight 1 and
    bias 0, linear weights N(0, 0.01) and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, FusedBatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def mobilenet_v2(num_classes=1000, width_mult=1.0, **kwargs):
    return MobileNetV2(MobileNetV2Config(num_classes, width_mult, **kwargs))


def mobilenet_v1(num_classes=1000, width_mult=1.0, **kwargs):
    return MobileNetV1(MobileNetV1Config(num_classes, width_mult, **kwargs))

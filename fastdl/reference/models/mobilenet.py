"""Reference MobileNets: MobileNetV1 written with torch.nn modules only (nn.Conv2d(groups=C),
nn.BatchNorm2d, nn.ReLU), the ground truth for fastdl.models.mobilenet_v1, and torchvision's
MobileNetV2, the ground truth for fastdl.models.mobilenet_v2.

torchvision is a development dependency of fastdl, not a runtime one: mobilenet_v2 imports it when
called. MobileNetV1's module names are fastdl's: one state_dict loads into both (strict).
"""
import torch
from torch import nn

from fastdl.models.mobilenet import MobileNetV1Config, MobileNetV2Config, make_divisible

V1_WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)  # the stem, then 13 blocks
V1_STRIDES = (2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)


class MobileNetV1(nn.Module):
    """features.0 = [conv, bn, relu], features.1..13 = [3x3 depthwise conv, bn, relu, 1x1 conv, bn, relu]
    -> global average pool -> classifier (dropout, linear). forward(x): (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(self, config: MobileNetV1Config):
        super().__init__()
        self.config = config
        widths = [make_divisible(c * config.width_mult, config.round_nearest) for c in V1_WIDTHS]
        features = [nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())]
        for c_in, c_out, s in zip(widths, widths[1:], V1_STRIDES[1:]):
            features.append(nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, s, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(widths[-1], config.num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v1(num_classes=1000, width_mult=1.0, **kwargs) -> MobileNetV1:
    """The reference MobileNetV1; keyword arguments are MobileNetV1Config's fields."""
    return MobileNetV1(MobileNetV1Config(num_classes, width_mult, **kwargs))


def mobilenet_v2(num_classes=1000, width_mult=1.0, **kwargs):
    """torchvision.models.MobileNetV2 of the MobileNetV2Config these arguments make (the same
    state_dict as fastdl's). Needs torchvision, a development dependency only."""
    import torchvision

    c = MobileNetV2Config(num_classes, width_mult, **kwargs)
    return torchvision.models.MobileNetV2(c.num_classes, c.width_mult, [list(s) for s in c.setting],
                                          c.round_nearest, dropout=c.dropout)

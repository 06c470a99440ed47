"""ResNet-18/34/50 (He et al., 2015) on FusedBatchNorm2d, state_dict-compatible with torchvision's.

Every batch norm runs with its ReLU fused in, and the last batch norm of each block also takes the
shortcut: BN + residual add + ReLU is one kernel. Module names are torchvision's, so
`model.load_state_dict(torchvision.models.resnet50().state_dict())` works with strict=True (the
parameter-free `relu` modules of torchvision are gone: their work is inside the batch norms).
"""
from dataclasses import dataclass

import torch
from torch import nn

from fastdl.nn.batch_norm import FusedBatchNorm2d


@dataclass
class ResNetConfig:
    block: str = "basic"  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1; 4x wider output)
    layers: tuple = (2, 2, 2, 2)  # blocks in layer1..layer4
    num_classes: int = 1000
    zero_init_residual: bool = False  # start each block's last batch norm at weight 0 (block = identity)


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)


def conv1x1(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""
    expansion = 1

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = FusedBatchNorm2d(channels, activation="relu")
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = FusedBatchNorm2d(channels, activation="relu")  # + residual, then relu
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(out), residual=identity)


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)); stride on the 3x3 conv."""
    expansion = 4

    def __init__(self, in_channels, channels, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(in_channels, channels)
        self.bn1 = FusedBatchNorm2d(channels, activation="relu")
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn2 = FusedBatchNorm2d(channels, activation="relu")
        self.conv3 = conv1x1(channels, channels * self.expansion)
        self.bn3 = FusedBatchNorm2d(channels * self.expansion, activation="relu")  # + residual, then relu
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        return self.bn3(self.conv3(out), residual=identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """Stem (7x7 conv, BN + ReLU, max pool), four stages of blocks, global average pool, fc.
    forward(x): (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        block = BLOCKS[config.block]
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FusedBatchNorm2d(64, activation="relu")
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for i, (channels, blocks) in enumerate(zip((64, 128, 256, 512), config.layers)):
            stage, in_channels = make_stage(block, in_channels, channels, blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, config.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """torchvision's initialisation: He-normal convs (fan_out), batch norms at weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, FusedBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_((m.bn2 if isinstance(m, BasicBlock) else m.bn3).weight)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_stage(block, in_channels, channels, blocks, stride):
    """(nn.Sequential of `blocks` blocks, its output channels); the first block strides and, when the
    shape changes, gets a 1x1 conv + BN shortcut named `downsample` as in torchvision."""
    out_channels = channels * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), FusedBatchNorm2d(out_channels))
    layers = [block(in_channels, channels, stride, downsample)]
    layers += [block(out_channels, channels) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_channels


def resnet18(num_classes=1000, **kwargs):
    return ResNet(ResNetConfig("basic", (2, 2, 2, 2), num_classes, **kwargs))


def resnet34(num_classes=1000, **kwargs):
    return ResNet(ResNetConfig("basic", (3, 4, 6, 3), num_classes, **kwargs))


def resnet50(num_classes=1000, **kwargs):
    return ResNet(ResNetConfig("bottleneck", (3, 4, 6, 3), num_classes, **kwargs))

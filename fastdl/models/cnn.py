"""CNN: the MNIST ConvNet, two 3x3 convolutions -> max-pool -> two linear layers.

conv(32) -> ReLU -> conv(64) -> ReLU -> MaxPool(2) -> Flatten -> Linear(128) -> ReLU -> Linear(num_classes).
With batch_norm=True each conv (then without bias) is followed by one FusedBatchNorm2d with the
ReLU fused in, in place of the ReLU module. image_size=8 for 8x8 digits.
"""
from dataclasses import dataclass

from torch import nn

from fastdl.nn import FusedBatchNorm2d


@dataclass
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28  # square inputs; 8 for 8 x 8 digits
    channels: tuple = (32, 64)
    hidden: int = 128
    num_classes: int = 10
    batch_norm: bool = False


class ConvBlock(nn.Module):
    """3x3 conv (no padding) -> ReLU, or -> FusedBatchNorm2d(activation="relu") with batch_norm."""

    def __init__(self, in_channels, out_channels, batch_norm):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, bias=not batch_norm)
        self.bn = FusedBatchNorm2d(out_channels, activation="relu") if batch_norm else None
        self.relu = None if batch_norm else nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else self.relu(x)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        side = (config.image_size - 4) // 2  # two unpadded 3x3 convs, then a 2x2 pool
        if side < 1:
            raise ValueError(f"image_size: expected at least 6, got {config.image_size}")
        self.block1 = ConvBlock(config.in_channels, c1, config.batch_norm)
        self.block2 = ConvBlock(c1, c2, config.batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, config.hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x):
        """x (N, in_channels, image_size, image_size) -> logits (N, num_classes)."""
        x = self.pool(self.block2(self.block1(x)))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


def cnn(batch_norm=False, **kwargs) -> CNN:
    """A CNN; keyword arguments are CNNConfig's fields."""
    return CNN(CNNConfig(batch_norm=batch_norm, **kwargs))

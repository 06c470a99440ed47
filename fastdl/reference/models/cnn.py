"""Reference CNN: fastdl.models.cnn written with torch.nn modules only, the ground truth for the model
of the same name.

Each ConvBlock is conv -> ReLU, or conv (no bias) -> nn.BatchNorm2d -> ReLU with batch_norm=True,
where fastdl runs one FusedBatchNorm2d with the ReLU fused in. Module names are fastdl's: one
state_dict loads into both (strict).
"""
from torch import nn

from fastdl.models.cnn import CNNConfig


class ConvBlock(nn.Module):
    """3x3 conv (no padding) -> [nn.BatchNorm2d] -> ReLU."""

    def __init__(self, in_channels, out_channels, batch_norm):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else None
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        return self.relu(self.bn(x) if self.bn is not None else x)


class CNN(nn.Module):
    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        side = (config.image_size - 4) // 2  # two unpadded 3x3 convs, then a 2x2 pool
        self.block1 = ConvBlock(config.in_channels, c1, config.batch_norm)
        self.block2 = ConvBlock(c1, c2, config.batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, config.hidden)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x):
        """x (N, in_channels, image_size, image_size) -> logits (N, num_classes)."""
        return self.fc2(self.relu(self.fc1(self.flatten(self.pool(self.block2(self.block1(x)))))))


def cnn(batch_norm=False, **kwargs) -> CNN:
    """The reference CNN; keyword arguments are CNNConfig's fields."""
    return CNN(CNNConfig(batch_norm=batch_norm, **kwargs))

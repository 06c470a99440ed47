"""MLP: the MNIST multilayer perceptron, Flatten -> Linear -> ReLU -> Dropout -> Linear.

The baseline of the ten models: plain torch.nn throughout (there is nothing to fuse), kept so that
every model of the set is built, trained and tested the same way. in_features=64 for 8x8 digits.
"""
from dataclasses import dataclass

from torch import nn


@dataclass
class MLPConfig:
    in_features: int = 784  # 28 x 28 MNIST; 64 for 8 x 8 digits
    hidden: int = 128
    num_classes: int = 10
    dropout: float = 0.2


class MLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(config.in_features, config.hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)

    def forward(self, x):
        """x (N, in_features) or images (N, C, H, W) with C * H * W = in_features -> logits (N, num_classes)."""
        return self.fc2(self.dropout(self.relu(self.fc1(self.flatten(x)))))


def mlp(**kwargs) -> MLP:
    """An MLP; keyword arguments are MLPConfig's fields."""
    return MLP(MLPConfig(**kwargs))

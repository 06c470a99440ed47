"""Reference MLP: fastdl.models.mlp written with torch.nn modules only, the ground truth for the model
of the same name.

Flatten -> Linear -> ReLU -> Dropout -> Linear, with fastdl's module names: one state_dict loads into
both (strict).
"""
from torch import nn

from fastdl.models.mlp import MLPConfig


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
    """The reference MLP; keyword arguments are MLPConfig's fields."""
    return MLP(MLPConfig(**kwargs))

"""LSTM forecaster: FusedLSTM over a window of a (multivariate) series -> Linear -> the next values.

Input (N, T, features), batch first; output (N, horizon, features): the `horizon` values that follow
the window, read off the last step's hidden state.
"""
from dataclasses import dataclass

from torch import nn

from fastdl.nn import FusedLSTM


@dataclass
class LSTMConfig:
    features: int = 1
    hidden: int = 32
    num_layers: int = 1
    horizon: int = 1
    dropout: float = 0.0  # between the LSTM layers


class LSTMForecaster(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.lstm = FusedLSTM(config.features, config.hidden, num_layers=config.num_layers,
                              dropout=config.dropout, batch_first=True)
        self.head = nn.Linear(config.hidden, config.horizon * config.features)

    def forward(self, x):
        """x (N, T, features) -> (N, horizon, features)."""
        out, _ = self.lstm(x)  # (N, T, hidden)
        return self.head(out[:, -1]).view(x.shape[0], self.config.horizon, self.config.features)


def lstm(**kwargs) -> LSTMForecaster:
    """An LSTMForecaster; keyword arguments are LSTMConfig's fields."""
    return LSTMForecaster(LSTMConfig(**kwargs))

"""Reference LSTM forecaster: fastdl.models.lstm written with torch.nn modules only (nn.LSTM in place
of FusedLSTM), the ground truth for the model of the same name.

nn.LSTM (batch first) -> Linear on the last step's output. Module names are fastdl's: one state_dict
loads into both (strict).
"""
from torch import nn

from fastdl.models.lstm import LSTMConfig


class LSTMForecaster(nn.Module):
    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.features, config.hidden, config.num_layers, batch_first=True,
                            dropout=config.dropout)
        self.head = nn.Linear(config.hidden, config.horizon * config.features)

    def forward(self, x):
        """x (N, T, features) -> (N, horizon, features)."""
        return self.head(self.lstm(x)[0][:, -1]).view(x.shape[0], self.config.horizon, self.config.features)


def lstm(**kwargs) -> LSTMForecaster:
    """The reference LSTMForecaster; keyword arguments are LSTMConfig's fields."""
    return LSTMForecaster(LSTMConfig(**kwargs))

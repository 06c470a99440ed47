"""RNN classifier: Embedding -> stacked Elman RNN (FusedRNN, tanh) -> Linear on the last hidden state.

Sequences of different lengths are packed (pack_padded_sequence, any order), so the last hidden
state is the one at each sequence's own last token.
"""
from dataclasses import dataclass
from typing import Optional

from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastdl.nn import FusedRNN


@dataclass
class RNNConfig:
    vocab_size: int
    embed_dim: int = 32
    hidden: int = 64
    num_layers: int = 2
    num_classes: int = 2
    nonlinearity: str = "tanh"
    dropout: float = 0.0  # between the RNN layers
    padding_idx: Optional[int] = 0


class RNNClassifier(nn.Module):
    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.rnn = FusedRNN(config.embed_dim, config.hidden, num_layers=config.num_layers,
                            nonlinearity=config.nonlinearity, dropout=config.dropout, batch_first=True)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward(self, tokens, lengths=None):
        """tokens (N, T) int64; lengths (N,) the number of real tokens of each row (the rest is
        padding), or None for full rows -> logits (N, num_classes)."""
        x = self.embed(tokens)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h_n = self.rnn(x)  # (num_layers, N, hidden), in the input's row order
        return self.head(h_n[-1])


def rnn(vocab_size, **kwargs) -> RNNClassifier:
    """An RNNClassifier; keyword arguments are RNNConfig's fields."""
    return RNNClassifier(RNNConfig(vocab_size, **kwargs))

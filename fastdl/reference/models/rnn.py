"""Reference RNN classifier: fastdl.models.rnn written with torch.nn modules only (nn.RNN in place of
FusedRNN), the ground truth for the model of the same name.

Embedding -> nn.RNN (batch first; packed when lengths are given) -> Linear on the last layer's final
hidden state. Module names are fastdl's: one state_dict loads into both (strict).
"""
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastdl.models.rnn import RNNConfig


class RNNClassifier(nn.Module):
    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.rnn = nn.RNN(config.embed_dim, config.hidden, config.num_layers, nonlinearity=config.nonlinearity,
                          batch_first=True, dropout=config.dropout)
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward(self, tokens, lengths=None):
        """tokens (N, T) int64; lengths (N,) the number of real tokens of each row, or None for full
        rows -> logits (N, num_classes)."""
        x = self.embed(tokens)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(x)[1][-1])


def rnn(vocab_size, **kwargs) -> RNNClassifier:
    """The reference RNNClassifier; keyword arguments are RNNConfig's fields."""
    return RNNClassifier(RNNConfig(vocab_size, **kwargs))

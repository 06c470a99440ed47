"""Reference transformer classifier: fastdl.models.transformer written with torch.nn modules only
(nn.TransformerEncoder of nn.TransformerEncoderLayer), the ground truth for the model of the same name.

token + position embeddings -> dropout -> encoder (with a final LayerNorm when norm_first) -> the mean
over each row's real tokens -> Linear. Module names are fastdl's: one state_dict loads into both
(strict).
"""
import torch
from torch import nn

from fastdl.models.transformer import TransformerConfig


class TransformerClassifier(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        layer = nn.TransformerEncoderLayer(c.d_model, c.nhead, c.dim_feedforward, c.dropout, c.activation,
                                           batch_first=True, norm_first=c.norm_first)
        norm = nn.LayerNorm(c.d_model) if c.norm_first else None
        self.encoder = nn.TransformerEncoder(layer, c.num_layers, norm=norm, enable_nested_tensor=False)
        self.head = nn.Linear(c.d_model, c.num_classes)

    def forward(self, tokens, padding_mask=None):
        """tokens (N, T) int64, T <= max_len; padding_mask (N, T) bool, True = padding, or None ->
        logits (N, num_classes)."""
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.encoder(self.dropout(x), src_key_padding_mask=padding_mask)
        if padding_mask is None:
            return self.head(x.mean(1))
        keep = ~padding_mask
        return self.head(torch.stack([x[i, keep[i]].mean(0) for i in range(x.shape[0])]))


def transformer(vocab_size, **kwargs) -> TransformerClassifier:
    """The reference TransformerClassifier; keyword arguments are TransformerConfig's fields."""
    return TransformerClassifier(TransformerConfig(vocab_size, **kwargs))

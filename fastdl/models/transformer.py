"""Transformer classifier: token + learned position embeddings -> a stack of
FusedTransformerEncoderLayer -> mean over the real (non-padding) tokens -> Linear.

The stack is named as nn.TransformerEncoder's (encoder.layers.{i}..., encoder.norm), so a model built
from nn.TransformerEncoder(nn.TransformerEncoderLayer(..., batch_first=True)) loads this state_dict.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastdl.nn import FusedTransformerEncoderLayer


@dataclass
class TransformerConfig:
    vocab_size: int
    max_len: int = 128
    d_model: int = 64
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 128
    dropout: float = 0.1
    activation: str = "relu"  # or "gelu"
    norm_first: bool = False  # pre-norm layers, then a final LayerNorm (encoder.norm)
    num_classes: int = 2


class Encoder(nn.Module):
    """num_layers FusedTransformerEncoderLayers (batch first) and, with norm_first, a final LayerNorm."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            FusedTransformerEncoderLayer(config.d_model, config.nhead, config.dim_feedforward, config.dropout,
                                         config.activation, batch_first=True, norm_first=config.norm_first)
            for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model) if config.norm_first else None

    def forward(self, x, padding_mask=None):
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding_mask)
        return self.norm(x) if self.norm is not None else x


def masked_mean(x, padding_mask: Optional[torch.Tensor]):
    """The mean of x (N, T, E) over T, leaving out positions where padding_mask (N, T) is True."""
    if padding_mask is None:
        return x.mean(1)
    count = (~padding_mask).sum(1, keepdim=True).clamp(min=1)
    return x.masked_fill(padding_mask.unsqueeze(-1), 0).sum(1) / count


class TransformerClassifier(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = Encoder(config)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def forward(self, tokens, padding_mask=None):
        """tokens (N, T) int64, T <= max_len; padding_mask (N, T) bool, True = padding (as torch's
        src_key_padding_mask), or None -> logits (N, num_classes)."""
        T = tokens.shape[1]
        if T > self.config.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.config.max_len} positions, got {T}")
        x = self.dropout(self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device)))
        x = self.encoder(x, padding_mask)
        return self.head(masked_mean(x, padding_mask))


def transformer(vocab_size, **kwargs) -> TransformerClassifier:
    """A TransformerClassifier; keyword arguments are TransformerConfig's fields."""
    return TransformerClassifier(TransformerConfig(vocab_size, **kwargs))

"""Reference attention classifier: fastdl.models.attention written with torch.nn modules only
(nn.MultiheadAttention, softmax pooling by hand), the ground truth for the model of the same name.

token + position embeddings -> dropout -> LayerNorm(x + self-attention(x)) -> attention pooling ("dot":
a learned query, "additive": v^T tanh(W h + b)) -> Linear. With hard_k, scores below the k-th best of
a row are masked out before the softmax (chosen by value, not through autograd). Module names are
fastdl's: one state_dict loads into both (strict).
"""
import math

import torch
from torch import nn

from fastdl.models.attention import AttentionConfig


class DotPooling(nn.Module):
    """Scores h q / sqrt(d) with a learned query q."""

    def __init__(self, d_model):
        super().__init__()
        self.query = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))

    def scores(self, h):
        """h (N, T, d) -> (N, T)."""
        return (h * self.query).sum(-1) / math.sqrt(h.shape[-1])


class AdditivePooling(nn.Module):
    """Scores v^T tanh(W h + b) (Bahdanau)."""

    def __init__(self, d_model, score_dim):
        super().__init__()
        self.proj = nn.Linear(d_model, score_dim)
        self.v = nn.Linear(score_dim, 1, bias=False)

    def scores(self, h):
        """h (N, T, d) -> (N, T)."""
        return self.v(torch.tanh(self.proj(h)))[..., 0]


class AttentionClassifier(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()
        c = config
        self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.dropout = nn.Dropout(c.dropout)
        self.attn = nn.MultiheadAttention(c.d_model, c.nhead, dropout=c.dropout, batch_first=True)
        self.norm = nn.LayerNorm(c.d_model)
        self.pool = DotPooling(c.d_model) if c.pooling == "dot" else AdditivePooling(c.d_model, c.score_dim)
        self.head = nn.Linear(c.d_model, c.num_classes)

    def forward(self, tokens, padding_mask=None):
        """tokens (N, T) int64, T <= max_len; padding_mask (N, T) bool, True = padding, or None ->
        logits (N, num_classes)."""
        x = self.dropout(self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device)))
        h = self.norm(x + self.attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0])
        scores = self.pool.scores(h)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, -math.inf)
        if self.config.hard_k is not None:
            kth = scores.detach().sort(dim=1, descending=True).values[:, min(self.config.hard_k, scores.shape[1]) - 1]
            scores = scores.masked_fill(scores.detach() < kth[:, None], -math.inf)
        pooled = (torch.softmax(scores, dim=1).unsqueeze(-1) * h).sum(1)
        return self.head(pooled)


def attention(vocab_size, pooling="dot", hard_k=None, **kwargs) -> AttentionClassifier:
    """The reference AttentionClassifier; keyword arguments are AttentionConfig's fields."""
    return AttentionClassifier(AttentionConfig(vocab_size, pooling=pooling, hard_k=hard_k, **kwargs))

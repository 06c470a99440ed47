"""Attention classifier: the attention mechanism as a model.

token + learned position embeddings -> one self-attention layer (FusedAttention, residual,
LayerNorm) -> attention pooling into one vector -> Linear. Pooling:
- "dot": softmax(h q / sqrt(d)) h with a learned query q, on fastdl's attention kernel;
- "additive" (Bahdanau): softmax(v^T tanh(W h + b)) h.
Hard attention (hard_k=k) keeps only the k positions with the highest scores: the selection is not
differentiable, the softmax over the kept positions is (gradients flow through the kept ones).
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastdl import functional as F
from fastdl.nn import FusedAttention


@dataclass
class AttentionConfig:
    vocab_size: int
    max_len: int = 128
    d_model: int = 64
    nhead: int = 4
    dropout: float = 0.1  # on the embeddings and the self-attention probabilities
    pooling: str = "dot"  # "dot" or "additive"
    score_dim: int = 64  # W's output size for additive pooling
    hard_k: Optional[int] = None  # keep only the top-k positions in the pooling
    num_classes: int = 2


class DotPooling(nn.Module):
    """softmax(h q / sqrt(d)) h: one learned query attending over the sequence."""

    def __init__(self, d_model):
        super().__init__()
        self.query = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))

    def scores(self, h):
        return h @ self.query / math.sqrt(h.shape[-1])

    def forward(self, h, keep):
        """h (N, T, d), keep (N, T) bool, True = attend -> (N, d)."""
        q = self.query.expand(h.shape[0], 1, -1)
        return F.scaled_dot_product_attention(q, h, h, key_padding_mask=keep).squeeze(1)


class AdditivePooling(nn.Module):
    """softmax(v^T tanh(W h + b)) h (Bahdanau et al., 2015), scores from a one-hidden-layer MLP."""

    def __init__(self, d_model, score_dim):
        super().__init__()
        self.proj = nn.Linear(d_model, score_dim)  # W, b
        self.v = nn.Linear(score_dim, 1, bias=False)

    def scores(self, h):
        return self.v(torch.tanh(self.proj(h))).squeeze(-1)

    def forward(self, h, keep):
        weights = torch.softmax(self.scores(h).masked_fill(~keep, -math.inf), dim=-1)
        return torch.bmm(weights.unsqueeze(1), h).squeeze(1)


class AttentionClassifier(nn.Module):
    def __init__(self, config: AttentionConfig):
        super().__init__()
        if config.pooling not in ("dot", "additive"):
            raise ValueError(f"pooling: expected 'dot' or 'additive', got {config.pooling!r}")
        if config.hard_k is not None and config.hard_k < 1:
            raise ValueError(f"hard_k: expected None or a positive int, got {config.hard_k}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.attn = FusedAttention(config.d_model, config.nhead, dropout=config.dropout, batch_first=True)
        self.norm = nn.LayerNorm(config.d_model)
        if config.pooling == "dot":
            self.pool = DotPooling(config.d_model)
        else:
            self.pool = AdditivePooling(config.d_model, config.score_dim)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def forward(self, tokens, padding_mask=None):
        """tokens (N, T) int64, T <= max_len; padding_mask (N, T) bool, True = padding (torch's
        key_padding_mask), or None -> logits (N, num_classes)."""
        N, T = tokens.shape
        if T > self.config.max_len:
            raise ValueError(f"tokens: expected at most max_len={self.config.max_len} positions, got {T}")
        x = self.dropout(self.embed(tokens) + self.pos(torch.arange(T, device=tokens.device)))
        h = self.norm(x + self.attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0])
        keep = ~padding_mask if padding_mask is not None else torch.ones(N, T, dtype=torch.bool, device=h.device)
        if self.config.hard_k is not None:
            keep = self.top_k(h, keep)
        return self.head(self.pool(h, keep))

    @torch.no_grad()
    def top_k(self, h, keep):
        """keep, narrowed to the hard_k kept positions of highest pooling score in each row."""
        scores = self.pool.scores(h).masked_fill(~keep, -math.inf)
        top = scores.topk(min(self.config.hard_k, scores.shape[1]), dim=1).indices
        return keep & torch.zeros_like(keep).scatter_(1, top, True)


def attention(vocab_size, pooling="dot", hard_k=None, **kwargs) -> AttentionClassifier:
    """An AttentionClassifier; keyword arguments are AttentionConfig's fields."""
    return AttentionClassifier(AttentionConfig(vocab_size, pooling=pooling, hard_k=hard_k, **kwargs))

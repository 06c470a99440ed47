"""GPT: a decoder-only causal language model, after nanoGPT.

token + position embeddings -> dropout -> n_layer pre-norm Blocks -> LayerNorm (ln_f) -> lm_head, whose
weight is the token embedding's (tied). A Block is x + attn(ln_1(x)), then x + mlp(ln_2(x)); attn is a
FusedAttention (batch first) run with is_causal=True, so its state_dict is nn.MultiheadAttention's
(in_proj_weight, in_proj_bias, out_proj.*) and no L x L mask is ever built.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as tF
from torch import nn

from fastdl.nn import FusedAttention


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int  # the longest context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # in the Linears and LayerNorms


class MLP(nn.Module):
    """n_embd -> 4 n_embd -> GELU -> n_embd -> dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: x + dropout(causal self-attention(ln_1(x))), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = FusedAttention(config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias,
                                   batch_first=True)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.resid_dropout(self.attn(h, h, h, need_weights=False, is_causal=True)[0])
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one parameter, two state_dict keys
        self.apply(init_weights)
        for block in self.transformer.h:  # GPT-2's scaled init of the projections into the residual
            nn.init.normal_(block.mlp.c_proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))
            nn.init.normal_(block.attn.out_proj.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets: Optional[torch.Tensor] = None):
        """idx (N, T) int64 with T <= block_size; targets (N, T) int64 (-1 = ignore) or None ->
        (logits (N, T, vocab_size), mean cross-entropy or None)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"idx: expected at most block_size={self.config.block_size} positions, got {T}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = tF.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """idx (N, T) extended by max_new_tokens tokens, each sampled from the softmax of the last
        logits / temperature (restricted to the top_k most likely when given), the context cropped to
        the last block_size tokens. Sampling draws from `generator` (torch's default when None)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -math.inf)
            next_idx = torch.multinomial(tF.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, next_idx), dim=1)
        return idx


def init_weights(module):
    """nanoGPT's: normal(0, 0.02) Linear and Embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def gpt(**kwargs) -> GPT:
    """A GPT; keyword arguments are GPTConfig's fields."""
    return GPT(GPTConfig(**kwargs))

"""Reference GPT: fastdl.models.gpt written with torch.nn modules only (nn.MultiheadAttention with an
explicit causal attn_mask in place of FusedAttention with is_causal), the ground truth for the model of
the same name.

token + position embeddings -> dropout -> pre-norm Blocks -> ln_f -> lm_head tied to the token
embedding; the loss is the mean cross-entropy, targets of -1 ignored. Module names are fastdl's: one
state_dict loads into both (strict). Weights keep torch.nn's default initialisation.
"""
import torch
from torch import nn

from fastdl.models.gpt import GPTConfig


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
    """x + dropout(causal self-attention(ln_1(x))), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = nn.MultiheadAttention(config.n_embd, config.n_head, dropout=config.dropout, bias=config.bias,
                                          batch_first=True)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        """x (N, T, n_embd) -> (N, T, n_embd)."""
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # True = a later key: masked
        h = self.ln_1(x)
        x = x + self.resid_dropout(self.attn(h, h, h, attn_mask=causal, need_weights=False)[0])
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
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets=None):
        """idx (N, T) int64, T <= block_size; targets (N, T) int64 (-1 = ignore) or None ->
        (logits (N, T, vocab_size), mean cross-entropy or None)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss


def gpt(**kwargs) -> GPT:
    """The reference GPT; keyword arguments are GPTConfig's fields."""
    return GPT(GPTConfig(**kwargs))

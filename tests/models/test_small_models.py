"""The six small models (mlp, cnn, rnn, lstm, transformer, attention) against twins built from torch.nn
alone with identical state_dict keys: the twin loads the model's state_dict (strict), then outputs,
every parameter gradient and the buffers after the step agree in float64, in training and eval mode.
Plus short SGD runs (mlp, cnn) whose losses agree step by step."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastdl import models
from fastdl.testing import assert_close

VOCAB = 23
MODES = ["train", "eval"]


# ---- twins: torch.nn modules only, named as the models' submodules ----

class TwinMLP(nn.Module):
    def __init__(self, in_features, hidden=128, num_classes=10, dropout=0.2):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(self.dropout(self.relu(self.fc1(self.flatten(x)))))


class TwinConvBlock(nn.Module):
    def __init__(self, cin, cout, batch_norm):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else None
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.conv(x)
        return self.relu(self.bn(x) if self.bn is not None else x)


class TwinCNN(nn.Module):
    def __init__(self, image_size, batch_norm):
        super().__init__()
        self.block1 = TwinConvBlock(1, 32, batch_norm)
        self.block2 = TwinConvBlock(32, 64, batch_norm)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * ((image_size - 4) // 2) ** 2, 128)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(self.flatten(self.pool(self.block2(self.block1(x)))))))


class TwinRNN(nn.Module):
    def __init__(self, embed_dim, hidden, num_layers, num_classes, dropout):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed_dim, padding_idx=0)
        self.rnn = nn.RNN(embed_dim, hidden, num_layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens, lengths=None):
        x = self.embed(tokens)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(x)[1][-1])


class TwinLSTM(nn.Module):
    def __init__(self, features, hidden, num_layers, horizon, dropout):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers, batch_first=True, dropout=dropout)
        self.head = nn.Linear(hidden, horizon * features)
        self.horizon, self.features = horizon, features

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1]).view(x.shape[0], self.horizon, self.features)


class TwinTransformer(nn.Module):
    def __init__(self, max_len, d_model, nhead, num_layers, dim_feedforward, activation, norm_first, num_classes):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(0.0)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, 0.0, activation, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens, padding_mask=None):
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))
        x = self.encoder(self.dropout(x), src_key_padding_mask=padding_mask)
        if padding_mask is None:
            return self.head(x.mean(1))
        keep = ~padding_mask
        return self.head(torch.stack([x[i, keep[i]].mean(0) for i in range(x.shape[0])]))


class TwinDotPooling(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(d_model))

    def scores(self, h):
        return (h * self.query).sum(-1) / math.sqrt(h.shape[-1])


class TwinAdditivePooling(nn.Module):
    def __init__(self, d_model, score_dim):
        super().__init__()
        self.proj = nn.Linear(d_model, score_dim)
        self.v = nn.Linear(score_dim, 1, bias=False)

    def scores(self, h):
        return self.v(torch.tanh(self.proj(h)))[..., 0]


class TwinAttention(nn.Module):
    def __init__(self, max_len, d_model, nhead, pooling, score_dim, hard_k, num_classes):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.dropout = nn.Dropout(0.0)
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.pool = TwinDotPooling(d_model) if pooling == "dot" else TwinAdditivePooling(d_model, score_dim)
        self.head = nn.Linear(d_model, num_classes)
        self.hard_k = hard_k

    def forward(self, tokens, padding_mask=None):
        x = self.dropout(self.embed(tokens) + self.pos(torch.arange(tokens.shape[1])))
        h = self.norm(x + self.attn(x, x, x, key_padding_mask=padding_mask, need_weights=False)[0])
        scores = self.pool.scores(h)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, -math.inf)
        if self.hard_k is not None:  # drop all but the k best (by value, not through autograd)
            kth = scores.detach().sort(dim=1, descending=True).values[:, min(self.hard_k, scores.shape[1]) - 1]
            scores = scores.masked_fill(scores.detach() < kth[:, None], -math.inf)
        pooled = (torch.softmax(scores, dim=1).unsqueeze(-1) * h).sum(1)
        return self.head(pooled)


# ---- the comparison ----

def lengths_mask(lengths, T):
    """(N, T) bool, True = padding, for rows of the given lengths."""
    return torch.arange(T)[None, :] >= torch.as_tensor(lengths)[:, None]


def tokens_of(lengths, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    return tokens.masked_fill(lengths_mask(lengths, T), 0)


def assert_same_state(state, ref_state, when, n):
    """Equal integer buffers (num_batches_tracked), close floating-point ones."""
    for name, want in ref_state.items():
        if want.is_floating_point():
            assert_close(f"{name} {when}", state[name], want, n=n)
        else:
            assert torch.equal(state[name], want), f"{name} {when}: {state[name]}, expected {want}"


def check_twins(model, twin, inputs, mode, n):
    """The twin loads the model's state_dict (strict); outputs, every parameter gradient (by name)
    and, after the step, every buffer agree in float64. Each forward runs after torch.manual_seed(0),
    so dropout modules draw the same masks."""
    model, twin = model.double().train(mode == "train"), twin.double().train(mode == "train")
    twin.load_state_dict(model.state_dict())
    inputs = [t.double() if t.is_floating_point() else t for t in inputs]
    results = []
    for m in (model, twin):
        torch.manual_seed(0)
        out = m(*inputs)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        names, params = zip(*m.named_parameters())
        grads = torch.autograd.grad((out * dout).sum(), params)
        results.append((out, dict(zip(names, grads)), m.state_dict()))
    (out, grads, state), (ref_out, ref_grads, ref_state) = results
    assert_close("output", out, ref_out, n=n)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(f"grad of {name}", grads[name], ref_grads[name], n=n)
    assert_same_state(state, ref_state, "after the step", n)
    if mode == "eval":  # inference without autograd (nn's transformer fast paths included)
        with torch.no_grad():
            assert_close("no_grad output", model(*inputs), twin(*inputs), n=n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_features", [784, 64], ids=["mnist", "digits"])
def test_mlp(in_features, mode):
    torch.manual_seed(0)
    model = models.mlp(in_features=in_features)
    side = int(math.isqrt(in_features))
    check_twins(model, TwinMLP(in_features), [torch.randn(5, 1, side, side)], mode, n=5 * in_features)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image_size", [28, 8])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_cnn(batch_norm, image_size, mode):
    torch.manual_seed(0)
    model = models.cnn(batch_norm=batch_norm, image_size=image_size)
    x = torch.randn(3, 1, image_size, image_size)
    check_twins(model, TwinCNN(image_size, batch_norm), [x], mode, n=3 * image_size ** 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [None, [5, 7, 2, 7, 1]], ids=["full", "packed"])
def test_rnn(lengths, mode):
    torch.manual_seed(0)
    model = models.rnn(VOCAB, embed_dim=6, hidden=9, num_layers=2, num_classes=3, dropout=0.3)
    tokens = tokens_of(lengths or [7] * 5, 7)
    inputs = [tokens] if lengths is None else [tokens, torch.tensor(lengths)]
    check_twins(model, TwinRNN(6, 9, 2, 3, 0.3), inputs, mode, n=35)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_layers,features,horizon", [(1, 1, 1), (2, 3, 4)])
def test_lstm(num_layers, features, horizon, mode):
    torch.manual_seed(0)
    model = models.lstm(features=features, hidden=11, num_layers=num_layers, horizon=horizon,
                         dropout=0.25 if num_layers > 1 else 0.0)
    x = torch.randn(4, 9, features)
    check_twins(model, TwinLSTM(features, 11, num_layers, horizon, 0.25 if num_layers > 1 else 0.0), [x], mode, n=36)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")], ids=["post-relu", "pre-gelu"])
@pytest.mark.parametrize("lengths", [None, [6, 3, 1, 5]], ids=["full", "padded"])
def test_transformer(lengths, norm_first, activation, mode):
    """Dropout 0: FusedAttention's dropout masks come from fastdl's own generator."""
    torch.manual_seed(0)
    config = dict(max_len=8, d_model=12, nhead=3, num_layers=2, dim_feedforward=20, activation=activation,
                  norm_first=norm_first, num_classes=3)
    model = models.transformer(VOCAB, dropout=0.0, **config)
    assert any(k.startswith("encoder.layers.1.self_attn.") for k in model.state_dict())
    tokens = tokens_of(lengths or [6] * 4, 6)
    inputs = [tokens] if lengths is None else [tokens, lengths_mask(lengths, 6)]
    check_twins(model, TwinTransformer(**config), inputs, mode, n=24)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hard_k", [None, 3], ids=["soft", "hard3"])
@pytest.mark.parametrize("pooling", ["dot", "additive"])
@pytest.mark.parametrize("lengths", [None, [6, 2, 4, 5]], ids=["full", "padded"])
def test_attention(lengths, pooling, hard_k, mode):
    torch.manual_seed(0)
    config = dict(max_len=8, d_model=12, nhead=2, score_dim=7, num_classes=3)
    model = models.attention(VOCAB, pooling=pooling, hard_k=hard_k, dropout=0.0, **config)
    tokens = tokens_of(lengths or [6] * 4, 6)
    inputs = [tokens] if lengths is None else [tokens, lengths_mask(lengths, 6)]
    check_twins(model, TwinAttention(pooling=pooling, hard_k=hard_k, **config), inputs, mode, n=24)


def test_hard_attention_keeps_k():
    """hard_k=1 pools exactly the best-scoring real token: its hidden state, through the head."""
    torch.manual_seed(0)
    model = models.attention(VOCAB, pooling="additive", hard_k=1, dropout=0.0, d_model=8, nhead=2).double()
    model.pool.v.weight.data.mul_(50)  # spread the scores
    tokens, mask = tokens_of([5, 3], 5), lengths_mask([5, 3], 5)
    seen = {}
    model.pool.register_forward_hook(lambda m, args, out: seen.update(h=args[0], keep=args[1], out=out))
    model(tokens, mask)
    assert seen["keep"].sum(1).tolist() == [1, 1] and not (seen["keep"] & mask).any()
    best = model.pool.scores(seen["h"]).masked_fill(mask, -math.inf).argmax(1)
    assert_close("pooled", seen["out"], seen["h"][torch.arange(2), best])


# ---- short training runs: the same losses step by step ----

@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn-bn"])
def test_training_run(name):
    """5 SGD steps (momentum, dropout on for mlp, batch statistics for cnn-bn) on one batch of 8x8
    synthetic digits: the losses agree at every step, and so do the parameters and buffers at the end."""
    torch.manual_seed(0)
    if name == "mlp":
        model, twin = models.mlp(in_features=64), TwinMLP(64)
    else:
        model, twin = models.cnn(batch_norm=name == "cnn-bn", image_size=8), TwinCNN(8, name == "cnn-bn")
    model, twin = model.double(), twin.double()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(32, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)
    losses = {}
    for key, m in (("model", model), ("twin", twin)):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        losses[key] = []
        for step in range(5):
            torch.manual_seed(100 + step)
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[key].append(loss.detach())
    for step, (got, want) in enumerate(zip(losses["model"], losses["twin"])):
        assert_close(f"loss at step {step}", got, want, n=32)
    assert losses["model"][-1] < losses["model"][0]
    assert_same_state(model.state_dict(), twin.state_dict(), "after training", n=32 * 64)

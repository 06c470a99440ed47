"""The six small models (mlp, cnn, rnn, lstm, transformer, attention) against their twins in
fastdl.reference.models, built from torch.nn alone with identical state_dict keys: the twin loads the
model's state_dict (strict), then outputs, every parameter gradient and the buffers after the step
agree in float64, in training and eval mode. Plus short SGD runs (mlp, cnn) whose losses agree step
by step."""
import math

import pytest
import torch
from torch import nn

from fastdl import models
from fastdl.reference import models as reference
from fastdl.testing import assert_close

VOCAB = 23
MODES = ["train", "eval"]


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
    check_twins(model, reference.mlp(in_features=in_features), [torch.randn(5, 1, side, side)], mode, n=5 * in_features)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image_size", [28, 8])
@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "bn"])
def test_cnn(batch_norm, image_size, mode):
    torch.manual_seed(0)
    model = models.cnn(batch_norm=batch_norm, image_size=image_size)
    x = torch.randn(3, 1, image_size, image_size)
    check_twins(model, reference.cnn(batch_norm=batch_norm, image_size=image_size), [x], mode, n=3 * image_size ** 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lengths", [None, [5, 7, 2, 7, 1]], ids=["full", "packed"])
def test_rnn(lengths, mode):
    torch.manual_seed(0)
    config = dict(embed_dim=6, hidden=9, num_layers=2, num_classes=3, dropout=0.3)
    model = models.rnn(VOCAB, **config)
    tokens = tokens_of(lengths or [7] * 5, 7)
    inputs = [tokens] if lengths is None else [tokens, torch.tensor(lengths)]
    check_twins(model, reference.rnn(VOCAB, **config), inputs, mode, n=35)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_layers,features,horizon", [(1, 1, 1), (2, 3, 4)])
def test_lstm(num_layers, features, horizon, mode):
    torch.manual_seed(0)
    config = dict(features=features, hidden=11, num_layers=num_layers, horizon=horizon,
                  dropout=0.25 if num_layers > 1 else 0.0)
    model = models.lstm(**config)
    x = torch.randn(4, 9, features)
    check_twins(model, reference.lstm(**config), [x], mode, n=36)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_first,activation", [(False, "relu"), (True, "gelu")], ids=["post-relu", "pre-gelu"])
@pytest.mark.parametrize("lengths", [None, [6, 3, 1, 5]], ids=["full", "padded"])
def test_transformer(lengths, norm_first, activation, mode):
    """Dropout 0: FusedAttention's dropout masks come from fastdl's own generator."""
    torch.manual_seed(0)
    config = dict(max_len=8, d_model=12, nhead=3, num_layers=2, dim_feedforward=20, activation=activation,
                  norm_first=norm_first, num_classes=3, dropout=0.0)
    model = models.transformer(VOCAB, **config)
    assert any(k.startswith("encoder.layers.1.self_attn.") for k in model.state_dict())
    tokens = tokens_of(lengths or [6] * 4, 6)
    inputs = [tokens] if lengths is None else [tokens, lengths_mask(lengths, 6)]
    check_twins(model, reference.transformer(VOCAB, **config), inputs, mode, n=24)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hard_k", [None, 3], ids=["soft", "hard3"])
@pytest.mark.parametrize("pooling", ["dot", "additive"])
@pytest.mark.parametrize("lengths", [None, [6, 2, 4, 5]], ids=["full", "padded"])
def test_attention(lengths, pooling, hard_k, mode):
    torch.manual_seed(0)
    config = dict(max_len=8, d_model=12, nhead=2, score_dim=7, num_classes=3, dropout=0.0)
    model = models.attention(VOCAB, pooling=pooling, hard_k=hard_k, **config)
    tokens = tokens_of(lengths or [6] * 4, 6)
    inputs = [tokens] if lengths is None else [tokens, lengths_mask(lengths, 6)]
    check_twins(model, reference.attention(VOCAB, pooling=pooling, hard_k=hard_k, **config), inputs, mode, n=24)


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
        model, twin = models.mlp(in_features=64), reference.mlp(in_features=64)
    else:
        config = dict(batch_norm=name == "cnn-bn", image_size=8)
        model, twin = models.cnn(**config), reference.cnn(**config)
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

"""Training on real data that needs no download, for the sequence models: fastdl's model and its
torch.nn reference (fastdl.reference.models) take the same steps (losses equal at every step, in
float64), and the fastdl model learns.

- gpt: next-character prediction on standard-library sources (fastdl.data.language_modeling); it
  must end below the unigram entropy of the training text, the loss of a model that knows only how
  often each character occurs.
- rnn, transformer, attention: which of three standard-library modules a window of text comes from
  (fastdl.data.source_classification); held-out accuracy far above chance (1/3).
- lstm: the Mackey-Glass series five steps ahead (fastdl.data.forecasting); held-out error far below
  that of repeating the last value.

Learning rates and sizes keep the two runs in lockstep: training amplifies rounding differences, and
at larger steps two torch.nn copies of one model, one nudged by 1e-16, drift apart the same way.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from fastdl import data, models
from fastdl.reference import models as reference
from fastdl.testing import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


def lockstep(make, batches, loss_of, lr, optimizer=torch.optim.Adam):
    """Trains make(fastdl.models) and make(fastdl.reference.models) (which loads the first's
    state_dict) in float64 on the same batches; asserts their losses agree at every step. Returns the
    fastdl model (eval mode) and its first and last losses."""
    torch.manual_seed(0)
    model = make(models).double()
    ref = make(reference).double()
    ref.load_state_dict(model.state_dict())
    opts = [optimizer(m.parameters(), lr=lr) for m in (model, ref)]
    losses = []
    for step, batch in enumerate(batches):
        pair = []
        for m, opt in zip((model, ref), opts):
            loss = loss_of(m, *batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pair.append(loss.detach())
        assert_close(f"loss at step {step}", pair[0], pair[1], n=batch[0].numel())
        losses.append(pair[0].item())
    return model.eval(), losses[0], losses[-1]


def random_batches(x, y, batch_size, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        yield x[idx], y[idx]


def test_gpt_on_stdlib_text():
    train, val = data.language_modeling()
    g = torch.Generator().manual_seed(1)
    batches = (data.next_token_batch(train, 16, 32, g) for _ in range(300))
    model, first, last = lockstep(
        lambda m: m.gpt(vocab_size=data.VOCAB_SIZE, block_size=16, n_layer=1, n_head=2, n_embd=32),
        batches, lambda m, x, y: m(x, y)[1], lr=5e-3, optimizer=torch.optim.AdamW)
    counts = torch.bincount(train, minlength=data.VOCAB_SIZE).double()
    p = counts[counts > 0] / counts.sum()
    unigram = -(p * p.log()).sum().item()
    x_val, y_val = data.next_token_batch(val, 16, 512, torch.Generator().manual_seed(2))
    with torch.no_grad():
        val_loss = model(x_val, y_val)[1].item()
    print(f"gpt: train loss {first:.3f} -> {last:.3f}, val loss {val_loss:.3f}, unigram entropy {unigram:.3f}, "
          f"log V {math.log(data.VOCAB_SIZE):.3f}")
    assert val_loss < unigram - 0.3, f"val loss {val_loss:.3f}, unigram entropy {unigram:.3f}"


CLASSIFIERS = {  # name: (constructor arguments, window length, steps, learning rate)
    "rnn": (dict(embed_dim=32, hidden=64, num_layers=1), 16, 300, 1e-3),
    "transformer": (dict(max_len=32, d_model=32, nhead=2, num_layers=1, dim_feedforward=64, dropout=0.0), 32, 200,
                    3e-3),
    "attention": (dict(max_len=32, d_model=32, nhead=2, dropout=0.0), 32, 200, 3e-3),
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_classifier_on_stdlib_sources(name):
    kwargs, seq_len, steps, lr = CLASSIFIERS[name]
    x, y, x_test, y_test = data.source_classification(seq_len)
    classes = len(data.CLASSIFICATION_MODULES)
    model, first, last = lockstep(
        lambda m: getattr(m, name)(data.VOCAB_SIZE, num_classes=classes, **kwargs),
        random_batches(x, y, 32, steps), lambda m, xb, yb: F.cross_entropy(m(xb), yb), lr=lr)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    print(f"{name}: loss {first:.3f} -> {last:.3f}, held-out accuracy {accuracy:.3f} (chance {1 / classes:.3f})")
    assert accuracy > 0.8, f"held-out accuracy {accuracy:.3f}"


def test_lstm_on_mackey_glass():
    x, y, x_test, y_test = data.forecasting(16, horizon=5, dtype=torch.float64)
    model, first, last = lockstep(lambda m: m.lstm(features=1, hidden=32, horizon=5),
                                  random_batches(x, y, 32, 200), lambda m, xb, yb: F.mse_loss(m(xb), yb), lr=1e-2)
    with torch.no_grad():
        mse = F.mse_loss(model(x_test), y_test).item()
    naive = F.mse_loss(x_test[:, -1:].expand_as(y_test), y_test).item()
    print(f"lstm: loss {first:.4f} -> {last:.4f}, held-out MSE {mse:.4f}, repeating the last value {naive:.4f}")
    assert mse < naive / 10, f"held-out MSE {mse:.4f}, naive {naive:.4f}"

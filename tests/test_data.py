"""fastdl.data: shapes, dtypes, ranges, determinism, disjoint splits, the tokenizer, Mackey-Glass."""
import sys

import pytest
import torch

from fastdl import data


def assert_equal_tuples(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v)


def windows_in(stream, windows):
    """Whether each row of `windows` (N, L), as text, occurs somewhere in the 1-D token stream."""
    text = data.decode(stream)
    return [data.decode(w) in text for w in windows]


# ---- digits ----

def test_digits():
    x, y, x_test, y_test = data.digits()
    assert x.shape == (1500, 1, 8, 8) and x_test.shape == (297, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1500,) and y_test.shape == (297,) and y.dtype == torch.long
    assert x.min() == 0 and x.max() == 1 and set(y.unique().tolist()) == set(range(10))
    assert_equal_tuples((x, y, x_test, y_test), data.digits())


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_digits_resized(size, channels):
    x, y, x_test, _ = data.digits(size, channels, dtype=torch.float64)
    assert x.shape == (1500, channels, size, size) and x_test.shape == (297, channels, size, size)
    assert x.dtype == torch.float64 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[:, :1].expand_as(x), x)  # the gray channel repeated
    assert torch.equal(y, data.digits()[1])


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        data.digits()


# ---- text ----

def test_encode_decode():
    text = data.stdlib_text(("textwrap",))
    tokens = data.encode(text)
    assert tokens.shape == (len(text),) and tokens.dtype == torch.long
    assert 1 <= tokens.min() and tokens.max() < data.VOCAB_SIZE  # PAD (0) is never a character
    assert data.decode(tokens) == text
    assert data.encode("a\n~ \té").tolist() == [ord("a") - 29, data.NEWLINE, 97, 3, data.UNK, data.UNK]
    assert data.decode([data.PAD, 68, data.UNK]) == "a\ufffd"
    assert data.encode("").shape == (0,)
    with pytest.raises(ValueError, match="ids"):
        data.decode([data.VOCAB_SIZE])


def test_stdlib_text():
    text = data.stdlib_text()
    assert len(text) > 100_000 and "def " in text
    assert text.startswith(data.module_source(data.TEXT_MODULES[0]))
    with pytest.raises(FileNotFoundError):
        data.module_source("sys")  # built in: no source file


def test_language_modeling():
    train, val = data.language_modeling()
    assert train.dim() == val.dim() == 1 and train.dtype == val.dtype == torch.long
    assert 0.08 < len(val) / (len(train) + len(val)) < 0.12
    assert 1 <= min(train.min(), val.min()) and max(train.max(), val.max()) < data.VOCAB_SIZE
    assert len(train) + len(val) == len(data.encode(data.stdlib_text()))
    assert_equal_tuples((train, val), data.language_modeling())


def test_next_token_batch():
    train, _ = data.language_modeling(("json.decoder",))
    batch = lambda: data.next_token_batch(train, 16, 8, torch.Generator().manual_seed(0))  # noqa: E731
    x, y = batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert all(windows_in(train, torch.cat([x, y[:, -1:]], 1)))
    assert_equal_tuples((x, y), batch())


@pytest.mark.parametrize("min_len", [None, 8])
def test_source_classification(min_len):
    make = lambda: data.source_classification(32, train_per_class=100, test_per_class=20, min_len=min_len)  # noqa: E731
    x, y, x_test, y_test = out = make()
    K = len(data.CLASSIFICATION_MODULES)
    assert x.shape == (100 * K, 32) and x_test.shape == (20 * K, 32) and x.dtype == torch.long
    assert torch.equal(y, torch.arange(K).repeat_interleave(100)) and y.dtype == torch.long
    assert torch.equal(y_test, torch.arange(K).repeat_interleave(20))
    assert_equal_tuples(out, make())
    lengths = (x != data.PAD).sum(1)
    if min_len is None:
        assert (lengths == 32).all() and (x_test != data.PAD).all()
    else:
        assert lengths.min() >= min_len and len(lengths.unique()) > 10
        assert torch.equal(x == data.PAD, torch.arange(32) >= lengths[:, None])  # right-padded
    for k, name in enumerate(data.CLASSIFICATION_MODULES):
        tokens = data.encode(data.module_source(name))
        cut = round(0.8 * len(tokens))
        for rows, part in ((x[y == k], tokens[:cut]), (x_test[y_test == k], tokens[cut:])):
            assert all(windows_in(part, rows[:, :min_len or 32]))


def test_source_classification_split(tmp_path, monkeypatch):
    """On modules whose every window is unique, no train window occurs in the test part, and no test
    window in the train part."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("counting_a", "counting_b")
    for k, name in enumerate(names):  # every window of 12 characters holds a whole line; all lines differ
        (tmp_path / f"{name}.py").write_text("".join(f"{1000 * k + i:05}\n" for i in range(300)))
    x, y, x_test, y_test = data.source_classification(12, names, train_per_class=50, test_per_class=30,
                                                      test_fraction=0.25)
    for k, name in enumerate(names):
        tokens = data.encode(data.module_source(name))
        cut = round(0.75 * len(tokens))
        train_part, test_part = tokens[:cut], tokens[cut:]
        assert all(windows_in(train_part, x[y == k])) and not any(windows_in(test_part, x[y == k]))
        assert all(windows_in(test_part, x_test[y_test == k])) and not any(windows_in(train_part, x_test[y_test == k]))
    with pytest.raises(ValueError, match="seq_len"):
        data.source_classification(2000, names)


# ---- series ----

def test_mackey_glass():
    x = data.mackey_glass()
    assert x.shape == (2000,) and x.dtype == torch.float64
    assert 0.2 < x.min() and x.max() < 1.4 and 0.15 < x.std()  # bounded, and not settled to a point
    for p in range(4, 300):  # no period below 300 time units (lags 1-3 are small by smoothness alone)
        assert (x[p:] - x[:-p]).abs().mean() > 0.05, p
    assert torch.equal(x, data.mackey_glass())
    assert torch.equal(data.mackey_glass(3000)[:2000], x)


def test_forecasting():
    x, y, x_test, y_test = out = data.forecasting(20, horizon=5, length=1000)
    assert x.shape == (800 - 24, 20, 1) and y.shape == (800 - 24, 5, 1)  # every window of 25 of 800 values
    assert x_test.shape == (200 - 24, 20, 1) and y_test.shape == (200 - 24, 5, 1) and x.dtype == torch.float32
    series = data.mackey_glass(1000)
    train_part = (series[:800] - series[:800].mean()) / series[:800].std()
    assert torch.allclose(x[0, :, 0].double(), train_part[:20], atol=1e-6)
    assert torch.allclose(y[-1, :, 0].double(), train_part[-5:], atol=1e-6)
    assert torch.equal(x[1:, :-1], x[:-1, 1:]) and torch.equal(y[:-1, 0], x[1:, -1])
    assert_equal_tuples(out, data.forecasting(20, horizon=5, length=1000))
    assert data.forecasting(8, dtype=torch.float64)[0].dtype == torch.float64

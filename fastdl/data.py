"""Real data for fastdl's models, with nothing downloaded.

- images: scikit-learn's bundled 8x8 handwritten digits (`digits`), optionally resized and repeated
  to 3 channels for the 28x28 / 32x32 models; or MNIST from IDX files the user points at (`mnist`);
- text: the source code of a fixed list of pure-Python standard-library modules (`stdlib_text`),
  present on every CPython install, tokenized character by character (`encode` / `decode`), for
  next-token prediction (`language_modeling`, `next_token_batch`) and for sequence classification
  by source module (`source_classification`);
- a series: the Mackey-Glass delay differential equation (`mackey_glass`), cut into windows for
  forecasting (`forecasting`).

Every function is deterministic: two calls return equal tensors. The standard-library sources
differ a little between Python versions, so the text tasks do too (not between calls).
"""
import gzip
import importlib.util
import struct
from pathlib import Path

import torch

# ---- images ----


def digits(size=8, channels=1, dtype=torch.float32):
    """scikit-learn's 1797 8x8 handwritten digits, pixels scaled to [0, 1] -> (x_train, y_train,
    x_test, y_test): the first 1500 images and the last 297, x (N, channels, size, size) `dtype`,
    y (N,) int64 in 0..9. size != 8 resizes bilinearly (28 for the MNIST-shaped models, 32 for
    resnet / mobilenet); channels > 1 repeats the gray channel."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("fastdl.data.digits needs scikit-learn (pip install scikit-learn)") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=dtype).unsqueeze(1) / 16
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def mnist(path, size=28, channels=1, dtype=torch.float32):
    """MNIST (or Fashion-MNIST) from its four standard IDX files in the folder `path`
    (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
    each optionally .gz), or in torchvision's layout under it (PATH/MNIST/raw, PATH/FashionMNIST/raw:
    the root given to torchvision.datasets.MNIST), which the user downloaded; nothing is fetched ->
    (x_train, y_train, x_test, y_test) as digits() returns them: x (N, channels, size, size) in
    [0, 1], y (N,) int64."""
    candidates = [Path(path), Path(path) / "MNIST" / "raw", Path(path) / "FashionMNIST" / "raw"]
    folder = next((c for c in candidates if any(c.glob("train-images-idx3-ubyte*"))), Path(path))

    def read(stem, kind):
        for name in (stem, stem + ".gz"):
            f = folder / name
            if f.exists():
                raw = gzip.decompress(f.read_bytes()) if name.endswith(".gz") else f.read_bytes()
                break
        else:
            raise FileNotFoundError(f"data: expected {stem}[.gz] in {folder}"
                                    + (" (or in torchvision's MNIST/raw under it)" if folder == Path(path) else ""))
        magic, n = struct.unpack(">II", raw[:8])
        if magic != (0x803 if kind == "images" else 0x801):
            raise ValueError(f"data: {f} is not an IDX {kind} file (magic {magic:#x})")
        if kind == "labels":
            return torch.frombuffer(bytearray(raw[8:8 + n]), dtype=torch.uint8).long()
        rows, cols = struct.unpack(">II", raw[8:16])
        pixels = torch.frombuffer(bytearray(raw[16:16 + n * rows * cols]), dtype=torch.uint8)
        return pixels.view(n, 1, rows, cols).to(dtype) / 255

    out = []
    for split in ("train", "t10k"):
        x = read(f"{split}-images-idx3-ubyte", "images")
        if x.shape[-1] != size:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out += [x.repeat(1, channels, 1, 1), read(f"{split}-labels-idx1-ubyte", "labels")]
    return tuple(out)


# ---- text ----

# Pure-Python standard-library modules whose source barely changes between CPython 3.10 and 3.13.
TEXT_MODULES = ("difflib", "textwrap", "heapq", "pprint", "shlex", "base64", "json.decoder", "json.encoder",
                "getopt", "colorsys")
# Three styles, one class each, for source_classification: Python code, a dict of HTML entity names,
# a codec's character table.
CLASSIFICATION_MODULES = ("json.decoder", "html.entities", "encodings.cp1252")

# The character vocabulary: 0 padding (no character has it), 1 unknown (any character not below),
# 2 newline, 3..97 the printable ASCII characters ' '..'~' in order.
PAD, UNK, NEWLINE = 0, 1, 2
VOCAB_SIZE = 98
_CHARS = ["", "\ufffd", "\n"] + [chr(c) for c in range(32, 127)]


def module_source(name):
    """The source text (str) of the pure-Python module `name` (e.g. "json.decoder"), read from the
    file importlib finds for it (without importing the module itself), with universal newlines."""
    spec = importlib.util.find_spec(name)
    if spec is None or not (spec.origin or "").endswith(".py"):
        raise FileNotFoundError(f"no Python source file for the module {name!r}")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def stdlib_text(modules=TEXT_MODULES):
    """The sources of `modules`, concatenated in order (str)."""
    return "".join(module_source(name) for name in modules)


def encode(text):
    """text (str) -> (len(text),) int64 token ids in 1..VOCAB_SIZE-1, one per character: newline 2,
    ' '..'~' 3..97, any other character UNK (1). Never PAD (0)."""
    codes = torch.tensor(list(map(ord, text)), dtype=torch.long)
    tokens = torch.where((codes >= 32) & (codes < 127), codes - 29, UNK)
    return tokens.masked_fill(codes == 10, NEWLINE)


def decode(tokens):
    """Token ids (a 1-D tensor or sequence of ints in 0..VOCAB_SIZE-1) -> str: PAD gives nothing,
    UNK the replacement character U+FFFD. decode(encode(text)) == text for printable ASCII text."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.numel() and not (0 <= tokens.min() and tokens.max() < VOCAB_SIZE):
        raise ValueError(f"tokens: expected ids in 0..{VOCAB_SIZE - 1}, got {tokens.min()}..{tokens.max()}")
    return "".join(_CHARS[i] for i in tokens.tolist())


def language_modeling(modules=TEXT_MODULES, val_fraction=0.1):
    """Next-character prediction on the sources of `modules` -> (train, val): 1-D int64 token
    streams, the first 1 - val_fraction of each module's text in train and the rest in val,
    concatenated in module order. Draw batches with next_token_batch."""
    parts = [encode(module_source(name)) for name in modules]
    cuts = [round(len(t) * (1 - val_fraction)) for t in parts]
    return torch.cat([t[:c] for t, c in zip(parts, cuts)]), torch.cat([t[c:] for t, c in zip(parts, cuts)])


def next_token_batch(tokens, block_size, batch_size, generator=None):
    """batch_size windows drawn uniformly from the 1-D stream `tokens` with `generator` -> (x, y),
    each (batch_size, block_size) int64, y[:, t] the token after x[:, t]."""
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(block_size + 1)]
    return windows[:, :-1], windows[:, 1:]


def source_classification(seq_len, modules=CLASSIFICATION_MODULES, train_per_class=256, test_per_class=64,
                          test_fraction=0.2, min_len=None):
    """Which module does a window of source code come from? Class k = modules[k], chance 1 / K.
    Returns (x_train, y_train, x_test, y_test): x (N, seq_len) int64 tokens, y (N,) int64 classes,
    train_per_class (test_per_class) windows per class, grouped by class (shuffle before batching).
    Train windows are evenly spaced over the first 1 - test_fraction of each module's text, test
    windows over the rest: no character is in both.
    min_len: None for full windows; else each window keeps its first L tokens, L uniform in
    min_len..seq_len (fixed seed), and is right-padded with PAD: lengths = (x != PAD).sum(1),
    padding_mask = x == PAD."""
    xs, ys = ([], []), ([], [])
    for k, name in enumerate(modules):
        tokens = encode(module_source(name))
        cut = round(len(tokens) * (1 - test_fraction))
        for i, (part, count) in enumerate(((tokens[:cut], train_per_class), (tokens[cut:], test_per_class))):
            if len(part) < seq_len:
                raise ValueError(f"{name}: {len(part)} tokens in a split, fewer than seq_len={seq_len}")
            starts = torch.linspace(0, len(part) - seq_len, count).round().long()
            xs[i].append(part[starts[:, None] + torch.arange(seq_len)])
            ys[i].append(torch.full((count,), k, dtype=torch.long))
    x_train, x_test = torch.cat(xs[0]), torch.cat(xs[1])
    if min_len is not None:
        generator = torch.Generator().manual_seed(0)
        for x in (x_train, x_test):
            lengths = torch.randint(min_len, seq_len + 1, (len(x), 1), generator=generator)
            x.masked_fill_(torch.arange(seq_len) >= lengths, PAD)
    return x_train, torch.cat(ys[0]), x_test, torch.cat(ys[1])


# ---- series ----


def mackey_glass(length=2000, tau=17, beta=0.2, gamma=0.1, n=10, x0=1.2, dt=0.1, transient=500):
    """The Mackey-Glass series (Mackey & Glass, Science 197, 1977), chaotic for tau=17:

        dx/dt = beta * x(t - tau) / (1 + x(t - tau)^n) - gamma * x(t),   x(t) = x0 for t <= 0,

    integrated by RK4 with step dt (tau a multiple of dt; the delayed term at half steps is the mean
    of its neighbours) -> (length,) float64: x at t = transient + 1, ..., transient + length, one
    sample per time unit, the first `transient` time units dropped."""
    delay, per_unit = round(tau / dt), round(1 / dt)
    f = lambda x, xd: beta * xd / (1 + xd ** n) - gamma * x  # noqa: E731
    xs = [x0] * (delay + 1)  # xs[-1] is x(t), xs[-1 - delay] is x(t - tau)
    samples = []
    for step in range(1, (transient + length) * per_unit + 1):
        x, a, b = xs[-1], xs[-1 - delay], xs[-delay]
        mid = (a + b) / 2
        k1 = f(x, a)
        k2 = f(x + dt / 2 * k1, mid)
        k3 = f(x + dt / 2 * k2, mid)
        k4 = f(x + dt * k3, b)
        xs.append(x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
        if step % per_unit == 0 and step > transient * per_unit:
            samples.append(xs[-1])
    return torch.tensor(samples, dtype=torch.float64)


def forecasting(window, horizon=1, length=2000, test_fraction=0.2, dtype=torch.float32):
    """Forecast the next `horizon` Mackey-Glass values from the last `window` -> (x_train, y_train,
    x_test, y_test): x (N, window, 1), y (N, horizon, 1) `dtype`, every window of the first
    1 - test_fraction of mackey_glass(length) in train and of the rest in test (chronological, no
    value in both), normalised by the train part's mean and standard deviation."""
    series = mackey_glass(length)
    cut = round(length * (1 - test_fraction))
    series = ((series - series[:cut].mean()) / series[:cut].std()).to(dtype)
    out = []
    for part in (series[:cut], series[cut:]):
        w = part.unfold(0, window + horizon, 1).unsqueeze(-1)  # (N, window + horizon, 1)
        out += [w[:, :window], w[:, window:]]
    return tuple(out)

"""`fastdl train`: every model trains for one short epoch on its built-in data, evaluates, and saves
a checkpoint that loads with weights_only=True into a fresh model; samples where the model makes
them; bad arguments exit 2 with a message naming the argument."""
import argparse

import pytest
import torch

from fastdl import models, train
from fastdl.__main__ import main


def args(tmp_path, **kw):
    base = dict(epochs=1, batch_size=256, lr=1e-3, device="cpu", amp=False, seed=0, out=str(tmp_path), data=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn", "transformer", "attention", "lstm", "gan", "diffusion"])
def test_trains_evaluates_and_saves(name, tmp_path, monkeypatch):
    small = {"diffusion": dict(timesteps=5, base_width=8), "gan": dict(gen_widths=(32, 16, 8), disc_widths=(8, 16))}
    if name in small:  # quicker: narrower, and a DDPM chain of 5 steps to sample
        make = getattr(models, name)
        monkeypatch.setattr(train.models, name, lambda **kw: make(**{**kw, **small[name]}))
    lines = []
    path = train.train(name, args(tmp_path), print=lines.append)
    state = torch.load(path, weights_only=True)
    assert state["model"] == name and state["config"]
    if name == "gan":
        gen, disc = models.gan(**state["config"])
        gen.load_state_dict(state["state_dict"]["generator"])
        disc.load_state_dict(state["state_dict"]["discriminator"])
        assert (tmp_path / "gan-samples.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert any(": held-out" in line for line in lines), lines
    if name == "diffusion":
        assert (tmp_path / "diffusion-samples.png").stat().st_size > 0


@pytest.mark.usefixtures("one_thread")
def test_gpt_samples_text(tmp_path, monkeypatch):
    text = train.data.language_modeling()
    monkeypatch.setattr(train.data, "language_modeling", lambda: tuple(t[:20000] for t in text))
    lines = []
    train.train("gpt", args(tmp_path, batch_size=64), print=lines.append)
    assert any(line.startswith("gpt: val loss") for line in lines)
    assert lines[-2] == "gpt: sample:" and lines[-1].startswith("def ")


@pytest.mark.usefixtures("one_thread")
def test_amp_trains_in_bfloat16(tmp_path, monkeypatch):
    """--amp: the training steps run under torch.autocast(bfloat16) (bf16 logits), and it learns."""
    seen, make = set(), models.mlp

    def mlp(**kw):
        model = make(**kw)
        model.fc2.register_forward_hook(lambda m, i, out: seen.add(out.dtype) if m.training else None)
        return model
    monkeypatch.setattr(train.models, "mlp", mlp)
    lines = []
    train.train("mlp", args(tmp_path, amp=True, epochs=3, batch_size=64), print=lines.append)
    assert seen == {torch.bfloat16}
    accuracy = float(next(line for line in lines if "held-out accuracy" in line).split()[3])
    assert accuracy > 0.5, lines


def test_png_grid_is_a_valid_png(tmp_path):
    import zlib
    path = train.write_png_grid(tmp_path / "g.png", torch.rand(5, 1, 4, 3))
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
    assert (width, height) == (3 * 3, 2 * 4)
    idat = raw.index(b"IDAT")
    body = zlib.decompress(raw[idat + 4:idat + 4 + int.from_bytes(raw[idat - 4:idat], "big")])
    assert len(body) == height * (1 + width)


@pytest.mark.parametrize("argv, message", [
    (["train", "mlp", "--epochs", "0"], "--epochs: expected a positive integer, got 0"),
    (["train", "mlp", "--batch-size", "-3"], "--batch-size: expected a positive integer, got -3"),
    (["train", "mlp", "--lr", "0"], "--lr: expected a positive number, got 0.0"),
    (["train", "mlp", "--nproc", "0"], "--nproc: expected a positive integer, got 0"),
    (["train", "mlp", "--nproc", "2", "--batch-size", "1"], "--batch-size: the global batch (1) must have a sample"),
    (["train", "gpt", "--fsdp"], "--fsdp: shards across processes; give --nproc N"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "alexnet"])
    assert e.value.code == 2 and "invalid choice: 'alexnet'" in capsys.readouterr().err


def write_idx(folder, n_train=200, n_test=40, gz=False):
    """A folder in MNIST's IDX format: images whose mean brightness is their label / 10."""
    import gzip
    import struct

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        pixels = (labels.view(n, 1, 1).float() * 25 + torch.rand(n, 28, 28, generator=g) * 20).to(torch.uint8)
        for stem, raw in ((f"{split}-images-idx3-ubyte", struct.pack(">IIII", 0x803, n, 28, 28) + pixels.numpy().tobytes()),
                          (f"{split}-labels-idx1-ubyte", struct.pack(">II", 0x801, n) + labels.numpy().tobytes())):
            (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_reads_idx_files(tmp_path, gz):
    from fastdl import data

    x, y, x_test, y_test = data.mnist(write_idx(tmp_path, gz=gz))
    assert x.shape == (200, 1, 28, 28) and x_test.shape == (40, 1, 28, 28) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x.mean((1, 2, 3)), (y * 25 + 9.5) / 255, atol=0.01)  # the pixels' mean tracks the label
    x32 = data.mnist(tmp_path, size=32, channels=3)[0]
    assert x32.shape == (200, 3, 32, 32)


def test_mnist_reads_torchvisions_layout(tmp_path):
    """--data may be the root given to torchvision.datasets.MNIST: its files are in ROOT/MNIST/raw."""
    from fastdl import data

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    expected = data.mnist(write_idx(raw))
    for got, want in zip(data.mnist(tmp_path), expected):
        assert torch.equal(got, want)


def test_mnist_errors_name_the_file(tmp_path):
    from fastdl import data

    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.mnist(tmp_path)
    write_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes((tmp_path / "train-images-idx3-ubyte").read_bytes())
    with pytest.raises(ValueError, match="not an IDX labels file"):
        data.mnist(tmp_path)


@pytest.mark.usefixtures("one_thread")
def test_trains_on_mnist_files(tmp_path):
    lines = []
    train.train("cnn", args(tmp_path, data=str(write_idx(tmp_path)), epochs=3, batch_size=32), print=lines.append)
    state = torch.load(tmp_path / "cnn.pt", weights_only=True)
    assert state["config"]["image_size"] == 28
    accuracy = float(next(line for line in lines if "held-out accuracy" in line).split()[3])
    assert accuracy > 0.5, lines


def test_data_only_for_image_models(tmp_path, capsys):
    assert main(["train", "gpt", "--data", str(tmp_path)]) == 2
    assert "--data: only the image models read MNIST" in capsys.readouterr().err


def test_nproc_2_trains_like_one_process(tmp_path):
    """`--nproc 2`: torchrun, two gloo processes, each with half of every batch of 256, DDP and
    synchronized batch norm; process 0 alone prints and saves. The checkpoint equals one process's
    up to float32 rounding in different reduction orders (parameters within 4e-7 of each other after
    moving 6e-3 in six AdamW steps; the float64 equality of the same machinery is
    tests/test_distributed.py's)."""
    import os
    import subprocess
    import sys

    common = ["-m", "fastdl", "train", "cnn", "--epochs", "1", "--batch-size", "256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "two"), "--nproc", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("held-out accuracy") == 1 and "trained on 2 processes" in two.stdout
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    a, b = (torch.load(tmp_path / run / "cnn.pt", weights_only=True)["state_dict"] for run in ("one", "two"))
    torch.manual_seed(0)  # the initialization `fastdl train --seed 0` starts from
    start = models.cnn(num_classes=10, batch_norm=True, image_size=8).state_dict()
    assert (a["fc1.weight"] - start["fc1.weight"]).abs().max() > 1e-3  # training moved the parameters
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5, msg=key)

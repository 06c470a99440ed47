"""`fastdl train MODEL`: trains a model of fastdl.models on data that needs no download
(fastdl.data), with a progress bar; evaluates it; saves a checkpoint; samples from gpt, gan and
diffusion.

    model             data                                              evaluation
    mlp, cnn          scikit-learn's digits, 8x8 (MNIST's 28x28 with    held-out accuracy
                      --data: every image model reads MNIST then)
    resnet*,          digits at 32x32, 3 channels                       held-out accuracy (running
      mobilenet*                                                        statistics recomputed first)
    rnn, transformer, which of 3 standard-library modules a window of   held-out accuracy
      attention       32 characters comes from
    lstm              the Mackey-Glass series, 5 steps ahead from 16    held-out MSE, and that of
                                                                        repeating the last value
    gpt               next character of standard-library sources        val loss and perplexity;
                                                                        generated text on stdout
    gan               digits at 28x28 in [-1, 1]                        a PNG grid of samples
    diffusion         digits at 16x16 in [-1, 1]                        held-out loss; a PNG grid

The checkpoint, OUT/MODEL.pt, holds {"model", "config", "state_dict"} (the GAN's two state_dicts
under "generator" / "discriminator") and loads with torch.load(path, weights_only=True).

Launched by torchrun (`fastdl train MODEL --nproc N` does it), each of the N processes trains on its
slice of every batch (--batch-size is the global batch) under DistributedDataParallel, or FSDP with
--fsdp, with synchronized batch norm (fastdl.distributed); every process evaluates, process 0 alone
prints and writes files.
"""
import dataclasses
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn import functional as F

from fastdl import data, distributed, models

IMAGE_CLASSIFIERS = ("mlp", "cnn", "resnet18", "resnet34", "resnet50", "mobilenet_v1", "mobilenet_v2")
SEQUENCE_CLASSIFIERS = ("rnn", "transformer", "attention")
MODELS = IMAGE_CLASSIFIERS + SEQUENCE_CLASSIFIERS + ("lstm", "gpt", "gan", "diffusion")
IMAGE_MODELS = IMAGE_CLASSIFIERS + ("gan", "diffusion")
LEARNING_RATES = {"gan": 2e-4}  # AdamW's (Adam's with betas (0.5, 0.999) for the GAN); 1e-3 otherwise
# Each default measured on this project's 2-core CPU: lstm 6 s to MSE 0.0013 (naive 0.21); gpt 80 s to val loss
# 1.46 and Python-like text (5 epochs: 2.26, gibberish); gan 3 min and diffusion (epsilon loss 0.08) about as
# long to digit-like samples (5 epochs: blobs).
EPOCHS = {"lstm": 30, "gpt": 40, "rnn": 5, "transformer": 5, "attention": 5, "gan": 30, "diffusion": 15}  # else 3


@dataclass
class Job:
    """What training one model runs: modules (one, or the GAN's two), the batches of one epoch
    (from a generator), one optimisation step on a batch (-> loss), and evaluation / sampling
    after training (-> lines to print)."""
    modules: tuple
    epoch: Callable
    step: Callable
    evaluate: Callable
    sample: Optional[Callable] = None


def _parallel(args, model, method="forward"):
    """What a training step calls for model.<method>: in a process group of several, through DDP
    or FSDP."""
    if distributed.world_size() == 1:
        return model if method == "forward" else getattr(model, method)
    return distributed.parallelize(model, method, fsdp=getattr(args, "fsdp", False))


def _shuffled(tensors, batch_size):
    def epoch(g):
        order = torch.randperm(len(tensors[0]), generator=g)
        return [[t[i] for t in tensors] for i in order.split(batch_size)]
    return epoch


def _accuracy(model, x, y, x_train=None):
    if x_train is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        torch.optim.swa_utils.update_bn([x_train[i:i + 256] for i in range(0, min(len(x_train), 1024), 256)], model)
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def _classifier(name, args, inputs):
    x, y, x_test, y_test = inputs
    classes = int(y.max()) + 1
    side = x.shape[-1]
    kwargs = dict(in_features=side * side) if name == "mlp" else dict(batch_norm=True, image_size=side) \
        if name == "cnn" else {}
    if name in SEQUENCE_CLASSIFIERS:
        model = getattr(models, name)(data.VOCAB_SIZE, num_classes=classes,
                                      **({} if name == "rnn" else dict(max_len=x.shape[1], dropout=0.0)))
    else:
        model = getattr(models, name)(num_classes=classes, **kwargs)
    model = model.to(args.device)
    x, y, x_test, y_test = (t.to(args.device) for t in (x, y, x_test, y_test))
    bn_data = x if name not in ("mlp", *SEQUENCE_CLASSIFIERS) else None
    run = _parallel(args, model)
    return Job((model,), _shuffled((x, y), args.batch_size), lambda b: F.cross_entropy(run(b[0]), b[1]),
               lambda: [f"held-out accuracy {_accuracy(model, x_test, y_test, bn_data):.3f} (chance {1 / classes:.3f})"])


def _lstm(args):
    x, y, x_test, y_test = (t.to(args.device) for t in data.forecasting(16, horizon=5))
    model = models.lstm(features=1, hidden=64, horizon=5).to(args.device)

    def evaluate():
        model.eval()
        with torch.no_grad():
            mse = F.mse_loss(model(x_test), y_test).item()
        naive = F.mse_loss(x_test[:, -1:].expand_as(y_test), y_test).item()
        return [f"held-out MSE {mse:.4f} (repeating the last value: {naive:.4f})"]
    run = _parallel(args, model)
    return Job((model,), _shuffled((x, y), args.batch_size), lambda b: F.mse_loss(run(b[0]), b[1]), evaluate)


def _gpt(args):
    train, val = data.language_modeling()
    block = 64
    model = models.gpt(vocab_size=data.VOCAB_SIZE, block_size=block, n_layer=2, n_head=4, n_embd=64).to(args.device)
    steps = max(1, len(train) // (block * args.batch_size))
    epoch = lambda g: [data.next_token_batch(train, block, args.batch_size, g) for _ in range(steps)]  # noqa: E731

    def evaluate():
        model.eval()
        x, y = data.next_token_batch(val, block, 64, torch.Generator().manual_seed(0))
        with torch.no_grad():
            loss = model(x.to(args.device), y.to(args.device))[1].item()
        return [f"val loss {loss:.3f} nats per character, perplexity {math.exp(loss):.2f} "
                f"(uniform over {data.VOCAB_SIZE} symbols: {math.log(data.VOCAB_SIZE):.3f})"]

    def sample(out, g):
        prompt = data.encode("def ").unsqueeze(0).to(args.device)
        with torch.no_grad():
            tokens = model.generate(prompt, 300, temperature=0.8, top_k=20, generator=g)
        return ["gpt: sample:", data.decode(tokens[0].cpu())]
    run = _parallel(args, model)
    return Job((model,), epoch, lambda b: run(b[0].to(args.device), b[1].to(args.device))[1], evaluate, sample)


def _gan(args):
    x = images(args, 28)[0].to(args.device) * 2 - 1
    gen, disc = (m.to(args.device) for m in models.gan())
    run_gen, run_disc = _parallel(args, gen), _parallel(args, disc)
    run_gen.config = gen.config  # train_step reads the latent size from it
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))
    step = lambda b: sum(models.train_step(run_gen, run_disc, b[0], opt_g, opt_d))  # noqa: E731

    def sample(out, g):
        gen.eval()
        with torch.no_grad():
            images = gen(torch.randn(16, gen.config.latent, generator=g).to(args.device))
        return [f"gan: samples {write_png_grid(out / 'gan-samples.png', (images + 1) / 2)}"]
    return Job((gen, disc), _shuffled((x,), args.batch_size), step, lambda: [], sample)


def _diffusion(args):
    x, _, x_test, _ = (t * 2 - 1 for t in images(args, 16))
    model = models.diffusion(image_size=16, base_width=32, timesteps=200).to(args.device)
    x, x_test = x.to(args.device), x_test.to(args.device)

    def evaluate():
        model.eval()
        with torch.no_grad():
            loss = model.loss(x_test, torch.Generator(args.device).manual_seed(0)).item()
        return [f"held-out epsilon loss {loss:.3f} (1.0 for a model that predicts no noise)"]

    def sample(out, g):
        with torch.no_grad():
            images = model.sample(16, generator=torch.Generator(args.device).manual_seed(args.seed))
        return [f"diffusion: samples {write_png_grid(out / 'diffusion-samples.png', (images + 1) / 2)}"]
    run = _parallel(args, model, "loss")
    return Job((model,), _shuffled((x,), args.batch_size), lambda b: run(b[0]), evaluate, sample)


def images(args, size, channels=1):
    """(x_train, y_train, x_test, y_test): MNIST from args.data's IDX files when given, else digits."""
    return data.mnist(args.data, size, channels) if args.data else data.digits(size, channels)


def build(name, args):
    """The Job training model `name` (one of MODELS) as args (device, batch_size, lr, data) say."""
    if name in IMAGE_CLASSIFIERS:
        size, channels = ((28 if args.data else 8), 1) if name in ("mlp", "cnn") else (32, 3)
        return _classifier(name, args, images(args, size, channels))
    if name in SEQUENCE_CLASSIFIERS:
        return _classifier(name, args, data.source_classification(32))
    return {"lstm": _lstm, "gpt": _gpt, "gan": _gan, "diffusion": _diffusion}[name](args)


def write_png_grid(path, images):
    """images (N, C, H, W) in [0, 1] (C = 1 or 3) as one 8-bit PNG, ceil(sqrt(N)) per row -> path
    (written by process 0 alone under torch.distributed)."""
    if distributed.rank() != 0:
        return str(path)
    N, C, H, W = images.shape
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    grid = torch.zeros(C, rows * H, cols * W)
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        grid[:, i // cols * H:(i // cols + 1) * H, i % cols * W:(i % cols + 1) * W] = img
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # (rows*H, cols*W, C)
    raw = b"".join(b"\x00" + bytes(row.flatten().tolist()) for row in pixels)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", cols * W, rows * H, 8, 0 if C == 1 else 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))
    return str(path)


def _full_state_dict(module):
    """module's state_dict with FSDP's sharded tensors gathered (every process must call it)."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}


def checkpoint(name, modules):
    """The checkpoint's contents: tensors, numbers and strings only (loads with weights_only=True)."""
    config = dataclasses.asdict(modules[0].config)
    if name == "gan":
        state = {"generator": _full_state_dict(modules[0]), "discriminator": _full_state_dict(modules[1])}
    else:
        state = _full_state_dict(modules[0])
    return {"model": name, "config": config, "state_dict": state}


def train(name, args, print=print):
    """Trains model `name` for args.epochs on args.device (torch.autocast when args.amp), then
    evaluates, saves args.out/name.pt and samples. Returns the checkpoint's path. Under torchrun,
    joins the process group first (unless already in one) and leaves what it joined at the end."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    joined = distributed.launched() and not torch.distributed.is_initialized()
    if joined:
        distributed.setup(args.device)
    world, first = distributed.world_size(), distributed.rank() == 0
    parallel = world > 1
    say = print if first else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    job = build(name, args)
    params = [p for m in job.modules for p in m.parameters()]
    opt = None if name == "gan" else torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.amp)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.0f} samples/s"), TimeRemainingColumn())
    with Progress(*columns, transient=False, disable=not first) as bar:
        for epoch in range(args.epochs):
            batches = [b for b in job.epoch(g) if len(b[0]) >= world]  # every process gets a sample
            task = bar.add_task(f"{name} epoch {epoch + 1}/{args.epochs}", total=len(batches), loss=math.nan, rate=0)
            for batch in batches:
                total, batch = len(batch[0]), distributed.shard(batch) if parallel else batch
                for m in job.modules:
                    m.train()
                with amp:
                    loss = job.step(batch)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    (loss * distributed.loss_scale(len(batch[0]), total) if parallel else loss).backward()
                    opt.step()
                elapsed = bar.tasks[task].elapsed or 1e-9
                bar.update(task, advance=1, loss=loss.item(), rate=(bar.tasks[task].completed + 1) * total / elapsed)
    with distributed.local_batch_norm(*job.modules):  # every process evaluates on the whole data (FSDP needs all)
        for line in job.evaluate():
            say(f"{name}: {line}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.pt"
    state = checkpoint(name, job.modules)
    if first:
        torch.save(state, path)
    say(f"{name}: checkpoint {path}" + (f" (trained on {world} processes)" if parallel else ""))
    if job.sample is not None:
        for m in job.modules:
            m.eval()
        for line in job.sample(out, torch.Generator().manual_seed(args.seed)):
            say(line)
    if joined:
        torch.distributed.destroy_process_group()
    return path

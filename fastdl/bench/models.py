"""Models: every model of fastdl.models against its torch.nn reference (fastdl.reference.models).

fastdl is the fastdl model; eager the reference model (torch.nn / torchvision modules only) holding
the same weights (built from one seed, its state_dict loaded into fastdl's, strict); compile
torch.compile of the reference model (of each of the GAN's two). "train" is one training step:
forward, loss, backward and an SGD step (momentum 0.9); "infer" an eval-mode forward under no_grad.
torch.compile does not trace nn.RNN / nn.LSTM (Dynamo captures no graph of rnn's or lstm's reference),
so their compile column is eager again. The steps:

    mlp, cnn, rnn, transformer, attention,  cross-entropy of the logits (cnn with batch_norm=True)
      resnet*, mobilenet*
    lstm                                     MSE of the next `horizon` values of the series
    gpt                                      the model's own next-token cross-entropy
    gan                                      train: one train_step (a discriminator step, then a
                                             generator step); infer: the generator on a batch of z
    diffusion                                train: the DDPM epsilon loss (t, noise drawn, MSE of the
                                             UNet's noise prediction); infer: one UNet call

Sizes (N the batch, T / L the sequence length; image models in channels_last), by default on CPU
in float32 and on CUDA in bfloat16 autocast (fp32 weights, torch.autocast around forward and loss;
around the whole train_step for gan); another dtype than float32 runs in its autocast. quick: the
training steps of mlp N64, cnn N16 and gpt at a quarter of its CPU size (QUICK).

    model        CPU                                          CUDA
    mlp          N256 28x28 -> 512 -> 10 (MNIST)              N4096, hidden 1024
    cnn          N64 1x28x28, convs 32, 64 (MNIST)            N512
    rnn          N32 T128, vocab 10k, embed 64, hidden 128 x2 N128 T256, embed 256, hidden 512 x2
    lstm         N32 T128, 8 features, hidden 128 x2          N128 T256, hidden 512 x2
    transformer  N16 T128, d 128, 4 heads, ff 512, 2 layers   N64 T512, d 512, 8 heads, ff 2048, 6 layers
    attention    N32 T128, d 128, 4 heads                     N64 T512, d 512, 8 heads
    gpt          N8 L256, vocab 65, 4 layers, n_embd 128      N8 L1024, vocab 50304, 12 layers, 768 (GPT-2 small)
    gan          N32 1x28x28 (DCGAN, MNIST)                   N512
    diffusion    N8 1x32x32, base width 32, mults 1, 2, 2     N128 3x32x32, base width 128, mults 1, 2, 2, 2
    resnet*,     N8 3x96x96, 100 classes                      N64 3x224x224, 1000 classes
      mobilenet*
"""
import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as tF

import fastdl.models
import fastdl.reference.models
from fastdl.bench import harness
from fastdl.bench.harness import DTYPE_NAMES, dtype_name


@dataclass
class Workload:
    """One model at one size: `make(lib)` builds it from fastdl.models or fastdl.reference.models
    (a module, or a tuple of modules); `inputs()` draws a batch on the CPU; `loss(model, inputs)`,
    `infer(model, inputs)` run it; `train(models, opts, inputs, lib)`, when given, is the whole
    training step in place of loss, backward and optimizer step."""
    label: str
    make: Callable
    inputs: Callable
    loss: Callable = None
    infer: Callable = None
    train: Callable = None
    images: bool = False  # channels_last weights and inputs


def classify(model, inputs):
    x, y = inputs
    return tF.cross_entropy(model(x).float(), y)


def first(model, inputs):
    return model(inputs[0])


def tokens(N, T, vocab, classes=2):
    return lambda: (torch.randint(vocab, (N, T)), torch.randint(classes, (N,)))


def images(N, C, S, classes):
    return lambda: (torch.randn(N, C, S, S), torch.randint(classes, (N,)))


def mlp(N, hidden=128):
    return Workload(f"N{N}-784-h{hidden}", lambda lib: lib.mlp(hidden=hidden), images(N, 1, 28, 10), classify, first)


def cnn(N):
    return Workload(f"N{N}-1x28x28-bn", lambda lib: lib.cnn(batch_norm=True), images(N, 1, 28, 10), classify, first,
                    images=True)


def rnn(N, T, embed_dim, hidden, vocab=10000):
    return Workload(f"N{N}-T{T}-E{embed_dim}-H{hidden}",
                    lambda lib: lib.rnn(vocab, embed_dim=embed_dim, hidden=hidden, num_layers=2),
                    tokens(N, T, vocab), classify, first)


def lstm(N, T, hidden, features=8, horizon=4):
    def loss(model, inputs):
        x, y = inputs
        return tF.mse_loss(model(x).float(), y)
    return Workload(f"N{N}-T{T}-F{features}-H{hidden}",
                    lambda lib: lib.lstm(features=features, hidden=hidden, num_layers=2, horizon=horizon),
                    lambda: (torch.randn(N, T, features), torch.randn(N, horizon, features)), loss, first)


def transformer(N, T, d_model, nhead, num_layers, vocab=10000):
    return Workload(f"N{N}-T{T}-E{d_model}x{num_layers}-H{nhead}",
                    lambda lib: lib.transformer(vocab, max_len=T, d_model=d_model, nhead=nhead, num_layers=num_layers,
                                                dim_feedforward=4 * d_model),
                    tokens(N, T, vocab), classify, first)


def attention(N, T, d_model, nhead, vocab=10000):
    return Workload(f"N{N}-T{T}-E{d_model}-H{nhead}",
                    lambda lib: lib.attention(vocab, max_len=T, d_model=d_model, nhead=nhead),
                    tokens(N, T, vocab), classify, first)


def gpt(N, L, vocab, n_layer, n_head, n_embd):
    return Workload(f"N{N}-L{L}-V{vocab}-{n_layer}x{n_embd}",
                    lambda lib: lib.gpt(vocab_size=vocab, block_size=L, n_layer=n_layer, n_head=n_head, n_embd=n_embd),
                    lambda: (torch.randint(vocab, (N, L)), torch.randint(vocab, (N, L))),
                    loss=lambda model, inputs: model(*inputs)[1], infer=lambda model, inputs: model(inputs[0])[0])


def gan(N):
    def train(models, opts, inputs, lib):
        lib.train_step(*models, inputs[0], *opts)  # fastdl.models.gan's or fastdl.reference.models.gan's
    return Workload(f"N{N}-1x28x28", lambda lib: lib.gan(), lambda: (torch.randn(N, 1, 28, 28).tanh(),
                                                                      torch.randn(N, 100)),
                    infer=lambda models, inputs: models[0](inputs[1]), train=train, images=True)


def diffusion(N, C, S, base_width, channel_mults):
    def loss(model, inputs):  # DDPM.loss, with the UNet called through model (compiled or not)
        x0 = inputs[0]
        t = torch.randint(0, model.config.timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        return tF.mse_loss(model(model.q_sample(x0, t, noise), t).float(), noise)
    return Workload(f"N{N}-{C}x{S}x{S}-W{base_width}-{'x'.join(map(str, channel_mults))}",
                    lambda lib: lib.diffusion(image_size=S, channels=C, base_width=base_width,
                                              channel_mults=channel_mults),
                    lambda: (torch.randn(N, C, S, S), torch.randint(0, 1000, (N,))),
                    loss=loss, infer=lambda model, inputs: model(*inputs), images=True)


def vision(name):
    def workload(N, S, classes):
        return Workload(f"N{N}-3x{S}x{S}", lambda lib: getattr(lib, name)(num_classes=classes),
                        images(N, 3, S, classes), classify, first, images=True)
    return workload


MODELS = dict(mlp=mlp, cnn=cnn, rnn=rnn, lstm=lstm, transformer=transformer, attention=attention, gpt=gpt, gan=gan,
              diffusion=diffusion, **{m: vision(m) for m in ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")})

VISION_CPU, VISION_CUDA = dict(N=8, S=96, classes=100), dict(N=64, S=224, classes=1000)
SIZES = dict(  # model: (CPU size, CUDA size), the keyword arguments of its function above
    mlp=(dict(N=256, hidden=512), dict(N=4096, hidden=1024)),
    cnn=(dict(N=64), dict(N=512)),
    rnn=(dict(N=32, T=128, embed_dim=64, hidden=128), dict(N=128, T=256, embed_dim=256, hidden=512)),
    lstm=(dict(N=32, T=128, hidden=128), dict(N=128, T=256, hidden=512)),
    transformer=(dict(N=16, T=128, d_model=128, nhead=4, num_layers=2),
                 dict(N=64, T=512, d_model=512, nhead=8, num_layers=6)),
    attention=(dict(N=32, T=128, d_model=128, nhead=4), dict(N=64, T=512, d_model=512, nhead=8)),
    gpt=(dict(N=8, L=256, vocab=65, n_layer=4, n_head=4, n_embd=128),
         dict(N=8, L=1024, vocab=50304, n_layer=12, n_head=12, n_embd=768)),
    gan=(dict(N=32), dict(N=512)),
    diffusion=(dict(N=8, C=1, S=32, base_width=32, channel_mults=(1, 2, 2)),
               dict(N=128, C=3, S=32, base_width=128, channel_mults=(1, 2, 2, 2))),
    **{m: (VISION_CPU, VISION_CUDA) for m in ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")},
)
QUICK = [("mlp", dict(N=64), "train"), ("cnn", dict(N=16), "train"),
         ("gpt", dict(N=4, L=128, vocab=65, n_layer=2, n_head=4, n_embd=128), "train")]
IMPLS = harness.IMPLS


def case(model, size, dtype, mode):
    """`dtype`: float32, or the dtype of the autocast the model runs in ("bf16-amp" in its name)."""
    label = "float32" if dtype == torch.float32 else f"{DTYPE_NAMES[dtype]}-amp"
    work = MODELS[model](**size)
    return dict(op="models", name=f"{model}-{work.label}-{label}-{mode}", model=model, size=size, dtype=label,
                amp=None if dtype == torch.float32 else dtype_name(dtype), mode=mode, **{"pass": mode})


def cases(device, quick, dtypes=None):
    """The cases measured on `device` in `dtypes` (default: float32 on CPU, bfloat16 autocast on
    CUDA); `quick`: the training steps of QUICK."""
    dtypes = dtypes or [torch.float32 if device == "cpu" else torch.bfloat16]
    if quick:
        return [case(model, size, d, mode) for d in dtypes for model, size, mode in QUICK]
    return [case(model, SIZES[model][device != "cpu"], d, mode) for d in dtypes for model in MODELS
            for mode in ("train", "infer")]


def as_tuple(models):
    return models if isinstance(models, tuple) else (models,)


def to(inputs, device, channels_last):
    return tuple(x.to(device, memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x.to(device)
                 for x in inputs)


def make_step(case, impl, device):
    """The step of one impl: models built from seed 0 (fastdl's loading the reference's state_dict),
    inputs from seed 1."""
    work = MODELS[case["model"]](**case["size"])
    torch.manual_seed(0)
    models = as_tuple(work.make(fastdl.reference.models))
    lib = fastdl.reference.models
    if impl == "fastdl":
        lib = fastdl.models
        fast = as_tuple(work.make(lib))
        for f, r in zip(fast, models):
            f.load_state_dict(r.state_dict(), strict=True)
        models = fast
    layout = torch.channels_last if work.images else torch.preserve_format
    models = tuple(m.to(device, memory_format=layout) for m in models)
    calls = tuple(torch.compile(m) for m in models) if impl == "compile" else models
    call = calls if len(calls) > 1 else calls[0]
    torch.manual_seed(1)
    inputs = to(work.inputs(), device, work.images)
    amp = torch.autocast(device.type, dtype=getattr(torch, case["amp"])) if case["amp"] else contextlib.nullcontext()

    if case["mode"] == "infer":
        for m in models:
            m.eval()

        def step():
            with torch.no_grad(), amp:
                return work.infer(call, inputs)
        return step
    opts = tuple(torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in models)
    if work.train is not None:
        def step():
            with amp:
                work.train(calls, opts, inputs, lib)
        return step
    opt = opts[0]

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = work.loss(call, inputs)
        loss.backward()
        opt.step()
    return step


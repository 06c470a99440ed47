"""`fastdl check`'s model rows: each model of fastdl.models against its torch.nn reference
(fastdl.reference.models) in float64, one training-mode forward and backward at a small size."""
import importlib.util

import torch

from fastdl import models
from fastdl.reference import models as reference
from fastdl.testing import check_close

VOCAB = 23


def _tokens(g, N=3, T=6):
    return torch.randint(1, VOCAB, (N, T), generator=g)


# name: (positional and keyword arguments of both constructors, the input, how to call the model)
MODELS = {
    "mlp": ((), dict(in_features=64), lambda g: torch.randn(4, 64, generator=g), None),
    "cnn": ((), dict(batch_norm=True, image_size=8), lambda g: torch.randn(4, 1, 8, 8, generator=g), None),
    "rnn": ((VOCAB,), dict(embed_dim=6, hidden=9, num_layers=2, num_classes=3), _tokens, None),
    "lstm": ((), dict(features=3, hidden=11, num_layers=2, horizon=4), lambda g: torch.randn(3, 5, 3, generator=g),
             None),
    "transformer": ((VOCAB,), dict(max_len=8, d_model=12, nhead=3, num_layers=2, dim_feedforward=20, dropout=0.0,
                                   num_classes=3), _tokens, None),
    "attention": ((VOCAB,), dict(max_len=8, d_model=12, nhead=2, dropout=0.0, num_classes=3), _tokens, None),
    "gpt": ((), dict(vocab_size=VOCAB, block_size=8, n_layer=2, n_head=2, n_embd=12), _tokens,
            lambda m, x: m(x)[0]),
    "gan": ((), dict(latent=8, gen_widths=(16, 8, 4), disc_widths=(4, 8)), lambda g: torch.randn(3, 8, generator=g),
            lambda pair, z: pair[1](pair[0](z))),
    "diffusion": ((), dict(image_size=8, base_width=8, timesteps=10, num_heads=2),
                  lambda g: torch.randn(2, 1, 8, 8, generator=g), lambda m, x: m.unet(x, torch.tensor([0, 9]))),
    "mobilenet_v1": ((), dict(num_classes=10, width_mult=0.25), lambda g: torch.randn(2, 3, 32, 32, generator=g),
                     None),
}
TORCHVISION = {  # references that are torchvision's models: checked when torchvision is installed
    "resnet18": ((), dict(num_classes=10), lambda g: torch.randn(4, 3, 64, 64, generator=g), None),
    "mobilenet_v2": ((), dict(num_classes=10, width_mult=0.5), lambda g: torch.randn(4, 3, 64, 64, generator=g),
                     None),
}


def _parameters(m):
    return [p for part in (m if isinstance(m, tuple) else (m,)) for p in part.parameters()]


def _double(m, device):
    """m (a model, or the GAN's pair) in float64 on device."""
    return tuple(part.double().to(device) for part in m) if isinstance(m, tuple) else m.double().to(device)


def check_models(device):
    """Rows (op, case, backend, output, ok, message): the output and every parameter's gradient of
    each model against its reference's, float64, training mode (batch statistics, the same dropout
    masks), on device. The
    gradient row reports the worst parameter. Each tensor is compared after dividing both sides by
    max(1, max |reference|): deep networks' gradients span orders of magnitude."""
    table = dict(MODELS, **(TORCHVISION if importlib.util.find_spec("torchvision") else {}))
    for name, (args, kwargs, make_input, call) in table.items():
        call = call or (lambda m, x: m(x))
        torch.manual_seed(0)
        ref = _double(getattr(reference, name)(*args, **kwargs), device)
        ours = _double(getattr(models, name)(*args, **kwargs), device)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), ref if isinstance(ref, tuple) else (ref,)):
            a.load_state_dict(b.state_dict())
        x = make_input(torch.Generator().manual_seed(1))
        x = (x.double() if x.is_floating_point() else x).to(device)
        results = []
        for m in (ref, ours):
            torch.manual_seed(3)  # the same dropout masks on both sides
            out = call(m, x)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
            results.append([out] + list(torch.autograd.grad((out * dout).sum(), _parameters(m))))
        scaled = [(a / max(1.0, e.abs().max().item()), e / max(1.0, e.abs().max().item()))
                  for a, e in zip(results[1], results[0])]
        n = x.numel()
        yield ("models", name, "fastdl modules", "output", *check_close(*scaled[0], torch.float64, n=n))
        grads = [check_close(a, e, torch.float64, n=n) for a, e in scaled[1:]]
        bad = [msg for ok, msg in grads if not ok]
        yield ("models", name, "fastdl modules", f"grad of {len(grads)} parameters", not bad,
               bad[0] if bad else max((msg for _, msg in grads), key=lambda m: float(m.split()[-1])))

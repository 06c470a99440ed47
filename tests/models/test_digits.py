"""Short training runs on real data that needs no download, fastdl.data.digits (scikit-learn's 8x8
handwritten digits: the first 1500 to train on, the last 297 held out), for the models of
fastdl.models. Each test shows two things:

- lockstep: fastdl's model and its twin in fastdl.reference.models (torch.nn only; torchvision's
  resnet18 and mobilenet_v2) start from one state_dict and take the same steps in float64 (same
  seeds, batches and optimizer): their losses agree at every step within fastdl.testing.assert_close's
  float64 tolerance;
- learning: the fastdl model gets better on held-out data by a measure that an untrained model fails.

mlp, cnn and diffusion run their whole training in lockstep. resnet18, the mobilenets and the GAN are
too slow in float64 for that: they run a few lockstep steps in float64, then learn in a separate
float32 run of the fastdl model alone, from the same initial weights.

Everything runs on one thread: these small batches are overhead-bound, and on a shared, busy machine
two OpenMP threads made the same steps up to 100 times slower. `pytest -s` prints the numbers reached.
"""
import functools

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from fastdl import data, models
from fastdl.reference import models as reference
from fastdl.testing import assert_close

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---- helpers ----

@functools.cache
def digits(size=8, channels=1, dtype=F64, signed=False):
    """fastdl.data.digits(size, channels, dtype), pixels in [0, 1], or [-1, 1] with signed=True (for
    the tanh of the GAN's generator and the diffusion model's x0). Cached: treat as read-only."""
    x, y, x_test, y_test = data.digits(size, channels, dtype)
    if signed:
        x, x_test = x * 2 - 1, x_test * 2 - 1
    return x, y, x_test, y_test


def batches(steps, size):
    """`steps` batches of training indices: epochs of one fixed shuffle of the 1500 training images,
    each epoch cut into pieces of `size` (its last piece shorter)."""
    epoch = torch.randperm(1500, generator=torch.Generator().manual_seed(1)).split(size)
    return [epoch[i % len(epoch)] for i in range(steps)]


def twins(name, dtype=F64, **kwargs):
    """(fastdl.models.<name>(**kwargs), fastdl.reference.models.<name>(**kwargs)) in dtype, the twin
    holding the model's initial state_dict (strict). torch's seed is 0 for the initialisation."""
    torch.manual_seed(0)
    model = getattr(models, name)(**kwargs).to(dtype)
    twin = getattr(reference, name)(**kwargs).to(dtype)
    twin.load_state_dict(model.state_dict(), strict=True)
    return model, twin


def optimizer_step(model, opt, loss_of):
    """step(i): loss = loss_of(model, i), then backward and opt.step() -> the loss, detached."""
    def step(i):
        loss = loss_of(model, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def lockstep(name, ours, twin, steps, n):
    """ours(i) and twin(i) for i = 0 .. steps - 1, torch's global seed set to i before each call (the
    same dropout masks for both); each returns a loss or a tuple of losses, which must agree within
    fastdl.testing.assert_close (n: the terms each loss sums). -> ours' losses, (steps, k) tensor."""
    history = []
    for i in range(steps):
        losses = []
        for step in (ours, twin):
            torch.manual_seed(i)
            loss = step(i)
            losses.append(torch.stack(loss) if isinstance(loss, tuple) else loss.reshape(1))
        assert_close(f"{name}: losses at step {i}", losses[0], losses[1], n=n)
        history.append(losses[0])
    return torch.stack(history)


def cross_entropy(x, y, batch_list):
    """loss_of(model, i) for optimizer_step: cross-entropy on the i-th training batch."""
    return lambda model, i: nn.functional.cross_entropy(model(x[batch_list[i]]), y[batch_list[i]])


def accuracy(model, x, y):
    """Held-out accuracy in eval mode (running statistics, no dropout)."""
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return correct


# ---- small classifiers: the whole run in lockstep ----

@pytest.mark.parametrize("name", ["mlp", "cnn-bn"])
def test_small_classifier(name):
    """mlp and cnn(batch_norm=True) on 8x8 digits, two epochs of SGD with momentum (batch 64), all
    in lockstep with the twin in float64; the loss falls at least threefold and the held-out
    accuracy exceeds 80% (chance: 10%)."""
    x, y, x_test, y_test = digits()
    kwargs = dict(in_features=64) if name == "mlp" else dict(batch_norm=True, image_size=8)
    model, twin = twins(name.split("-")[0], **kwargs)
    steps = batches(2 * 24, 64)  # two epochs
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, twin)]
    ours, ref = (optimizer_step(m, opt, cross_entropy(x, y, steps)) for m, opt in zip((model, twin), opts))
    losses = lockstep(name, ours, ref, len(steps), n=64)
    held_out = accuracy(model, x_test, y_test)
    print(f"{name}: loss {losses[0].item():.3f} -> {losses[-1].item():.3f}, held-out accuracy {held_out:.3f}")
    assert losses[-1] < losses[0] / 3
    assert held_out > 0.8, f"held-out accuracy {held_out:.3f}"


# ---- resnet18, mobilenet_v1, mobilenet_v2 on 32x32, 3-channel digits ----

# Lockstep steps: the mobilenets amplify rounding about 100-fold per step (see test_large_classifier).
LOCKSTEP_STEPS = {"resnet18": 3, "mobilenet_v1": 2, "mobilenet_v2": 2}
LOCKSTEP_BATCH, LEARN_STEPS, LEARN_BATCH = 16, 25, 32


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v1", "mobilenet_v2"])
def test_large_classifier(name):
    """num_classes=10, digits resized to 32x32 and repeated to 3 channels.

    Lockstep: batches of 16 in float64, SGD (lr 0.01, momentum 0.9), against the twin (torchvision's
    model for resnet18 and mobilenet_v2), dropout masks matched by seeding before each model's step;
    3 steps for resnet18, 2 for the mobilenets. The mobilenets at 32x32 amplify rounding: each
    training step multiplies a difference in the weights by 50 to 150 in the next loss (likely through
    their last, 1x1 feature maps, whose batch norms see 16 values per channel). Two torch.nn copies,
    one nudged by 1e-15 relative, drift apart as fast as fastdl and its twin do: relative loss
    differences ~1e-12 to 1e-11 at the second step, 1e-10 to 1e-9 at the third (past float64's
    1e-10), 1e-8 at the fourth. resnet18 stays at ~1e-14. SGD rather than Adam for this part: Adam's
    first step, lr * g / (|g| + eps), multiplies the absolute rounding of gradient elements near eps
    (1e-8) by up to lr / (4 eps); after one Adam step mobilenet_v1's weights differ by up to 2e-9.
    Learning: the fastdl model alone in float32 from the same initial weights, Adam (lr 3e-3), 25
    steps of batch 32 (800 images), then held-out accuracy above 40% (chance: 10%). Before that the
    batch norms' running statistics are recomputed from 512 training images (no labels;
    torch.optim.swa_utils.update_bn, "precise BN"): after so few steps the momentum-0.1 running
    averages still hold much of their initial (0, 1) and lag the moving weights, and eval mode on them
    is near chance for the mobilenets (the figure is printed too). An untrained model recalibrated
    the same way is at chance."""
    x, y, x_test, y_test = digits(32, 3)
    model, twin = twins(name, num_classes=10)
    steps = batches(LOCKSTEP_STEPS[name], LOCKSTEP_BATCH)
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    ours, ref = (optimizer_step(m, sgd(m.parameters()), cross_entropy(x, y, steps)) for m in (model, twin))
    lockstep(name, ours, ref, len(steps), n=LOCKSTEP_BATCH)

    x, y, x_test, y_test = digits(32, 3, torch.float32)
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10)  # the same initial weights, in float32
    steps = batches(LEARN_STEPS, LEARN_BATCH)
    step = optimizer_step(model, torch.optim.Adam(model.parameters(), lr=3e-3), cross_entropy(x, y, steps))
    losses = [step(i).item() for i in range(LEARN_STEPS)]
    raw = accuracy(model, x_test, y_test)
    update_bn([x[:512]], model)
    held_out = accuracy(model, x_test, y_test)
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, held-out accuracy {held_out:.3f} "
          f"({raw:.3f} on the running statistics of training)")
    assert held_out > 0.4, f"held-out accuracy {held_out:.3f}"


# ---- DDPM ----

DIFFUSION = dict(image_size=8, channels=1, base_width=8, channel_mults=(1, 2), num_heads=2)  # T = 1000, batch norms


def test_diffusion():
    """fastdl.models.diffusion on 8x8 digits in [-1, 1] (base width 8, T = 1000, linear schedule,
    batch norms), 30 steps of Adam (lr 2e-3, batch 64) in lockstep with the twin in float64: each
    step's loss draws t and the noise from torch.Generator().manual_seed(step) on both sides.
    Learning: the epsilon-prediction loss on the 297 held-out images, with one fixed draw of t and
    noise, in eval mode, falls below half its untrained value (about 1: an untrained UNet predicts
    roughly zero, and the noise has unit variance)."""
    x, _, x_test, _ = digits(signed=True)
    model, twin = twins("diffusion", **DIFFUSION)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            loss = model.loss(x_test, generator=torch.Generator().manual_seed(123)).item()
        model.train()
        return loss

    before = held_out_loss()
    steps = batches(30, 64)

    def loss_of(m, i):
        return m.loss(x[steps[i]], generator=torch.Generator().manual_seed(i))

    ours, ref = (optimizer_step(m, torch.optim.Adam(m.parameters(), lr=2e-3), loss_of) for m in (model, twin))
    losses = lockstep("diffusion", ours, ref, len(steps), n=64 * 64)
    after = held_out_loss()
    print(f"diffusion: training loss {losses[0].item():.3f} -> {losses[-1].item():.3f}, "
          f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before / 2, (before, after)


# ---- DCGAN ----

GAN = dict(image_size=8, latent=64, gen_widths=(128, 64, 32), disc_widths=(32, 64))  # dropout 0.3


def gan_twins(dtype):
    """(generator, discriminator) of fastdl.models.gan(**GAN) and of its reference, in dtype, the
    reference holding fastdl's initial state_dicts; seed 0."""
    torch.manual_seed(0)
    ours = [m.to(dtype) for m in models.gan(**GAN)]
    ref = [m.to(dtype) for m in reference.gan(**GAN)]
    for a, b in zip(ours, ref):
        b.load_state_dict(a.state_dict(), strict=True)
    return ours, ref


def gan_step(train_step, gen, disc, x, batch_list, lr_g=2e-3, lr_d=1e-3):
    """step(i): one train_step (D, then G) on the i-th batch, noise from Generator().manual_seed(i)."""
    opt_g = torch.optim.Adam(gen.parameters(), lr=lr_g, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr_d, betas=(0.5, 0.999))
    return lambda i: train_step(gen, disc, x[batch_list[i]], opt_g, opt_d,
                                generator=torch.Generator().manual_seed(i))


def mean_image_match(gen, real):
    """(RMS distance, Pearson correlation) over pixels between the mean of 512 generated images (fixed
    z, eval mode) and the mean of the `real` images."""
    z = torch.randn(512, gen.config.latent, generator=torch.Generator().manual_seed(123), dtype=real.dtype)
    gen.eval()
    with torch.no_grad():
        fake = gen(z).mean(0).flatten()
    gen.train()
    real = real.mean(0).flatten()
    return (fake - real).pow(2).mean().sqrt().item(), torch.corrcoef(torch.stack([fake, real]))[0, 1].item()


GAN_LOCKSTEP_STEPS, GAN_STEPS = 10, 160


def test_gan():
    """fastdl.models.gan (image_size 8, narrower than the default: latent 64, generator widths
    (128, 64, 32), discriminator (32, 64), dropout 0.3) on 8x8 digits in [-1, 1], Adam (beta1 0.5;
    lr 2e-3 for G, 1e-3 for D), batches of 64, the noise of step i from Generator().manual_seed(i).

    Lockstep: 10 train_steps in float64, fastdl.models.gan.train_step against
    fastdl.reference.models.gan.train_step: both losses (D's, then G's) agree at every step.
    Learning: 160 steps of the fastdl pair alone in float32, then the mean of 512 generated images
    against the mean of the 297 held-out digits, pixel by pixel. Their correlation must exceed 0.6
    (the generator puts ink where digits have it and background where they have none) and their RMS
    distance fall below 0.75 of the untrained generator's. An untrained generator fails both by
    construction (distance ratio 1; its mean image, near 0 everywhere, correlates at about 0 (-0.14
    here) with the digits', whose border is -1). These are first-moment criteria, what a run this short shows
    reliably: they do not test diversity, and a short GAN run often collapses towards a few digit-like
    images (which keeps the distance near half the untrained one) and oscillates from step to step."""
    (gen, disc), (twin_gen, twin_disc) = gan_twins(F64)
    x, _, x_test, _ = digits(signed=True)
    steps = batches(GAN_LOCKSTEP_STEPS, 64)
    ours = gan_step(models.train_step, gen, disc, x, steps)
    ref = gan_step(reference.train_step, twin_gen, twin_disc, x, steps)
    lockstep("gan", ours, ref, len(steps), n=64)

    (gen, disc), _ = gan_twins(torch.float32)
    x, _, x_test, _ = digits(dtype=torch.float32, signed=True)
    distance_before, correlation_before = mean_image_match(gen, x_test)
    steps = batches(GAN_STEPS, 64)
    step = gan_step(models.train_step, gen, disc, x, steps)
    for i in range(GAN_STEPS):
        torch.manual_seed(i)  # dropout
        loss_d, loss_g = step(i)
    distance, correlation = mean_image_match(gen, x_test)
    print(f"gan: last losses D {loss_d.item():.3f} G {loss_g.item():.3f}; generated vs held-out mean image: "
          f"distance {distance_before:.3f} -> {distance:.3f} (ratio {distance / distance_before:.2f}), "
          f"correlation {correlation_before:.2f} -> {correlation:.2f}")
    assert correlation > 0.6, (correlation_before, correlation)
    assert distance < 0.75 * distance_before, (distance_before, distance)

"""fastdl.models.gan (DCGAN) against twins built from torch.nn alone (nn.BatchNorm2d + nn.ReLU where the
generator fuses them) holding the same state_dict: outputs, the input's and every parameter's gradient
and the running statistics in float64, train and eval; and three train_steps under one seed."""
import pytest
import torch
from torch import nn

from fastdl import models
from fastdl.models.gan import Discriminator, GANConfig, Generator, train_step
from fastdl.testing import assert_close
from twin import check_inference, check_round_trip, check_step, twins

SMALL = dict(latent=10, gen_widths=(12, 8, 6), disc_widths=(5, 7))  # 28 x 28, narrow
N = 4


class TwinUpBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 5, stride, padding=2, output_padding=stride - 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class TwinGenerator(nn.Module):
    def __init__(self, latent=100, image_size=28, channels=1, gen_widths=(256, 128, 64), **_):
        super().__init__()
        w0, w1, w2 = gen_widths
        self.side = image_size // 4
        self.fc = nn.Linear(latent, w0 * self.side ** 2, bias=False)
        self.bn0 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.block1 = TwinUpBlock(w0, w1, 1)
        self.block2 = TwinUpBlock(w1, w2, 2)
        self.out = nn.ConvTranspose2d(w2, channels, 5, 2, padding=2, output_padding=1)

    def forward(self, z):
        x = self.relu(self.bn0(self.fc(z).view(z.shape[0], -1, self.side, self.side)))
        return torch.tanh(self.out(self.block2(self.block1(x))))


class TwinDownBlock(nn.Module):
    def __init__(self, cin, cout, dropout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 5, 2, 2)
        self.act = nn.LeakyReLU(0.2)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.act(self.conv(x)))


class TwinDiscriminator(nn.Module):
    def __init__(self, image_size=28, channels=1, disc_widths=(64, 128), dropout=0.3, **_):
        super().__init__()
        w1, w2 = disc_widths
        self.block1 = TwinDownBlock(channels, w1, dropout)
        self.block2 = TwinDownBlock(w1, w2, dropout)
        self.fc = nn.Linear(w2 * (image_size // 4) ** 2, 1)

    def forward(self, x):
        return self.fc(self.block2(self.block1(x)).flatten(1))


class TwinTrainStep:
    """train_step written out again with the twins, as a reader would from the docstring."""

    def __call__(self, gen, disc, real, opt_g, opt_d, latent):
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = gen(torch.randn(real.shape[0], latent, dtype=real.dtype))
        r, f = disc(real), disc(fake.detach())
        loss_d = bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))
        opt_d.zero_grad(), loss_d.backward(), opt_d.step()
        f = disc(fake)
        loss_g = bce(f, torch.ones_like(f))
        opt_g.zero_grad(), loss_g.backward(), opt_g.step()
        return loss_d.detach(), loss_g.detach()


def make_generator(**kw):
    return Generator(GANConfig(**kw))


def make_discriminator(**kw):
    return Discriminator(GANConfig(**kw))


def test_shapes_at_default_widths():
    gen, disc = models.gan()
    z = torch.randn(2, 100)
    assert gen(z).shape == (2, 1, 28, 28) and disc(gen(z)).shape == (2, 1)
    assert set(gen.state_dict()) == set(TwinGenerator().state_dict())
    assert set(disc.state_dict()) == set(TwinDiscriminator().state_dict())
    with pytest.raises(ValueError, match="multiple of 4"):
        models.gan(image_size=30)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generator_matches_twin(mode):
    ours, ref = twins(make_generator, TwinGenerator, **SMALL)
    z = torch.randn(N, SMALL["latent"], dtype=torch.float64)
    check_step(ours, ref, z, train=mode == "train", n=N * 14 * 14)
    check_inference(ours, ref, z, n=N * 14 * 14)
    check_round_trip(ours, TwinGenerator, **SMALL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_discriminator_matches_twin(mode):
    ours, ref = twins(make_discriminator, TwinDiscriminator, dropout=0.0, **SMALL)
    x = torch.randn(N, 1, 28, 28, dtype=torch.float64)
    check_step(ours, ref, x, train=mode == "train", n=N * 14 * 14)
    check_inference(ours, ref, x, n=N * 14 * 14)


def test_discriminator_dropout_matches_twin():
    """Dropout 0.3 in train mode: nn.Dropout on both sides, the same masks under one seed."""
    ours, ref = twins(make_discriminator, TwinDiscriminator, dropout=0.3, **SMALL)
    check_step(ours, ref, torch.randn(N, 1, 28, 28, dtype=torch.float64), train=True, n=N * 14 * 14)


def test_train_steps_match_twin():
    """Three train_steps (Adam, dropout 0.3, batch statistics) against the twins' written-out step
    under the same seeds: equal losses at every step, equal parameters and buffers at the end."""
    torch.manual_seed(0)
    gen, disc = models.gan(**SMALL)
    gen, disc = gen.double(), disc.double()
    twin_gen, twin_disc = TwinGenerator(**SMALL).double(), TwinDiscriminator(**SMALL).double()
    twin_gen.load_state_dict(gen.state_dict(), strict=True)
    twin_disc.load_state_dict(disc.state_dict(), strict=True)
    real = torch.rand(N, 1, 28, 28, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    losses = {}
    for key, (g, d) in (("ours", (gen, disc)), ("twin", (twin_gen, twin_disc))):
        opt_g = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999))
        losses[key] = []
        for step in range(3):
            torch.manual_seed(100 + step)
            if key == "ours":
                losses[key].append(train_step(g, d, real, opt_g, opt_d))
            else:
                losses[key].append(TwinTrainStep()(g, d, real, opt_g, opt_d, SMALL["latent"]))
    for step, ((ld, lg), (want_d, want_g)) in enumerate(zip(losses["ours"], losses["twin"])):
        assert_close(f"loss_d at step {step}", ld, want_d, n=N)
        assert_close(f"loss_g at step {step}", lg, want_g, n=N)
    for ours, ref in ((gen, twin_gen), (disc, twin_disc)):
        ref_state = ref.state_dict()
        for name, t in ours.state_dict().items():
            if t.is_floating_point():
                assert_close(f"{name} after 3 steps", t, ref_state[name], n=N * 14 * 14)
            else:
                assert torch.equal(t, ref_state[name]), name


def test_train_step_generator_argument():
    """The noise comes from the given generator: two runs from equal states and seeds agree exactly."""
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        gen, disc = models.gan(**SMALL, dropout=0.0)
        opt_g, opt_d = torch.optim.SGD(gen.parameters(), lr=0.01), torch.optim.SGD(disc.parameters(), lr=0.01)
        real = torch.zeros(N, 1, 28, 28)
        results.append(train_step(gen, disc, real, opt_g, opt_d, generator=torch.Generator().manual_seed(9)))
    assert results[0] == results[1] and all(torch.isfinite(t) for t in results[0])

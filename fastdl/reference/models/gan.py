"""Reference DCGAN: fastdl.models.gan written with torch.nn modules only (nn.BatchNorm2d + nn.ReLU
where the generator fuses them), the ground truth for the model of the same name, and its train_step.

Generator: Linear -> (N, w0, S/4, S/4) -> BN, ReLU -> two ConvTranspose 5x5 + BN + ReLU blocks (stride
1, then 2) -> ConvTranspose 5x5 stride 2 -> tanh. Discriminator: two Conv 5x5 stride 2 + LeakyReLU +
Dropout blocks -> Linear(1). Module names are fastdl's: one state_dict loads into each (strict).
"""
import torch
from torch import nn

from fastdl.models.gan import GANConfig


class UpBlock(nn.Module):
    """ConvTranspose2d 5x5 (no bias) -> nn.BatchNorm2d -> ReLU; stride 2 doubles the side."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 5, stride, padding=2, output_padding=stride - 1,
                                       bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        w0, w1, w2 = config.gen_widths
        self.side = config.image_size // 4
        self.fc = nn.Linear(config.latent, w0 * self.side ** 2, bias=False)
        self.bn0 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU()
        self.block1 = UpBlock(w0, w1, 1)
        self.block2 = UpBlock(w1, w2, 2)
        self.out = nn.ConvTranspose2d(w2, config.channels, 5, 2, padding=2, output_padding=1)

    def forward(self, z):
        """z (N, latent) -> images (N, channels, image_size, image_size) in [-1, 1]."""
        x = self.relu(self.bn0(self.fc(z).view(z.shape[0], -1, self.side, self.side)))
        return torch.tanh(self.out(self.block2(self.block1(x))))


class DownBlock(nn.Module):
    """Conv2d 5x5 stride 2 -> LeakyReLU -> Dropout: halves the side."""

    def __init__(self, in_channels, out_channels, config: GANConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 5, 2, 2)
        self.act = nn.LeakyReLU(config.negative_slope)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.act(self.conv(x)))


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        w1, w2 = config.disc_widths
        self.block1 = DownBlock(config.channels, w1, config)
        self.block2 = DownBlock(w1, w2, config)
        self.fc = nn.Linear(w2 * (config.image_size // 4) ** 2, 1)

    def forward(self, x):
        """images (N, channels, image_size, image_size) -> logits (N, 1)."""
        return self.fc(self.block2(self.block1(x)).flatten(1))


def train_step(gen, disc, real, opt_g, opt_d, generator=None):
    """fastdl.models.gan.train_step written out again from its docstring: a discriminator step on
    BCE(D(real), 1) + BCE(D(fake), 0), then a generator step on BCE(D(G(z)), 1) through the updated
    discriminator, z ~ N(0, I) (N, latent) drawn from `generator` -> (loss_d, loss_g), detached."""
    bce = nn.functional.binary_cross_entropy_with_logits
    fake = gen(torch.randn(real.shape[0], gen.config.latent, generator=generator, dtype=real.dtype,
                           device=real.device))
    r, f = disc(real), disc(fake.detach())
    loss_d = bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    f = disc(fake)
    loss_g = bce(f, torch.ones_like(f))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d.detach(), loss_g.detach()


def gan(**kwargs):
    """(reference Generator, reference Discriminator) of one GANConfig; keyword arguments are its fields."""
    config = GANConfig(**kwargs)
    return Generator(config), Discriminator(config)

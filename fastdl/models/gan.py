"""DCGAN for 28 x 28 images (MNIST), after TensorFlow's DCGAN tutorial.

Generator: z (N, latent) -> Linear(no bias) -> (N, 256, 7, 7) -> BN + ReLU -> ConvTranspose 5x5 (stride 1)
-> BN + ReLU -> ConvTranspose 5x5 (stride 2) -> BN + ReLU -> ConvTranspose 5x5 (stride 2) -> tanh.
Each BN + ReLU is one FusedBatchNorm2d(activation="relu") (nn.BatchNorm2d's state_dict).
Discriminator: Conv 5x5 (stride 2) -> LeakyReLU(0.2) -> Dropout -> Conv 5x5 (stride 2) -> LeakyReLU(0.2)
-> Dropout -> Flatten -> Linear(1): one logit per image.
train_step: one step of each with the non-saturating loss (BCE with logits).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as tF
from torch import nn

from fastdl.nn import FusedBatchNorm2d


@dataclass
class GANConfig:
    latent: int = 100
    image_size: int = 28  # square, a multiple of 4
    channels: int = 1
    gen_widths: tuple = (256, 128, 64)  # the generator's 7x7, 7x7 and 14x14 feature maps
    disc_widths: tuple = (64, 128)  # the discriminator's 14x14 and 7x7 feature maps
    dropout: float = 0.3
    negative_slope: float = 0.2


def side_of(config: GANConfig):
    """The side of the smallest feature map: image_size / 4."""
    if config.image_size < 4 or config.image_size % 4:
        raise ValueError(f"image_size: expected a positive multiple of 4, got {config.image_size}")
    return config.image_size // 4


class UpBlock(nn.Module):
    """ConvTranspose2d 5x5 (no bias) -> FusedBatchNorm2d(activation="relu"); stride 2 doubles the side."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 5, stride, padding=2, output_padding=stride - 1,
                                       bias=False)
        self.bn = FusedBatchNorm2d(out_channels, activation="relu")

    def forward(self, x):
        return self.bn(self.conv(x))


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        w0, w1, w2 = config.gen_widths
        self.side = side_of(config)
        self.fc = nn.Linear(config.latent, w0 * self.side * self.side, bias=False)
        self.bn0 = FusedBatchNorm2d(w0, activation="relu")
        self.block1 = UpBlock(w0, w1, stride=1)
        self.block2 = UpBlock(w1, w2, stride=2)
        self.out = nn.ConvTranspose2d(w2, config.channels, 5, 2, padding=2, output_padding=1)

    def forward(self, z):
        """z (N, latent) -> images (N, channels, image_size, image_size) in [-1, 1]."""
        x = self.fc(z).view(z.shape[0], -1, self.side, self.side)
        x = self.block2(self.block1(self.bn0(x)))
        return torch.tanh(self.out(x))


class DownBlock(nn.Module):
    """Conv2d 5x5 stride 2 -> LeakyReLU -> Dropout: halves the side."""

    def __init__(self, in_channels, out_channels, config: GANConfig):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 5, 2, padding=2)
        self.act = nn.LeakyReLU(config.negative_slope)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.act(self.conv(x)))


class Discriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        w1, w2 = config.disc_widths
        side = side_of(config)
        self.block1 = DownBlock(config.channels, w1, config)
        self.block2 = DownBlock(w1, w2, config)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w2 * side * side, 1)

    def forward(self, x):
        """images (N, channels, image_size, image_size) -> logits (N, 1): real > 0 > fake."""
        return self.fc(self.flatten(self.block2(self.block1(x))))


def train_step(gen, disc, real, opt_g, opt_d, generator=None):
    """One discriminator step, then one generator step, on a batch of real images; the noise is
    drawn from `generator` (torch's default when None). The discriminator minimises
    BCE(D(real), 1) + BCE(D(fake), 0); the generator the non-saturating BCE(D(G(z)), 1), i.e. it
    maximises log D(G(z)), through the just-updated discriminator. -> (loss_d, loss_g), detached."""
    z = torch.randn(real.shape[0], gen.config.latent, generator=generator, dtype=real.dtype, device=real.device)
    fake = gen(z)
    real_logits, fake_logits = disc(real), disc(fake.detach())
    loss_d = (tF.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
              + tF.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    fake_logits = disc(fake)
    loss_g = tF.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return loss_d.detach(), loss_g.detach()


def gan(**kwargs):
    """(Generator, Discriminator) of one GANConfig; keyword arguments are its fields."""
    config = GANConfig(**kwargs)
    return Generator(config), Discriminator(config)

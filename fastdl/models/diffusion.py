"""DDPM (Ho et al., 2020): a small UNet that predicts the noise, a noise schedule, the training loss
and ancestral sampling.

UNet: sinusoidal time embedding -> MLP (Linear, SiLU, Linear); in_conv; per resolution level one
ResBlock (its output kept as a skip) and, except at the last level, a stride-2 conv; at the lowest
resolution ResBlock -> self-attention -> ResBlock; then back up, each level's ResBlock taking the
concatenation of the path and its skip, nearest upsample + conv between levels; norm + act -> out_conv.

ResBlock: x -> norm1 + act -> conv1 -> + time_proj(silu(emb)) -> norm2 + act -> conv2 -> + skip(x),
skip a 1x1 conv when the channels change. Activation: ReLU after every norm, because norm="batch"
runs each norm and its activation as one FusedBatchNorm2d(activation="relu") kernel and the fused
activations are ReLU-like (no SiLU); norm="group" uses GroupNorm followed by the same ReLU so both
norms build the same network. The time MLP keeps DDPM's SiLU (it has no norm to fuse with).
Attention: norm (no activation) -> FusedAttention over the H*W positions (batch_first,
need_weights=False) -> + x.

The schedule's tensors (betas, alphas_cumprod, posterior coefficients, ...) are non-persistent
buffers: they follow .to() / .double() but are recomputed from the config, not saved. sample() clips
the predicted x0 to [-1, 1] at every step (as DDPM's reference code does), so images land in
[-1, 1]. There is no dropout.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as tF

from fastdl.nn import FusedAttention, FusedBatchNorm2d


@dataclass
class DiffusionConfig:
    image_size: int = 28  # square images; divisible by 2 ** (len(channel_mults) - 1)
    channels: int = 1
    base_width: int = 32
    channel_mults: tuple = (1, 2)  # level i has base_width * channel_mults[i] channels
    timesteps: int = 1000  # T
    schedule: str = "linear"  # "linear" (beta 1e-4 .. 0.02) or "cosine" (Nichol & Dhariwal, 2021)
    norm: str = "batch"  # "batch" (FusedBatchNorm2d) or "group" (nn.GroupNorm)
    num_heads: int = 4  # of the attention at the lowest resolution
    max_groups: int = 8  # GroupNorm groups: gcd(channels, max_groups)


def linear_betas(timesteps):
    return torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t + 1) / abar(t), abar(t) = f(t) / f(0), f(t) = cos((t / T + s) / (1 + s) * pi / 2)^2."""
    t = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def norm_layer(kind, channels, max_groups, activation=None):
    """norm (+ ReLU with activation="relu") as one module with nn.BatchNorm2d's / nn.GroupNorm's state_dict."""
    if kind == "batch":
        return FusedBatchNorm2d(channels, activation=activation)
    if kind == "group":
        groups = math.gcd(channels, max_groups)
        return GroupNormReLU(groups, channels) if activation == "relu" else nn.GroupNorm(groups, channels)
    raise ValueError(f"norm: expected 'batch' or 'group', got {kind!r}")


class GroupNormReLU(nn.GroupNorm):
    """relu(group_norm(x)), nn.GroupNorm's parameters."""

    def forward(self, x):
        return tF.relu(super().forward(x))


def timestep_embedding(t, dim, dtype):
    """Sinusoidal embedding of integer timesteps t (N,) -> (N, dim): [sin(t w), cos(t w)], w = 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeMLP(nn.Module):
    def __init__(self, width, emb_dim):
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(width, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t, dtype):
        return self.fc2(tF.silu(self.fc1(timestep_embedding(t, self.width, dtype))))


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim, config):
        super().__init__()
        self.norm1 = norm_layer(config.norm, in_channels, config.max_groups, "relu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = norm_layer(config.norm, out_channels, config.max_groups, "relu")
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        h = self.conv1(self.norm1(x)) + self.time_proj(tF.silu(emb))[:, :, None, None]
        h = self.conv2(self.norm2(h))
        return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(nn.Module):
    """x + attention(norm(x)) over the H * W positions."""

    def __init__(self, channels, config):
        super().__init__()
        self.norm = norm_layer(config.norm, channels, config.max_groups)
        self.attn = FusedAttention(channels, config.num_heads, batch_first=True)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (N, H * W, C)
        h = self.attn(h, h, h, need_weights=False)[0]
        return x + h.transpose(1, 2).reshape(N, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(tF.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """forward(x, t): x (N, channels, S, S), t (N,) integer timesteps -> predicted noise, x's shape."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c = config
        widths = [c.base_width * m for m in c.channel_mults]
        emb_dim = 4 * c.base_width
        self.time_mlp = TimeMLP(c.base_width, emb_dim)
        self.in_conv = nn.Conv2d(c.channels, c.base_width, 3, padding=1)
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        prev = c.base_width
        for i, w in enumerate(widths):
            self.down_blocks.append(ResBlock(prev, w, emb_dim, c))
            if i < len(widths) - 1:
                self.downsamples.append(Downsample(w))
            prev = w
        self.mid_block1 = ResBlock(prev, prev, emb_dim, c)
        self.mid_attn = AttentionBlock(prev, c)
        self.mid_block2 = ResBlock(prev, prev, emb_dim, c)
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(prev + w, w, emb_dim, c))  # path + skip
            if i > 0:
                self.upsamples.append(Upsample(w))
            prev = w
        self.out_norm = norm_layer(c.norm, prev, c.max_groups, "relu")
        self.out_conv = nn.Conv2d(prev, c.channels, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(t, x.dtype)
        h = self.in_conv(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, emb)), emb)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        return self.out_conv(self.out_norm(h))


class DDPM(nn.Module):
    """The UNet (`unet`) and the schedule; loss(x0) to train, sample(n) to generate."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        c = config
        if c.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected 'linear' or 'cosine', got {c.schedule!r}")
        if c.image_size % 2 ** (len(c.channel_mults) - 1):
            raise ValueError(f"image_size: expected a multiple of {2 ** (len(c.channel_mults) - 1)}, got {c.image_size}")
        if c.base_width % 2 or (c.base_width * c.channel_mults[-1]) % c.num_heads:
            raise ValueError("base_width: expected even, and the lowest level's width divisible by num_heads")
        self.config = config
        self.unet = UNet(config)
        betas = SCHEDULES[c.schedule](c.timesteps)  # float64 here, stored in the default dtype
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            # q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, posterior_variance)
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(torch.get_default_dtype()), persistent=False)

    def forward(self, x, t):
        return self.unet(x, t)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (N,) integer timesteps."""
        return (self.sqrt_alphas_cumprod[t][:, None, None, None] * x0
                + self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise)

    def loss(self, x0, generator=None):
        """MSE between the noise and the UNet's prediction of it, t uniform in [0, T) (t, then noise
        drawn from generator, or torch's default one)."""
        t = torch.randint(0, self.config.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return tF.mse_loss(self.unet(self.q_sample(x0, t, noise), t), noise)

    @torch.no_grad()
    def sample(self, n, generator=None):
        """n images (n, channels, S, S) by ancestral sampling from x_T ~ N(0, I), the UNet in eval mode
        (its mode is restored afterwards)."""
        c = self.config
        was_training = self.training
        self.eval()
        ref = self.betas
        x = torch.randn((n, c.channels, c.image_size, c.image_size), generator=generator, dtype=ref.dtype,
                        device=ref.device)
        for step in reversed(range(c.timesteps)):
            t = torch.full((n,), step, dtype=torch.long, device=ref.device)
            eps = self.unet(x, t)
            x0 = (self.sqrt_recip_alphas_cumprod[step] * x - self.sqrt_recipm1_alphas_cumprod[step] * eps).clamp(-1, 1)
            x = self.posterior_mean_coef1[step] * x0 + self.posterior_mean_coef2[step] * x
            if step > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + self.posterior_variance[step].sqrt() * z
        self.train(was_training)
        return x


def diffusion(**kwargs) -> DDPM:
    """A DDPM; keyword arguments are DiffusionConfig's fields."""
    return DDPM(DiffusionConfig(**kwargs))

"""Reference DDPM: fastdl.models.diffusion written with torch.nn modules only (nn.BatchNorm2d or
nn.GroupNorm followed by nn.ReLU, nn.MultiheadAttention), the ground truth for the model of the same
name.

UNet: sinusoidal time embedding -> Linear, SiLU, Linear; in_conv; per level a ResBlock (kept as a skip)
and, but at the last level, a stride-2 conv; ResBlock -> self-attention -> ResBlock at the lowest
resolution; back up, each ResBlock taking the path and its skip, nearest upsample + conv between
levels; norm, ReLU -> out_conv. Module names are fastdl's: one state_dict loads into both (strict).
The schedule (linear or cosine) and its derived tensors are computed here in Python floats, apart from
fastdl's, as non-persistent buffers of fastdl's names in torch's default dtype.
"""
import math

import torch
from torch import nn

from fastdl.models.diffusion import DiffusionConfig


def norm_layer(config: DiffusionConfig, channels):
    """nn.BatchNorm2d, or nn.GroupNorm with gcd(channels, max_groups) groups."""
    if config.norm == "batch":
        return nn.BatchNorm2d(channels)
    if config.norm == "group":
        return nn.GroupNorm(math.gcd(channels, config.max_groups), channels)
    raise ValueError(f"norm: expected 'batch' or 'group', got {config.norm!r}")


def betas_of(config: DiffusionConfig):
    """The T betas, as Python floats: linear from 1e-4 to 0.02, or cosine (Nichol & Dhariwal, 2021:
    1 - abar(t + 1) / abar(t), abar(t) = cos((t / T + 0.008) / 1.008 * pi / 2)^2, at most 0.999)."""
    T = config.timesteps
    if config.schedule == "linear":
        return [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    if config.schedule == "cosine":
        f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
        return [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    raise ValueError(f"schedule: expected 'linear' or 'cosine', got {config.schedule!r}")


class TimeMLP(nn.Module):
    """t (N,) integer timesteps -> [sin(t w), cos(t w)], w = 10000^(-i / half) -> Linear, SiLU, Linear."""

    def __init__(self, width, emb_dim):
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(width, emb_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t, dtype):
        """-> (N, emb_dim) in dtype."""
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t.to(dtype)[:, None] * freqs
        return self.fc2(self.act(self.fc1(torch.cat([args.sin(), args.cos()], dim=1))))


class ResBlock(nn.Module):
    """conv2(relu(norm2(conv1(relu(norm1(x))) + time_proj(silu(emb))))) + skip(x)."""

    def __init__(self, in_channels, out_channels, emb_dim, config: DiffusionConfig):
        super().__init__()
        self.norm1, self.relu = norm_layer(config, in_channels), nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.silu = nn.SiLU()
        self.time_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = norm_layer(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, emb):
        """x (N, in_channels, H, W), emb (N, emb_dim) -> (N, out_channels, H, W)."""
        h = self.conv1(self.relu(self.norm1(x))) + self.time_proj(self.silu(emb))[:, :, None, None]
        h = self.conv2(self.relu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class AttentionBlock(nn.Module):
    """x + nn.MultiheadAttention(norm(x)) over the H * W positions."""

    def __init__(self, channels, config: DiffusionConfig):
        super().__init__()
        self.norm = norm_layer(config, channels)
        self.attn = nn.MultiheadAttention(channels, config.num_heads, batch_first=True)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x).reshape(N, C, H * W).permute(0, 2, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return x + h.permute(0, 2, 1).reshape(N, C, H, W)


class Resample(nn.Module):
    """A 3x3 stride-2 conv (down), or nearest 2x upsampling then a 3x3 conv (up); fastdl's
    Downsample / Upsample, a module holding `conv`."""

    def __init__(self, channels, up):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if up else nn.Identity()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


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
                self.downsamples.append(Resample(w, up=False))
            prev = w
        self.mid_block1 = ResBlock(prev, prev, emb_dim, c)
        self.mid_attn = AttentionBlock(prev, c)
        self.mid_block2 = ResBlock(prev, prev, emb_dim, c)
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            self.up_blocks.append(ResBlock(prev + w, w, emb_dim, c))
            if i > 0:
                self.upsamples.append(Resample(w, up=True))
            prev = w
        self.out_norm, self.out_relu = norm_layer(c, prev), nn.ReLU()
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
        return self.out_conv(self.out_relu(self.out_norm(h)))


class DDPM(nn.Module):
    """The UNet (`unet`) and the schedule's buffers; loss(x0) is the training loss."""

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        self.config = config
        self.unet = UNet(config)
        betas = betas_of(config)
        abar, prev = [], 1.0
        for b in betas:
            prev *= 1 - b
            abar.append(prev)
        abar_prev = [1.0] + abar[:-1]
        names = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"]
        rows = [(b, a, ap, a ** 0.5, (1 - a) ** 0.5, (1 / a) ** 0.5, (1 / a - 1) ** 0.5, b * (1 - ap) / (1 - a),
                 b * ap ** 0.5 / (1 - a), (1 - ap) * (1 - b) ** 0.5 / (1 - a))
                for b, a, ap in zip(betas, abar, abar_prev)]
        for name, column in zip(names, zip(*rows)):
            self.register_buffer(name, torch.tensor(column, dtype=torch.get_default_dtype()), persistent=False)

    def forward(self, x, t):
        return self.unet(x, t)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0, noise (N, C, H, W), t (N,) integer timesteps."""
        return (self.sqrt_alphas_cumprod[t][:, None, None, None] * x0
                + self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise)

    def loss(self, x0, generator=None):
        """The mean squared error between the noise and the UNet's prediction of it; t uniform in
        [0, T), then the noise, drawn from generator (torch's default one when None). x0 (N, C, H, W)."""
        t = torch.randint(0, self.config.timesteps, (x0.shape[0],), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return ((self.unet(self.q_sample(x0, t, noise), t) - noise) ** 2).mean()


def diffusion(**kwargs) -> DDPM:
    """The reference DDPM; keyword arguments are DiffusionConfig's fields."""
    return DDPM(DiffusionConfig(**kwargs))

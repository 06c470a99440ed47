"""The DDPM against a twin built from torch.nn alone (nn.BatchNorm2d / nn.GroupNorm + nn.ReLU,
nn.MultiheadAttention) with identical state_dict keys: UNet outputs and every gradient in float64,
train and eval, both norms; the loss under the same seed. Plus the schedules against their closed
forms, sampling, and a few optimizer steps that lower the loss."""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as tF

from fastdl import models
from twin import assert_close_scaled, check_inference, check_step, twins

SMALL = dict(image_size=8, channels=1, base_width=8, channel_mults=(1, 2), timesteps=10, num_heads=2)


# ---- the twin: torch.nn modules only, named as the model's submodules ----

def twin_norm(kind, channels, max_groups=8):
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(math.gcd(channels, max_groups), channels)


class TwinTimeMLP(nn.Module):
    def __init__(self, width, emb_dim):
        super().__init__()
        self.width = width
        self.fc1 = nn.Linear(width, emb_dim)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t, dtype):
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dtype) / half)
        args = t.to(dtype)[:, None] * freqs
        return self.fc2(self.act(self.fc1(torch.cat([args.sin(), args.cos()], dim=1))))


class TwinResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, norm):
        super().__init__()
        self.norm1, self.relu = twin_norm(norm, cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.silu = nn.SiLU()
        self.time_proj = nn.Linear(emb_dim, cout)
        self.norm2 = twin_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, emb):
        h = self.conv1(self.relu(self.norm1(x))) + self.time_proj(self.silu(emb))[:, :, None, None]
        h = self.conv2(self.relu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class TwinAttention(nn.Module):
    def __init__(self, channels, heads, norm):
        super().__init__()
        self.norm = twin_norm(norm, channels)
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.norm(x).reshape(N, C, H * W).permute(0, 2, 1)
        h = self.attn(h, h, h, need_weights=False)[0]
        return x + h.permute(0, 2, 1).reshape(N, C, H, W)


class TwinConv(nn.Module):  # Downsample / Upsample: a module holding `conv`
    def __init__(self, channels, stride, upsample):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if upsample else nn.Identity()
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(self.up(x))


class TwinUNet(nn.Module):
    def __init__(self, image_size, channels, base_width, channel_mults, num_heads, norm):
        super().__init__()
        w0, w1 = (base_width * m for m in channel_mults)  # two levels, written out
        emb = 4 * base_width
        self.time_mlp = TwinTimeMLP(base_width, emb)
        self.in_conv = nn.Conv2d(channels, base_width, 3, padding=1)
        self.down_blocks = nn.ModuleList([TwinResBlock(base_width, w0, emb, norm), TwinResBlock(w0, w1, emb, norm)])
        self.downsamples = nn.ModuleList([TwinConv(w0, 2, False)])
        self.mid_block1 = TwinResBlock(w1, w1, emb, norm)
        self.mid_attn = TwinAttention(w1, num_heads, norm)
        self.mid_block2 = TwinResBlock(w1, w1, emb, norm)
        self.up_blocks = nn.ModuleList([TwinResBlock(2 * w1, w1, emb, norm), TwinResBlock(w1 + w0, w0, emb, norm)])
        self.upsamples = nn.ModuleList([TwinConv(w1, 1, True)])
        self.out_norm, self.out_relu = twin_norm(norm, w0), nn.ReLU()
        self.out_conv = nn.Conv2d(w0, channels, 3, padding=1)

    def forward(self, x, t):
        emb = self.time_mlp(t, x.dtype)
        s0 = self.down_blocks[0](self.in_conv(x), emb)
        s1 = self.down_blocks[1](self.downsamples[0](s0), emb)
        h = self.mid_block2(self.mid_attn(self.mid_block1(s1, emb)), emb)
        h = self.upsamples[0](self.up_blocks[0](torch.cat([h, s1], 1), emb))
        h = self.up_blocks[1](torch.cat([h, s0], 1), emb)
        return self.out_conv(self.out_relu(self.out_norm(h)))


class TwinDDPM(nn.Module):
    """`unet` plus the linear schedule, computed here step by step, as float32 buffers of the model's names."""

    def __init__(self, timesteps, norm, **unet):
        super().__init__()
        self.timesteps = timesteps
        self.unet = TwinUNet(norm=norm, **unet)
        betas = [1e-4 + (0.02 - 1e-4) * i / (timesteps - 1) for i in range(timesteps)]
        abar, prev = [], 1.0
        for b in betas:
            prev *= 1 - b
            abar.append(prev)
        abar_prev = [1.0] + abar[:-1]
        rows = zip(betas, abar, abar_prev)
        names = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"]
        values = [(b, a, ap, a ** 0.5, (1 - a) ** 0.5, (1 / a) ** 0.5, (1 / a - 1) ** 0.5, b * (1 - ap) / (1 - a),
                   b * ap ** 0.5 / (1 - a), (1 - ap) * (1 - b) ** 0.5 / (1 - a)) for b, a, ap in rows]
        for name, column in zip(names, zip(*values)):
            self.register_buffer(name, torch.tensor(column, dtype=torch.float32), persistent=False)

    def forward(self, x, t):
        return self.unet(x, t)

    def loss(self, x0, generator):
        t = torch.randint(0, self.timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        x_t = self.sqrt_alphas_cumprod[t][:, None, None, None] * x0 + self.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise
        return ((self.unet(x_t, t) - noise) ** 2).mean()


def make_ours(norm):
    return models.diffusion(norm=norm, **SMALL)


def make_ref(norm):
    c = dict(SMALL)
    return TwinDDPM(c.pop("timesteps"), norm, **c)


class WithT(nn.Module):
    """model(x) = model.unet(x, fixed t), for twin.check_step."""

    def __init__(self, model, t):
        super().__init__()
        self.model, self.t = model, t

    def forward(self, x):
        return self.model(x, self.t)


# ---- tests ----

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_unet_matches_twin(norm, mode):
    ours, ref = twins(make_ours, make_ref, norm=norm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    torch.manual_seed(2)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 4, 9])
    check_step(WithT(ours, t), WithT(ref, t), x, mode == "train", n=1000)
    if mode == "eval":
        check_inference(WithT(ours, t), WithT(ref, t), x, n=1000)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_loss_matches_twin(norm):
    ours, ref = twins(make_ours, make_ref, norm=norm)
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    la = ours.loss(x0, generator=torch.Generator().manual_seed(5))
    lb = ref.loss(x0, generator=torch.Generator().manual_seed(5))
    assert_close_scaled("loss", la, lb, n=1000)
    la.backward(), lb.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close_scaled(f"{name}.grad", p.grad, ref_params[name].grad, n=1000)


def test_linear_schedule():
    m = models.diffusion(schedule="linear", **{**SMALL, "timesteps": 1000})
    betas = m.betas.double()
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.all(betas[1:] > betas[:-1])
    check_cumprod(m)


def test_cosine_schedule():
    T, s = 1000, 0.008
    m = models.diffusion(schedule="cosine", **{**SMALL, "timesteps": T})
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = m.betas < 0.999  # beta is clipped at 0.999 only at the very end
    assert unclipped[: T - 5].all() and m.betas.max().item() <= 0.999 + 1e-6
    got = m.alphas_cumprod.double()
    torch.testing.assert_close(got[unclipped], expected[unclipped], rtol=1e-5, atol=1e-7)
    check_cumprod(m)


def check_cumprod(m):
    abar, betas = m.alphas_cumprod.double(), m.betas.double()
    assert torch.all((abar > 0) & (abar < 1)) and torch.all(abar[1:] < abar[:-1])
    torch.testing.assert_close(abar, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.sqrt_alphas_cumprod ** 2 + m.sqrt_one_minus_alphas_cumprod ** 2,
                               torch.ones_like(m.betas), rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_q_sample(norm):
    m = make_ours(norm)
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([0, 9])
    xt = m.q_sample(x0, t, noise)
    for i in range(2):
        abar = m.alphas_cumprod[t[i]]
        torch.testing.assert_close(xt[i], abar.sqrt() * x0[i] + (1 - abar).sqrt() * noise[i])


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_sample(norm):
    torch.manual_seed(0)
    m = make_ours(norm).train()
    a = m.sample(3, generator=torch.Generator().manual_seed(7))
    b = m.sample(3, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert a.abs().max().item() <= 1.0
    assert m.training  # mode restored
    if norm == "batch":
        assert m.unet.in_conv is not None and int(m.unet.out_norm.num_batches_tracked) == 0  # eval: no BN updates


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_training_lowers_loss(norm):
    torch.manual_seed(0)
    m = make_ours(norm)
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)

    def loss():
        return m.loss(x0, generator=torch.Generator().manual_seed(3))  # the same t and noise every step

    before = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    after = loss().item()
    assert after < 0.8 * before, (before, after)

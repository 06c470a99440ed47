"""The DDPM against its twin fastdl.reference.models.diffusion, built from torch.nn alone
(nn.BatchNorm2d / nn.GroupNorm + nn.ReLU, nn.MultiheadAttention) with identical state_dict keys: UNet
outputs and every gradient in float64, train and eval, both norms; the loss under the same seed. Plus
the schedules against their closed forms, sampling, and a few optimizer steps that lower the loss."""
import math

import pytest
import torch
from torch import nn

from fastdl import models
from fastdl.reference import models as reference
from twin import assert_close_scaled, check_inference, check_step, twins

SMALL = dict(image_size=8, channels=1, base_width=8, channel_mults=(1, 2), timesteps=10, num_heads=2)


def make_ours(norm):
    return models.diffusion(norm=norm, **SMALL)


def make_ref(norm):
    return reference.diffusion(norm=norm, **SMALL)


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

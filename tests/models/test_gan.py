"""fastdl.models.gan (DCGAN) against its twins in fastdl.reference.models, built from torch.nn alone
(nn.BatchNorm2d + nn.ReLU where the generator fuses them) and holding the same state_dict: outputs, the
input's and every parameter's gradient and the running statistics in float64, train and eval; and three
train_steps under one seed."""
import pytest
import torch

from fastdl import models
from fastdl.models.gan import Discriminator, GANConfig, Generator, train_step
from fastdl.reference import models as reference
from fastdl.reference.models.gan import Discriminator as RefDiscriminator, Generator as RefGenerator
from fastdl.testing import assert_close
from twin import check_inference, check_round_trip, check_step, twins

SMALL = dict(latent=10, gen_widths=(12, 8, 6), disc_widths=(5, 7))  # 28 x 28, narrow
N = 4


def make_generator(**kw):
    return Generator(GANConfig(**kw))


def make_discriminator(**kw):
    return Discriminator(GANConfig(**kw))


def make_ref_generator(**kw):
    return RefGenerator(GANConfig(**kw))


def make_ref_discriminator(**kw):
    return RefDiscriminator(GANConfig(**kw))


def test_shapes_at_default_widths():
    gen, disc = models.gan()
    z = torch.randn(2, 100)
    assert gen(z).shape == (2, 1, 28, 28) and disc(gen(z)).shape == (2, 1)
    ref_gen, ref_disc = reference.gan()
    assert set(gen.state_dict()) == set(ref_gen.state_dict())
    assert set(disc.state_dict()) == set(ref_disc.state_dict())
    with pytest.raises(ValueError, match="multiple of 4"):
        models.gan(image_size=30)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generator_matches_twin(mode):
    ours, ref = twins(make_generator, make_ref_generator, **SMALL)
    z = torch.randn(N, SMALL["latent"], dtype=torch.float64)
    check_step(ours, ref, z, train=mode == "train", n=N * 14 * 14)
    check_inference(ours, ref, z, n=N * 14 * 14)
    check_round_trip(ours, make_ref_generator, **SMALL)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_discriminator_matches_twin(mode):
    ours, ref = twins(make_discriminator, make_ref_discriminator, dropout=0.0, **SMALL)
    x = torch.randn(N, 1, 28, 28, dtype=torch.float64)
    check_step(ours, ref, x, train=mode == "train", n=N * 14 * 14)
    check_inference(ours, ref, x, n=N * 14 * 14)


def test_discriminator_dropout_matches_twin():
    """Dropout 0.3 in train mode: nn.Dropout on both sides, the same masks under one seed."""
    ours, ref = twins(make_discriminator, make_ref_discriminator, dropout=0.3, **SMALL)
    check_step(ours, ref, torch.randn(N, 1, 28, 28, dtype=torch.float64), train=True, n=N * 14 * 14)


def test_train_steps_match_twin():
    """Three train_steps (Adam, dropout 0.3, batch statistics) against the twins' written-out step
    (fastdl.reference.models.train_step) under the same seeds: equal losses at every step, equal
    parameters and buffers at the end."""
    torch.manual_seed(0)
    gen, disc = models.gan(**SMALL)
    gen, disc = gen.double(), disc.double()
    twin_gen, twin_disc = (m.double() for m in reference.gan(**SMALL))
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
            step_fn = train_step if key == "ours" else reference.train_step
            losses[key].append(step_fn(g, d, real, opt_g, opt_d))
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

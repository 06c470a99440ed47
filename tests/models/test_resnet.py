"""fastdl.models.resnet18/34/50 against torchvision's (through fastdl.reference.models), one state_dict in
both, in float64."""
import pytest
import torch

from fastdl.models import resnet18, resnet34, resnet50
from fastdl.reference import models as reference
from twin import check_inference, check_round_trip, check_step, twins

pytest.importorskip("torchvision")

MODELS = {"resnet18": (resnet18, reference.resnet18),
          "resnet34": (resnet34, reference.resnet34),
          "resnet50": (resnet50, reference.resnet50)}
# Small, yet layer4's batch statistics reduce over 2 x 2 x 2 values: with only two (a 32 x 32 input)
# BN's output is +-1 whatever its input, and float64 rounding comes out amplified ~1e4 times.
N, H, W = 2, 64, 64


@pytest.mark.parametrize("name, layout", [("resnet18", "nchw"), ("resnet18", "channels_last"),
                                          ("resnet34", "nchw"), ("resnet50", "nchw")])
def test_matches_torchvision(name, layout):
    """Train mode (batch statistics; running statistics compared after the step), eval mode with
    gradients, eval mode without, and the state_dict back into torchvision's model."""
    ours, ref = twins(*MODELS[name], num_classes=10)
    x = torch.randn(N, 3, H, W, dtype=torch.float64)
    if layout == "channels_last":
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    n = N * H * W
    check_step(ours, ref, x, train=True, n=n)  # batch statistics; running stats compared afterwards
    ours.zero_grad(), ref.zero_grad()
    check_step(ours, ref, x, train=False, n=n)
    check_inference(ours, ref, x, n=n)
    check_round_trip(ours, MODELS[name][1], num_classes=10)


def test_fuses_batch_norm_with_relu_and_residual():
    m = resnet50(num_classes=10)
    assert m.bn1.activation == "relu"
    assert m.layer1[0].bn3.activation == "relu" and m.layer1[0].downsample[1].activation is None
    assert not any(isinstance(mod, torch.nn.ReLU) for mod in m.modules())


def test_zero_init_residual():
    for make in (resnet18, reference.resnet18):
        m = make(zero_init_residual=True)
        assert torch.equal(m.layer2[1].bn2.weight, torch.zeros(128))
        assert torch.equal(m.layer2[1].bn1.weight, torch.ones(128))
    assert torch.equal(resnet50(zero_init_residual=True).layer3[2].bn3.weight, torch.zeros(1024))


def test_shapes():
    m = resnet18(num_classes=7).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 40, 33)).shape == (1, 7)

"""fastdl.models.mobilenet_v2 against torchvision's and mobilenet_v1 against a twin of torch.nn
modules, both from fastdl.reference.models, one state_dict in both, in float64."""
import pytest
import torch
from torch import nn

import fastdl
from fastdl.models import mobilenet_v1, mobilenet_v2
from fastdl.reference import models as reference
from twin import check_inference, check_round_trip, check_step, twins

pytest.importorskip("torchvision")

N, H, W = 2, 64, 64  # the last feature map is 2 x 2: batch statistics over 8 values


MODELS = {"mobilenet_v2": (mobilenet_v2, reference.mobilenet_v2),
          "mobilenet_v1": (mobilenet_v1, reference.mobilenet_v1)}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_reference(name, layout):
    """Train mode (batch statistics, dropout under one seed; running statistics compared after the
    step), eval mode with gradients, eval mode without (MobileNetV1's blocks then fold their batch
    norms into the convolutions), and the state_dict back into the reference model."""
    ours, ref = twins(*MODELS[name], num_classes=10, width_mult=0.5)
    x = torch.randn(N, 3, H, W, dtype=torch.float64)
    if layout == "channels_last":
        ours, ref = ours.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    n = N * H * W
    check_step(ours, ref, x, train=True, n=n)
    ours.zero_grad(), ref.zero_grad()
    check_step(ours, ref, x, train=False, n=n)
    check_inference(ours, ref, x, n=n)
    check_round_trip(ours, MODELS[name][1], num_classes=10, width_mult=0.5)


@pytest.mark.parametrize("width_mult", [0.35, 1.0, 1.4])
def test_mobilenet_v2_state_dict_matches_torchvision(width_mult):
    ours, ref = mobilenet_v2(width_mult=width_mult), reference.mobilenet_v2(width_mult=width_mult)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)


def test_fused_modules():
    v2 = mobilenet_v2()
    assert isinstance(v2.features[2].conv[1][0], fastdl.DepthwiseConv2d)
    assert v2.features[2].conv[1][1].activation == "relu6" and v2.features[2].conv[3].activation is None
    assert v2.features[3].use_res_connect and not v2.features[2].use_res_connect
    v1 = mobilenet_v1()
    assert all(isinstance(m, fastdl.DepthwiseSeparableConv2d) for m in v1.features[1:])
    assert sum(p.numel() for p in v1.parameters()) == 4_231_976  # the paper's 4.2M
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in [*v1.modules(), *v2.modules()])


@pytest.mark.parametrize("make", [mobilenet_v1, mobilenet_v2])
def test_forward_backward_shapes(make):
    m = make(num_classes=7, width_mult=0.25)
    x = torch.randn(3, 3, 37, 45, requires_grad=True)
    y = m(x)
    assert y.shape == (3, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in m.parameters())

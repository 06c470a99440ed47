"""Helpers for the model tests: a fastdl model against a twin of torch.nn (or torchvision) modules
holding the same state_dict, compared in float64 on every output, gradient and buffer.

Gradients through a deep network span orders of magnitude (ResNet-50's conv1.weight.grad reaches
~1e3 where layer4's are ~1), so a tensor whose largest |reference| element exceeds 1 is compared
after dividing both sides by it: fastdl.testing's float64 tolerances then apply relative to the
tensor's scale. (PyTorch's own spread on these models, NCHW against channels_last, is ~1e-12 on that
scale.) Smaller tensors keep the absolute tolerance: some gradients are exactly 0 in exact arithmetic
(a bias feeding a conv and a train-mode batch norm) and both sides hold only rounding noise.
"""
import torch
from torch import nn

from fastdl.testing import assert_close


def randomize_batch_norms(model):
    """Random affine parameters and running statistics (from torch's global generator), so that eval
    mode and the gradients of weight and bias are not those of the identity initialisation."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def assert_close_scaled(name, actual, expected, n):
    """fastdl.testing.assert_close on actual / s and expected / s, s = max(1, max |expected|)."""
    s = max(1.0, expected.detach().abs().max().item())
    assert_close(f"{name} (divided by {s:.3g})", actual / s, expected / s, n=n)


def twins(make_ours, make_ref, seed=0, **kwargs):
    """(ours, ref) in float64: ref built with torch's generator seeded, BN state randomised, and its
    state_dict loaded into ours with strict=True."""
    torch.manual_seed(seed)
    ref = randomize_batch_norms(make_ref(**kwargs).double())
    ours = make_ours(**kwargs).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def check_step(ours, ref, x, train, n):
    """One forward and backward of both models on x in train or eval mode: outputs, the input's and
    every parameter's gradient, and every buffer afterwards (running statistics) must agree."""
    ours.train(train), ref.train(train)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout mask for both
    ya = ours(xa)
    torch.manual_seed(1)
    yb = ref(xb)
    assert_close_scaled("output", ya, yb, n=n)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    assert_close_scaled("input.grad", xa.grad, xb.grad, n=n)
    ref_params, ref_buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    ours_params, ours_buffers = dict(ours.named_parameters()), dict(ours.named_buffers())
    assert ours_params.keys() == ref_params.keys() and ours_buffers.keys() == ref_buffers.keys()
    for name, p in ours_params.items():
        assert_close_scaled(f"{name}.grad", p.grad, ref_params[name].grad, n=n)
    for name, b in ours_buffers.items():
        if b.is_floating_point():
            assert_close_scaled(name, b, ref_buffers[name], n=n)
        else:
            assert torch.equal(b, ref_buffers[name]), name


def check_inference(ours, ref, x, n):
    """Eval mode without autograd (where fastdl may fold batch norms into convolutions)."""
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert_close_scaled("output (eval, no_grad)", ours(x), ref(x), n=n)


def check_round_trip(ours, make_ref, **kwargs):
    """ours' state_dict loads into a fresh reference (strict) and back, every tensor unchanged."""
    ref = make_ref(**kwargs).double()
    ref.load_state_dict(ours.state_dict(), strict=True)
    expected = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, expected[k]) and torch.equal(ref.state_dict()[k], v), k

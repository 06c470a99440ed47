"""fastdl.convert on torchvision's resnet18 / resnet50 / mobilenet_v2 and on models of torch.nn
modules: same state_dict keys, same outputs and parameter gradients (float64, train and eval),
the BN -> (add ->) ReLU patterns fused, the module swaps, and the report."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fastdl
import fastdl.reference.models as reference
from fastdl.testing import assert_close, max_error


def _outputs_and_grads(model, x, run):
    torch.manual_seed(1)  # the same dropout masks on every side
    out = run(model, x)
    return [out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))]


def compare(ref, conv, x, n, run=lambda m, x: m(x), twin=False):
    """Outputs (run(model, x)) and every parameter gradient of conv against ref, in train then eval
    mode, and every buffer afterwards. twin: also run a channels_last copy of ref on a channels_last
    x (other conv algorithms, other rounding); each result of conv may then be off by twice the
    largest difference between the two references' results (float64 rounding through a deep
    network, which differs between CPUs), besides the tolerance of n terms."""
    assert sorted(conv.state_dict()) == sorted(ref.state_dict())
    other = copy.deepcopy(ref).to(memory_format=torch.channels_last) if twin else None
    names = ["output"] + [name for name, _ in ref.named_parameters()]
    for training in (True, False):
        models = (ref, conv) + ((other,) if twin else ())
        for m in models:
            m.train(training)
        want, got = _outputs_and_grads(ref, x, run), _outputs_and_grads(conv, x, run)
        spread = ([max_error(a, e) for a, e in zip(_outputs_and_grads(other, x.contiguous(
            memory_format=torch.channels_last), run), want)] if twin else [0.0] * len(want))
        for name, a, e, noise in zip(names, got, want, spread):
            assert_close(f"{name} ({'train' if training else 'eval'})", a, e, n=n, noise=noise)
    for name, buf in ref.named_buffers():
        if buf.is_floating_point():
            assert_close(name, conv.get_buffer(name), buf, n=n)
        else:
            assert torch.equal(conv.get_buffer(name), buf), name


@pytest.mark.parametrize("arch, fused, swapped, n", [
    ("resnet18", 17, 3, 1e4),  # stem + 2 per block fused; the 3 downsample BNs swapped
    ("resnet50", 49, 4, 1e6),  # deep: fp64 rounding adds up over 50 BN backward passes
    ("mobilenet_v2", 35, 17 + 17, 1e4),  # conv-BN-ReLU6 fused; projection BNs and depthwise convs swapped
])
def test_torchvision_models(arch, fused, swapped, n):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(num_classes=10).double()
    conv, report = fastdl.convert(ref, report=True)
    assert not report.untraced
    assert len(report.fused) == fused and len(report.swapped) == swapped, str(report)
    assert all(isinstance(m, fastdl.FusedBatchNorm2d) for m in conv.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ref.modules() if isinstance(m, fastdl.FusedBatchNorm2d))
    compare(ref, conv, torch.randn(2, 3, 48, 48, dtype=torch.float64), n)


def test_report_names_what_changed():
    ref = torchvision.models.resnet18(num_classes=10)
    _, report = fastdl.convert(ref, report=True)
    text = str(report)
    assert "fused   layer1.0.bn2: BatchNorm2d -> add -> relu" in text
    assert "fused   bn1: BatchNorm2d -> relu" in text
    assert "swapped layer2.0.downsample.1: BatchNorm2d -> FusedBatchNorm2d" in text


class Twins(nn.Module):
    """torch.nn modules convert swaps, in a forward torch.fx cannot trace (data-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.gru = nn.GRU(6, 5, bidirectional=True, batch_first=True)
        self.cell = nn.RNNCell(10, 7)
        self.proj = nn.LSTM(8, 6, proj_size=3)

    def forward(self, x):
        y = torch.relu(self.bn(self.dw(self.conv(x))))
        seq = y.flatten(2).transpose(1, 2)  # (N, HW, 8)
        if seq.sum() > -1e9:  # data-dependent: torch.fx cannot trace this
            seq = seq + self.attn(seq, seq, seq, need_weights=False)[0]
        seq = self.encoder(seq)
        out, _ = self.gru(self.lstm(seq)[0])
        return self.cell(out[:, -1])


def test_untraceable_model_gets_the_swaps():
    torch.manual_seed(0)
    ref = Twins().double()
    conv, report = fastdl.convert(ref, report=True)
    assert [name for name, _ in report.untraced] == [""] and not report.fused
    assert type(conv) is Twins
    kinds = {name: b for name, _, b in report.swapped}
    assert kinds == {"dw": "DepthwiseConv2d", "bn": "FusedBatchNorm2d", "attn": "FusedAttention",
                     "encoder": "FusedTransformerEncoderLayer", "lstm": "FusedLSTM", "gru": "FusedGRU",
                     "cell": "FusedRNNCell"}
    assert report.skipped == [("proj", "proj_size > 0 is not implemented by FusedLSTM")]
    assert type(ref.lstm) is nn.LSTM  # inplace=False left the original alone
    ref.eval(), conv.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert_close("output", conv(x), ref(x), n=100)


def test_inplace_and_idempotent():
    ref = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.BatchNorm2d(3), nn.ReLU())
    conv = fastdl.convert(ref, inplace=True, fuse=False)
    assert conv is ref and isinstance(ref[0], fastdl.DepthwiseConv2d) and isinstance(ref[1], fastdl.FusedBatchNorm2d)
    _, report = fastdl.convert(ref, report=True, fuse=False)
    assert not report.swapped


def test_not_a_module_is_named():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fastdl.convert(lambda x: x)


def _tokens(N, T, vocab=23):
    return torch.randint(1, vocab, (N, T), generator=torch.Generator().manual_seed(2))


def _unet(m, x):  # the DDPM's noise prediction at fixed timesteps
    return m.unet(x, torch.tensor([0, 9]))


# name: (reference model, input, how to run it, fused patterns, swapped module types)
REFERENCES = {
    "mlp": (lambda: reference.mlp(in_features=64), lambda: torch.randn(3, 64), None, 0, set()),
    "cnn": (lambda: reference.cnn(batch_norm=True, image_size=8), lambda: torch.randn(3, 1, 8, 8), None, 2, set()),
    "rnn": (lambda: reference.rnn(23, embed_dim=6, hidden=9, num_layers=2, num_classes=3),
            lambda: _tokens(3, 5), None, 0, {"FusedRNN"}),
    "lstm": (lambda: reference.lstm(features=3, hidden=11, num_layers=2, horizon=4),
             lambda: torch.randn(3, 5, 3), None, 0, {"FusedLSTM"}),
    "transformer": (lambda: reference.transformer(23, max_len=8, d_model=12, nhead=3, num_layers=2,
                                                  dim_feedforward=20, dropout=0.0, num_classes=3),
                    lambda: _tokens(3, 6), None, 0, {"FusedTransformerEncoderLayer"}),
    "attention": (lambda: reference.attention(23, pooling="additive", max_len=8, d_model=12, nhead=2, dropout=0.0,
                                              num_classes=3),
                  lambda: _tokens(3, 6), None, 0, {"FusedAttention"}),
    "gpt": (lambda: reference.gpt(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=12),
            lambda: _tokens(2, 8), lambda m, x: m(x)[0], 0, {"FusedAttention"}),
    "gan": (lambda: reference.gan(latent=8, gen_widths=(16, 8, 4), disc_widths=(4, 8))[0],
            lambda: torch.randn(3, 8), None, 3, set()),
    "diffusion": (lambda: reference.diffusion(image_size=8, base_width=8, timesteps=10, num_heads=2),
                  lambda: torch.randn(2, 1, 8, 8), _unet, 13, {"FusedAttention", "FusedBatchNorm2d"}),
    "mobilenet_v1": (lambda: reference.mobilenet_v1(num_classes=10, width_mult=0.25),
                     lambda: torch.randn(2, 3, 32, 32), None, 27, {"DepthwiseConv2d"}),
}


@pytest.mark.parametrize("name", list(REFERENCES))
def test_reference_models(name):
    """convert on each model of fastdl.reference.models (torch.nn only): the same class and
    state_dict keys, the expected fusions and swaps, and outputs, gradients and buffers equal to the
    unconverted model's in float64, train and eval."""
    make, inputs, run, fused, swapped = REFERENCES[name]
    torch.manual_seed(0)
    ref = make().double()
    conv, report = fastdl.convert(ref, report=True)
    assert type(conv) is type(ref) and not report.untraced and not report.skipped
    assert len(report.fused) == fused and {b for _, _, b in report.swapped} == swapped, str(report)
    x = inputs()
    x = x.double() if x.is_floating_point() else x
    compare(ref, conv, x, 1e3, run or (lambda m, x: m(x)), twin=x.dim() == 4)


def test_fused_model_keeps_its_methods():
    """A fused DDPM still computes its loss and samples (its own methods, through the fused UNet),
    and matches the unconverted one; its UNet's forward is the rewritten graph's."""
    torch.manual_seed(0)
    ref = reference.diffusion(image_size=8, base_width=8, timesteps=10, num_heads=2).double().eval()
    conv = fastdl.convert(ref)
    assert "forward" in vars(conv.unet) and "forward" not in vars(ref.unet)
    x0 = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    assert_close("loss", conv.loss(x0, torch.Generator().manual_seed(3)), ref.loss(x0, torch.Generator().manual_seed(3)))
    copied = copy.deepcopy(conv)
    assert copied.unet.forward.__self__ is copied.unet
    assert_close("deep copy", copied.unet(x0, torch.tensor([1, 2])), ref.unet(x0, torch.tensor([1, 2])))


def test_compiles_fullgraph():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    conv = fastdl.convert(ref)
    x = torch.randn(2, 3, 32, 32)
    assert_close("compiled", torch.compile(conv, fullgraph=True, backend="aot_eager")(x), ref(x), n=1e3)

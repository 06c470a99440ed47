"""fastdl depthwise conv2d (functional, DepthwiseConv2d, DepthwiseSeparableConv2d) against F.conv2d /
torch.nn in float64."""
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as tF

import fastdl
import fastdl.functional as F
from fastdl.testing import TOLERANCES, assert_close, lay_out, max_error

LAYOUTS = ["nchw", "channels_last", "strided"]
# (N, C, H, W, multiplier, kernel, stride, padding, dilation, bias)
CASES = [
    (2, 3, 7, 7, 1, 3, 1, 1, 1, True),
    (1, 4, 13, 13, 1, 3, 2, 1, 1, False),
    (2, 3, 13, 7, 2, 3, 1, "same", 1, True),
    (2, 5, 7, 13, 1, 5, 1, "valid", 1, True),
    (1, 3, 13, 13, 1, 5, 2, 2, 2, True),
    (2, 4, 13, 13, 1, 7, 1, 3, 1, False),
    (2, 2, 13, 13, 2, 7, 2, 3, 1, True),
    (1, 3, 7, 13, 1, 3, 1, "same", 2, True),
    (3, 2, 1, 1, 1, 3, 1, 1, 1, True),
    (2, 3, 1, 7, 1, 3, 1, 1, 1, True),
    (2, 3, 7, 7, 1, 1, 1, 0, 1, True),
    (2, 3, 7, 7, 3, 1, 2, 0, 1, False),
    (1, 2, 13, 13, 1, 31, 1, 15, 1, True),
    (2, 2, 7, 7, 1, 31, 1, "same", 1, False),
    (2, 3, 7, 7, 1, (2, 4), 1, "same", 1, True),
    (2, 3, 13, 7, 1, (3, 5), (2, 1), (0, 2), (1, 2), True),
    (1, 3, 5, 5, 1, 3, 1, 4, 1, True),  # padding beyond the kernel's reach
    # wide: full register blocks of channels (16 to 64 of them, by ISA and dtype), then narrower
    # constant-width ones, then a ragged rest
    (1, 61, 9, 9, 1, 3, 1, 1, 1, True),
    (1, 150, 6, 9, 1, 3, 1, 1, 1, False),
    (1, 19, 8, 8, 2, 3, 2, 1, 1, False),
]


def cid(c):
    N, C, H, W, m, k, s, p, d, b = c
    return f"N{N}-C{C}-{H}x{W}-m{m}-k{k}-s{s}-p{p}-d{d}" + ("-bias" if b else "")


def make_inputs(case, seed=0, device="cpu"):
    N, C, H, W, m, k, s, p, d, has_bias = case
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C * m, 1, *k, generator=g, dtype=torch.float64)
    b = torch.randn(C * m, generator=g, dtype=torch.float64) if has_bias else None
    return [t.to(device) if t is not None else None for t in (x, w, b)], dict(stride=s, padding=p, dilation=d)


def run(fn, x, w, b, dy, kw):
    """fn's output and grads of (x, w, b) for the upstream gradient dy."""
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(x, w, b, **kw)
    return [y, *torch.autograd.grad(y, leaves, dy)]


def counts(y, w, multiplier):
    """The number of terms each of [y, grad_x, grad_weight, grad_bias] sums: its tolerance's n."""
    taps = w.shape[2] * w.shape[3]
    positions = y.shape[0] * y.shape[2] * y.shape[3]
    return [taps, taps * multiplier, positions, positions]


def compare(case, layout, dtype, device="cpu", seed=0):
    """fastdl's [y, grad_x, grad_weight(, grad_bias)] in `dtype` on `device`, and F.conv2d's in float64."""
    (x, w, b), kw = make_inputs(case, seed)
    y64 = tF.conv2d(x, w, b, groups=x.shape[1], **kw)
    dy = torch.randn(y64.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = run(lambda x, w, b, **kw: tF.conv2d(x, w, b, groups=x.shape[1], **kw), x.clone(), w.clone(),
              None if b is None else b.clone(), dy, kw)
    xt = lay_out(x.to(device, dtype), layout)
    wt, bt = w.to(device, dtype), None if b is None else b.to(device, dtype)
    got = run(F.depthwise_conv2d, xt, wt, bt, lay_out(dy.to(device, dtype), layout), kw)
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_matches_conv2d(case, layout, dtype, isa):
    got, ref = compare(case, layout, dtype)
    for name, a, e, n in zip(["y", "grad_x", "grad_weight", "grad_bias"], got, ref, counts(ref[0], ref[2], case[4])):
        assert_close(name, a, e, dtype=dtype, n=n)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("activation", [None, "relu", "relu6"], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_fused_epilogue(activation, layout, grad):
    """act((conv + bias) * scale + shift), in the kernel (inference) or as differentiable ops (grad)."""
    (x, w, b), kw = make_inputs((2, 6, 9, 9, 1, 3, 1, 1, 1, True), seed=3)
    g = torch.Generator().manual_seed(4)
    scale, shift = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, torch.randn(6, generator=g, dtype=torch.float64) * 3
    act = {None: lambda z: z, "relu": tF.relu, "relu6": tF.relu6}[activation]
    want = act(tF.conv2d(x, w, b, groups=6, **kw) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    xt = lay_out(x, layout).requires_grad_(grad)
    got = F.depthwise_conv2d(xt, w, b, **kw, scale=scale, shift=shift, activation=activation)
    assert_close("y", got, want, dtype=torch.float64, n=9)
    if grad:
        x64 = x.clone().requires_grad_()
        want = act(tF.conv2d(x64, w, b, groups=6, **kw) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
        dy = torch.randn_like(want)
        assert_close("grad_x", torch.autograd.grad(got, xt, dy)[0], torch.autograd.grad(want, x64, dy)[0],
                     dtype=torch.float64, n=9)


@pytest.mark.parametrize("activation", ["none", "relu", "relu6"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_cpu_kernel(layout, activation, isa):
    """fp64 gradcheck of the op itself (its registered autograd), stride 2, dilation 2, multiplier 2."""
    assert fastdl._backends.choose("depthwise_conv2d", "cpu", torch.float64).name == "cpp"
    g = torch.Generator().manual_seed(5)
    x = lay_out(torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64), layout).requires_grad_()
    w = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    scale = torch.rand(6, generator=g, dtype=torch.float64) + 0.5

    def f(x, w, b):
        return torch.ops.fastdl.depthwise_conv2d_forward(x, w, b, scale, None, [2, 1], [1, 2], [1, 2], activation)
    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("conv", [((1, 1), (1, 1), (1, 1)), ((2, 1), (1, 2), (1, 2)), ((2, 2), (0, 0), (1, 1))],
                         ids=["s1", "s2x1-p1x2-d1x2", "s2-p0"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradgradcheck_cpu_kernel(layout, conv):
    """Second derivatives in float64 (multiplier 2, with bias): the backward op's own derivatives
    (the convolution and its gradients again) against finite differences of the gradients."""
    g = torch.Generator().manual_seed(6)
    x = lay_out(torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64), layout).requires_grad_()
    w = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    stride, padding, dilation = conv

    def f(x, w, b):
        return F.depthwise_conv2d(x, w, b, stride, padding, dilation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered": nothing dropped silently
        assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradient_penalty_matches_conv2d(layout, stride):
    """A gradient penalty through depthwise conv -> relu -> depthwise conv (DepthwiseConv2d against
    nn.Conv2d, float64): the weights' and biases' gradients of |d loss / d x|^2, and its
    third-order term (the penalty's gradient with respect to x, differentiated once more)."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 6, 3, stride, 1, groups=3), nn.Tanh(),
                        nn.Conv2d(6, 6, 5, 1, 2, groups=6)).double()
    ours = nn.Sequential(*(fastdl.DepthwiseConv2d.from_module(m) if isinstance(m, nn.Conv2d) else m for m in ref))
    x = lay_out(torch.randn(2, 3, 9, 8, dtype=torch.float64), layout)
    results = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        penalty = grad_x.square().sum()
        grads = torch.autograd.grad(penalty, [xi, *model.parameters()], create_graph=True)
        third, = torch.autograd.grad(grads[0].square().sum(), xi)
        results.append([*grads[1:], third])
    names = [n for n, _ in ref.named_parameters()] + ["third-order grad_x"]
    for name, got, want in zip(names, results[1], results[0]):
        assert_close(name, got, want, n=x.numel())


def test_weight_grad_is_deterministic(isa):
    (x, w, b), kw = make_inputs((4, 8, 13, 13, 1, 5, 1, 2, 1, True), seed=6)
    x, w = x.float().contiguous(memory_format=torch.channels_last), w.float()
    dy = torch.randn(4, 8, 13, 13).contiguous(memory_format=torch.channels_last)
    first = torch.ops.fastdl.depthwise_conv2d_backward(dy, x, w, [1, 1], [2, 2], [1, 1], [False, True])[1]
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            again = torch.ops.fastdl.depthwise_conv2d_backward(dy, x, w, [1, 1], [2, 2], [1, 1], [False, True])[1]
        finally:
            torch.set_num_threads(old)
        assert torch.equal(first, again), f"grad_weight changed with {threads} thread(s)"


def _op_samples():
    g = torch.Generator().manual_seed(7)
    for layout in ("nchw", "channels_last"):
        x = lay_out(torch.randn(2, 3, 6, 5, generator=g), layout).requires_grad_()
        w = torch.randn(6, 1, 3, 3, generator=g).requires_grad_()
        b = torch.randn(6, generator=g).requires_grad_()
        s, h = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
        yield (x, w, b, None, None, [1, 1], [1, 1], [1, 1], "none")
        yield (x, w, None, s, h, [2, 1], [0, 1], [1, 2], "relu")
        yield (x, w, b, s, None, [1, 2], [2, 2], [2, 1], "relu6")


@pytest.mark.parametrize("sample", list(_op_samples()),
                         ids=lambda s: f"{'cl' if s[0].stride(1) == 1 else 'nchw'}-{s[8]}-s{s[5][0]}{s[5][1]}")
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.fastdl.depthwise_conv2d_forward.default, sample)
    x, w = sample[0], sample[1]
    with torch.no_grad():
        y = torch.ops.fastdl.depthwise_conv2d_forward(*sample)
    torch.library.opcheck(torch.ops.fastdl.depthwise_conv2d_backward.default,
                          (torch.randn_like(y), x.detach(), w.detach(), *sample[5:8], [True, True]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(8)
    block = fastdl.DepthwiseSeparableConv2d(4, 8, 3, stride=2)
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    want = block(x)
    got = compiled(x)
    assert_close("y", got, want.double(), dtype=torch.float32, n=9)
    gw, gx = torch.autograd.grad(got.sum(), (block[0].weight, x))
    ww, wx = torch.autograd.grad(want.sum(), (block[0].weight, x))
    assert_close("grad_weight", gw, ww.double(), dtype=torch.float32, n=2 * 5 * 5 * 8)
    assert_close("grad_x", gx, wx.double(), dtype=torch.float32, n=9 * 8)


# ---- modules --------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_depthwise_conv2d_is_a_drop_in(padding_mode):
    ref = nn.Conv2d(4, 8, 3, stride=1, padding=1, groups=4, padding_mode=padding_mode, dtype=torch.float64)
    ours = fastdl.DepthwiseConv2d(4, 8, 3, padding=1, padding_mode=padding_mode, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict()) and isinstance(ours, nn.Conv2d)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert_close("y", ours(x), ref(x), dtype=torch.float64, n=9)
    shared = fastdl.DepthwiseConv2d.from_module(ref)
    assert shared.weight is ref.weight and shared.padding_mode == padding_mode
    back = nn.Conv2d(4, 8, 3, padding=1, groups=4, padding_mode=padding_mode, dtype=torch.float64)
    back.load_state_dict(ours.state_dict())


def _separable_reference(C, out, activation, stride=1):
    act = nn.ReLU() if activation == "relu" else nn.ReLU6()
    return nn.Sequential(nn.Conv2d(C, C, 3, stride, 1, groups=C, bias=False), nn.BatchNorm2d(C), act,
                         nn.Conv2d(C, out, 1, bias=False), nn.BatchNorm2d(out), act).double()


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_separable_block_matches_sequential(activation, layout):
    torch.manual_seed(9)
    ref = _separable_reference(6, 10, activation, stride=2)
    ours = fastdl.DepthwiseSeparableConv2d(6, 10, 3, stride=2, activation=activation, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for step in range(2):  # training: outputs, grads, running statistics
        x = lay_out(torch.randn(3, 6, 11, 11, dtype=torch.float64) * 2, layout)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(a), ref(b)
        assert_close("y", ya, yb, dtype=torch.float64, n=9)
        ga = torch.autograd.grad(ya.sum(), [a, *ours.parameters()])
        gb = torch.autograd.grad(yb.sum(), [b, *ref.parameters()])
        for (name, _), u, v in zip([("x", None), *ours.named_parameters()], ga, gb):
            assert_close(f"grad_{name}", u, v, dtype=torch.float64, n=3 * 11 * 11)
    for key, value in ref.state_dict().items():
        assert_close(key, ours.state_dict()[key].double(), value.double(), dtype=torch.float64, n=3 * 11 * 11)
    ours.eval(), ref.eval()
    x = lay_out(torch.randn(3, 6, 11, 11, dtype=torch.float64), layout)
    with torch.no_grad():  # eval: the fused epilogue path
        assert_close("eval y", ours(x), ref(x), dtype=torch.float64, n=9 * 6)
    assert_close("eval y (grad enabled)", ours(x.requires_grad_()), ref(x), dtype=torch.float64, n=9 * 6)


def test_separable_eval_runs_the_fused_epilogue(monkeypatch):
    block = fastdl.DepthwiseSeparableConv2d(4, 6).eval()
    calls = []
    real = torch.ops.fastdl.depthwise_conv2d_forward.default

    def spy(*args):
        calls.append(args[3] is not None and args[8] == "relu")
        return real(*args)
    monkeypatch.setattr(fastdl.ops.depthwise_conv2d.torch.ops.fastdl, "depthwise_conv2d_forward",
                        types.SimpleNamespace(default=spy), raising=False)
    with torch.no_grad():
        block(torch.randn(2, 4, 5, 5))
    assert calls == [True]


ERRORS = [
    ("groups", lambda: fastdl.DepthwiseConv2d(4, 8, 3, groups=2), ValueError, "groups: expected in_channels (4)"),
    ("out-channels", lambda: fastdl.DepthwiseConv2d(4, 6, 3), ValueError, "out_channels: expected a multiple"),
    ("rank", lambda: F.depthwise_conv2d(torch.randn(4, 5, 5), torch.randn(4, 1, 3, 3)), ValueError,
     "input: expected a 4-D"),
    ("weight-shape", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)), ValueError,
     "weight: expected shape (C * multiplier, 1, KH, KW) with C = 4"),
    ("weight-dtype", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3).double()),
     TypeError, "weight: expected dtype torch.float32"),
    ("bias-shape", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(3)),
     ValueError, "bias: expected shape (4,)"),
    ("stride", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), stride=0), ValueError,
     "stride: expected an int or a pair of ints >= 1"),
    ("padding", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), padding="full"),
     ValueError, "padding: expected 'same', 'valid'"),
    ("same-strided", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), stride=2,
                                                padding="same"), ValueError, "padding='same' is not supported"),
    ("too-small", lambda: F.depthwise_conv2d(torch.randn(1, 4, 2, 2), torch.randn(4, 1, 3, 3)), ValueError,
     "input: spatial size (2, 2)"),
    ("activation", lambda: F.depthwise_conv2d(torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), activation="gelu"),
     ValueError, "activation: expected one of"),
    ("op-cpu-dtype", lambda: torch.ops.fastdl.depthwise_conv2d_forward(
        torch.randn(1, 4, 5, 5).half(), torch.randn(4, 1, 3, 3).half(), None, None, None, [1, 1], [1, 1], [1, 1],
        "none"), TypeError, "x: the CPU kernel expects float32 or float64"),
    ("op-weight", lambda: torch.ops.fastdl.depthwise_conv2d_forward(
        torch.randn(1, 4, 5, 5), torch.randn(6, 1, 3, 3), None, None, None, [1, 1], [1, 1], [1, 1], "none"),
     ValueError, "weight: expected shape (C * multiplier, 1, KH, KW) with C = 4"),
    ("op-grad-out", lambda: torch.ops.fastdl.depthwise_conv2d_backward(
        torch.randn(1, 4, 4, 4), torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), [1, 1], [1, 1], [1, 1],
        [True, True]), ValueError, "grad_out: expected shape"),
]


@pytest.mark.parametrize("fn,exc,msg", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_named(fn, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        fn()


def test_cpu_reduced_precision_runs_the_reported_reference():
    row = [r for r in fastdl.info()["ops"] if r["op"] == "depthwise_conv2d" and r["device"] == "cpu"
           and r["dtype"] == "bfloat16"][0]
    assert row["backend"] == "reference" and "float32, float64" in row["reason"]
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3)
    got = F.depthwise_conv2d(x.bfloat16(), w.bfloat16(), padding=1)
    assert max_error(got.float(), tF.conv2d(x, w, padding=1, groups=4)) < 0.1


# ---- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=cid)
def test_cuda_matches_conv2d(case, layout, dtype):
    """fp32 to the tolerance table; fp16 / bf16 within twice PyTorch's own error in that dtype."""
    got, ref = compare(case, layout, dtype, device="cuda")
    (x, w, b), kw = make_inputs(case, 0, device="cuda")
    names = ["y", "grad_x", "grad_weight", "grad_bias"]
    if dtype == torch.float32:
        for name, a, e, n in zip(names, got, ref, counts(ref[0], ref[2], case[4])):
            assert_close(name, a, e.cuda(), dtype=dtype, n=n)
        return
    dy = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    theirs = run(lambda x, w, b, **kw: tF.conv2d(x, w, b, groups=x.shape[1], **kw), lay_out(x.to(dtype), layout),
                 w.to(dtype), None if b is None else b.to(dtype), lay_out(dy.to("cuda", dtype), layout), kw)
    for name, a, t, e in zip(names, got, theirs, ref):
        ours, torch_own = max_error(a, e.cuda()), max_error(t, e.cuda())
        assert ours <= 2 * torch_own + TOLERANCES[dtype][0], f"{name}: error {ours:.3g}, PyTorch's {torch_own:.3g}"


@pytest.mark.cuda
def test_cuda_plane_over_int32_is_an_error():
    """A plane of 2^31 elements would overflow the kernels' int plane offsets: an error naming x
    (the kernels keep n in int64, the offset within a plane in int)."""
    x = torch.empty(1, 1, 2**16, 2**15 + 1, dtype=torch.float16, device="cuda")
    w = torch.ones(1, 1, 1, 1, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=r"x: the CUDA kernel expects input and output planes"):
        F.depthwise_conv2d(x, w)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_autocast_follows_conv2d(layout):
    """Under torch.autocast("cpu", bfloat16), like nn.Conv2d: a bfloat16 output within twice nn's
    own error of nn's float32 result (plus 1e-2), and float32 gradients for the float32 parameters."""
    torch.manual_seed(0)
    ref = nn.Conv2d(16, 32, 3, padding=1, groups=16)
    ours = fastdl.DepthwiseConv2d.from_module(ref)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 16, 9, 9).contiguous(memory_format=fmt)
    want = ref(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, got = ref(x), ours(x)
    assert got.dtype == theirs.dtype == torch.bfloat16
    ours_err, torch_err = (got.double() - want).abs().max().item(), (theirs.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-2, f"error {ours_err:.3g}, PyTorch's {torch_err:.3g}"
    got.float().sum().backward()
    assert ours.weight.grad.dtype == ours.bias.grad.dtype == torch.float32

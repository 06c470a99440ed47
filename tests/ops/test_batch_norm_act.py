"""fastdl.FusedBatchNorm2d / batch_norm_act against nn.BatchNorm2d + add + activation in float64."""
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as tF

import fastdl
import fastdl.functional as F
from fastdl.testing import TOLERANCES, assert_close, lay_out, max_error

ACTS = [None, "relu", "relu6", "leaky_relu"]
SHAPES = [(4, 3, 5, 5), (1, 8, 3, 3), (3, 5, 1, 7), (2, 7, 13, 11), (6, 4, 1, 1)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def sid(shape):
    return "x".join(map(str, shape))


def activate(z, act, slope=0.01):
    return {None: lambda t: t, "relu": tF.relu, "relu6": tF.relu6,
            "leaky_relu": lambda t: tF.leaky_relu(t, slope)}[act](z)


class EagerBatchNormAct(nn.BatchNorm2d):
    """act(nn.BatchNorm2d(x) + residual) in plain PyTorch ops."""

    def __init__(self, C, activation=None, negative_slope=0.01, **kw):
        super().__init__(C, **kw)
        self.activation, self.negative_slope = activation, negative_slope

    def forward(self, x, residual=None):
        z = super().forward(x)
        return activate(z + residual if residual is not None else z, self.activation, self.negative_slope)


class Pair:
    """A float64 reference nn.BatchNorm2d and a module under test (by default FusedBatchNorm2d) with
    the same state, in `dtype`."""

    def __init__(self, C, act, dtype, device="cpu", slope=0.01, impl=fastdl.FusedBatchNorm2d, **kw):
        self.act, self.slope = act, slope
        self.ref = nn.BatchNorm2d(C, dtype=torch.float64, device=device, **kw)
        if self.ref.affine:
            with torch.no_grad():
                self.ref.weight.uniform_(0.5, 1.5)
                if self.ref.bias is not None:
                    self.ref.bias.uniform_(-0.5, 0.5)
        param_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.fused = impl(C, activation=act, negative_slope=slope, dtype=param_dtype,
                                             device=device, **kw)
        self.fused.load_state_dict(self.ref.state_dict())
        self.dtype, self.device = dtype, device

    def train(self, mode=True):
        self.ref.train(mode)
        self.fused.train(mode)
        return self

    def step(self, shape, layout="nchw", residual=True, seed=0):
        """One forward + backward of both; returns {name: (fastdl value, float64 reference)}."""
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(self.device)
        r = torch.randn(shape, generator=g, dtype=torch.float64).to(self.device) if residual else None
        dy = torch.randn(shape, generator=g, dtype=torch.float64).to(self.device)
        x64 = x.clone().requires_grad_()
        r64 = r.clone().requires_grad_() if residual else None
        y64 = activate(self.ref(x64) + (r64 if residual else 0), self.act, self.slope)
        xf = lay_out(x.to(self.dtype), layout).requires_grad_()
        rf = lay_out(r.to(self.dtype), layout).requires_grad_() if residual else None
        yf = self.fused(xf, rf)
        grads = [t for t in (x64, r64) if t is not None] + list(self.ref.parameters())
        ref_grads = torch.autograd.grad(y64, grads, dy)
        fused_in = [t for t in (xf, rf) if t is not None] + list(self.fused.parameters())
        fused_grads = torch.autograd.grad(yf, fused_in, lay_out(dy.to(self.dtype), layout))
        names = ["grad_x"] + (["grad_residual"] if residual else []) + [
            f"grad_{n}" for n, _ in self.ref.named_parameters()]
        out = {"y": (yf, y64), **{n: (a, b) for n, a, b in zip(names, fused_grads, ref_grads)}}
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(self.ref, name) is not None:
                out[name] = (getattr(self.fused, name), getattr(self.ref, name))
        return out


def reduced_over(shape):
    return shape[0] * shape[2] * shape[3]


def check(results, dtype, shape):
    n = reduced_over(shape)
    for name, (got, want) in results.items():
        assert got.dtype == (want.dtype if name == "num_batches_tracked" else got.dtype)
        sums = name in ("grad_weight", "grad_bias", "running_mean", "running_var")
        assert_close(name, got, want, dtype=dtype if name != "num_batches_tracked" else torch.float64,
                     n=n if sums else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
def test_train_steps_then_eval(shape, act, residual, layout, dtype, isa):
    pair = Pair(shape[1], act, dtype)
    for step in range(3):
        check(pair.step(shape, layout, residual, seed=step), dtype, shape)
    check(pair.train(False).step(shape, layout, residual, seed=3), dtype, shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad_mode", ["no_grad", "no-input-requires-grad"])
def test_inference_records_no_node_and_no_mask(training, grad_mode):
    """With no gradient to compute, the op's Autograd kernel (C++) runs the kernel directly: no
    autograd node, and no mask written for a backward that will not come; with one to compute, it
    records the node and saves the mask whatever save_mask says. The module matches nn's."""
    pair = Pair(4, "relu", torch.float64).train(training)
    x, r = torch.randn(2, 4, 3, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    w, b, rm, rv = (pair.fused.weight, pair.fused.bias, pair.fused.running_mean.clone(),
                    pair.fused.running_var.clone())
    op = lambda x: torch.ops.fastdl.batch_norm_act_forward(x, w, b, r, rm, rv, training, 0.1, 1e-5, "relu", 0.01, False)
    if grad_mode == "no_grad":
        with torch.no_grad():
            y, *_, mask = op(x)
            y_module = pair.fused(x, r)
    else:
        pair.fused.requires_grad_(False)
        y, *_, mask = op(x)
        y_module = pair.fused(x, r)
    assert y.grad_fn is None and y_module.grad_fn is None and mask.numel() == 0
    with torch.no_grad():
        want = tF.relu(pair.ref(x) + r)
    assert_close("y", y_module, want, dtype=torch.float64)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert_close(name, getattr(pair.fused, name), getattr(pair.ref, name), dtype=torch.float64, n=18)
    y, *_, mask = op(x.requires_grad_())
    assert y.grad_fn is not None and mask.shape == x.shape


def test_running_statistics_version_is_bumped():
    """The forward op updates the running statistics in place: like an in-place ATen op it bumps
    their version counters (in training only), so autograd notices if a saved one was changed."""
    bn = fastdl.FusedBatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    before = bn.running_mean._version, bn.running_var._version
    bn(x)
    assert (bn.running_mean._version, bn.running_var._version) == (before[0] + 1, before[1] + 1)
    bn.eval()
    bn(x)
    assert (bn.running_mean._version, bn.running_var._version) == (before[0] + 1, before[1] + 1)


def test_output_keeps_memory_format():
    bn = fastdl.FusedBatchNorm2d(8, activation="relu")
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    assert bn(x, x).is_contiguous(memory_format=torch.channels_last)
    assert bn(x.contiguous()).is_contiguous()
    assert bn.eval()(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kw", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                dict(momentum=0.5, eps=1e-3)], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_module_options(kw, layout):
    shape = (3, 6, 4, 5)
    pair = Pair(6, "relu", torch.float64, **kw)
    for step in range(3):
        check(pair.step(shape, layout, seed=step), torch.float64, shape)
    check(pair.train(False).step(shape, layout, seed=9), torch.float64, shape)


def test_leaky_relu_slope():
    shape = (4, 5, 3, 3)
    pair = Pair(5, "leaky_relu", torch.float64, slope=0.2)
    check(pair.step(shape), torch.float64, shape)
    assert "negative_slope=0.2" in repr(pair.fused)


def test_state_dict_loads_both_ways():
    ref = nn.BatchNorm2d(7)
    ref(torch.randn(4, 7, 3, 3))  # non-trivial running stats
    fused = fastdl.FusedBatchNorm2d(7, activation="relu")
    fused.load_state_dict(ref.state_dict())
    assert list(fused.state_dict()) == list(ref.state_dict())
    back = nn.BatchNorm2d(7)
    back.load_state_dict(fused.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_from_module_shares_state():
    ref = nn.BatchNorm2d(4, momentum=None).eval()
    fused = fastdl.FusedBatchNorm2d.from_module(ref, activation="relu6")
    assert not fused.training and fused.momentum is None and fused.weight is ref.weight
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused(x), tF.relu6(ref(x)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_cpu_kernel(act, training, layout, isa):
    g = torch.Generator().manual_seed(1)
    shape = (3, 4, 3, 2)
    x = lay_out(torch.randn(shape, generator=g, dtype=torch.float64), layout).requires_grad_()
    r = lay_out(torch.randn(shape, generator=g, dtype=torch.float64), layout).requires_grad_()
    w = torch.rand(4, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    stats = (None, None) if training else (rm, rv)
    assert fastdl._backends.choose("batch_norm_act", "cpu", torch.float64).name == "cpp"

    def f(x, r, w, b):
        return F.batch_norm_act(x, *stats, w, b, training, 0.1, 1e-5, residual=r, activation=act)

    assert torch.autograd.gradcheck(f, (x, r, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_gradgradcheck_cpu_kernel(affine, layout, act, training):
    """Second derivatives (create_graph=True, then backward) in float64: the kernel's gradients,
    differentiated through reference.batch_norm_act_backward's formula, against finite differences
    of those gradients."""
    g = torch.Generator().manual_seed(4)
    shape = (3, 4, 3, 2)
    x = lay_out(torch.randn(shape, generator=g, dtype=torch.float64), layout).requires_grad_()
    r = lay_out(torch.randn(shape, generator=g, dtype=torch.float64), layout).requires_grad_()
    w = torch.rand(4, generator=g, dtype=torch.float64).add_(0.5).requires_grad_() if affine else None
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_() if affine else None
    stats = (None, None) if training else (torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5)

    def f(x, r, *wb):
        return F.batch_norm_act(x, *stats, *(wb or (None, None)), training, 0.1, 1e-5, residual=r, activation=act)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered": nothing dropped silently
        assert torch.autograd.gradgradcheck(f, (x, r) + ((w, b) if affine else ()))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradient_penalty_matches_batchnorm2d(layout, training):
    """A gradient penalty (R1 / WGAN-GP style: |d loss / d x|^2, then its gradient) through a
    residual block relu(bn2(conv(relu(bn1(x)))) + x) of FusedBatchNorm2d, against nn.BatchNorm2d in
    float64: the parameters' gradients and the running statistics."""
    torch.manual_seed(0)

    def block(fused):
        conv = nn.Conv2d(4, 4, 3, padding=1, bias=False, dtype=torch.float64)
        bns = [nn.BatchNorm2d(4, dtype=torch.float64) for _ in range(2)]
        for bn in bns:
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
        if fused:
            bns = [fastdl.FusedBatchNorm2d.from_module(bn, activation="relu") for bn in bns]
            return nn.ModuleList([*bns, conv]), lambda x: bns[1](conv(bns[0](x)), x)
        return nn.ModuleList([*bns, conv]), lambda x: tF.relu(bns[1](conv(tF.relu(bns[0](x)))) + x)

    x = lay_out(torch.randn(3, 4, 5, 5, dtype=torch.float64), layout)
    results = []
    for fused in (False, True):
        torch.manual_seed(1)
        modules, run = block(fused)
        modules.train(training)
        xi = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(run(xi).square().sum(), xi, create_graph=True)
        penalty = grad_x.square().sum()
        results.append(list(torch.autograd.grad(penalty, list(modules.parameters()))) +
                       [b for m in modules for b in m.buffers() if b.is_floating_point()])
    names = [n for n, _ in modules.named_parameters()] + [n for n, b in modules.named_buffers() if b.is_floating_point()]
    for name, got, want in zip(names, results[1], results[0]):
        assert_close(name, got, want, n=reduced_over(x.shape))


def _op_samples():
    g = torch.Generator().manual_seed(2)

    def t(*shape, layout="nchw", grad=False):
        return lay_out(torch.randn(shape, generator=g), layout).requires_grad_(grad)

    C = 5
    for layout in ("nchw", "channels_last"):
        for act in ("none", "relu", "leaky_relu"):
            x, res, w, b = t(2, C, 3, 4, layout=layout, grad=True), t(2, C, 3, 4, layout=layout), t(C), t(C)
            rm, rv = torch.zeros(C), torch.ones(C)
            yield (x, w, b, res, rm, rv, True, 0.1, 1e-5, act, 0.01, True)
            yield (x, w, b, None, rm, rv, False, 0.1, 1e-5, act, 0.01, True)
            yield (x, None, None, res, None, None, True, 0.1, 1e-5, act, 0.01, False)


# opcheck backpropagates through the raw ops, which (by design) have no autograd kernel: autograd is
# the autograd.Function in fastdl/ops. Its warning about that is expected here.
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
@pytest.mark.parametrize("sample", list(_op_samples()), ids=lambda s: f"{'cl' if s[0].stride(1) == 1 else 'nchw'}"
                         f"-{s[9]}-{'train' if s[6] else 'eval'}-{'w' if s[1] is not None else 'now'}")
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.fastdl.batch_norm_act_forward.default, sample)
    x, w, *_ = sample
    act, training = sample[9], sample[6]
    with torch.no_grad():
        _, mean, invstd, mask = torch.ops.fastdl.batch_norm_act_forward(*sample[:-1], True)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastdl.batch_norm_act_backward.default,
                          (dy, x.detach(), w, mean, invstd, mask, training, act, 0.01, True))


@pytest.mark.parametrize("backend,act", [("aot_eager", "relu"), ("aot_eager", None), ("inductor", "relu")],
                         ids=["aot_eager-relu", "aot_eager-none", "inductor-relu"])
def test_compile_fullgraph(backend, act):
    torch._dynamo.reset()
    shape = (4, 6, 5, 5)
    eager, compiled = Pair(6, act, torch.float32), Pair(6, act, torch.float32)
    compiled.fused.load_state_dict(eager.fused.state_dict())
    compiled.fused = torch.compile(compiled.fused, fullgraph=True, backend=backend)
    for step in range(2):
        a, b = eager.step(shape, "channels_last", seed=step), compiled.step(shape, "channels_last", seed=step)
        for name in a:
            assert_close(name, b[name][0], a[name][0].double(), dtype=torch.float32, n=reduced_over(shape))


def test_autocast_matches_batchnorm2d():
    ref = nn.BatchNorm2d(4)
    fused = fastdl.FusedBatchNorm2d(4)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), fused(x)
    assert y.dtype == y_ref.dtype
    assert_close("y", y, y_ref.double(), dtype=y_ref.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_reduced_precision_runs_the_reported_reference(dtype):
    backend = fastdl._backends.choose("batch_norm_act", "cpu", dtype)
    assert backend.name == "reference" and "float32, float64" in backend.reason
    ref, fused = nn.BatchNorm2d(3), fastdl.FusedBatchNorm2d(3, activation="relu")
    x = torch.randn(2, 3, 4, 4).to(dtype)
    torch.testing.assert_close(fused(x), tF.relu(ref(x)))


def _bn(**kw):
    return fastdl.FusedBatchNorm2d(4, **kw)


ERRORS = [
    ("rank", lambda: _bn()(torch.randn(2, 4, 3)), ValueError, "expected 4D input"),
    ("channels", lambda: _bn()(torch.randn(2, 3, 3, 3)), ValueError, "input: expected 4 channels"),
    ("res-shape", lambda: _bn()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2)), ValueError, "residual: expected shape"),
    ("res-dtype", lambda: _bn()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3).double()), TypeError, "residual: expected dtype"),
    ("res-device", lambda: _bn()(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3, device="meta")), ValueError, "residual: expected device"),
    ("one-value", lambda: _bn()(torch.randn(1, 4, 1, 1)), ValueError, "more than 1 value per channel"),
    ("int-dtype", lambda: _bn()(torch.ones(2, 4, 3, 3, dtype=torch.int32)), TypeError, "input: expected a floating-point"),
    ("param-dtype", lambda: _bn(dtype=torch.float64)(torch.randn(2, 4, 3, 3)), TypeError, "weight: expected dtype"),
    ("activation", lambda: _bn(activation="gelu"), ValueError, "activation: expected one of"),
    ("functional-eval", lambda: F.batch_norm_act(torch.randn(2, 4, 3, 3), None, None), ValueError, "running_mean: required"),
    ("op-cpu-dtype", lambda: torch.ops.fastdl.batch_norm_act_forward(
        torch.randn(2, 4, 3, 3).half(), None, None, None, None, None, True, 0.1, 1e-5, "relu", 0.0, True),
     TypeError, "x: the CPU kernel expects float32 or float64"),
    ("op-activation", lambda: torch.ops.fastdl.batch_norm_act_forward(
        torch.randn(2, 4, 3, 3), None, None, None, None, None, True, 0.1, 1e-5, "tanh", 0.0, True),
     ValueError, "activation: expected one of"),
    ("op-weight", lambda: torch.ops.fastdl.batch_norm_act_forward(
        torch.randn(2, 4, 3, 3), torch.ones(3), None, None, None, None, True, 0.1, 1e-5, "relu", 0.0, True),
     ValueError, "weight: expected shape (4,)"),
]


@pytest.mark.parametrize("fn,exc,msg", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_named(fn, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        fn()


def test_info_reports_backends():
    rows = {(r["op"], r["device"], r["dtype"]): r for r in fastdl.info()["ops"]}
    assert rows[("batch_norm_act", "cpu", "float32")]["backend"] == "cpp"
    assert rows[("batch_norm_act", "cpu", "bfloat16")]["backend"] == "reference"
    cuda = rows[("batch_norm_act", "cuda", "float16")]
    assert cuda["backend"] == ("triton" if torch.cuda.is_available() else "unavailable")


def _python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_does_not_touch_the_gpu():
    assert _python("import torch, fastdl; print(torch.cuda.is_initialized())").strip() == "False"


def test_without_the_extension_ops_fall_back_to_the_reference():
    out = _python(
        "import sys; sys.modules['fastdl._C'] = None\n"
        "import torch, fastdl\n"
        "r = [o for o in fastdl.info()['ops'] if o['device'] == 'cpu' and o['dtype'] == 'float32'][0]\n"
        "print(r['backend'], '|', r['reason'])\n"
        "bn, ref = fastdl.FusedBatchNorm2d(3, activation='relu'), torch.nn.BatchNorm2d(3)\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "torch.testing.assert_close(bn(x), torch.relu(ref(x)))\n")
    assert out.startswith("reference | fastdl._C is not loaded")


# ---- Triton kernels through the interpreter (CPU tensors) or on the GPU -------------------------

def _triton_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


TRITON_CASES = [((2, 3, 5, 5), "nchw"), ((2, 3, 5, 5), "channels_last"), ((4, 3, 20, 20), "nchw"),
                ((4, 3, 20, 20), "channels_last"), ((3, 5, 1, 7), "strided")]


@pytest.mark.triton
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("shape", [(256, 64, 112, 112), (512, 3, 224, 224), (1, 4096, 7, 7), (2, 65536, 4, 4),
                                   (1, 1, 4096, 4096)], ids=sid)
def test_triton_launch_grids_fit_cuda_limits(shape, channels_last, monkeypatch):
    """Every launch's grid within CUDA's limits (axis 0 up to 2^31 - 1, axes 1 and 2 up to
    65535) at large shapes, with an H100's 132 SMs deciding the split: the position blocks of a
    ResNet's first BN at batch 256 (100,352 of them channels_last) once sat on axis 1."""
    from fastdl.triton import batch_norm_act as kernels

    monkeypatch.setattr(kernels, "_programs", lambda device: 4 * 132)
    N, C, H, W = shape
    cfg = kernels._config(C, N * H * W, channels_last, torch.device("cuda"))
    for grid in (kernels.stats_grid(cfg), kernels.tile_grid(cfg)):
        assert 0 < grid[0] <= 2**31 - 1 and all(0 < g <= 65535 for g in grid[1:]), (grid, cfg)
    assert cfg["grid_r"] * cfg["block_r"] >= N * H * W and cfg["grid_c"] * cfg["block_c"] >= C


@pytest.mark.triton
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["none", "relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("shape,layout", TRITON_CASES, ids=[f"{sid(s)}-{l}" for s, l in TRITON_CASES])
def test_triton_kernels_match_reference(shape, layout, act, training):
    from fastdl.triton import batch_norm_act as kernels

    dev = _triton_device()
    g = torch.Generator().manual_seed(3)
    C = shape[1]
    x, r, dy = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    x = x * 2 + 3
    w, b = torch.rand(C, generator=g, dtype=torch.float64) + 0.5, torch.randn(C, generator=g, dtype=torch.float64)
    rm, rv = torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64) + 0.5

    ref_in = [t.clone().requires_grad_() for t in (x, r, w, b)]
    rm64, rv64 = rm.clone(), rv.clone()
    y64 = activate(tF.batch_norm(ref_in[0], rm64, rv64, ref_in[2], ref_in[3], training, 0.1, 1e-5) + ref_in[1],
                   None if act == "none" else act)
    grads64 = torch.autograd.grad(y64, ref_in, dy)

    f32 = lambda t: lay_out(t.float().to(dev), layout)  # noqa: E731
    rm32, rv32 = rm.float().to(dev), rv.float().to(dev)
    y, mean, invstd, mask = kernels.forward(f32(x), w.float().to(dev), b.float().to(dev), f32(r), rm32, rv32,
                                            training, 0.1, 1e-5, act, 0.01, True)
    dx, dw, db, dres = kernels.backward(f32(dy), f32(x), w.float().to(dev), mean, invstd, mask, training, act,
                                        0.01, True)
    n = reduced_over(shape)
    assert_close("y", y, y64, dtype=torch.float32)
    assert_close("grad_x", dx, grads64[0], dtype=torch.float32)
    assert_close("grad_residual", dres if act != "none" else f32(dy), grads64[1], dtype=torch.float32)
    assert_close("grad_weight", dw, grads64[2], dtype=torch.float32, n=n)
    assert_close("grad_bias", db, grads64[3], dtype=torch.float32, n=n)
    assert_close("running_mean", rm32, rm64, dtype=torch.float32, n=n)
    assert_close("running_var", rv32, rv64, dtype=torch.float32, n=n)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


# ---- CUDA: the module on the GPU, fp32 and low precision -----------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(32, 64, 28, 28)], ids=sid)
def test_cuda_module(shape, act, layout, dtype):
    """fp32 within the table; fp16 / bf16 within twice PyTorch's own error in that dtype."""
    assert fastdl._backends.choose("batch_norm_act", "cuda", dtype).name == "triton"
    pair = Pair(shape[1], act, dtype, device="cuda")
    torch_pair = Pair(shape[1], act, dtype, device="cuda", impl=EagerBatchNormAct)
    for step, mode in enumerate((True, True, False)):
        ours = pair.train(mode).step(shape, layout, seed=step)
        theirs = torch_pair.train(mode).step(shape, layout, seed=step)
        for name, (got, want) in ours.items():
            if name == "num_batches_tracked":
                assert got.item() == want.item()
                continue
            if dtype == torch.float32:
                sums = name in ("grad_weight", "grad_bias", "running_mean", "running_var")
                assert_close(name, got, want, dtype=dtype, n=reduced_over(shape) if sums else 1)
            else:
                limit = 2 * max_error(theirs[name][0], want) + TOLERANCES[dtype][0]
                err = max_error(got, want)
                assert err <= limit, f"{name}: error {err:.3g} > 2x PyTorch's ({limit:.3g})"


@pytest.mark.skipif("bias" not in (nn.BatchNorm2d.__init__.__kwdefaults__ or {}),
                    reason="nn.BatchNorm2d(bias=False) needs torch >= 2.14")
def test_bias_false_like_batchnorm2d():
    ref = nn.BatchNorm2d(5, bias=False)
    fused = fastdl.FusedBatchNorm2d(5, bias=False, activation="relu")
    fused.load_state_dict(ref.state_dict())
    assert fused.bias is None and list(fused.state_dict()) == list(ref.state_dict())
    assert fastdl.FusedBatchNorm2d.from_module(ref).bias is None
    check(Pair(5, "relu", torch.float64, bias=False).step((3, 5, 4, 4)), torch.float64, (3, 5, 4, 4))

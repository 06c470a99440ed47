"""fastdl::rnn_forward / rnn_backward (one layer and direction, the time loop in C++) against the
PyTorch contract of fastdl/reference/rnn.py in float64: every output and every gradient, packed and
padded steps, both directions; gradcheck, opcheck, torch.compile and the error messages."""
import pytest
import torch

import fastdl  # noqa: F401  (registers the ops)
from fastdl import _extension
from fastdl.ops import rnn as ops
from fastdl.reference import rnn as reference
from fastdl.testing import assert_close

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="fastdl._C is not built")

MODES = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
# (T, N, H, batch_sizes or None)
SHAPES = [
    (4, 5, 13, None),
    (4, 5, 13, [5, 4, 2, 2]),
    (1, 1, 8, None),
    (6, 3, 33, [3, 3, 3, 2, 1, 1]),
    (3, 64, 64, [64, 40, 1]),
]


def sid(s):
    T, N, H, bs = s
    return f"T{T}-N{N}-H{H}" + ("-packed" if bs else "")


def make_inputs(mode, shape, bias=True, seed=0, dtype=torch.float64, device="cpu"):
    """(gates_x, batch_sizes, h0, c0, w_hh, b_hh), float64 leaves requiring grad, then cast."""
    T, N, H, bs = shape
    G = reference.GATES[mode]
    g = torch.Generator().manual_seed(seed)
    rows = sum(bs) if bs else T * N
    gx = torch.randn((rows, G * H) if bs else (T, N, G * H), generator=g, dtype=torch.float64)
    h0, c0 = (torch.randn(N, H, generator=g, dtype=torch.float64) for _ in range(2))
    w_hh = torch.randn(G * H, H, generator=g, dtype=torch.float64) / H ** 0.5
    b_hh = torch.randn(G * H, generator=g, dtype=torch.float64) if bias else None
    ts = [t.to(device, dtype).requires_grad_() if t is not None else None
          for t in (gx, h0, c0 if mode == "lstm" else None, w_hh, b_hh)]
    batch_sizes = torch.tensor(bs, dtype=torch.int64) if bs else None
    return ts[0], batch_sizes, ts[1], ts[2], ts[3], ts[4]


def outputs_and_grads(fn, args, seed=1):
    """fn's outputs (output, h_n, c_n) and the gradients of a random projection of them with
    respect to gates_x, h0, c0, w_hh, b_hh (None where absent)."""
    gx, bs, h0, c0, w_hh, b_hh = args
    outs = [o for o in fn(gx, bs, h0, c0, w_hh, b_hh) if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    leaves = [t for t in (gx, h0, c0, w_hh, b_hh) if t is not None]
    grads = iter(torch.autograd.grad(loss, leaves))
    return outs, [next(grads) if t is not None else None for t in (gx, h0, c0, w_hh, b_hh)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
@pytest.mark.parametrize("mode", MODES)
def test_scan_matches_reference(mode, shape, reverse, dtype, isa):
    compare_scan(mode, shape, reverse, dtype, "cpu")


def compare_scan(mode, shape, reverse, dtype, device):
    """ops.scan on `device` in `dtype` against reference.scan in float64 on the CPU: outputs and
    the gradients of every input."""
    T, N, H, _ = shape
    args = make_inputs(mode, shape, dtype=dtype, device=device)
    ref_args = [t.detach().double().cpu().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                else t for t in args]
    got, got_grads = outputs_and_grads(lambda *a: ops.scan(*a, mode, reverse), args)
    want, want_grads = outputs_and_grads(lambda *a: reference.scan(*a, mode, reverse), ref_args)
    for name, a, e in zip(("output", "h_n", "c_n"), got, want):
        assert_close(name, a, e, dtype=dtype, n=H)
    rows = args[0].numel() // args[0].shape[-1]
    for name, a, e, n in zip(("grad_gates_x", "grad_h0", "grad_c0", "grad_w_hh", "grad_b_hh"), got_grads, want_grads,
                             (H * T, H * T, H * T, rows * T, rows * T)):
        if e is not None:
            assert_close(name, a, e, dtype=dtype, n=n)


@pytest.mark.parametrize("mode", MODES)
def test_without_bias_and_workspace(mode):
    """b_hh = None matches the reference; without a gradient to take, no workspace is kept."""
    args = make_inputs(mode, SHAPES[1], bias=False)
    got, got_grads = outputs_and_grads(lambda *a: ops.scan(*a, mode, True), args)
    want, want_grads = outputs_and_grads(lambda *a: reference.scan(*a, mode, True), args)
    for a, e in zip(got + got_grads, want + want_grads):
        if e is not None:
            assert_close("output or gradient", a, e, n=64)
    gx, bs, h0, c0, w_hh, _ = args
    with torch.no_grad():
        out = torch.ops.fastdl.rnn_forward(gx, bs, h0, c0, w_hh, None, mode, False, False)
    assert out[3].shape[0] == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(3, 4, 5, None), (4, 3, 3, [3, 2, 2, 1])], ids=sid)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck_cpu_kernel(mode, shape, reverse, isa):
    gx, bs, h0, c0, w_hh, b_hh = make_inputs(mode, shape)
    leaves = [t for t in (gx, h0, c0, w_hh, b_hh) if t is not None]

    def f(*ts):
        it = iter(ts)
        gx_, h0_ = next(it), next(it)
        c0_ = next(it) if mode == "lstm" else None
        out, h_n, c_n = ops.scan(gx_, bs, h0_, c0_, next(it), next(it), mode, reverse)
        return (out, h_n) + ((c_n,) if c_n is not None else ())

    assert torch.autograd.gradcheck(f, leaves)


def _op_samples():
    for mode in MODES:
        for shape in (SHAPES[0], SHAPES[1]):
            for reverse in (False, True):
                gx, bs, h0, c0, w_hh, b_hh = make_inputs(mode, shape, dtype=torch.float32)
                yield (gx, bs, h0, c0, w_hh, b_hh, mode, reverse, True)


@pytest.mark.parametrize("sample", list(_op_samples()),
                         ids=lambda s: f"{s[6]}-{'packed' if s[1] is not None else 'padded'}-{'rev' if s[7] else 'fwd'}")
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.fastdl.rnn_forward.default, sample)
    gx, bs, h0, c0, w_hh, b_hh, mode, reverse, _ = sample
    with torch.no_grad():
        out, h_n, c_n, ws = torch.ops.fastdl.rnn_forward(*sample)
    detached = [t.detach() if t is not None else None for t in (h0, c0, w_hh)]
    torch.library.opcheck(torch.ops.fastdl.rnn_backward.default,
                          (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(h_n) if mode == "lstm" else None,
                           bs, *detached, out, ws, mode, reverse))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_compile_fullgraph(mode, backend):
    torch._dynamo.reset()
    gx, bs, h0, c0, w_hh, b_hh = make_inputs(mode, SHAPES[0], dtype=torch.float32)

    def f(gx, h0, c0, w_hh, b_hh):
        out, h_n, c_n = ops.scan(torch.tanh(gx), None, h0, c0, w_hh, b_hh, mode, False)
        return out.sum() + h_n.square().sum() + (c_n.sum() if c_n is not None else 0)

    leaves = [t for t in (gx, h0, c0, w_hh, b_hh) if t is not None]
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(gx, h0, c0, w_hh, b_hh)
    want = f(gx, h0, c0, w_hh, b_hh)
    assert_close("loss", got, want.double(), n=100)
    for name, a, e in zip(("gates_x", "h0", "c0 or w_hh", "w_hh or b_hh", "b_hh"),
                          torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        assert_close(f"grad of {name}", a, e.double(), dtype=torch.float32, n=100)


def test_double_backward_is_not_implemented():
    """create_graph=True gives the same first derivatives; differentiating them raises."""
    gx, bs, h0, c0, w_hh, b_hh = make_inputs("lstm", SHAPES[0])
    out, h_n, _ = ops.scan(gx, bs, h0, c0, w_hh, b_hh, "lstm", False)
    want = torch.autograd.grad(out.sum(), (gx, w_hh), retain_graph=True)
    got = torch.autograd.grad(out.sum(), (gx, w_hh), create_graph=True)
    for name, a, e in zip(("gates_x", "w_hh"), got, want):
        assert torch.equal(a, e), name
    with pytest.raises(NotImplementedError, match="^rnn: double backward"):
        torch.autograd.grad(got[1].square().sum(), w_hh)


def _bad_calls():
    gx, bs, h0, c0, w_hh, b_hh = (t.detach() if isinstance(t, torch.Tensor) else t
                                  for t in make_inputs("lstm", SHAPES[1], dtype=torch.float32))
    op = torch.ops.fastdl.rnn_forward

    def call(**kw):
        args = dict(gates_x=gx, batch_sizes=bs, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, mode="lstm", reverse=False,
                    save_workspace=False)
        args.update(kw)
        return lambda: op(*args.values())

    return [
        (call(mode="lstmx"), ValueError, "mode: expected one of"),
        (call(h0=h0[0]), ValueError, "h0: expected a 2-D"),
        (call(c0=None), ValueError, r"c0: expected an \(N, H\) cell state"),
        (call(c0=c0[:2]), ValueError, "c0: expected shape"),
        (call(w_hh=w_hh[:, :4]), ValueError, "w_hh: expected shape"),
        (call(w_hh=w_hh.double()), TypeError, "w_hh: expected dtype"),
        (call(b_hh=b_hh[:5]), ValueError, "b_hh: expected shape"),
        (call(gates_x=gx[:, :7]), ValueError, "gates_x: expected packed shape"),
        (call(gates_x=gx[:5]), ValueError, "gates_x: expected 13 rows"),
        (call(batch_sizes=torch.tensor([5, 5, 3, 6])), ValueError, "batch_sizes: expected positive, non-increasing"),
        (call(batch_sizes=torch.tensor([4, 4, 3, 2])), ValueError, "batch_sizes: expected positive, non-increasing"),
        (call(batch_sizes=bs.int()), ValueError, "batch_sizes: expected a 1-D int64 CPU tensor"),
        (call(batch_sizes=None), ValueError, r"gates_x: expected shape \(T, 5, 52\)"),
        (call(h0=h0.half(), c0=c0.half(), w_hh=w_hh.half(), b_hh=b_hh.half(), gates_x=gx.half()), TypeError,
         "h0: the CPU kernel expects float32 or float64"),
        (call(mode="gru", w_hh=w_hh[:39]), ValueError, "c0: expected None for mode 'gru'"),
    ]


@pytest.mark.parametrize("fn, exc, msg", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()


# ---- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("shape", SHAPES, ids=sid)
@pytest.mark.parametrize("mode", MODES)
def test_cuda_scan_matches_reference(mode, shape, reverse, dtype):
    compare_scan(mode, shape, reverse, dtype, "cuda")


def test_small_input_projections_stay_off_onednn():
    """oneDNN's fixed per-call cost loses to MKL for small GEMMs: a cell step's input projection
    (1 x 16 by 64 x 16) runs F.linear; a layer's (T * N x 512 by 2048 x 512) oneDNN, where built."""
    small, w_small = torch.randn(1, 16), torch.randn(64, 16)
    large, w_large = torch.randn(100 * 64, 512), torch.randn(2048, 512)
    assert not ops._onednn_applies(small, w_small)
    assert ops._onednn_applies(large, w_large) == (ops._HAS_ONEDNN and torch.backends.mkldnn.enabled)


# ---- rnn_cell: a cell module's step in one call (csrc/autograd/rnn_cell.cpp) -----------------------

def cell_inputs(mode, batched=True, with_state=True, bias=True, seed=0):
    """(input, h0, c0, w_ih, w_hh, b_ih, b_hh): float64 leaves requiring grad; I = 5, H = 7, N = 3."""
    G, I, H, N = reference.GATES[mode], 5, 7, 3
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).requires_grad_()
    lead = (N,) if batched else ()
    x = leaf(*lead, I)
    h0 = leaf(*lead, H) if with_state else None
    c0 = leaf(*lead, H) if with_state and mode == "lstm" else None
    return (x, h0, c0, leaf(G * H, I, scale=I ** -0.5), leaf(G * H, H, scale=H ** -0.5),
            leaf(G * H) if bias else None, leaf(G * H) if bias else None)


def reference_cell(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mode):
    """rnn_cell's contract from the reference: the projection, then one step of reference.scan."""
    batched = x.dim() == 2
    xb = x if batched else x.unsqueeze(0)
    zeros = xb.new_zeros(xb.shape[0], w_hh.shape[1])
    h = zeros if h0 is None else h0 if batched else h0.unsqueeze(0)
    c = None if mode != "lstm" else zeros if c0 is None else c0 if batched else c0.unsqueeze(0)
    _, h_n, c_n = reference.scan(torch.nn.functional.linear(xb, w_ih, b_ih).unsqueeze(0), None, h, c, w_hh, b_hh,
                                 mode, False)
    if not batched:
        h_n, c_n = h_n.squeeze(0), None if c_n is None else c_n.squeeze(0)
    return h_n, c_n


CELL_CASES = [(mode, batched, with_state, bias) for mode in MODES for batched in (True, False)
              for with_state in (True, False) for bias in (True, False)]


def cell_id(case):
    mode, batched, with_state, bias = case
    return f"{mode}-{'batched' if batched else 'unbatched'}-{'hx' if with_state else 'zeros'}" + (
        "" if bias else "-nobias")


@pytest.mark.parametrize("case", CELL_CASES, ids=cell_id)
def test_cell_matches_reference(case, isa):
    mode, batched, with_state, bias = case
    args = cell_inputs(mode, batched, with_state, bias)
    leaves = [t for t in args if t is not None]
    results = []
    for fn in (ops.cell, reference_cell):
        h, c = fn(*args, mode)
        outs = [h] if c is None else [h, c]
        g = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
        results.append(outs + list(torch.autograd.grad(loss, leaves)))
    for k, (a, e) in enumerate(zip(*results)):
        assert_close(f"{cell_id(case)} output/gradient #{k}", a, e, dtype=torch.float64, n=7 * 3)


@pytest.mark.parametrize("mode", MODES)
def test_cell_gradcheck(mode):
    args = cell_inputs(mode)
    assert torch.autograd.gradcheck(lambda *a: torch.ops.fastdl.rnn_cell(*a, mode), args)


@pytest.mark.parametrize("case", [c for c in CELL_CASES if c[3]], ids=cell_id)
def test_cell_opcheck(case):
    mode, batched, with_state, _ = case
    torch.library.opcheck(torch.ops.fastdl.rnn_cell.default, (*cell_inputs(mode, batched, with_state), mode))


def _bad_cell_calls():
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = (None if t is None else t.detach().float() for t in cell_inputs("lstm"))
    op = torch.ops.fastdl.rnn_cell

    def call(**kw):
        args = dict(input=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, mode="lstm")
        args.update(kw)
        return lambda: op(*args.values())

    return [
        (call(input=x[None]), ValueError, "input: expected 1-D or 2-D, got 3-D"),
        (call(input=x[:, :4]), ValueError, r"input: expected size 5 \(input_size\) in its last dim, got 4"),
        (call(input=x.double()), TypeError, r"input: expected dtype torch.float32 \(the module's parameters'\), "
                                            "got torch.float64"),
        (call(input=x.to("meta")), ValueError, "input: expected device cpu"),
        (call(h0=h0[:2]), ValueError, r"hx\[0\] \(h\): expected shape \(3, 7\), got \(2, 7\)"),
        (call(input=x[0], h0=h0[0, :6], c0=c0[0]), ValueError, r"hx\[0\] \(h\): expected shape \(7,\), got \(6,\)"),
        (call(c0=c0.double()), TypeError, r"hx\[1\] \(c\): expected dtype torch.float32 \(input's\)"),
        (call(c0=None), ValueError, r"hx: expected a pair \(h, c\)"),
        (call(mode="gru", c0=None, w_ih=w_ih[:21], w_hh=w_hh[:21], b_ih=b_ih[:21], b_hh=b_hh[:21], h0=h0[:1]),
         ValueError, r"hx: expected shape \(3, 7\), got \(1, 7\)"),
    ]


@pytest.mark.parametrize("fn, exc, msg", _bad_cell_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_cell_input_is_named(fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()

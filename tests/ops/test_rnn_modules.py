"""FusedLSTM / FusedGRU / FusedRNN and their cells against torch.nn's, with copied weights: outputs,
final states and every gradient (input, initial states, all weights and biases), in float64 and
float32 against nn's float64 result; packed sequences, unbatched inputs, dropout, state_dicts,
torch.compile and the error messages."""
import copy
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastdl
from fastdl.testing import assert_close

LAYERS = {"LSTM": (nn.LSTM, fastdl.FusedLSTM, {}), "GRU": (nn.GRU, fastdl.FusedGRU, {}),
          "RNN": (nn.RNN, fastdl.FusedRNN, {}), "RNN-relu": (nn.RNN, fastdl.FusedRNN, {"nonlinearity": "relu"})}
CELLS = {"LSTMCell": (nn.LSTMCell, fastdl.FusedLSTMCell, {}), "GRUCell": (nn.GRUCell, fastdl.FusedGRUCell, {}),
         "RNNCell": (nn.RNNCell, fastdl.FusedRNNCell, {}),
         "RNNCell-relu": (nn.RNNCell, fastdl.FusedRNNCell, {"nonlinearity": "relu"})}
DTYPES = [torch.float64, torch.float32]
# (T, N, input_size, hidden_size, num_layers, bidirectional, batch_first, bias)
CONFIGS = [
    (5, 3, 4, 13, 1, False, False, True),
    (4, 2, 6, 7, 2, True, True, True),
    (3, 4, 5, 9, 3, False, False, False),
    (1, 1, 3, 5, 2, True, False, True),
    (7, 2, 8, 16, 1, True, True, False),
]


def cid(c):
    T, N, I, H, L, bi, bf, bias = c
    return f"T{T}-N{N}-I{I}-H{H}-L{L}" + ("-bi" if bi else "") + ("-bf" if bf else "") + ("" if bias else "-nobias")


def twins(kind, config, dtype, device="cpu", **extra):
    """(nn module in float64, fastdl module in dtype) with the same weights."""
    ref_cls, our_cls, kw = LAYERS[kind]
    T, N, I, H, L, bi, bf, bias = config
    torch.manual_seed(0)
    ref = ref_cls(I, H, num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, dtype=torch.float64,
                  device=device, **kw, **extra)
    ours = our_cls(I, H, num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, dtype=dtype, device=device,
                   **kw, **extra)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flat_states(states):
    return list(states) if isinstance(states, tuple) else [states]


def run(module, x, hx, dout, dstates):
    """Outputs, final states and the gradients of x, hx (each state) and every parameter."""
    x = x.detach().requires_grad_()
    hx = None if hx is None else tuple(t.detach().requires_grad_() for t in hx)
    out, states = module(x, None if hx is None else (hx if len(hx) == 2 else hx[0]))
    states = flat_states(states)
    loss = (out * dout).sum() + sum((s * d).sum() for s, d in zip(states, dstates))
    leaves = [x] + list(hx or ()) + list(module.parameters())
    return [out] + states, torch.autograd.grad(loss, leaves)


def random_like(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("config", CONFIGS, ids=cid)
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_matches_nn(kind, config, with_hx, dtype):
    T, N, I, H, L, bi, bf, bias = config
    ref, ours = twins(kind, config, dtype)
    D = 2 if bi else 1
    x = random_like((N, T, I) if bf else (T, N, I), 1)
    hx = None
    if with_hx:
        hx = tuple(random_like((L * D, N, H), 2 + k) for k in range(2 if kind == "LSTM" else 1))
    dout = random_like((N, T, D * H) if bf else (T, N, D * H), 5)
    dstates = [random_like((L * D, N, H), 6 + k) for k in range(2)]
    want, want_grads = run(ref, x, hx, dout, dstates)
    cast = None if hx is None else tuple(t.to(dtype) for t in hx)
    got, got_grads = run(ours, x.to(dtype), cast, dout.to(dtype), [d.to(dtype) for d in dstates])
    for name, a, e in zip(("output", "h_n", "c_n"), got, want):
        assert_close(name, a, e, dtype=dtype, n=H * L)
    names = ["grad_input"] + [f"grad_hx[{k}]" for k in range(len(hx or ()))] + [n for n, _ in ref.named_parameters()]
    for name, a, e in zip(names, got_grads, want_grads):
        assert_close(name, a, e, dtype=dtype, n=N * T * H)


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("kind", LAYERS)
def test_packed_sequence(kind, enforce_sorted):
    """Packed in -> packed out; h_n is each sequence's state after its own last step, in the caller's
    order; nothing is computed on the padding (its gradient is zero)."""
    config = (6, 4, 5, 11, 2, True, True, True)
    ref, ours = twins(kind, config, torch.float64)
    lengths = torch.tensor([6, 4, 3, 1]) if enforce_sorted else torch.tensor([3, 6, 1, 4])
    x = random_like((4, 6, 5), 1).requires_grad_()
    hx = tuple(random_like((4, 4, 11), 2 + k).requires_grad_() for k in range(2 if kind == "LSTM" else 1))
    results = []
    for m in (ref, ours):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
        out, states = m(packed, hx if kind == "LSTM" else hx[0])
        assert type(out).__name__ == "PackedSequence"
        states = flat_states(states)
        loss = (out.data * random_like(out.data.shape, 3)).sum() + sum((s * random_like(s.shape, 4)).sum()
                                                                       for s in states)
        results.append([out.data] + states + list(torch.autograd.grad(loss, [x, *hx, *m.parameters()])))
    for k, (a, e) in enumerate(zip(*reversed(results))):
        assert_close(f"output/state/gradient #{k}", a, e, n=100)
    grad_x = results[1][1 + len(hx)]
    for n, length in enumerate(lengths):
        assert (grad_x[n, length:] == 0).all()


@pytest.mark.parametrize("kind", LAYERS)
def test_unbatched_input(kind):
    config = (5, 1, 4, 6, 2, True, False, True)
    for batch_first in (False, True):
        ref, ours = twins(kind, config[:6] + (batch_first, True), torch.float64)
        x = random_like((5, 4), 1)
        hx = tuple(random_like((4, 6), 2 + k) for k in range(2 if kind == "LSTM" else 1))
        for states in (None, hx if kind == "LSTM" else hx[0]):
            (a, sa), (b, sb) = ref(x, states), ours(x, states)
            assert b.shape == a.shape == (5, 12)
            for k, (p, q) in enumerate(zip([a] + flat_states(sa), [b] + flat_states(sb))):
                assert_close(f"output/state #{k}", q, p, n=10)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dropout(kind):
    """Eval: no dropout, equal to nn's. Training: nn's masks from the same seed (same draws, same
    order), reproducible; dropped units change the output."""
    config = (5, 3, 4, 8, 3, True, False, True)
    ref, ours = twins(kind, config, torch.float64, dropout=0.5)
    x = random_like((5, 3, 4), 1)
    ref.eval(), ours.eval()
    assert_close("eval output", ours(x)[0], ref(x)[0], n=30)
    ref.train(), ours.train()
    torch.manual_seed(7)
    want = ref(x)[0]
    torch.manual_seed(7)
    got = ours(x)[0]
    assert_close("training output", got, want, n=30)
    torch.manual_seed(7)
    assert torch.equal(ours(x)[0], got)
    assert not torch.allclose(got, ours.eval()(x)[0])


def test_dropout_keep_rate():
    """Layer 2 of a relu FusedRNN with w_ih = I, w_hh = 0 and no bias outputs relu(dropout(layer 1's
    output)), which is positive: zeros are exactly the dropped units, and kept ones are scaled by
    1 / (1 - p)."""
    p, H = 0.3, 64
    torch.manual_seed(0)
    rnn = fastdl.FusedRNN(8, H, num_layers=2, nonlinearity="relu", dropout=p)
    first = fastdl.FusedRNN(8, H, nonlinearity="relu")
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(rnn, name).uniform_(0.1, 0.2)
            getattr(first, name).copy_(getattr(rnn, name))
        rnn.weight_ih_l1.copy_(torch.eye(H)), rnn.weight_hh_l1.zero_(), rnn.bias_ih_l1.zero_(), rnn.bias_hh_l1.zero_()
    x = torch.rand(20, 16, 8)
    layer1 = first(x)[0]
    out = rnn(x)[0]
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.02
    assert_close("kept units", out[kept], (layer1 / (1 - p))[kept].double(), dtype=torch.float32, n=H)


def test_state_dicts_load_both_ways_and_from_module():
    for kind, (ref_cls, our_cls, kw) in LAYERS.items():
        ref = ref_cls(3, 5, num_layers=2, bidirectional=True, **kw)
        ours = our_cls(3, 5, num_layers=2, bidirectional=True, **kw)
        assert list(ours.state_dict()) == list(ref.state_dict())
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
        assert isinstance(ours, nn.RNNBase) and ours.mode == ref.mode
        ours.flatten_parameters()
        swapped = our_cls.from_module(ref.eval())
        assert swapped.weight_hh_l1_reverse is ref.weight_hh_l1_reverse and not swapped.training
        x = torch.randn(4, 2, 3)
        assert_close(kind, swapped(x)[0], ref(x)[0].double(), dtype=torch.float32, n=20)
    for kind, (ref_cls, our_cls, kw) in CELLS.items():
        ref = ref_cls(3, 5, **kw)
        swapped = our_cls.from_module(ref)
        assert list(swapped.state_dict()) == list(ref.state_dict()) and swapped.weight_ih is ref.weight_ih
        assert getattr(swapped, "nonlinearity", None) == getattr(ref, "nonlinearity", None)


def test_same_initialisation_as_nn():
    for ref_cls, our_cls, kw in list(LAYERS.values()) + list(CELLS.values()):
        torch.manual_seed(3)
        ref = ref_cls(3, 5, **kw)
        torch.manual_seed(3)
        ours = our_cls(3, 5, **kw)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            assert torch.equal(p, q), name


@pytest.mark.parametrize("input_size,hidden,batch", [(1, 64, 32), (3, 5, 2), (40, 8, 64)])
def test_parameter_gradients_have_the_parameters_strides(input_size, hidden, batch):
    """The gradient layout contract, which DistributedDataParallel's buckets rely on (it warns, and
    copies, otherwise): oneDNN's weight-gradient GEMM may return a transposed result."""
    for cls in (fastdl.FusedLSTM, fastdl.FusedGRU, fastdl.FusedRNN):
        m = cls(input_size, hidden, num_layers=2, bidirectional=True, batch_first=True)
        m(torch.randn(batch, 16, input_size))[0].sum().backward()
        for name, p in m.named_parameters():
            assert p.grad.stride() == p.stride(), (cls.__name__, name)


def test_proj_size_is_not_implemented():
    with pytest.raises(NotImplementedError, match="proj_size"):
        fastdl.FusedLSTM(4, 8, proj_size=3)
    with pytest.raises(NotImplementedError, match="proj_size"):
        fastdl.FusedLSTM.from_module(nn.LSTM(4, 8, proj_size=3))


@pytest.mark.skipif(not fastdl._extension.loaded(), reason="the reference path is differentiable twice")
def test_double_backward_is_not_implemented():
    m = fastdl.FusedGRU(3, 4)
    x = torch.randn(2, 1, 3, requires_grad=True)
    grad_x, = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="^rnn: double backward"):
        grad_x.square().sum().backward()


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", CELLS)
def test_cell_loop_matches_nn(kind, bias, dtype):
    """A Python loop of cells over 4 steps: outputs and every gradient, batched and unbatched."""
    ref_cls, our_cls, kw = CELLS[kind]
    torch.manual_seed(0)
    ref = ref_cls(5, 13, bias=bias, dtype=torch.float64, **kw)
    ours = our_cls(5, 13, bias=bias, dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict())
    lstm = kind == "LSTMCell"
    for batch in ((3,), ()):
        xs = random_like((4, *batch, 5), 1)
        hx = tuple(random_like((*batch, 13), 2 + k) for k in range(2 if lstm else 1))
        results = []
        for m, dt in ((ref, torch.float64), (ours, dtype)):
            x = xs.to(dt).requires_grad_()
            h = tuple(t.to(dt).requires_grad_() for t in hx)
            state = h if lstm else h[0]
            outs = []
            for t in range(4):
                state = m(x[t], state)
                outs.append(state[0] if lstm else state)
            loss = sum((o * random_like(o.shape, 10 + t).to(dt)).sum() for t, o in enumerate(outs))
            if lstm:
                loss = loss + state[1].sum()
            results.append(outs + list(torch.autograd.grad(loss, [x, *h, *m.parameters()])))
        for k, (a, e) in enumerate(zip(results[1], results[0])):
            assert_close(f"{kind} output/gradient #{k}", a, e, dtype=dtype, n=4 * 13 * 3)


def test_cell_default_state_is_zeros():
    for kind, (ref_cls, our_cls, kw) in CELLS.items():
        ref = ref_cls(4, 6, **kw)
        ours = our_cls.from_module(ref)
        x = torch.randn(2, 4)
        for a, e in zip(flat_states(ours(x)), flat_states(ref(x))):
            assert_close(kind, a, e.double(), dtype=torch.float32, n=4)


@pytest.mark.parametrize("kind", CELLS)
def test_cell_step_is_one_fused_call(kind, monkeypatch):
    """Without autocast a cell's step is one fastdl::rnn_cell call (fastdl.ops.rnn.cell); under
    autocast it takes the general path (projection, then the step), as the layers do."""
    _, our_cls, kw = CELLS[kind]
    cell = our_cls(4, 6, **kw)
    calls = []
    real = fastdl.ops.rnn.cell
    monkeypatch.setattr(fastdl.ops.rnn, "cell", lambda *a: calls.append(a[-1]) or real(*a))
    for x in (torch.randn(3, 4), torch.randn(4)):
        cell(x)
    assert calls == [calls[0]] * 2 and calls[0] in ("lstm", "gru", "rnn_tanh", "rnn_relu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cell(torch.randn(3, 4))
    assert len(calls) == 2


class _Twice(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "LSTM", "GRU"])
def test_parametrized_weights_are_read(kind):
    """A parametrization (torch.nn.utils.parametrize) replaces a weight with a computed one; the
    drop-in reads it as nn's module does, in the step and in the gradient of the original."""
    ref_cls, our_cls, kw = {**CELLS, **LAYERS}[kind]
    torch.manual_seed(0)
    ref = ref_cls(4, 6, dtype=torch.float64, **kw)
    ours = our_cls.from_module(copy.deepcopy(ref))
    name = "weight_hh" if kind.endswith("Cell") else "weight_hh_l0"
    for m in (ref, ours):
        torch.nn.utils.parametrize.register_parametrization(m, name, _Twice())
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    results = []
    for m in (ref, ours):
        out = m(x[0]) if kind.endswith("Cell") else m(x)[0]
        out = out[0] if isinstance(out, tuple) else out
        original = getattr(m.parametrizations, name).original
        results.append([out, torch.autograd.grad(out.square().sum(), original)[0]])
    for what, a, e in zip(("output", "gradient of the original weight"), results[1], results[0]):
        assert_close(f"{kind} {what}", a, e, dtype=torch.float64, n=6)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    lstm, cell = fastdl.FusedLSTM(4, 8, num_layers=2, batch_first=True), fastdl.FusedGRUCell(8, 8)

    def f(x):
        out, (h, c) = lstm(x)
        return cell(out[:, -1], h[-1]).sum() + c.sum()

    x = torch.randn(3, 5, 4, requires_grad=True)
    got = torch.compile(f, fullgraph=True, backend=backend)(x)
    want = f(x)
    assert_close("loss", got, want.double(), dtype=torch.float32, n=100)
    params = [x, *lstm.parameters(), *cell.parameters()]
    for k, (a, e) in enumerate(zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params))):
        assert_close(f"gradient #{k}", a, e.double(), dtype=torch.float32, n=100)


def _bad_calls():
    lstm, gru, cell = fastdl.FusedLSTM(4, 6, num_layers=2), fastdl.FusedGRU(4, 6), fastdl.FusedLSTMCell(4, 6)
    x = torch.randn(5, 3, 4)
    h = torch.zeros(2, 3, 6)
    return [
        (lambda: lstm(torch.randn(5, 3, 7)), ValueError, r"input: expected size 4 \(input_size\)"),
        (lambda: lstm(torch.randn(5, 3, 2, 4)), ValueError, "input: expected 2-D or 3-D, got 4-D"),
        (lambda: lstm(x.double()), TypeError, "input: expected dtype torch.float32"),
        (lambda: lstm(x, h), TypeError, r"hx: expected a pair \(h_0, c_0\)"),
        (lambda: lstm(x, (h, torch.zeros(2, 4, 6))), ValueError, r"hx\[1\] \(c_0\): expected shape \(2, 3, 6\)"),
        (lambda: lstm(x, (h.double(), h)), TypeError, r"hx\[0\] \(h_0\): expected dtype torch.float32"),
        (lambda: lstm(x, (h.to("meta"), h)), ValueError, r"hx\[0\] \(h_0\): expected device cpu"),
        (lambda: gru(x, torch.zeros(2, 3, 6)), ValueError, r"hx: expected shape \(1, 3, 6\)"),
        (lambda: gru(x[0], torch.zeros(1, 3, 6)), ValueError, r"hx: expected shape \(1, 6\)"),
        (lambda: cell(torch.randn(3, 5)), ValueError, r"input: expected size 4 \(input_size\)"),
        (lambda: cell(torch.randn(3, 4), torch.zeros(3, 6)), TypeError, r"hx: expected a pair \(h, c\)"),
        (lambda: cell(torch.randn(3, 4), (torch.zeros(2, 6), torch.zeros(3, 6))), ValueError,
         r"hx\[0\] \(h\): expected shape \(3, 6\)"),
    ]


@pytest.mark.parametrize("fn, exc, msg", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_is_named(fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()


def test_cpu_reduced_precision_runs_the_reported_reference():
    row = [r for r in fastdl.info()["ops"] if r["op"] == "rnn" and r["device"] == "cpu" and r["dtype"] == "bfloat16"][0]
    assert row["backend"] == "reference" and "float32, float64" in row["reason"]
    ref = nn.GRU(3, 5)
    ours = fastdl.FusedGRU(3, 5, dtype=torch.bfloat16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    assert (ours(x.bfloat16())[0].float() - ref(x)[0]).abs().max() < 0.05


# ---- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=cid)
@pytest.mark.parametrize("kind", LAYERS)
def test_cuda_layer_matches_nn(kind, config, dtype):
    """fp32 to the tolerance table; fp16 / bf16 within twice nn's own error (cuDNN) in that dtype."""
    T, N, I, H, L, bi, bf, bias = config
    ref, ours = twins(kind, config, dtype, device="cuda")
    D = 2 if bi else 1
    x = random_like((N, T, I) if bf else (T, N, I), 1).cuda()
    dout = random_like((N, T, D * H) if bf else (T, N, D * H), 5).cuda()
    dstates = [random_like((L * D, N, H), 6 + k).cuda() for k in range(2)]
    want, want_grads = run(ref, x, None, dout, dstates)
    got, got_grads = run(ours, x.to(dtype), None, dout.to(dtype), [d.to(dtype) for d in dstates])
    if dtype == torch.float32:
        for k, (a, e) in enumerate(zip(got + list(got_grads), want + list(want_grads))):
            assert_close(f"output/state/gradient #{k}", a, e, dtype=dtype, n=N * T * H)
        return
    theirs_module = LAYERS[kind][0](I, H, num_layers=L, bidirectional=bi, batch_first=bf, bias=bias, device="cuda",
                                    dtype=dtype, **LAYERS[kind][2])
    theirs_module.load_state_dict(ref.state_dict())
    theirs, theirs_grads = run(theirs_module, x.to(dtype), None, dout.to(dtype), [d.to(dtype) for d in dstates])
    for k, (a, t, e) in enumerate(zip(got + list(got_grads), theirs + list(theirs_grads), want + list(want_grads))):
        ours_err, torch_err = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert ours_err <= 2 * torch_err + 1e-3, f"#{k}: error {ours_err:.3g}, PyTorch's {torch_err:.3g}"


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_cpu_autocast_follows_nn(kind):
    """Under torch.autocast("cpu", bfloat16) the float32 parameters get float32 gradients, and the
    output has nn's dtype (bf16 where nn's is, float32 where nn keeps it) and is within twice nn's
    own error of nn's float32 result (plus 1e-3). Where nn's module itself cannot run under bf16
    autocast on this CPU (oneDNN's bf16 LSTM wants avx512_bf16), the comparison with it is skipped."""
    ref_cls, ours_cls, kw = {**LAYERS, **CELLS}[kind]
    torch.manual_seed(0)
    ref = ref_cls(8, 16, **kw)
    ours = ours_cls.from_module(copy.deepcopy(ref))
    x = torch.randn(5, 3, 8) if kind in LAYERS else torch.randn(3, 8)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # the output (layers), h (LSTMCell)
    want = first(ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = first(ours(x))
    got.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            theirs = first(ref(x))
        except RuntimeError as e:
            pytest.skip(f"torch's own nn.{kind} cannot run under CPU bf16 autocast on this machine: {e}")
    assert got.dtype == theirs.dtype, f"{kind}: {got.dtype}, nn's {theirs.dtype}"
    ours_err, torch_err = (got.double() - want).abs().max().item(), (theirs.double() - want).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, f"error {ours_err:.3g}, PyTorch's {torch_err:.3g}"

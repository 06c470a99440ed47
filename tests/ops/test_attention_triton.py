"""The Triton attention kernels (fastdl/triton/attention.py) against the float64 reference.

The launchers `forward` / `backward` are called directly: through the Triton interpreter on CPU
tensors without a GPU (tests/conftest.py sets TRITON_INTERPRET), on CUDA tensors with one. Shapes
are small and not multiples of the interpreter's blocks (16 and 32), so boundary blocks are hit.
"""
import dataclasses
import math

import pytest
import torch

from fastdl.reference import attention as reference
from fastdl.testing import TOLERANCES, assert_close, max_error

pytest.importorskip("triton")
from fastdl.triton import attention as kernels  # noqa: E402

pytestmark = pytest.mark.triton
FP32 = torch.float32


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    H: int = 2
    Hkv: int = 2
    L: int = 17
    S: int = 33
    D: int = 16
    causal: bool = False
    mask: str = ""  # "bcast": (1, 1, L, S); "full": (N, H, L, S); each with a row all -inf
    padding: bool = False  # key_padding_mask, batch 1 wholly masked
    lengths: tuple = ()  # key_lengths
    dropout: float = 0.0
    packed: bool = False  # q, k, v: views of one (N, L, 3, H, D) tensor (needs L == S, H == Hkv)

    @property
    def id(self):
        parts = [f"N{self.N}-H{self.H}" + (f"-Hkv{self.Hkv}" if self.Hkv != self.H else ""),
                 f"L{self.L}-S{self.S}-D{self.D}"]
        parts += ["causal"] * self.causal + [f"mask_{self.mask}"] * bool(self.mask) + ["padding"] * self.padding
        parts += [f"lengths{'_'.join(map(str, self.lengths))}"] * bool(self.lengths)
        parts += [f"dropout{self.dropout}"] * bool(self.dropout) + ["packed"] * self.packed
        return "-".join(parts)


CASES = [
    Case(),
    Case(L=33, S=17),
    Case(causal=True),
    Case(L=33, S=17, causal=True),
    Case(L=40, S=40, causal=True),
    Case(padding=True),
    Case(lengths=(0, 13)),
    Case(L=33, S=33, causal=True, lengths=(33, 0)),
    Case(mask="bcast"),
    Case(mask="full", causal=True),
    Case(dropout=0.3),
    Case(H=4, Hkv=2, causal=True, padding=True, dropout=0.2),
    Case(D=40),
    Case(S=17, D=72),
    Case(H=4, Hkv=2),
    Case(H=4, Hkv=1, L=33, S=17, causal=True),
    Case(L=33, S=33, D=40, packed=True),
    Case(H=4, Hkv=2, L=33, S=40, D=40, causal=True, mask="full", padding=True, lengths=(40, 25), dropout=0.1),
]


def _inputs(case, g):
    """fp32 (q, k, v, grad_out, attn_mask, key_padding_mask, key_lengths) on CPU."""
    N, H, Hkv, L, S, D = case.N, case.H, case.Hkv, case.L, case.S, case.D
    if case.packed:
        qkv = torch.randn(N, L, 3, H, D, generator=g)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        grad_out = torch.randn(N, L, H, D, generator=g).transpose(1, 2)
    else:
        q = torch.randn(N, H, L, D, generator=g)
        k, v = (torch.randn(N, Hkv, S, D, generator=g) for _ in range(2))
        grad_out = torch.randn(N, H, L, D, generator=g)
    attn_mask = None
    if case.mask:
        attn_mask = torch.randn((1, 1, L, S) if case.mask == "bcast" else (N, H, L, S), generator=g)
        attn_mask[..., 3, :] = -math.inf  # one row with no key left
        attn_mask[..., 5, ::4] = -math.inf
    key_padding_mask = None
    if case.padding:
        key_padding_mask = torch.rand(N, S, generator=g) > 0.3
        key_padding_mask[1] = False
    key_lengths = torch.tensor(case.lengths) if case.lengths else None
    return q, k, v, grad_out, attn_mask, key_padding_mask, key_lengths


def _to(t, dev):
    return t.to(dev) if t is not None else None


def _reference(q, k, v, grad_out, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p, seed):
    """(out, lse, grad_q, grad_k, grad_v) of fastdl.reference.attention in float64, on q's device."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    attn_mask = attn_mask.double() if attn_mask is not None else None
    out, lse = reference.attention(q, k, v, attn_mask, key_padding_mask, key_lengths, is_causal, scale, dropout_p,
                                   seed)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad_out.double()))


def _check_lse(lse, want):
    lse, want = lse.cpu(), want.cpu()
    dead = torch.isinf(want)
    assert torch.equal(torch.isinf(lse), dead) and bool((lse[dead] > 0).all()), \
        "lse: +inf must mark exactly the rows with no attended key"
    assert_close("lse", lse[~dead], want[~dead], dtype=FP32)


def _stored_like_out(t):
    """Is t (N, heads, len, D) stored (N, len, heads, D)-contiguous?"""
    return t.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_reference(case):
    dev = _device()
    g = torch.Generator().manual_seed(0)
    q, k, v, grad_out, attn_mask, kpm, lengths = _inputs(case, g)
    scale = 1.0 / math.sqrt(case.D)
    seed = 1234
    want = _reference(q, k, v, grad_out, attn_mask, kpm, lengths, case.causal, scale, case.dropout, seed)

    q, k, v, grad_out, attn_mask, kpm, lengths = (_to(t, dev) for t in (q, k, v, grad_out, attn_mask, kpm, lengths))
    out, lse = kernels.forward(q, k, v, attn_mask, kpm, lengths, case.causal, scale, case.dropout, seed)
    grads = kernels.backward(grad_out, q, k, v, out, lse, attn_mask, kpm, lengths, case.causal, scale,
                             case.dropout, seed)

    group = case.H // case.Hkv
    assert_close("out", out, want[0], dtype=FP32, n=case.S)
    _check_lse(lse, want[1])
    assert_close("grad_q", grads[0], want[2], dtype=FP32, n=case.S)
    assert_close("grad_k", grads[1], want[3], dtype=FP32, n=case.L * group)
    assert_close("grad_v", grads[2], want[4], dtype=FP32, n=case.L * group)
    assert lse.dtype == FP32 and lse.is_contiguous()
    assert all(_stored_like_out(t) for t in (out, *grads))


@pytest.mark.parametrize("seed", [0, 2**32 + 5, 2**63 - 1, -7], ids=lambda s: f"seed{s}")
def test_dropout_mask_is_the_reference_hash(seed):
    """With q = k = 0 every probability is 1 / S; with v = I (D = S) out[i, j] = keep_ij / (S (1 - p)),
    and with grad_out = I (D >= L) grad_v[j, i] = keep_ij / (S (1 - p)): both kernels' masks, bit for bit."""
    dev = _device()
    N, H, L, S, p = 2, 3, 17, 32, 0.3
    zeros = torch.zeros(N, H, L, S, device=dev)
    eye = torch.eye(S, device=dev).expand(N, H, S, S)
    grad_out = torch.eye(L, S, device=dev).expand(N, H, L, S)
    out, lse = kernels.forward(zeros, zeros[:, :, :1].expand(N, H, S, S), eye, None, None, None, False, 1.0, p, seed)
    _, _, grad_v = kernels.backward(grad_out, zeros, zeros[:, :, :1].expand(N, H, S, S), eye, out, lse, None, None,
                                    None, False, 1.0, p, seed)
    keep = reference.dropout_keep(seed, N, H, L, S, p, dev)
    assert torch.equal(out > 0, keep), "forward's dropout mask differs from reference.dropout_keep"
    assert torch.equal(grad_v[:, :, :, :L] > 0, keep.transpose(-1, -2)), "backward regenerates another mask"
    assert_close("out", out, keep.double() / (S * (1 - p)), dtype=FP32)
    assert 0.6 < keep.float().mean().item() < 0.8


def test_backward_is_deterministic():
    case = Case(H=4, Hkv=2, L=33, S=40, causal=True, padding=True)
    dev = _device()
    q, k, v, grad_out, _, kpm, _ = (_to(t, dev) for t in _inputs(case, torch.Generator().manual_seed(1)))
    out, lse = kernels.forward(q, k, v, None, kpm, None, True, 0.25, 0.1, 5)
    first = kernels.backward(grad_out, q, k, v, out, lse, None, kpm, None, True, 0.25, 0.1, 5)
    second = kernels.backward(grad_out, q, k, v, out, lse, None, kpm, None, True, 0.25, 0.1, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_float64_is_refused_by_name():
    q = torch.zeros(1, 1, 2, 16, dtype=torch.float64, device=_device())
    with pytest.raises(TypeError, match="query: .*float64"):
        kernels.forward(q, q, q, None, None, None, False, 1.0, 0.0, 0)


# ---- on the GPU: fp16 / bf16 within twice PyTorch's own error ------------------------------------

def _eager(q, k, v, key_padding_mask, is_causal, scale):
    """Attention as plain PyTorch ops in q's dtype (scores, softmax and products all in that dtype)."""
    s = reference.scores(q, k, None, key_padding_mask, None, is_causal, scale)
    return torch.matmul(torch.softmax(s, -1), v.repeat_interleave(q.shape[1] // v.shape[1], dim=1))


GPU_CASES = [(dtype, D, L, causal) for dtype in (torch.float16, torch.bfloat16, torch.float32) for D in (64, 128)
             for L in (128, 1000) for causal in (False, True)]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,D,L,causal", GPU_CASES,
                         ids=[f"N2-H4-Hkv2-L{L}-D{D}-{DTYPE_IDS[t]}-{'causal' if c else 'full'}-padding"
                              for t, D, L, c in GPU_CASES])
def test_cuda_within_twice_pytorch_error(dtype, D, L, causal):
    """fp32 within the table; fp16 / bf16: the kernel's error against float64 at most twice that of
    PyTorch ops in the same dtype (flash-attention's rule), for out and every gradient."""
    _check_twice_pytorch_error(dtype, D, L, causal, tf32=False)


@pytest.mark.cuda
@pytest.mark.parametrize("D,L,causal", [(64, 1000, False), (128, 1000, True)], ids=["D64-full", "D128-causal"])
def test_cuda_tf32_within_twice_pytorch_error(D, L, causal):
    """fp32 with TF32 allowed (tensor-core dots): at most twice the error of PyTorch ops under the
    same setting (their matmuls are TF32 too), as for fp16 / bf16."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_twice_pytorch_error(torch.float32, D, L, causal, tf32=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _check_twice_pytorch_error(dtype, D, L, causal, tf32):
    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, Hkv, scale = 2, 4, 2, 1.0 / math.sqrt(D)
    q = torch.randn(N, H, L, D, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(N, Hkv, L, D, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    grad_out = torch.randn(N, H, L, D, generator=g, device="cuda", dtype=dtype)
    kpm = torch.ones(N, L, dtype=torch.bool, device="cuda")
    kpm[1, 2 * L // 3:] = False  # key 0 is always attended: no row is left empty
    want = _reference(q, k, v, grad_out, None, kpm, None, causal, scale, 0.0, 0)
    out, lse = kernels.forward(q, k, v, None, kpm, None, causal, scale, 0.0, 0)
    got = (out, *kernels.backward(grad_out, q, k, v, out, lse, None, kpm, None, causal, scale, 0.0, 0))
    names = ("out", "grad_q", "grad_k", "grad_v")
    want = (want[0], *want[2:])
    if dtype == torch.float32 and not tf32:
        for name, a, b, n in zip(names, got, want, (L, L, L * H // Hkv, L * H // Hkv)):
            assert_close(name, a, b, dtype=dtype, n=n)
        return
    qe, ke, ve = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out_e = _eager(qe, ke, ve, kpm, causal, scale)
    theirs = (out_e, *torch.autograd.grad(out_e, (qe, ke, ve), grad_out))
    for name, a, b, t in zip(names, got, want, theirs):
        limit = 2 * max_error(t, b) + TOLERANCES[dtype][0]
        err = max_error(a, b)
        assert err <= limit, f"{name}: error {err:.3g} > twice PyTorch's {dtype} error ({limit:.3g})"


@pytest.mark.parametrize("name", ["_forward_kernel", "_dkdv_kernel", "_dq_kernel"])
def test_autotune_key_holds_every_variant(name):
    """A config tuned on the plain variant must not be reused for a masked / dropout one: the
    autotuner's key names every constexpr of the kernel except the block sizes it tunes."""
    import inspect

    tuner = getattr(kernels, name)
    params = inspect.signature(tuner.fn.fn).parameters  # the Python function under the JIT / interpreter
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert constexprs - {"BLOCK_M", "BLOCK_N"} <= set(tuner.keys), constexprs - set(tuner.keys)
    assert {"L_BUCKET", "S_BUCKET"} <= set(tuner.keys)  # lengths, bucketed to powers of two


def test_bucketed_lengths_share_a_config():
    """L and S enter the autotune key as their next powers of two: L = 600 and L = 1000 share a
    tuned config, L = 1100 does not."""
    def key_args(L):
        q = torch.empty(1, 2, L, 64, device="meta")
        return kernels._common_args(q, q, None, None, None, False, 0.125, 0.0, 0)[2]
    assert key_args(600)["L_BUCKET"] == key_args(1000)["L_BUCKET"] == 1024
    assert key_args(1100)["L_BUCKET"] == 2048


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_precision_follows_torch(tf32):
    """fp32 dots are TF32 exactly when torch allows TF32 for fp32 matmuls (what
    torch.set_float32_matmul_precision("high") sets); half-precision inputs ignore the setting."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert kernels.precision(torch.float32) == ("tf32" if tf32 else "ieee")
        assert kernels.precision(torch.bfloat16) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_info_reports_fp32_dot_precision():
    import fastdl

    def reason():
        return [r for r in fastdl.info()["ops"] if r["op"] == "attention" and r["device"] == "cuda"
                and r["dtype"] == "float32"][0]["reason"]
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert "TF32 dots" in reason()
        torch.backends.cuda.matmul.allow_tf32 = False
        assert "IEEE fp32 dots" in reason()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved

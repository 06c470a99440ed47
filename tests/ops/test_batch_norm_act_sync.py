"""Synchronized batch norm (FusedBatchNorm2d(process_group=...)) and its statistics op.

Two gloo processes, each with its slice of a batch (of unequal sizes), must compute what one
FusedBatchNorm2d / nn.BatchNorm2d computes on the whole batch, in float64: each slice of the output
and of grad_x / grad_residual, the running statistics, and (summed over the processes, as the
gradient of a sum of their losses) grad_weight and grad_bias.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as tF

import fastdl
from fastdl.distributed import run_ranks
from fastdl.testing import assert_close, lay_out

SPLIT = (3, 2)  # the batch's rows on rank 0 and rank 1
CASES = [(act, residual, layout, affine) for act in (None, "relu", "relu6", "leaky_relu")
         for residual in (True, False) for layout in ("nchw", "channels_last") for affine in (True, False)
         if (residual or act == "relu") and (affine or layout == "nchw")]


def cid(case):
    act, residual, layout, affine = case
    return f"{act}-{'res' if residual else 'nores'}-{layout}-{'affine' if affine else 'noaffine'}"


def inputs(case, seed=0):
    """x, residual, dy for the whole batch (sum(SPLIT), 3, 4, 5) and weight / bias, float64."""
    g = torch.Generator().manual_seed(seed)
    x, res, dy = (torch.randn(sum(SPLIT), 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    w, b = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)
    return x * 2 + 1, res, dy, w, b


def run_case(bn, case, x, res, dy, steps=2):
    """Two training steps of bn on (x, residual): (output, grads of x / residual / weight / bias, the
    running statistics), each gradient None when it does not apply."""
    act, residual, layout, affine = case
    x, res, dy = (lay_out(t, layout) for t in (x, res, dy))
    x.requires_grad_()
    res.requires_grad_(residual)
    for _ in range(steps):
        y = bn(x, res if residual else None)
    params = [x] + ([res] if residual else []) + ([bn.weight, bn.bias] if affine else [])
    grads = list(torch.autograd.grad(y, params, dy))
    gx = grads.pop(0)
    gres = grads.pop(0) if residual else None
    gw, gb = grads if affine else (None, None)
    return dict(y=y.detach(), x=gx, residual=gres, weight=gw, bias=gb, running_mean=bn.running_mean,
                running_var=bn.running_var, channels_last=y.is_contiguous(memory_format=torch.channels_last))


def make_bn(case, w, b, process_group=None):
    act, _, _, affine = case
    bn = fastdl.FusedBatchNorm2d(3, affine=affine, activation=act, process_group=process_group).double()
    if affine:
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    return bn


def _sync_worker(rank, world):
    import torch.distributed as dist

    results = {}
    for case in CASES:
        x, res, dy, w, b = inputs(case)
        rows = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
        bn = make_bn(case, w, b, dist.group.WORLD)
        out = run_case(bn, case, x[rows], res[rows], dy[rows])
        for name in ("weight", "bias"):  # the gradient of the sum of the processes' losses
            if out[name] is not None:
                dist.all_reduce(out[name])
        results[cid(case)] = out
    bn = fastdl.FusedBatchNorm2d(3, process_group=dist.group.WORLD)
    copied = copy.deepcopy(torch.nn.Sequential(bn))[0]
    results["deepcopy shares the group"] = copied.process_group is bn.process_group and copied is not bn
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    grad_x, = torch.autograd.grad(bn(x).square().sum(), x, create_graph=True)
    try:
        grad_x.square().sum().backward()
        results["double backward refused"] = "no error"
    except NotImplementedError as e:
        results["double backward refused"] = str(e)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_sync_worker, 2)


@pytest.mark.parametrize("case", CASES, ids=cid)
def test_two_processes_match_one_over_the_whole_batch(two_ranks, case):
    x, res, dy, w, b = inputs(case)
    act, residual, layout, affine = case
    expected = run_case(make_bn(case, w, b), case, x, res, dy)
    # and the fused module on the whole batch is nn.BatchNorm2d + add + activation
    ref = nn.BatchNorm2d(3, affine=affine).double()
    if affine:
        ref.load_state_dict(make_bn(case, w, b).state_dict())
    for _ in range(2):
        z = ref(x) + (res if residual else 0)
    z = {"relu": tF.relu, "relu6": tF.relu6, "leaky_relu": tF.leaky_relu, None: lambda t: t}[act](z)
    assert_close("whole-batch y", expected["y"], z.detach(), dtype=torch.float64)
    ranks = [r[cid(case)] for r in two_ranks]
    for name in ("y", "x", "residual"):
        if expected[name] is not None:
            got = torch.cat([r[name] for r in ranks])
            assert_close(name, got, expected[name], dtype=torch.float64)
    for name in ("weight", "bias", "running_mean", "running_var"):
        for r in ranks:
            if expected[name] is not None:
                assert_close(name, r[name], expected[name], dtype=torch.float64, n=sum(SPLIT) * 20)
    assert all(r["channels_last"] == (layout == "channels_last") for r in ranks)


def test_deepcopy_shares_the_process_group(two_ranks):
    assert all(r["deepcopy shares the group"] for r in two_ranks)


def test_double_backward_is_refused(two_ranks):
    """A second derivative through synchronized batch norm raises, naming the op (never a wrong one)."""
    for r in two_ranks:
        assert r["double backward refused"].startswith("batch_norm_act with process_group: double backward")


def test_the_sync_test_can_fail():
    """Guard: the per-rank statistics of an unsynchronized module are not the whole batch's."""
    case = (None, False, "nchw", True)
    x, res, dy, w, b = inputs(case)
    local = run_case(make_bn(case, w, b), case, x[:SPLIT[0]], res[:SPLIT[0]], dy[:SPLIT[0]])
    whole = run_case(make_bn(case, w, b), case, x, res, dy)
    assert (local["y"] - whole["y"][:SPLIT[0]]).abs().max() > 1e-3


# ---- the statistics op ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (1, 8, 3, 3), (2, 7, 13, 11), (6, 4, 1, 1), (5, 3), (2, 3, 7)],
                         ids=str)
def test_stats_op(shape, layout, dtype):
    if len(shape) != 4 and layout != "nchw":
        pytest.skip("memory formats are 4-D")
    x = lay_out(torch.randn(shape, dtype=torch.float64) * 3 + 5, layout)
    mean, m2 = torch.ops.fastdl.batch_norm_stats(x.to(dtype))
    dims = [d for d in range(x.dim()) if d != 1]
    n = x.numel() // x.shape[1]
    var, expected_mean = torch.var_mean(x, dim=dims, correction=0)
    assert mean.dtype == dtype and m2.dtype == dtype
    assert_close("mean", mean, expected_mean, dtype=dtype, n=n)
    assert_close("m2 / n", m2 / n, var, dtype=dtype, n=n)


@pytest.mark.triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stats_triton(layout):
    from fastdl.triton import batch_norm_act as kernels

    x = lay_out(torch.randn(4, 3, 20, 20, dtype=torch.float64) * 3 + 5, layout)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    mean, m2 = kernels.stats(x.float().to(dev))
    var, expected_mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    assert_close("mean", mean, expected_mean, dtype=torch.float32, n=1600)
    assert_close("m2 / n", m2 / 1600, var, dtype=torch.float32, n=1600)


def test_stats_opcheck():
    for x in (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
              torch.randn(6, 4)):
        torch.library.opcheck(torch.ops.fastdl.batch_norm_stats.default, (x,))


def test_stats_bad_input():
    with pytest.raises(ValueError, match="x: expected at least one value per channel"):
        torch.ops.fastdl.batch_norm_stats(torch.randn(0, 3, 2, 2))
    with pytest.raises(TypeError, match="x: the CPU kernel expects float32 or float64"):
        torch.ops.fastdl.batch_norm_stats(torch.randn(2, 3, 2, 2).half())


# ---- errors -------------------------------------------------------------------------------------

def test_without_an_initialized_group_the_error_names_process_group():
    bn = fastdl.FusedBatchNorm2d(3, process_group=object())
    with pytest.raises(RuntimeError, match="process_group: torch.distributed is not initialized"):
        bn(torch.randn(2, 3, 4, 4))
    bn.eval()  # eval normalizes with the running statistics: nothing to synchronize
    assert bn(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    # nor without them (batch statistics in eval): nn.SyncBatchNorm synchronizes in train mode only
    bn = fastdl.FusedBatchNorm2d(3, track_running_stats=False, process_group=object()).eval()
    assert bn(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)


def test_reference_backend_is_not_implemented():
    bn = fastdl.FusedBatchNorm2d(3, process_group=object()).bfloat16()
    with pytest.raises(NotImplementedError, match="process_group: synchronized batch statistics"):
        bn(torch.randn(2, 3, 4, 4, dtype=torch.bfloat16))


def test_convert_sync_bn_needs_a_group():
    with pytest.raises(RuntimeError, match="sync_bn=True: torch.distributed is not initialized"):
        fastdl.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()), sync_bn=True)


def test_convert_sync_bn_with_a_group():
    group = object()  # any group object: it is only stored until training runs
    model, report = fastdl.convert(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3)),
                                   sync_bn=True, process_group=group, report=True)
    bns = [m for m in model.modules() if isinstance(m, fastdl.FusedBatchNorm2d)]
    assert len(bns) == 2 and all(m.process_group is group for m in bns)
    assert len(report.synchronized) == 2 and "2 batch norms synchronized" in str(report)
    assert "process_group=synchronized" in repr(model)


def test_sync_batch_norm_module_is_kept_and_reported():
    model, report = fastdl.convert(nn.Sequential(nn.SyncBatchNorm(3)), report=True)
    assert type(model[0]) is nn.SyncBatchNorm
    assert any("SyncBatchNorm" in why for _, why in report.skipped)

"""batch_norm_act with its batch statistics synchronized across a process group (training only).

nn.SyncBatchNorm's semantics on fastdl's kernels, CPU (gloo) as well as CUDA (NCCL):
- forward: fastdl::batch_norm_stats reduces this process's x to per-channel (mean, M2). One
  all_reduce of a (world, 3, C) buffer, in which each process fills its own row (count, mean, M2)
  and leaves the others zero, hands every process all the partials; they merge exactly (Chan's
  formula, no sum of squares). The fused forward op then normalizes in its
  given-statistics mode (training=False, the group's mean and biased variance in place of the
  running statistics), and the running statistics take the group's mean and unbiased variance.
- backward: the fused backward op in the same mode returns w * invstd * dz and this process's
  sums, grad_bias = sum(dz) and grad_weight = sum(dz * x_hat). One all_reduce of the two sums, and
  grad_x -= w * invstd / count * (sum dz + x_hat * sum(dz x_hat)) in two elementwise passes.
  grad_weight / grad_bias stay local, as nn.SyncBatchNorm's do: DistributedDataParallel averages
  them like every other gradient. Double backward raises NotImplementedError (fastdl._autograd).
Every process of the group must call it, with the same number of channels.
"""
import torch
import torch.distributed as dist

from fastdl import _autograd


def batch_norm_act(x, running_mean, running_var, weight, bias, residual, momentum, eps, activation,
                   slope, process_group, backend):
    """y = act(batch_norm(x) + residual) in training, statistics over the group's whole batch.

    Arguments as fastdl.ops.batch_norm_act's (already checked), backend the one fastdl._backends
    chose for x. Raises NotImplementedError where no fastdl kernel runs x (the reference backend).
    """
    if backend == "reference":
        raise NotImplementedError(
            f"process_group: synchronized batch statistics run on fastdl's kernels, and batch_norm_act runs "
            f"on the reference for {x.device.type} {x.dtype} (see fastdl.info())")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialized (call "
                           "torch.distributed.init_process_group first)")
    return _SyncBatchNormAct.apply(x, weight, bias, residual, running_mean, running_var, momentum, eps,
                                   activation, slope, process_group)


def merge_statistics(mean, m2, count, group):
    """(mean, biased variance, total count) of the group's batch from this process's (mean, M2) over
    `count` values per channel: one all_reduce. mean, m2: (C,); returns (C,), (C,), a 0-d tensor."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = mean.new_zeros(world, 3, mean.shape[0])
    rows[rank, 0] = count
    rows[rank, 1] = mean
    rows[rank, 2] = m2
    dist.all_reduce(rows, group=group)
    n, means, m2s = rows.unbind(1)  # (world, C) each
    total = n.sum(0)
    merged = (n * means).sum(0) / total
    merged_m2 = (m2s + n * (means - merged) ** 2).sum(0)
    return merged, merged_m2 / total, total[0]


def _per_channel(t, x):
    return t.view((1, -1) + (1,) * (x.dim() - 2))


class _SyncBatchNormAct(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, activation, slope,
                group):
        count = x.numel() // x.shape[1]
        if count == 1 and dist.get_world_size(group) < 2:  # nn.SyncBatchNorm's check: no host sync
            raise ValueError(f"input: expected more than 1 value per channel when training, got input size "
                             f"{tuple(x.shape)}")
        mean, var, total = merge_statistics(*torch.ops.fastdl.batch_norm_stats(x), count, group)
        save_mask = activation != "none" and any(ctx.needs_input_grad[:4])
        y, mean, invstd, mask = torch.ops.fastdl.batch_norm_act_forward(
            x, weight, bias, residual, mean, var, False, 0.0, eps, activation, slope, save_mask)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (total / (total - 1))).to(running_var.dtype), momentum)
        ctx.save_for_backward(x, weight, mean, invstd, mask, total)
        ctx.activation, ctx.slope, ctx.group = activation, slope, group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with torch.no_grad():  # not differentiable: refused below
            grads = _SyncBatchNormAct.gradients(ctx, grad_y)
        return _autograd.refuse("batch_norm_act with process_group", grads, (grad_y, *ctx.saved_tensors[:2])) + (None,) * 7

    @staticmethod
    def gradients(ctx, grad_y):
        """(grad_x, grad_weight, grad_bias, grad_residual), None where not needed."""
        x, weight, mean, invstd, mask, total = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dw, db, dres = torch.ops.fastdl.batch_norm_act_backward(
            grad_y, x, weight, mean, invstd, mask, False, ctx.activation, ctx.slope,
            needs[3] and ctx.activation != "none")
        sums = torch.stack([db, dw])  # this process's sum(dz), sum(dz * x_hat)
        dist.all_reduce(sums, group=ctx.group)
        if needs[0]:
            k = invstd / total if weight is None else weight.to(invstd.dtype) * invstd / total
            k1 = -k * sums[1] * invstd  # x_hat = (x - mean) * invstd
            k0 = -k * sums[0] - k1 * mean
            dx = dx.addcmul_(x, _per_channel(k1, x)).add_(_per_channel(k0, x))
        if needs[3] and ctx.activation == "none":
            dres = grad_y
        return (dx if needs[0] else None, dw.to(weight.dtype) if needs[1] else None,
                db.to(ctx.bias_dtype) if needs[2] else None, dres if needs[3] else None)

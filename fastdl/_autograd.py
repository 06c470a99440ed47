"""Higher-order autograd for the ops: a backward that is itself differentiable, or that refuses.

An op's backward runs with grad mode on exactly when the caller asked for create_graph=True
(a gradient penalty, a Hessian-vector product). Then each op either returns gradients that are
differentiable (batch_norm_act and depthwise_conv2d: their backward op wrapped in an
autograd.Function whose own backward is a formula of PyTorch ops, see `vjp`) or returns them
through `refuse`, so that differentiating them again raises NotImplementedError naming the op.
A second derivative is never silently missing a term.
"""
import torch


def vjp(fn, primals, cotangents):
    """Gradients of sum_i <fn(*primals)[i], cotangents[i]> with respect to each primal.

    fn: PyTorch ops of the primals, returning a tuple of tensors (or None); primals: tensors or
    None (None gets None); cotangents: one per output, None where that output has no gradient.
    With grad mode on (create_graph=True), the gradients are differentiable in turn, back through
    the primals' own history, so third and higher derivatives are right too.
    """
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        ins = [None if p is None else p if create and p.requires_grad else p.detach().requires_grad_()
               for p in primals]
        outs = fn(*ins)
        pairs = [(o, c) for o, c in zip(outs, cotangents) if o is not None and c is not None]
        wrt = [p for p in ins if p is not None]
        if not pairs:
            return (None,) * len(ins)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True,
                                         create_graph=create))
    return tuple(None if p is None else next(grads) for p in ins)


class _Refused(torch.autograd.Function):
    """Passes gradients through; differentiating them raises NotImplementedError naming the op."""

    @staticmethod
    def forward(ctx, op, count, *tensors):
        ctx.op = op
        return tensors[:count]

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"{ctx.op}: double backward (differentiating its gradients, as torch.autograd.grad(..., "
            f"create_graph=True) then backward does) is not implemented")


def refuse(op, grads, inputs):
    """`grads` (a tuple of tensors or None), computed by op's backward from `inputs` (the tensors
    they depend on), as gradients that raise NotImplementedError when differentiated. Only with
    grad mode on (create_graph=True) and an input requiring grad; else `grads` unchanged."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return grads
    present = [g for g in grads if g is not None]
    passed = iter(_Refused.apply(op, len(present), *present, *(t for t in inputs if t is not None)))
    return tuple(None if g is None else next(passed) for g in grads)

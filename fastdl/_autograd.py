"""Higher-order autograd for the ops: a backward that is itself differentiable, or that refuses.

An op's backward runs with grad mode on exactly when the caller asked for create_graph=True
(a gradient penalty, a Hessian-vector product). The forward ops' C++ autograd
(csrc/autograd/) then calls the backward op through its own autograd, registered in
fastdl/ops/<op>.py: batch_norm_act's and depthwise_conv2d's is a derivative formula of PyTorch
ops (`vjp`); attention's and rnn's raise NotImplementedError naming the op (`refused`), as do the
gradients of a Python autograd.Function passed through `refuse` (synchronized batch norm). A
second derivative is never silently missing a term.
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


def _refuse(op):
    raise NotImplementedError(
        f"{op}: double backward (differentiating its gradients, as torch.autograd.grad(..., create_graph=True) "
        f"then backward does) is not implemented")


def refused(op):
    """A torch.library.register_autograd backward for op's backward op, which has no derivative:
    it raises NotImplementedError naming op when a create_graph=True gradient is differentiated."""
    def backward(ctx, *grads):
        _refuse(op)
    return backward


class _Refused(torch.autograd.Function):
    """Passes gradients through; differentiating them raises NotImplementedError naming the op."""

    @staticmethod
    def forward(ctx, op, count, *tensors):
        ctx.op = op
        return tensors[:count]

    @staticmethod
    def backward(ctx, *grads):
        _refuse(ctx.op)


def refuse(op, grads, inputs):
    """For an autograd.Function's backward: `grads` (a tuple of tensors or None), computed from
    `inputs` (the tensors they depend on), as gradients that raise NotImplementedError naming op
    when differentiated. Only with grad mode on (create_graph=True) and an input requiring grad;
    else `grads` unchanged."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in inputs):
        return grads
    present = [g for g in grads if g is not None]
    passed = iter(_Refused.apply(op, len(present), *present, *(t for t in inputs if t is not None)))
    return tuple(None if g is None else next(passed) for g in grads)

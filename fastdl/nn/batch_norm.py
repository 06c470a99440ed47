"""FusedBatchNorm2d: nn.BatchNorm2d with an optional residual add and activation fused in."""
import copy

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from fastdl import functional as F


class FusedBatchNorm2d(_BatchNorm):
    """Drop-in for nn.BatchNorm2d computing act(BN(x) + residual) in one pass.

    Same constructor, parameters, buffers and state_dict as nn.BatchNorm2d (including `bias=False`
    where the installed torch has it), plus `activation` (None, "relu", "relu6", "leaky_relu"),
    `negative_slope` and `process_group`: with a torch.distributed group (e.g.
    torch.distributed.group.WORLD), training normalizes with the statistics of the whole group's
    batch, as nn.SyncBatchNorm does, on CPU (gloo) too; one all_reduce forward and one backward.
    forward(x, residual=None): x (N, C, H, W), residual of x's shape; the output keeps x's memory
    format.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, activation=None, negative_slope=0.01,
                 process_group=None):
        # bias=False (torch >= 2.14) is passed on only when asked for, so older torch keeps working.
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **({} if bias else {"bias": False}))
        F._bna._check_activation("none" if activation is None else activation)
        self.activation = activation
        self.negative_slope = negative_slope
        self.process_group = process_group

    @classmethod
    def from_module(cls, bn: torch.nn.BatchNorm2d, *, activation=None, negative_slope=0.01, process_group=None):
        """A FusedBatchNorm2d with bn's configuration, parameters and buffers (shared, not copied)."""
        ref = bn.weight if bn.affine else bn.running_mean
        m = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                device=ref.device if ref is not None else None, bias=not bn.affine or bn.bias is not None,
                activation=activation, negative_slope=negative_slope, process_group=process_group)
        for name in ("weight", "bias"):
            setattr(m, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(m, name, getattr(bn, name))
        return m.train(bn.training)

    def __deepcopy__(self, memo):
        """A deep copy sharing process_group: a group is a handle to the processes, not state (and
        cannot be copied; nn.SyncBatchNorm's deep copy fails on it)."""
        memo[id(self.process_group)] = self.process_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"input: expected {self.num_features} channels (num_features), got {input.shape[1]}")

    def _state(self):
        """(weight, bias, running_mean, running_var, num_batches_tracked), None where absent: from the
        _parameters / _buffers dicts (nn.Module.__getattr__ costs ~2 us a name, as much as a small
        batch's kernel), through getattr where a parametrization replaced one."""
        p, b = self._parameters, self._buffers
        try:
            return p["weight"], p["bias"], b["running_mean"], b["running_var"], b["num_batches_tracked"]
        except KeyError:
            return self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, tracked = self._state()
        # Momentum and statistics bookkeeping exactly as nn.BatchNorm2d.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            factor = 1.0 / float(tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (running_mean is None and running_var is None)
        use_running = not self.training or self.track_running_stats
        return F.batch_norm_act(
            input, running_mean if use_running else None, running_var if use_running else None,
            weight, bias, bn_training, factor, self.eps, residual=residual,
            activation=self.activation, negative_slope=self.negative_slope,
            process_group=self.process_group if self.training else None)  # nn.SyncBatchNorm syncs in train mode only

    def extra_repr(self):
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        if self.process_group is not None:
            s += ", process_group=synchronized"
        return s

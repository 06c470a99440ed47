"""Ops: registration (fake impls, Triton kernels), autograd and dispatch, one module per op."""
from fastdl.ops import attention  # noqa: F401
from fastdl.ops import batch_norm_act  # noqa: F401
from fastdl.ops import depthwise_conv2d  # noqa: F401
from fastdl.ops import rnn  # noqa: F401

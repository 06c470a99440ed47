"""fastdl: fused Triton, CUDA and C++ kernels for PyTorch models, as drop-in modules.

Importing fastdl never touches the GPU and never fails because the compiled extension is missing:
ops then run their PyTorch references, and fastdl.info() says so.
"""
from fastdl import functional, ops  # noqa: F401  (registers the ops)
from fastdl._extension import cpu_isa, cpu_isas, set_cpu_isa
from fastdl._info import info
from fastdl.convert import convert
from fastdl.nn import (DepthwiseConv2d, DepthwiseSeparableConv2d, FusedAttention, FusedBatchNorm2d, FusedGRU,
                       FusedGRUCell, FusedLSTM, FusedLSTMCell, FusedRNN, FusedRNNCell, FusedTransformerEncoderLayer)

__version__ = "0.1.0"
__all__ = ["DepthwiseConv2d", "DepthwiseSeparableConv2d", "FusedAttention", "FusedBatchNorm2d", "FusedGRU",
           "FusedGRUCell", "FusedLSTM", "FusedLSTMCell", "FusedRNN", "FusedRNNCell", "FusedTransformerEncoderLayer",
           "convert", "cpu_isa", "cpu_isas", "functional", "info", "set_cpu_isa"]

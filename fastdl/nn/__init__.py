"""Drop-in modules, re-exported at the top level (fastdl.FusedBatchNorm2d, ...)."""
from fastdl.nn.attention import FusedAttention, FusedTransformerEncoderLayer
from fastdl.nn.batch_norm import FusedBatchNorm2d
from fastdl.nn.depthwise import DepthwiseConv2d, DepthwiseSeparableConv2d
from fastdl.nn.rnn import FusedGRU, FusedGRUCell, FusedLSTM, FusedLSTMCell, FusedRNN, FusedRNNCell

__all__ = ["DepthwiseConv2d", "DepthwiseSeparableConv2d", "FusedAttention", "FusedBatchNorm2d", "FusedGRU",
           "FusedGRUCell", "FusedLSTM", "FusedLSTMCell", "FusedRNN", "FusedRNNCell", "FusedTransformerEncoderLayer"]

"""Drop-in modules, re-exported at the top level (fastdl.FusedBatchNorm2d, ...)."""
from fastdl.nn.batch_norm import FusedBatchNorm2d

__all__ = ["FusedBatchNorm2d"]

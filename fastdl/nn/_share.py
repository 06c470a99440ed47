"""Helpers the drop-in modules share."""
from torch import nn


def share_parameters(dst: nn.Module, src: nn.Module):
    """Points dst's parameters at src's (same names, recursively; shared, not copied)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, child in src.named_children():
        share_parameters(getattr(dst, name), child)

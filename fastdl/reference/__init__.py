"""Pure-PyTorch references, one module per op: the tests' ground truth and the fallback of last resort."""

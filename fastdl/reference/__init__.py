"""Pure-PyTorch references, one module per op: the tests' ground truth and the fallback of last resort.

The subpackage fastdl.reference.models holds the models' references, one file per model as in
fastdl/models: each is built from torch.nn alone (or is torchvision's model) with the fastdl model's
state_dict keys, and is the ground truth that model is tested against.
"""

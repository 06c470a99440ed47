"""fastdl's models on more than one process: torch.distributed's engines, set up for them.

    torchrun --nproc-per-node 2 -m fastdl train resnet18    # or: fastdl train resnet18 --nproc 2

Each process runs the same script. `setup` joins the process group torchrun describes in the
environment (gloo on CPU, NCCL on CUDA); `parallelize` makes a model's batch norms synchronize their
statistics across the group (fastdl.convert(sync_bn=True)) and wraps it in DistributedDataParallel,
or shards it with FSDP (torch.distributed.fsdp.fully_shard); `shard` gives this process its slice
of a global batch, and `loss_scale` the factor that makes the average of the processes' gradients
the gradient of the whole batch's mean loss when the slices differ in size. `run_ranks` runs a
function in N local processes, for tests and small experiments.
"""
import contextlib
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def launched():
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device):
    """Joins torchrun's process group: gloo for device "cpu", NCCL for "cuda" (each process then
    on GPU LOCAL_RANK). Returns the torch.device this process computes on."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def has_batch_norm(model):
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class Method(nn.Module):
    """module.<name>(...) as a forward, so that DistributedDataParallel can wrap a method other
    than forward (a DDPM's loss): DDP synchronizes only what runs through its own forward."""

    def __init__(self, module, name):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.name)(*args, **kwargs)


def parallelize(model, method="forward", fsdp=False):
    """A callable training `model` across the process group: its BatchNorm2d / FusedBatchNorm2d made
    to synchronize (in place), then wrapped in DistributedDataParallel (device_ids set on CUDA), or
    with fsdp=True sharded in place by fully_shard (each parameter split across the processes, and
    gathered for the forward and backward of its unit: each element of a ModuleList, and the rest). method: the method the returned callable runs
    (DDP wraps a Method around anything but forward; FSDP needs none)."""
    import fastdl

    if has_batch_norm(model):
        fastdl.convert(model, inplace=True, fuse=False, sync_bn=True)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:  # a gpt's transformer blocks, a resnet's ...: one unit each
                fully_shard(block)
        fully_shard(model)
        return model if method == "forward" else getattr(model, method)
    device = next(model.parameters()).device
    wrapped = model if method == "forward" else Method(model, method)
    return nn.parallel.DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)


@contextlib.contextmanager
def local_batch_norm(*modules):
    """Within it, the modules' synchronized batch norms use this process's batch alone: for work that
    every process does on the same whole data (recomputing running statistics before evaluation),
    where synchronizing would count each sample once per process."""
    from fastdl.nn import FusedBatchNorm2d

    bns = [m for module in modules for m in module.modules()
           if isinstance(m, FusedBatchNorm2d) and m.process_group is not None]
    groups = [m.process_group for m in bns]
    for m in bns:
        m.process_group = None
    try:
        yield
    finally:
        for m, group in zip(bns, groups):
            m.process_group = group


def shard(batch):
    """This process's slice of each tensor of a global batch (dim 0, tensor_split: sizes differ by at
    most one)."""
    return [t.tensor_split(world_size())[rank()] for t in batch]


def loss_scale(local, total):
    """The factor for a mean loss over `local` of a global batch's `total` samples that makes the
    processes' averaged gradients (DDP's, FSDP's) those of the mean loss over all `total`."""
    return local * world_size() / total


def _rank_main(rank_, fn, world, folder, args):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank_, world_size=world)
    try:
        torch.set_num_threads(1)
        result = fn(rank_, world, *args)
        torch.save(result, Path(folder) / f"{rank_}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args):
    """[fn(rank, world, *args) for each rank], each run in its own process of a gloo group of `world`
    processes on this machine. fn must be importable (module level); its results (tensors, numbers,
    containers of them) come back through files."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_rank_main, args=(fn, world, folder, args), nprocs=world, start_method="spawn")
        return [torch.load(Path(folder) / f"{r}.pt", weights_only=True) for r in range(world)]

"""Training on two gloo processes (spawned here) ends with the parameters of one process training
on the whole batch: resnet18 with synchronized batch norm and gpt under DistributedDataParallel,
gpt also under FSDP (fully_shard). float64, uneven slices (a batch of 5 splits 3 / 2), SGD with
momentum for a few steps."""
import pytest
import torch
import torch.nn.functional as F

from fastdl import distributed, models
from fastdl.testing import assert_close

STEPS = 3
BATCH = 5


def _model_and_batches(name):
    """(model, [global batch per step], loss(callable, batch)) in float64, seeded identically in every
    process."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "resnet18":
        model = models.resnet18(num_classes=10).double()
        batches = [(torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64),
                    torch.randint(10, (BATCH,), generator=g)) for _ in range(STEPS)]
        return model, batches, lambda f, b: F.cross_entropy(f(b[0]), b[1])
    model = models.gpt(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=16).double()
    batches = [tuple(torch.randint(17, (BATCH, 12), generator=g) for _ in range(2)) for _ in range(STEPS)]
    return model, batches, lambda f, b: f(b[0], b[1])[1]


def train(name, fsdp=False):
    """Parameters (full tensors) after STEPS steps; in a process group, each process trains on its
    slice of every batch."""
    model, batches, loss_fn = _model_and_batches(name)
    run = distributed.parallelize(model, fsdp=fsdp) if distributed.world_size() > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for batch in batches:
        local = distributed.shard(batch)
        loss = loss_fn(run, local) * distributed.loss_scale(len(local[0]), len(batch[0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in state.items()}


def _worker(rank, world, name, fsdp):
    return train(name, fsdp)


@pytest.mark.parametrize("name,fsdp", [("resnet18", False), ("gpt", False), ("gpt", True)],
                         ids=["resnet18-ddp-sync_bn", "gpt-ddp", "gpt-fsdp"])
def test_two_processes_train_like_one(name, fsdp, one_thread):
    expected = train(name)
    start = _model_and_batches(name)[0].state_dict()
    moved = max((expected[k].double() - start[k].double()).abs().max().item() for k in start)
    assert moved > 1e-3  # the steps changed the parameters: the comparison below can fail
    for rank, state in enumerate(distributed.run_ranks(_worker, 2, name, fsdp)):
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert_close(f"rank {rank} {key}", state[key], value, dtype=torch.float64, n=BATCH * 1024)


def _one_step_of_every_model(rank, world):
    """Every model of `fastdl train`, its Job built in the process group (so wrapped by DDP, its
    batch norms synchronized), one step on this process's slice of a batch of 6: the loss, and a
    fingerprint of the parameters after the step (DDP keeps every process's equal)."""
    import argparse

    from fastdl import train as fastdl_train

    out = {}
    for name in fastdl_train.MODELS:
        args = argparse.Namespace(epochs=1, batch_size=6, lr=1e-3, device="cpu", amp=False, seed=0, out="",
                                  data=None, fsdp=False)
        torch.manual_seed(0)
        job = fastdl_train.build(name, args)
        params = [p for m in job.modules for p in m.parameters()]
        batch = job.epoch(torch.Generator().manual_seed(0))[0]
        total, local = len(batch[0]), distributed.shard(batch)
        loss = job.step(local)
        if name != "gan":  # the GAN's step runs its own backward and optimizer steps
            (loss * distributed.loss_scale(len(local[0]), total)).backward()
            torch.optim.SGD(params, lr=0.1).step()
        out[name] = (loss.detach(), torch.stack([p.detach().double().sum() for p in params]))
    return out


def test_every_model_trains_under_ddp(one_thread):
    ranks = distributed.run_ranks(_one_step_of_every_model, 2)
    from fastdl.train import MODELS

    assert set(ranks[0]) == set(MODELS)
    for name in MODELS:
        (loss0, params0), (loss1, params1) = ranks[0][name], ranks[1][name]
        assert torch.isfinite(loss0) and torch.isfinite(loss1), name
        torch.testing.assert_close(params0, params1, atol=0, rtol=0, msg=name)  # the same step on both

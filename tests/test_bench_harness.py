"""fastdl.bench.harness's CPU peak memory, against steps whose allocations are known (16 MiB blocks
here to keep the NaN-poisoned torch.empty cheap; 64 MiB blocks measure exactly 64 MiB too)."""
import torch

from fastdl.bench import harness

MiB = 2**20
SLACK = 64 * 2**10


def empty(nbytes):
    return torch.empty(nbytes, dtype=torch.uint8)


def check(step, expected):
    peak = harness.peak_memory(step, torch.device("cpu"))
    assert expected <= peak <= expected + SLACK, f"{peak / MiB:.3f} MiB, expected {expected / MiB:.3f} MiB"


def test_one_block_allocated_and_freed():
    check(lambda: empty(16 * MiB), 16 * MiB)


def test_two_blocks_at_once():
    def step():
        a, b = empty(16 * MiB), empty(16 * MiB)
        del a, b
    check(step, 32 * MiB)


def test_blocks_one_after_the_other():
    def step():
        for _ in range(3):
            a = empty(16 * MiB)
            del a
    check(step, 16 * MiB)


def test_state_freed_and_allocated_again_is_not_counted():
    """Like a training step's gradients (zero_grad(set_to_none=True), then backward): the step frees
    what its previous call allocated before allocating it again, so only its temporary counts."""
    state = dict(grad=empty(16 * MiB))

    def step():
        state["grad"] = None
        tmp = empty(8 * MiB)
        state["grad"] = empty(16 * MiB)
        del tmp
    check(step, 8 * MiB)

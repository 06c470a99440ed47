"""Per-call overhead of every public op and drop-in module at a tiny shape, fastdl against the
torch.nn module or function it replaces.

The cases, impls and steps are fastdl/bench/overhead.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_overhead.py --benchmark-enable [--quick]
"""
from fastdl.bench import overhead as BENCH


def test_overhead(case, impl, device, measure):
    measure(BENCH, case, impl)

"""relu(batch_norm(x) + residual), the tail of a ResNet block: fastdl against the PyTorch it replaces.

The cases, impls and steps are fastdl/bench/batch_norm_act.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_batch_norm_act.py [--quick] [--device cuda]
"""
from fastdl.bench import batch_norm_act as BENCH


def test_batch_norm_act(case, impl, device, measure):
    measure(BENCH, case, impl)

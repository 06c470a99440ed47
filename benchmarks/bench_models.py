"""Models: every model of fastdl.models against its torch.nn reference (fastdl.reference.models).

The cases, impls and steps are fastdl/bench/models.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_models.py [--quick] [--device cuda] [-k gpt]
"""
from fastdl.bench import models as BENCH


def test_models(case, impl, device, measure):
    measure(BENCH, case, impl)

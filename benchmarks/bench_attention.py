"""Attention: fastdl against F.scaled_dot_product_attention and nn.MultiheadAttention.

The cases, impls and steps are fastdl/bench/attention.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_attention.py [--quick] [--device cuda]
"""
from fastdl.bench import attention as BENCH


def test_attention(case, impl, device, measure):
    measure(BENCH, case, impl)

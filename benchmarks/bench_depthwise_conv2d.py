"""Depthwise conv2d and MobileNetV1's separable block: fastdl against the PyTorch it replaces.

The cases, impls and steps are fastdl/bench/depthwise_conv2d.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_depthwise_conv2d.py [--quick] [--device cuda]
"""
from fastdl.bench import depthwise_conv2d as BENCH


def test_depthwise_conv2d(case, impl, device, measure):
    measure(BENCH, case, impl)

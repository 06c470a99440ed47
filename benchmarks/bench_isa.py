"""The portable-CPU targets (SDPA, MultiheadAttention, depthwise k3 / k7, BatchNorm2d+add+ReLU),
fastdl against eager PyTorch and torch.compile, for the ISA copy of the C++ kernels the run uses.

The cases, impls and steps are fastdl/bench/isa.py's; benchmarks/isa.py runs this group once per
ISA the machine has and merges the results with the CPU's FMA peak.

    FASTDL_CPU_ISA=avx2 python -m pytest benchmarks/bench_isa.py --benchmark-enable [--quick]
"""
from fastdl.bench import isa as BENCH


def test_isa(case, impl, device, measure):
    measure(BENCH, case, impl)

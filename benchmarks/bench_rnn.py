"""Recurrent layers and cells: fastdl.FusedLSTM / GRU / RNN (and their cells) against torch.nn's.

The cases, impls and steps are fastdl/bench/rnn.py's (its docstring says what is measured);
conftest.py parametrizes the test with them.

    python -m pytest benchmarks/bench_rnn.py [--quick] [--device cuda]
"""
from fastdl.bench import rnn as BENCH


def test_rnn(case, impl, device, measure):
    measure(BENCH, case, impl)

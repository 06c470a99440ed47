"""Benchmarks of fastdl against eager PyTorch and torch.compile, shared by `fastdl bench` and the
pytest-benchmark files of benchmarks/ (`make bench`).

One module per op stem holds that op's cases and steps (batch_norm_act, depthwise_conv2d,
attention, rnn; models for the models of fastdl.models; overhead for the per-call time of every op
and module at a tiny shape; isa for the portable-CPU targets, run once per ISA copy of the C++
kernels); harness.py times a step and measures its peak memory, and records the
conditions of the run; report.py writes the table, bench.json, bench.md and bench.png; run.py is
`fastdl bench`.
"""
STEMS = ("batch_norm_act", "depthwise_conv2d", "attention", "rnn", "models", "overhead", "isa")

"""The recurrent CUDA kernels' logic on the CPU: tests/cuda_host/rnn.cu runs every block and
thread of each step kernel's launch in order on the host (their bodies are __host__ __device__),
on NaN-poisoned outputs, against a float64 reference from csrc/rnn.h's layouts: each mode x fp64,
fp32, fp16, bf16 x awkward (B, H), with grid-stride loops. Built with nvcc, run without a GPU.
Races, warp behaviour, the launch itself and the device's math are outside its reach."""
import os
import subprocess

import pytest

from fastdl.gpu_ready.nvcc import ROOT, nvcc


@pytest.mark.skipif(nvcc() is None, reason="no CUDA toolkit: nvcc builds the host emulation")
def test_step_kernels_emulated_on_host(tmp_path):
    exe = tmp_path / "rnn_host"
    build = subprocess.run([nvcc(), "-std=c++17", "-O1", "-arch=sm_80", "-I", os.path.join(ROOT, "csrc"),
                            os.path.join(ROOT, "tests", "cuda_host", "rnn.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.endswith("OK: 0 failures\n"), done.stdout[-4000:]

"""`make gpu-check`'s pieces that run without a GPU: the summary of a run's folder
(benchmarks/gpu_summary.py) and each case's fraction of the device's ceilings (harness.summarize).
The script itself (benchmarks/gpu.sh) was dry-run end to end here (docs/benchmarks.md)."""
import json
import os
import subprocess
import sys

from fastdl.bench import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_of_a_run(tmp_path):
    (tmp_path / "steps.tsv").write_text("build\t0\t61\ninfo\t0\t3\ntests\t1\t140\nbench\t124\t120\n")
    (tmp_path / "tests-test_rnn.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    bench = dict(copy_gbps=3000.0, matmul_tflops=700.0, cases=[dict(op="rnn", name="lstm", median_s={"fastdl": 1e-3},
                                                                     fastdl_fraction_of_matmul=0.1, other="dropped")])
    (tmp_path / "bench-cuda.json").write_text(json.dumps(bench))
    done = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in out["steps"]] == [0, 0, 1, 124]
    assert out["tests"] == {"test_rnn": dict(passed=7, failed=1, errors=0, skipped=2)}
    assert out["ceilings"] == dict(copy_gbps=3000.0, matmul_bf16_tflops=700.0)
    assert out["cases"] == [dict(op="rnn", name="lstm", median_s={"fastdl": 1e-3}, fastdl_fraction_of_matmul=0.1)]
    assert {"device", "torch", "triton", "cuda", "commit", "date"} <= set(out)
    assert "7 passed, 1 failed, 2 skipped" in done.stdout


def test_cases_report_their_fraction_of_each_ceiling():
    record = dict(case=dict(op="x", name="y", flops=2e12, bytes=3e9), seconds={"fastdl": 0.01, "eager": 0.02},
                  peak_bytes={}, skipped={})
    row = harness.summarize(record, copy_bps=3e12, matmul_fps=800e12)
    assert row["fastdl_fraction_of_matmul"] == 2e12 / 0.01 / 800e12
    assert row["fastdl_fraction_of_copy"] == 3e9 / 0.01 / 3e12
    assert row["eager_over_fastdl"] == 2.0

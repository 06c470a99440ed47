"""The summary of one `make gpu-check` (benchmarks/gpu.sh): OUT/summary.json from what its steps
left in OUT (steps.tsv, tests-<file>.xml, bench-cuda.json), printed as a few lines.

    python benchmarks/gpu_summary.py OUT
"""
import datetime
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastdl.bench.harness import git_commit  # noqa: E402


DRY_RUN = "no CUDA device (a dry run: every GPU test and benchmark skipped)"


def _steps(out):
    rows = []
    with open(os.path.join(out, "steps.tsv")) as f:
        for line in f:
            name, status, seconds, *why = line.rstrip("\n").split("\t")
            rows.append(dict(step=name, status=status if status == "skipped" else int(status), seconds=int(seconds),
                             **({"why": why[0]} if why else {})))
    return rows


def _tests(out):
    """Per test file: passed, failed, errors, skipped (from pytest's JUnit XML)."""
    files = {}
    for path in sorted(glob.glob(os.path.join(out, "tests-*.xml"))):
        suite = ET.parse(path).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        files[os.path.basename(path)[6:-4]] = dict(passed=n - f - e - s, failed=f, errors=e, skipped=s)
    return files


def _bench(out):
    path = os.path.join(out, "bench-cuda.json")
    if not os.path.exists(path):
        return {}, []
    with open(path) as f:
        run = json.load(f)
    ceilings = dict(copy_gbps=run.get("copy_gbps"), matmul_bf16_tflops=run.get("matmul_tflops"))
    keep = ("op", "name", "median_s", "eager_over_fastdl", "compile_over_fastdl", "tflops", "fastdl_gbps",
            "fastdl_fraction_of_copy", "fastdl_fraction_of_matmul", "skipped")
    return ceilings, [{k: c[k] for k in keep if k in c} for c in run.get("cases", [])]


def main(out):
    cuda = torch.cuda.is_available()
    ceilings, cases = _bench(out)
    summary = dict(
        device=torch.cuda.get_device_name(0) if cuda else DRY_RUN,
        torch=torch.__version__, triton=_version("triton"), cuda=torch.version.cuda, commit=git_commit(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"), steps=_steps(out), tests=_tests(out),
        ceilings=ceilings, cases=cases)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['device']}; torch {summary['torch']}, triton {summary['triton']}, cuda {summary['cuda']}")
    for s in summary["steps"]:
        print(f"  {s['step']:8} {s['status']!s:8} {s['seconds']:4d} s  {s.get('why', '')}")
    failed = sum(t["failed"] + t["errors"] for t in summary["tests"].values())
    print(f"  tests: {sum(t['passed'] for t in summary['tests'].values())} passed, {failed} failed, "
          f"{sum(t['skipped'] for t in summary['tests'].values())} skipped; "
          f"{len(cases)} benchmark cases; ceilings {ceilings or '-'}")
    print(f"summary: {os.path.join(out, 'summary.json')}")


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main(sys.argv[1])

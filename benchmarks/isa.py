"""The portable-CPU targets once per ISA copy of the C++ kernels this CPU runs, in one JSON file.

For each ISA of fastdl.cpu_isas(): `fastdl bench --only isa` with FASTDL_CPU_ISA set (torch as it
is), and with --torch-avx2 a second run whose torch is held to AVX2 as well (ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): what an AVX2-only CPU gives both. Beside them, one
core's measured fp32 FMA peak per ISA (benchmarks/fma_peak.c, built with gcc) and the attention
cases' GFLOP/s per core, so the distance to the ceiling shows.

    python benchmarks/isa.py --out benchmarks/results/NAME.json [--quick] [--torch-avx2]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import fastdl
from fastdl.bench import harness

HERE = Path(__file__).parent
LEVELS = {"baseline": ("x86-64-v2", 16), "avx2": ("x86-64-v3", 32), "avx512": ("x86-64-v4", 64)}
TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def fma_peak(isa, folder):
    """One core's fp32 multiply-add GFLOP/s with `isa`'s vectors, or None without gcc."""
    if shutil.which("gcc") is None:
        return None
    march, width = LEVELS[isa]
    exe = Path(folder) / f"fma_peak_{isa}"
    subprocess.run(["gcc", "-O3", "-ffp-contract=fast", f"-march={march}", f"-DBYTES={width}",
                    str(HERE / "fma_peak.c"), "-o", str(exe)], check=True)
    return float(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()[0])


def bench(isa, quick, folder, extra_env):
    env = dict(os.environ, FASTDL_CPU_ISA=isa, **extra_env)
    cmd = [sys.executable, "-m", "fastdl", "bench", "--device", "cpu", "--only", "isa", "--out", str(folder)]
    subprocess.run(cmd + (["--quick"] if quick else []), env=env, check=True)
    return json.loads((Path(folder) / "bench.json").read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--torch-avx2", action="store_true", help="also run with torch held to AVX2")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    runs, peaks = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for isa in fastdl.cpu_isas():
            peaks[isa] = fma_peak(isa, tmp)
            torch_envs = [("as installed", {})] + ([("held to avx2", TORCH_AVX2)] if args.torch_avx2 else [])
            for torch_isa, env in torch_envs:
                if torch_isa != "as installed" and isa == "avx512":
                    continue  # an AVX2-only CPU has no avx512 copy to run
                result = bench(isa, args.quick, Path(tmp) / f"{isa}-{len(runs)}", env)
                for row in result["cases"]:
                    if row.get("tflops"):
                        row["gflops_per_core"] = {k: v * 1e3 / threads for k, v in row["tflops"].items()}
                runs.append(dict(fastdl_isa=isa, torch=torch_isa, torch_env=env, kernel_isa=result["kernel_isa"],
                                 cases=result["cases"]))
    out = dict(harness.conditions(torch.device("cpu"), "fastdl bench --only isa (its CPU timer)"),
               fma_peak_gflops_per_core=peaks, runs=runs)
    out.pop("kernel_isa")  # this process's; each run records the copy it ran
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for run in runs:
        print(f"\nfastdl {run['fastdl_isa']} copy, torch {run['torch']}  (FMA peak, one core: "
              f"{peaks[run['fastdl_isa']]} GFLOP/s)")
        for row in run["cases"]:
            eager, comp = row.get("eager_over_fastdl"), row.get("compile_over_fastdl")
            gf = row.get("gflops_per_core", {}).get("fastdl")
            print(f"  {row['name']:<52} eager/fastdl {eager and f'{eager:.2f}x'}  compile/fastdl "
                  f"{comp and f'{comp:.2f}x'}" + (f"  fastdl {gf:.1f} GFLOP/s/core" if gf else ""))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

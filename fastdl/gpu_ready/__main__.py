"""`python -m fastdl.gpu_ready`: the GPU-readiness gate (`make gpu-ready`). Compiles every Triton
launch of fastdl's wrappers for sm_80 and sm_90 (every autotune config) and every CUDA kernel with
ptxas -v, writes the resource table, and exits 1 on any failure of the gate (fastdl.gpu_ready.gate).

--quick: the subset `make test` runs (one target, the heaviest variants), checked against the
committed tables. A full run rewrites docs/gpu-resources.md and the attention pruner's measured
table, fastdl/triton/attention_resources.json: commit both.
"""
import argparse
import dataclasses
import json
import os
import sys
import time

from fastdl.gpu_ready import cases, gate, nvcc, triton_aot
from fastdl.triton import attention_configs

QUICK = dict(dtypes=("bf16", "tf32", "fp32"), variants=("full",), head_dims=(64, 128, 256))


def _cases(quick):
    if quick:
        return cases.attention_cases(**QUICK) + cases.batch_norm_cases(dtypes=("bf16",))
    return cases.attention_cases() + cases.batch_norm_cases()


def _doc(rows, cuda_rows, problems, seconds):
    lines = ["# GPU resources", "",
             "Written by `make gpu-ready` (`python -m fastdl.gpu_ready`, fastdl/gpu_ready): every Triton kernel",
             "launched by fastdl's wrappers, compiled ahead of time for each target and autotune config with no",
             "GPU, and every CUDA kernel instantiation compiled with `nvcc -Xptxas -v`. Registers and spills are",
             "ptxas's (spill: stores + loads, bytes per thread); smem: shared memory per block (Triton: the",
             "kernel's total; CUDA: static only, the dynamic part is sized and checked at launch). kept: whether",
             "the kernel's config pruner lets the autotuner pick the config on that target (fastdl/triton/",
             "attention_configs.py). cores: where `tl.dot` runs (wgmma / mma: tensor cores; fma: CUDA cores).",
             "",
             f"Gate: 0 compile errors; for kept configs, the grid within {triton_aot.GRID_LIMIT}, shared memory",
             "within the target's opt-in limit (" + ", ".join(f"sm_{a}: {b} B" for a, b in triton_aot.SMEM_LIMIT.items()
                                                            if a in (80, 90)) + "),",
             f"spills at most {attention_configs.SPILL_FREE} B (attention fp16 / bf16 at D <= 128; batch norm) "
             f"or {attention_configs.SPILL_HEAVY} B (attention fp32, D = 256), no pointer offset formed in int32; "
             f"CUDA kernels spill at most {nvcc.SPILL_LIMIT} B.",
             "", f"This run: {len(rows)} Triton compiles, {len(cuda_rows)} CUDA kernels, {len(problems)} failures, "
             f"{seconds:.0f} s.", ""]
    lines += [f"- {p}" for p in problems]
    lines += ["", "## Triton", ""] + gate.table(rows)
    lines += ["", "## CUDA", "", "| source | kernel | target | regs | spill B | smem B |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.source} | `{r.kernel}` | {r.target} | {r.registers} | {r.spills} | {r.shared} |"
              for r in sorted(cuda_rows, key=lambda r: (r.source, r.kernel, r.target))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastdl.gpu_ready", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the subset make test runs; writes no table")
    ap.add_argument("--doc", default="docs/gpu-resources.md", help="the resource table (full runs)")
    ap.add_argument("--json", help="also write every row as JSON here")
    ap.add_argument("--processes", type=int, help="compile processes (default: os.cpu_count())")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1: Triton's interpreter compiles nothing; unset it")
    start = time.time()
    targets = ("sm_90",) if args.quick else tuple(triton_aot.TARGETS)

    def progress(done, total, row):
        if done % 50 == 0 or done == total:
            print(f"  triton: {done}/{total} compiled ({time.time() - start:.0f} s)", flush=True)

    # A full run measures the attention configs anew and writes the pruner's table from them; a quick
    # run checks the committed table's choices against fresh compiles.
    rows = gate.run(_cases(args.quick), targets, args.processes, progress,
                    None if args.quick else gate.resource_table)
    cuda_rows = nvcc.run(targets) if nvcc.nvcc() else []
    problems = gate.failures(rows) + nvcc.failures(cuda_rows)
    if not cuda_rows:
        problems.append("nvcc: no CUDA toolkit found, the CUDA kernels were not checked")
    seconds = time.time() - start
    if not args.quick:
        with open(attention_configs.RESOURCES, "w") as f:
            json.dump(gate.resource_table(rows), f, indent=0, sort_keys=True)
            f.write("\n")
        with open(args.doc, "w") as f:
            f.write(_doc(rows, cuda_rows, problems, seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": [dataclasses.asdict(r) for r in rows],
                       "cuda": [dataclasses.asdict(r) for r in cuda_rows], "failures": problems}, f, indent=1)
    print(f"{len(rows)} Triton compiles, {len(cuda_rows)} CUDA kernels, {len(problems)} failures, {seconds:.0f} s")
    for p in problems:
        print("  FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU-readiness gate: every Triton launch of `cases` compiled for every autotune config and
target, checked against the target's limits, as rows of a resource table.

A row is one (case, kernel, config, target). `kept` says whether the kernel's config pruner lets
the autotuner pick that config on that target; the gate's checks (`failures`) apply to kept rows:
0 compile errors, the grid within CUDA's axis limits, shared memory within the target's opt-in
limit, spills within the row's `spill_limit` (attention_configs.spill_limit; 0 for batch norm),
and no pointer offset formed in int32.
"""
import dataclasses
import multiprocessing
import os

from fastdl.gpu_ready import triton_aot
from fastdl.gpu_ready.cases import DTYPES
from fastdl.triton import attention_configs

@dataclasses.dataclass
class Row:
    op: str
    kernel: str
    dtype: str
    variant: str
    head_dim: int
    target: str
    config: str
    kept: bool
    grid: tuple
    registers: int = -1
    spills: int = -1       # spill stores + loads, bytes per thread
    shared: int = -1
    cores: str = ""
    dots: str = ""
    i32_addptr: int = -1
    error: str = ""
    table_key: str = ""    # attention: the launch's key in attention_resources.json
    spill_limit: int = 0


def element_size(case):
    return DTYPES[case.dtype].itemsize


def _pruner(launch):
    return getattr(launch.kernel, "early_config_prune", None)


def kept(launch, cfg, target, table=None):
    """Whether the kernel's pruner keeps cfg on target (with the committed resource table, or
    `table`): what the autotuner could pick there."""
    prune = _pruner(launch)
    if prune is None:
        return True
    if table is not None:
        prune = attention_configs.Prune(prune.kernel, lambda: table)
    arch = triton_aot.TARGETS[target].arch
    chosen = prune.for_device(arch, triton_aot.SMEM_LIMIT[arch], launch.kernel.configs, launch.named_args(),
                              **launch.kwargs)
    return any(dict(c.all_kwargs()) == cfg for c in chosen)


def _candidates(case, launch):
    """The launch's configs that its pruner would consider at all (attention: the FMA or the
    tensor-core list, by the dots' input type): the others are never compiled."""
    if _pruner(launch) is None:
        return launch.configs()
    kept = attention_configs.candidates(launch.name, launch.kernel.configs, element_size(case),
                                        launch.kwargs["PREC"])
    return [dict(c.all_kwargs()) for c in kept]


def jobs(cases, targets):
    """(case, launch, config, target) for every distinct launch of each case (a wrapper that
    launches the same kernel twice with the same constexprs is compiled once)."""
    out = []
    for case in cases:
        seen = set()
        for launch in case.launches:
            key = (launch.name, tuple(sorted((k, v) for k, v in launch.kwargs.items())))
            if key in seen:
                continue
            seen.add(key)
            out += [(case, launch, cfg, t) for cfg in _candidates(case, launch) for t in targets]
    return out


def _compile(job):
    case, launch, cfg, target = job
    grid = launch.grid_for(cfg)
    row = Row(case.op, launch.name, case.dtype, case.variant, case.head_dim, target,
              attention_configs.config_name(cfg), False, grid)
    if _pruner(launch) is not None:
        kw, es = launch.kwargs, element_size(case)
        row.table_key = attention_configs.table_key(launch.name, es, kw["PREC"], kw["BLOCK_D"],
                                                    kw["HAS_MASK"] or kw["HAS_KPM"] or kw["DROPOUT"])
        row.spill_limit = attention_configs.spill_limit(es, kw["BLOCK_D"])
    try:
        _, res = triton_aot.compile_launch(launch, cfg, triton_aot.TARGETS[target])
    except Exception as e:  # a compile error is a row, reported by `failures`
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return row
    row.registers, row.spills, row.shared = res.registers, res.spill_stores + res.spill_loads, res.shared
    row.cores, row.dots, row.i32_addptr = res.cores, res.dots, res.i32_addptr
    return row


_JOBS = []


def _compile_index(i):
    return _compile(_JOBS[i])


def run(cases, targets=tuple(triton_aot.TARGETS), processes=None, progress=None, table=None):
    """Compiles every job of `cases` in a pool of forked processes (os.cpu_count() by default);
    returns the rows in job order, each marked kept or not by its pruner with the committed
    resource table, or `table` (a callable of the rows giving one). progress: called with (done,
    total, row) after each job."""
    global _JOBS
    _JOBS = jobs(cases, targets)
    processes = processes or os.cpu_count() or 1
    rows = []
    if processes == 1:
        for i in range(len(_JOBS)):
            rows.append(_compile_index(i))
            progress and progress(i + 1, len(_JOBS), rows[-1])
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            for row in pool.imap(_compile_index, range(len(_JOBS)), chunksize=2):
                rows.append(row)
                progress and progress(len(rows), len(_JOBS), row)
    fresh = table(rows) if table else None
    for row, (_, launch, cfg, target) in zip(rows, _JOBS):
        row.kept = kept(launch, cfg, target, fresh)
    return rows


def resource_table(rows):
    """The attention pruner's table (attention_configs.load_table's format) from compiled rows:
    per key and config, the largest shared memory and spills over the dtypes and variants measured
    under that key. A config that failed to compile is left out, so it is never kept."""
    out = {}
    for r in rows:
        if not r.table_key or r.error:
            continue
        m = out.setdefault(r.table_key, {}).setdefault(r.config, {}).setdefault(r.target, [0, 0])
        m[0], m[1] = max(m[0], r.shared), max(m[1], r.spills)
    return out


def failures(rows):
    """What the gate rejects, one line each: any compile error, and for the configs the autotuner
    can pick, grids, shared memory, spills and int32 offsets. Also a kernel variant whose every
    config is pruned on a target."""
    out = []
    for r in rows:
        where = f"{r.kernel} {r.dtype} {r.variant} D={r.head_dim} {r.config} {r.target}"
        if r.error:
            out.append(f"{where}: compile error {r.error}")
            continue
        if not r.kept:
            continue
        if any(g > lim for g, lim in zip(r.grid, triton_aot.GRID_LIMIT)):
            out.append(f"{where}: grid {r.grid} over {triton_aot.GRID_LIMIT}")
        smem = triton_aot.SMEM_LIMIT[triton_aot.TARGETS[r.target].arch]
        if r.shared > smem:
            out.append(f"{where}: {r.shared} B of shared memory over {smem}")
        if r.spills > r.spill_limit:
            out.append(f"{where}: spills {r.spills} B per thread over {r.spill_limit}")
        if r.i32_addptr:
            out.append(f"{where}: {r.i32_addptr} pointer offsets formed in int32")
    groups = {}
    for r in rows:
        groups.setdefault((r.kernel, r.dtype, r.variant, r.head_dim, r.target), []).append(r.kept)
    out += [f"{k} {d} {v} D={h} {t}: every config pruned" for (k, d, v, h, t), kept in groups.items()
            if not any(kept)]
    return out


def table(rows):
    """The resource table as markdown lines: one line per (kernel, dtype, variant, head dim,
    config), each target's kept / registers / spills / shared memory side by side."""
    targets = sorted({r.target for r in rows})
    lines = {}
    for r in rows:
        key = (r.op, r.kernel, r.dtype, r.variant, r.head_dim or "-", r.config)
        cells = lines.setdefault(key, {"cores": "", "dots": ""})
        if r.error:
            cells[r.target] = ["error", r.error.replace("|", "/"), "", ""]
            continue
        cells[r.target] = ["yes" if r.kept else "pruned", r.registers, r.spills, r.shared]
        if r.target == "sm_90" or not cells["cores"]:
            cells["cores"], cells["dots"] = r.cores, r.dots
    head = ["op", "kernel", "dtype", "variant", "D", "config"]
    head += [f"{t} {c}" for t in targets for c in ("kept", "regs", "spill B", "smem B")] + ["cores (sm_90)", "dots"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, cells in lines.items():
        row = list(key) + [x for t in targets for x in cells.get(t, ["", "", "", ""])] + [cells["cores"], cells["dots"]]
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return out

"""`fastdl bench`: the cases selected, each impl of each measured under a progress bar, then the
table in the terminal and the files of report.write."""
import importlib

import torch

from fastdl.bench import STEMS, harness, report
from fastdl.bench.harness import dtype_name

BUDGET = {True: 0.5, False: 2.0}
# Stems whose cases are other stems' cases regrouped (isa: the portable-CPU targets, run once per
# ISA copy by benchmarks/isa.py): measured only when --only names them.
ON_REQUEST = ("isa",)  # seconds of timed calls per impl and case, with --quick or not
CPU_TIMER = "median of wall-clock calls (5 or more, for {budget} s) after 3 warm-up calls"


def stem(name):
    return importlib.import_module(f"fastdl.bench.{name}")


def names():
    """What --only takes: the op stems and the models' names."""
    from fastdl.bench.models import MODELS

    return list(dict.fromkeys(STEMS + tuple(MODELS)))  # attention and rnn: an op and a model


def select(device, quick, dtype, only=()):
    """The (stem module, case) pairs to measure on `device` ("cpu" or "cuda") in `dtype`, of the
    stems and models named in `only` (all but ON_REQUEST when empty), and a line per stem skipped: an op for which
    fastdl would run its pure-PyTorch reference (as fastdl.info() reports it), the models when any op would."""
    fallbacks = {op: why for op in STEMS if (why := harness.fallback(op, device, dtype))}
    picked, skipped = [], []
    for name in STEMS:
        if name in ON_REQUEST and name not in only:
            continue
        module = stem(name)
        cases = [c for c in module.cases(device, quick, [dtype])
                 if not only or c["op"] in only or c.get("model") in only]
        if cases and name in fallbacks:
            skipped.append(f"{name}: no {dtype_name(dtype)} kernel on {device} ({fallbacks[name]}): fastdl would "
                           "time its pure-PyTorch reference")
        elif cases and name == "models" and fallbacks:
            skipped.append(f"models: their ops {', '.join(fallbacks)} have no {dtype_name(dtype)} kernel on {device}")
        elif cases:
            picked += [(module, c) for c in cases]
    return picked, skipped


def measure(module, case, impl, device, record, budget):
    """Times one impl of a case into its record, or records why it does not apply."""
    try:
        step = harness.build_step(module, case, impl, device)
    except harness.Unsupported as e:
        record["skipped"][impl] = str(e)
        return
    harness.warm_up(harness.synchronized(step, device))
    record["seconds"][impl] = harness.median_seconds(step, device, budget)
    record["peak_bytes"][impl] = harness.peak_memory(step, device)


def run(picked, skipped, device, quick, dtype, folder):
    """Measures the picked cases with a progress bar, prints the table and writes the files."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    device = torch.device(device)
    records = {}
    columns = (TextColumn("{task.description:<52}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("cases", total=len(picked))
        for module, case in picked:
            record = harness.record_of(records, case)
            for impl in module.IMPLS:
                bar.update(task, description=f"{case['name']} {impl}")
                measure(module, case, impl, device, record, BUDGET[quick])
            bar.advance(task)
    out = harness.results(records, device, CPU_TIMER.format(budget=BUDGET[quick]), dtype=dtype_name(dtype),
                          quick=quick, skipped=skipped)
    console = Console()
    report.show(out, console)
    paths, missing = report.write(out, folder)
    console.print(f"results: {', '.join(map(str, paths))}", highlight=False, soft_wrap=True)
    if missing:
        console.print(missing, highlight=False, soft_wrap=True)
    return out

"""The reports of a benchmark run (the dict of harness.results): its table in the terminal (rich),
and bench.json, bench.md and bench.png, a bar chart of the speed-ups, in a folder."""
import io
import json
from pathlib import Path

from fastdl.bench.harness import IMPLS

RATIOS = ("eager_over_fastdl", "compile_over_fastdl")
NOTE = ("Ratios are eager time / fastdl time and torch.compile time / fastdl time: above 1 means fastdl is "
        "faster. Peak MiB: what one step allocates beyond what was allocated before it (fastdl / eager / compile).")


def ms(seconds):
    """Milliseconds, 3 significant digits below 100 ms, then to a tenth: '0.660', '18.0', '547.9'."""
    if not seconds:
        return "-"
    return f"{seconds * 1e3:#.3g}" if seconds < 0.1 else f"{seconds * 1e3:.1f}"


def times(ratio):
    return f"{ratio:.2f}x" if ratio else "-"


def mib(peaks):
    """fastdl/eager/compile peak memory in MiB, e.g. '12.5/14/14'."""
    return "/".join(f"{peaks[impl] / 2**20:.3g}" if peaks.get(impl) is not None else "-" for impl in IMPLS)


def others(row):
    """The other baselines measured (e.g. SDPA's backends on CUDA): 'sdpa-flash 1.234 ms (1.10x)'."""
    return "  ".join(f"{impl} {ms(t)} ms ({times(row[f'{impl}_over_fastdl'])})"
                     for impl, t in row["median_s"].items() if impl not in IMPLS and t)


def table(out):
    """(headers, rows of strings): a row per case; GB/s and the fraction of a copy's on CUDA, and a
    column of the other baselines when any was measured."""
    cuda = out["copy_gbps"] is not None
    extra = any(others(row) for row in out["cases"])
    headers = ["case", "fastdl ms", "eager ms", "compile ms", "eager/fastdl", "compile/fastdl", "peak MiB f/e/c"]
    headers += ["GB/s", "of copy"] * cuda + ["other baselines"] * extra
    rows = []
    for row in out["cases"]:
        m = row["median_s"]
        cells = [row["name"], ms(m["fastdl"]), ms(m["eager"]), ms(m["compile"]), times(row["eager_over_fastdl"]),
                 times(row["compile_over_fastdl"]), mib(row["peak_bytes"])]
        if cuda:
            gbps = row["fastdl_gbps"]
            cells += [f"{gbps:.0f}", f"{row['fastdl_fraction_of_copy']:.0%}"] if gbps else ["-", "-"]
        rows.append(cells + [others(row)] * extra)
    return headers, rows


def title(out):
    return f"fastdl vs eager vs torch.compile on {out['device_name']} ({out['device']}, {out['threads']} threads)"


def conditions(out):
    """One line: versions, commit, date and timer (the device is in the title)."""
    v = out["versions"]
    return (f"fastdl {v['fastdl']} at commit {out['commit']}, torch {v['torch']}, triton {v['triton'] or '-'}, "
            f"CUDA {v['cuda'] or '-'}, python {v['python']}; {out['date']}; timer: {out['timer']}")


def notes(out):
    """Lines below the table: the copy bandwidth on CUDA, what was skipped and why."""
    lines = [f"device-to-device copy: {out['copy_gbps']:.0f} GB/s (bytes read + written)"] if out["copy_gbps"] else []
    lines += [f"skipped: {why}" for why in out.get("skipped", [])]
    lines += [f"{row['name']}: no {impl}: {why}" for row in out["cases"]
              for impl, why in row["skipped"].items() if impl in IMPLS]
    return lines


def rich_table(out):
    from rich.table import Table

    headers, rows = table(out)
    t = Table(title=title(out), caption=conditions(out), caption_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 or h == "other baselines" else "right", no_wrap=i == 0)
    for cells in rows:
        t.add_row(*cells)
    return t


def show(out, console):
    """Prints the table and its notes on a rich console, widened to the table's width when narrower
    (numbers are never cut), the notes unwrapped."""
    from rich.measure import Measurement

    t = rich_table(out)
    console.width = max(console.width, Measurement.get(console, console.options.update_width(1000), t).maximum)
    console.print(t)
    for line in notes(out):
        console.print(line, highlight=False, soft_wrap=True)


def render(out):
    """The table and its notes as plain text (for pytest's terminal summary)."""
    from rich.console import Console

    console = Console(file=io.StringIO(), color_system=None)
    show(out, console)
    return console.file.getvalue().rstrip()


def markdown(out):
    headers, rows = table(out)
    lines = [f"# {title(out)}", "", conditions(out), "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", NOTE] + [f"- {line}" for line in notes(out)]
    return "\n".join(lines) + "\n"


def bar_chart(out, path):
    """A PNG of eager/fastdl and compile/fastdl per case: bars from 1 on a log2 axis, to the right
    where fastdl is faster, to the left where it is slower."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    names = [row["name"] for row in out["cases"]][::-1]
    fig = Figure(figsize=(10, 1.5 + 0.45 * len(names)), layout="constrained")
    ax = fig.subplots()
    height = 0.4
    for i, (key, label) in enumerate(zip(RATIOS, ("eager / fastdl", "torch.compile / fastdl"))):
        ratios = [row[key] for row in out["cases"]][::-1]
        bars = ax.barh([y + (0.5 - i) * height for y in range(len(names))], [(r or 1) - 1 for r in ratios], height,
                       left=1, label=label)  # a ratio not measured: no bar, no label
        ax.bar_label(bars, labels=[f"{r:.2f}x" if r else "" for r in ratios], padding=2, fontsize=8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("baseline time / fastdl time (right of 1x: fastdl is faster)")
    ax.set_title(f"{title(out)}\ntorch {out['versions']['torch']}, fastdl commit {out['commit']}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.savefig(path, dpi=120)


def write_json(out, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def write(out, folder):
    """Writes bench.json, bench.md and, when matplotlib imports, bench.png to `folder`. Returns the
    paths written and, when the chart could not be drawn, a line saying why."""
    folder = Path(folder)
    write_json(out, folder / "bench.json")
    (folder / "bench.md").write_text(markdown(out))
    paths = [folder / "bench.json", folder / "bench.md"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return paths, "bench.png not written: the bar chart needs matplotlib (pip install 'fastdl[bench]')"
    bar_chart(out, folder / "bench.png")
    return paths + [folder / "bench.png"], None

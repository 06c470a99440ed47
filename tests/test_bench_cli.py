"""`fastdl bench`: the files it writes on a tiny selection, its answers to bad arguments, and every
stem's quick cases. The run: one batch_norm_act case (fastdl, eager, torch.compile) and one GRU
layer case (no compile column), at sizes small enough to compile and time in seconds."""
import contextlib
import importlib
import io
import json
import sys

import pytest
import torch

from fastdl import __main__ as cli
from fastdl.bench import STEMS, harness, report, rnn, run

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ("device", "device_name", "cpu", "cpu_isa", "versions", "commit", "date", "threads", "timer", "dtype", "quick", "cases")
ROW_KEYS = ("op", "name", "median_s", "peak_bytes", "eager_over_fastdl", "compile_over_fastdl", "skipped")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """`fastdl bench --quick --device cpu --only batch_norm_act rnn` on the tiny cases: its exit
    status, what it printed, its output folder and its bench.json."""
    out = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr("fastdl.bench.batch_norm_act.QUICK_SHAPES", [(2, 3, 5, 4)])
        mp.setattr("fastdl.bench.batch_norm_act.QUICK_PASSES", [("eval", "fwd")])
        mp.setattr(rnn, "cases", lambda device, quick, dtypes=None: [
            rnn.case("gru", False, 3, 2, 4, 5, 1, False, dtypes[0], "fwd+bwd")])
        mp.setattr(run, "BUDGET", {True: 0.01, False: 0.01})
        status = cli.main(["bench", "--quick", "--device", "cpu", "--only", "batch_norm_act", "rnn", "--out", str(out)])
    return status, printed.getvalue(), out, json.loads((out / "bench.json").read_text())


def test_json_holds_the_conditions_and_a_row_per_case(bench_run):
    status, _, _, result = bench_run
    assert status == 0
    assert all(key in result for key in KEYS), [key for key in KEYS if key not in result]
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["quick"] is True
    assert all(result["versions"][name] for name in ("fastdl", "torch", "python"))
    assert set(result["cpu_isa"]) <= set(harness.ISA_FLAGS) and result["cpu"]
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert ("avx2" in result["cpu_isa"]) == (" avx2 " in flags.replace("\n", " "))
    assert [row["name"] for row in result["cases"]] == ["N2-C3-H5-W4-fp32-eval-fwd", "gru-T3-N2-I4-H5-fp32-fwd+bwd"]
    for row in result["cases"]:
        assert all(key in row for key in ROW_KEYS), [key for key in ROW_KEYS if key not in row]


def test_times_and_ratios_are_consistent(bench_run):
    bn, gru = bench_run[3]["cases"]
    for impl in harness.IMPLS:
        assert bn["median_s"][impl] > 0 and bn["peak_bytes"][impl] >= 0
    assert bn["eager_over_fastdl"] == pytest.approx(bn["median_s"]["eager"] / bn["median_s"]["fastdl"])
    assert bn["compile_over_fastdl"] == pytest.approx(bn["median_s"]["compile"] / bn["median_s"]["fastdl"])
    assert gru["median_s"]["compile"] is None and gru["compile_over_fastdl"] is None
    assert "torch.compile does not trace" in gru["skipped"]["compile"]


def test_table_markdown_and_chart(bench_run):
    _, printed, out, result = bench_run
    markdown = (out / "bench.md").read_text()
    for row in result["cases"]:
        assert f"| {row['name']} | {report.ms(row['median_s']['fastdl'])} |" in markdown
        assert row["name"] in printed
    assert result["commit"] in markdown and "eager/fastdl" in printed
    assert (out / "bench.png").read_bytes().startswith(PNG)


def test_without_matplotlib_the_chart_is_named_missing(bench_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths, missing = report.write(bench_run[3], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]
    assert "bench.png" in missing and "matplotlib" in missing


def exit_status(argv):
    """cli.main's status, or argparse's when it exits."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("args, name", [
    (["--dtype", "int8"], "--dtype"),
    (["--device", "tpu"], "--device"),
    (["--only", "nosuchop"], "--only"),
    (["--quick", "--only", "resnet18"], "--only"),
])
def test_bad_arguments_exit_2_naming_them(args, name, capsys):
    assert exit_status(["bench", "--device", "cpu", *args]) == 2
    assert name in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert exit_status(["bench", "--device", "cuda", "--quick"]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.skipif(harness.fallback("batch_norm_act", "cpu", torch.bfloat16) is None,
                    reason="batch_norm_act has a bfloat16 CPU kernel")
def test_a_dtype_without_cpu_kernels_is_skipped_with_its_reason(capsys):
    assert exit_status(["bench", "--device", "cpu", "--dtype", "bfloat16", "--only", "batch_norm_act"]) == 2
    err = capsys.readouterr().err
    assert "--dtype bfloat16" in err and "batch_norm_act: no bfloat16 kernel on cpu" in err and "reference" in err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("stem", STEMS)
def test_quick_cases_are_few_and_named_once(stem, device):
    cases = importlib.import_module(f"fastdl.bench.{stem}").cases(device, True)
    names = [c["name"] for c in cases]
    assert 0 < len(cases) <= 4
    assert len(set(names)) == len(names), names


def test_the_isa_group_runs_only_when_named():
    """The isa stem regroups other stems' cases: not measured twice by a plain `fastdl bench`."""
    everything, _ = run.select("cpu", True, torch.float32)
    assert everything and all(c["op"] != "isa" for _, c in everything)
    named, _ = run.select("cpu", True, torch.float32, ["isa"])
    assert named and all(c["op"] == "isa" for _, c in named)

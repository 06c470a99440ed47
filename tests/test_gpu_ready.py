"""The GPU-readiness gate (fastdl/gpu_ready): Triton kernels compiled ahead of time for sm_80 /
sm_90 from the wrappers' real launches, and the CUDA kernels' ptxas reports, with no GPU.

Triton compiles only outside its interpreter, which tests/conftest.py turns on: each check runs
in a subprocess without TRITON_INTERPRET. `make test` runs the quick subset (sm_90; bf16, tf32 and
fp32 attention with every mask, padding, causal and dropout at once, at D = 64, 128, 256; batch
norm at ResNet's batch-256 stem); `make gpu-ready` runs the whole table (docs/gpu-resources.md).
"""
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, timeout=900):
    """Runs `code` in a fresh interpreter without TRITON_INTERPRET (from a file: @triton.jit reads
    its function's source); returns its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "check.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(code))
        done = subprocess.run([sys.executable, path], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick gate's rows and failures (its exit status is checked by test_quick_gate_passes)."""
    path = tmp_path_factory.mktemp("gate") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "fastdl.gpu_ready", "--quick", "--json", str(path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    out = json.loads(path.read_text()) if path.exists() else {}
    return done, out


def test_quick_gate_passes(quick):
    done, out = quick
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert out["triton"] and out["cuda"] and not out["failures"]


def test_quick_gate_covers_every_kernel(quick):
    _, out = quick
    kernels = {(r["op"], r["kernel"]) for r in out["triton"]}
    assert kernels == {("attention", k) for k in ("_forward_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel")} \
        | {("batch_norm_act", k) for k in ("_stats_kernel", "_forward_kernel", "_grad_stats_kernel",
                                           "_backward_kernel")}
    sources = {r["source"] for r in out["cuda"]}
    assert sources == {"csrc/cuda/depthwise_conv2d.cu", "csrc/cuda/rnn.cu"}


def test_every_offset_is_int64(quick):
    """The int64 offsets (attention's rows * stride, start_n * stride, masks; batch norm's c * HW,
    block * BLOCK_R) in the compiled IR: no pointer addition with an i32 offset in any kernel."""
    _, out = quick
    assert all(r["i32_addptr"] == 0 for r in out["triton"] if not r["error"])


def test_fp32_follows_torch_tf32_setting(quick):
    """fp32 attention runs its dots as TF32 on tensor cores when torch allows TF32 for matmuls,
    else as IEEE fp32 FMAs; bf16 always on tensor cores."""
    _, out = quick
    by = {}
    for r in out["triton"]:
        if r["op"] == "attention" and r["kernel"] != "_delta_kernel" and not r["error"]:
            by.setdefault(r["dtype"], set()).add((r["cores"], r["dots"].split(":")[0]))
    assert by["tf32"] and all(c in ("wgmma", "mma") and d == "tf32" for c, d in by["tf32"])
    assert {c for c, _ in by["fp32"]} == {"fma"} and {d for _, d in by["fp32"]} == {"ieee"}
    assert {c for c, _ in by["bf16"]} <= {"wgmma", "mma"}


def test_batch_norm_resnet_stem_grid_fits(quick):
    """N=256 at 112x112, channels_last: 100,352 position blocks, on grid axis 0 (limit 2^31 - 1):
    on axis 1 (limit 65535) the launch would fail."""
    _, out = quick
    grids = [r["grid"] for r in out["triton"] if r["op"] == "batch_norm_act" and "resnet-stem" in r["variant"]
             and "channels_last" in r["variant"] and r["kernel"] == "_forward_kernel"]
    assert grids and all(g[0] > 65535 and all(x <= 65535 for x in g[1:]) for g in grids)


def test_kept_configs_exist_for_each_half_precision_variant(quick):
    """bf16 at D <= 128: each kernel has a kept config with no spill."""
    _, out = quick
    for kernel in ("_forward_kernel", "_dkdv_kernel", "_dq_kernel"):
        for d in (64, 128):
            kept = [r for r in out["triton"] if r["kernel"] == kernel and r["dtype"] == "bf16" and r["head_dim"] == d
                    and r["kept"] and not r["error"]]
            assert kept and all(r["spills"] == 0 for r in kept), (kernel, d)


def test_aot_counts_int32_offsets():
    """The i32 check can fail: a kernel adding an int32 offset to a pointer counts 1, its int64
    twin 0."""
    out = _python("""
        import torch, triton, triton.language as tl
        from fastdl.gpu_ready import triton_aot

        @triton.jit
        def copy(X, Y, n, WIDE: tl.constexpr, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            if WIDE:
                offs = offs.to(tl.int64)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)

        class M:
            copy = copy
        x = torch.empty(1000, device="meta")
        for wide in (False, True):
            with triton_aot.record(M, ["copy"]) as launches:
                M.copy[(4,)](x, x, 1000, WIDE=wide, BLOCK=256)
            _, res = triton_aot.compile_launch(launches[0], {}, triton_aot.TARGETS["sm_90"])
            print(res.i32_addptr)
    """)
    assert out.split() == ["2", "0"]


def test_pruner_follows_the_device_limits():
    """The pruner keeps only configs measured within a device's shared memory; with less than any
    config needs it keeps the smallest, so a launch still has one."""
    out = _python("""
        import torch
        from fastdl.gpu_ready import cases
        from fastdl.triton import attention_configs as ac
        case = cases.attention_case("bf16", "plain", 128)
        fwd = [l for l in case.launches if l.name == "_forward_kernel"][0]
        table = ac.load_table()
        prune = fwd.kernel.early_config_prune
        entry = table[ac.table_key("_forward_kernel", 2, "ieee", 128, False)]
        for limit in (232448, 101376, 1):
            kept = prune.for_device(90 if limit > 200000 else 86, limit, fwd.kernel.configs, fwd.named_args(),
                                    **fwd.kwargs)
            target = "sm_90" if limit > 200000 else "sm_80"
            print(len(kept), all(entry[ac.config_name(c)][target][0] <= limit for c in kept))
    """)
    lines = out.split("\n")[:3]
    big, mid, tiny = (line.split() for line in lines)
    assert big[1] == "True" and mid[1] == "True" and int(big[0]) >= int(mid[0]) >= 1
    assert tiny[0] == "1"


def test_table_covers_every_candidate():
    """attention_resources.json (written by make gpu-ready) has a measurement on both targets for
    every candidate config of every key the gate's cases launch: a config added to
    attention_configs without rerunning the gate would be silently never kept."""
    out = _python("""
        from fastdl.gpu_ready import cases, gate
        from fastdl.triton import attention_configs as ac
        table = ac.load_table()
        missing = []
        for case in cases.attention_cases():
            for launch in case.launches:
                if launch.name == "_delta_kernel":
                    continue
                kw = launch.kwargs
                key = ac.table_key(launch.name, gate.element_size(case), kw["PREC"], kw["BLOCK_D"],
                                   kw["HAS_MASK"] or kw["HAS_KPM"] or kw["DROPOUT"])
                for cfg in gate._candidates(case, launch):
                    name = ac.config_name(cfg)
                    if set(table.get(key, {}).get(name, {})) != {"sm_80", "sm_90"}:
                        missing.append(f"{key} {name}")
        print(len(missing), sorted(set(missing))[:10])
    """, timeout=300)
    assert out.startswith("0 "), out


def test_head_dim_and_grid_limits_are_clear_errors():
    out = _python("""
        import torch
        from fastdl.triton import attention
        def attempt(N, H, D):
            q = torch.empty(N, H, 8, D, device="meta")
            try:
                attention.forward(q, q, q, None, None, None, False, 1.0, 0.0, 0)
            except NotImplementedError as e:
                print(str(e))
        attempt(1, 1, 257)
        attempt(70000, 1, 64)
    """)
    assert "head dims up to 256, got 257" in out and "up to 65535" in out and "batch 70000" in out

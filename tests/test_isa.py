"""The CPU kernels' ISA dispatch (csrc/cpu/isa.h): the best copy the CPU supports by default, the
FASTDL_CPU_ISA / fastdl.set_cpu_isa override (lower only), what fastdl info says, and a build whose
code outside the ISA copies runs on any x86-64 CPU (no -march=native)."""
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastdl
from fastdl import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="fastdl._C is not built")

X86 = platform.machine().lower() in ("x86_64", "amd64")
# x86-64 micro-architecture levels as /proc/cpuinfo names their features (abm: LZCNT).
LEVELS = {
    "baseline": {"sse4_2", "ssse3", "sse4_1", "popcnt", "cx16"},
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def cpuinfo_flags():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_best():
    """The best ISA by /proc/cpuinfo (each level needs the ones below it)."""
    if not X86:
        return "baseline"
    flags, best = cpuinfo_flags(), "none"
    for isa, needs in LEVELS.items():
        if not needs <= flags:
            break
        best = isa
    return best


def fresh_info(**env):
    """fastdl.info()["cpu"] in a new process with `env` (FASTDL_CPU_ISA unset unless given)."""
    environ = {k: v for k, v in os.environ.items() if k != "FASTDL_CPU_ISA"}
    environ.update(env)
    code = "import json, fastdl; print(json.dumps(fastdl.info()['cpu']))"
    r = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300)
    return r


def test_dispatcher_picks_the_best_supported_isa():
    isa = fastdl.cpu_isa()
    assert isa["supported"] == expected_best()
    assert isa["compiled"] == (["baseline", "avx2", "avx512"] if X86 else ["baseline"])
    r = fresh_info()
    assert r.returncode == 0, r.stderr
    cpu = json.loads(r.stdout)
    assert cpu["active"] == expected_best() and cpu["reason"] == "the best this CPU supports"
    assert fastdl.cpu_isas() == cpu["compiled"][: cpu["compiled"].index(cpu["active"]) + 1]


@pytest.mark.parametrize("name", ["baseline", "avx2", "avx512"])
def test_env_override_lowers_the_isa(name):
    if name not in fastdl.cpu_isas():
        pytest.skip(f"this CPU does not run {name} (the rule is checked in test_resolve_rule)")
    r = fresh_info(FASTDL_CPU_ISA=name)
    assert r.returncode == 0, r.stderr
    cpu = json.loads(r.stdout)
    assert cpu["active"] == name and cpu["reason"] == f"FASTDL_CPU_ISA={name}"


def test_env_rejects_an_unknown_isa():
    r = fresh_info(FASTDL_CPU_ISA="sse9")
    assert r.returncode != 0
    assert "FASTDL_CPU_ISA: expected one of baseline, avx2, avx512 (or auto), got 'sse9'" in r.stderr


def test_env_rejects_more_than_the_cpu_supports():
    above = [i for i in _extension.ISAS if _extension.ISAS.index(i) > _extension.ISAS.index(expected_best())]
    if not above:
        pytest.skip("this CPU supports every ISA (the rule is checked in test_resolve_rule)")
    r = fresh_info(FASTDL_CPU_ISA=above[-1])
    assert r.returncode != 0
    assert f"FASTDL_CPU_ISA: '{above[-1]}' is more than this CPU supports ({expected_best()})" in r.stderr


def test_resolve_rule():
    resolve = torch.ops.fastdl._resolve_cpu_isa
    assert resolve("isa", "baseline", "avx2") == "baseline"
    assert resolve("isa", "avx2", "avx2") == "avx2"
    assert resolve("isa", "avx2", "avx512") == "avx2"
    with pytest.raises(ValueError, match=r"isa: 'avx512' is more than this CPU supports \(avx2\); it can only be"):
        resolve("isa", "avx512", "avx2")
    with pytest.raises(ValueError, match=r"FASTDL_CPU_ISA: 'baseline' is more than this CPU supports \(none\)"):
        resolve("FASTDL_CPU_ISA", "baseline", "none")
    with pytest.raises(ValueError, match="isa: expected one of baseline, avx2, avx512"):
        resolve("isa", "AVX2", "avx512")


def test_set_cpu_isa_switches_every_runnable_copy_and_back():
    start = fastdl.cpu_isa()["active"]
    try:
        for name in fastdl.cpu_isas():
            fastdl.set_cpu_isa(name)
            isa = fastdl.cpu_isa()
            assert isa["active"] == name and isa["reason"] == f"set by fastdl.set_cpu_isa('{name}')"
            row = next(r for r in fastdl.info()["ops"] if r["device"] == "cpu" and r["backend"] == "cpp")
            assert f"{name} copy" in row["reason"]
    finally:
        assert fastdl.set_cpu_isa(None) == fastdl.cpu_isas()[-1]
    assert fastdl.cpu_isa()["active"] == start


def test_set_cpu_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa: expected one of baseline, avx2, avx512"):
        fastdl.set_cpu_isa("neon")


def test_fastdl_info_shows_the_isa():
    out = subprocess.run([sys.executable, "-m", "fastdl", "info"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    isa = fastdl.cpu_isa()
    assert f"C++ kernels: {isa['active']} copy ({isa['reason']}); built: {', '.join(isa['compiled'])}" in out
    assert f"supports up to {isa['supported']}" in out
    assert re.search(r"attention\s+cpu\s+float32\s+cpp\s+C\+\+ kernel, " + isa["active"] + " copy", out)


# ------------------------------------------------------------------------------------------------
# The build: each copy holds its ISA's instructions, and nothing outside them needs more than
# x86-64 (what a wheel built on an AVX-512 machine must be to run on an AVX2 one).

VEX = re.compile(r"^v(?!err|erw)[a-z0-9]+$")  # AVX / AVX-512 mnemonics (VEX / EVEX encoded)


def functions_by_isa(path):
    """{isa or "other": {"vex": names, "zmm": names, "ymm": names}} over the functions in `path`."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True,
                          check=True).stdout
    found = {k: {"vex": set(), "ymm": set(), "zmm": set()} for k in ("baseline", "avx2", "avx512", "other")}
    owner, name = "other", ""
    for line in dump.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            name = m.group(1)
            # Demangled, or mangled where objdump cannot demangle (OpenMP's "._omp_fn.0" clones).
            owner = next((i for i in ("avx512", "avx2", "baseline")
                          if f"fastdl::cpu::{i}::" in name or f"6fastdl3cpu{len(i)}{i}" in name), "other")
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        insn = parts[-1].split()
        if not insn:
            continue
        if VEX.match(insn[0]):
            found[owner]["vex"].add(name)
        if "%ymm" in parts[-1]:
            found[owner]["ymm"].add(name)
        if "%zmm" in parts[-1] or re.search(r"%k[0-7]\b", parts[-1]):
            found[owner]["zmm"].add(name)
    return found


@pytest.mark.skipif(not X86 or shutil.which("objdump") is None, reason="x86-64 with objdump only")
def test_each_copy_has_its_isa_and_nothing_else_needs_avx():
    found = functions_by_isa(fastdl._C.__file__)
    assert not found["other"]["vex"], f"AVX code outside the ISA copies: {sorted(found['other']['vex'])[:5]}"
    assert not found["baseline"]["vex"], f"AVX code in the baseline copy: {sorted(found['baseline']['vex'])[:5]}"
    assert not found["avx2"]["zmm"], f"AVX-512 code in the avx2 copy: {sorted(found['avx2']['zmm'])[:5]}"
    assert found["avx2"]["ymm"] and found["avx512"]["zmm"]
    # A function of each kernel file (csrc/cpu/<op>.cpp) that holds vector code.
    kernels = {"attention_forward_kernel", "batch_norm_act_forward_kernel", "depthwise_conv2d_forward_kernel",
               "lstm_forward_block"}
    for isa in ("avx2", "avx512"):
        wide = found[isa]["zmm" if isa == "avx512" else "ymm"]
        assert {k for k in kernels if any(k in name for name in wide)} == kernels, isa


def test_a_cpu_below_x86_64_v2_runs_the_reference_and_says_why(monkeypatch):
    """The C++ kernels' baseline needs x86-64-v2: without it every CPU op runs its reference."""
    from fastdl import _backends

    monkeypatch.setattr(_extension, "cpu_isa", lambda: dict(fastdl.cpu_isa(), supported="none"))
    monkeypatch.setattr(_backends, "_CHOSEN", {})
    for op in _backends.OPS:
        b = _backends.choose(op, "cpu", torch.float32)
        assert (b.name, b.reason) == ("reference", "the C++ kernels need an x86-64-v2 CPU (SSE4.2, POPCNT)"), op

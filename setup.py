"""Builds fastdl._C: the C++ CPU kernels always, the CUDA kernels when a toolkit and a CUDA torch are present.

Switches (environment):
  FASTDL_SKIP_CUDA=1     build the CPU extension only.
  FASTDL_FORCE_CUDA=1    build the CUDA objects, or fail saying why not.
  FASTDL_CPU_ISAS=...    the CPU kernel copies to build (default: all of the machine's kind:
                         baseline,avx2,avx512 on x86-64, baseline elsewhere). The build is portable:
                         no -march=native; the copy run is chosen at run time (csrc/cpu/isa.h).
  TORCH_CUDA_ARCH_LIST   CUDA archs (default: the visible GPU's, else "8.0;9.0").
  CUDA_HOME              the CUDA toolkit; found from nvcc on PATH otherwise (wrapper scripts resolved).
  MAX_JOBS               parallel compile jobs (read by torch.utils.cpp_extension).
"""
import glob
import os
import platform
import re
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _toolkit_of(nvcc):
    """The toolkit folder of an nvcc binary, following symlinks and `exec .../nvcc` wrapper scripts."""
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        target = re.search(rb"exec\s+\"?([^\s\"]+/nvcc)\b", head)
        if target:
            return _toolkit_of(target.group(1).decode())
    return os.path.dirname(os.path.dirname(nvcc))


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_of(nvcc)
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
if not os.environ.get("CUDA_HOME") and _find_cuda_home():
    os.environ["CUDA_HOME"] = _find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if _flag("FASTDL_SKIP_CUDA"):
        return False, "FASTDL_SKIP_CUDA=1"
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is a CPU-only build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        missing.append(f"no CUDA toolkit (CUDA_HOME={CUDA_HOME})")
    if missing and _flag("FASTDL_FORCE_CUDA"):
        sys.exit("FASTDL_FORCE_CUDA=1 but the CUDA objects cannot be built: " + "; ".join(missing))
    return not missing, "; ".join(missing) or "ok"


def _cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return "{}.{}".format(*torch.cuda.get_device_capability(0))
    return "8.0;9.0"


def _pip_cuda_includes():
    """CUDA headers that pip wheels install (nvidia/cu13/include, ...): some toolkits lack cusparse.h."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    return sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "cu*", "include"))})


# The CPU kernels (csrc/cpu/<op>.cpp; <op>_api.cpp are compiled once) are compiled once per ISA,
# each into namespace fastdl::cpu::<isa>: the target flags of each copy. -fno-trapping-math lets
# GCC if-convert the selects of the `omp simd` loops (exp, sigmoid, tanh) without AVX-512's masks:
# without it no AVX2 or SSE loop with a select vectorizes. It changes no result, only the
# assumption that FP exceptions trap.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
ISA_FLAGS = {
    "baseline": ["-march=x86-64-v2"] if X86 else [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4"],
}
KERNELS = sorted(f for f in glob.glob("csrc/cpu/*.cpp") if not f.endswith("_api.cpp"))


def _cpu_isas():
    default = "baseline,avx2,avx512" if X86 else "baseline"
    isas = [i.strip() for i in os.environ.get("FASTDL_CPU_ISAS", default).split(",") if i.strip()]
    bad = [i for i in isas if i not in ISA_FLAGS or (i != "baseline" and not X86)]
    if bad or "baseline" not in isas:
        sys.exit(f"FASTDL_CPU_ISAS={','.join(isas)}: expected baseline plus any of avx2, avx512 (x86-64 only)")
    return isas


class Build(BuildExtension):
    """Compiles the kernels once per ISA, in its own folder and namespace, then links them in."""

    def build_extension(self, ext):
        cxx = list(ext.extra_compile_args["cxx"])
        for isa in ext.cpu_isas:
            ext.extra_objects += self.compiler.compile(
                KERNELS, output_dir=os.path.join(self.build_temp, "isa-" + isa), macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug, depends=ext.depends,
                extra_postargs={"cxx": cxx + ISA_FLAGS[isa] + ["-fno-trapping-math", f"-DFASTDL_ISA={isa}"],
                                "nvcc": []})
        super().build_extension(ext)


def extension():
    with_cuda, why = _want_cuda()
    print(f"fastdl: CUDA objects {'on' if with_cuda else 'off'} ({why}); CUDA_HOME={CUDA_HOME}")
    isas = _cpu_isas()
    print(f"fastdl: CPU kernel copies: {', '.join(isas)}")
    sources = ["csrc/fastdl.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*_api.cpp"))
    cxx = ["-O3", "-fopenmp"] + [f"-DFASTDL_HAVE_{isa.upper()}" for isa in isas if isa != "baseline"]
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + KERNELS)
    args = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"], depends=depends)
    if not with_cuda:
        ext = CppExtension("fastdl._C", sources, extra_compile_args={"cxx": cxx}, **args)
    else:
        ext = _cuda_extension(sources, cxx, args)
    ext.cpu_isas = isas
    return ext


def _cuda_extension(sources, cxx, args):
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    print(f"fastdl: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    cxx += ["-DFASTDL_WITH_CUDA"] + [f"-idirafter{d}" for d in _pip_cuda_includes()]
    nvcc = ["-O3", "-DFASTDL_WITH_CUDA", "-lineinfo"]
    return CUDAExtension("fastdl._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **args)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)

"""Builds fastdl._C: the C++ CPU kernels always, the CUDA kernels when a toolkit and a CUDA torch are present.

Switches (environment):
  FASTDL_SKIP_CUDA=1     build the CPU extension only.
  FASTDL_FORCE_CUDA=1    build the CUDA objects, or fail saying why not.
  FASTDL_CPU_ARCH=...    -march for the C++ kernels (default: native; "x86-64-v2" for a portable build).
  TORCH_CUDA_ARCH_LIST   CUDA archs (default: the visible GPU's, else "8.0;9.0").
  CUDA_HOME              the CUDA toolkit; found from nvcc on PATH otherwise (wrapper scripts resolved).
  MAX_JOBS               parallel compile jobs (read by torch.utils.cpp_extension).
"""
import glob
import os
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


def extension():
    with_cuda, why = _want_cuda()
    print(f"fastdl: CUDA objects {'on' if with_cuda else 'off'} ({why}); CUDA_HOME={CUDA_HOME}")
    sources = ["csrc/fastdl.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    march = os.environ.get("FASTDL_CPU_ARCH", "native")
    cxx = ["-O3", f"-march={march}", "-fopenmp", "-DFASTDL_CPU_ARCH=" + march]
    args = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not with_cuda:
        return CppExtension("fastdl._C", sources, extra_compile_args={"cxx": cxx}, **args)
    os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
    print(f"fastdl: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    cxx += ["-DFASTDL_WITH_CUDA"] + [f"-idirafter{d}" for d in _pip_cuda_includes()]
    nvcc = ["-O3", "-DFASTDL_WITH_CUDA", "-lineinfo"]
    return CUDAExtension("fastdl._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **args)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

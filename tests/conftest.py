"""Test setup: Triton through its interpreter without a GPU, NaN-poisoned outputs, the cuda marker,
and the one_thread and isa fixtures."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit runs: the Triton kernels then execute on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

HAS_CUDA = torch.cuda.is_available()


def pytest_generate_tests(metafunc):
    # A test that takes `isa` runs once per CPU kernel copy this machine can run (csrc/cpu/isa.h).
    if "isa" in metafunc.fixturenames:
        import fastdl

        metafunc.parametrize("isa", fastdl.cpu_isas(), indirect=True)


@pytest.fixture
def isa(request):
    """The C++ CPU kernels run their `isa` copy for the test, then the start-up choice again."""
    import fastdl

    fastdl.set_cpu_isa(request.param)
    assert fastdl.cpu_isa()["active"] == request.param
    yield request.param
    fastdl.set_cpu_isa(None)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """torch.empty is NaN-filled (in Python and in C++): a kernel that misses an element fails."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then back: training runs of small models are so small that a
    second thread costs more than it gives (and on a loaded machine, far more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

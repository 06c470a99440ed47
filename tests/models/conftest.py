"""Fixtures of the model tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then back: the training runs' models are so small that a
    second thread costs more than it gives (and on a loaded machine, far more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

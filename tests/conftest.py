"""Shared test configuration."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the tensors here are small, and on a shared 2-core
    machine OpenMP threads competing with another process made tests 3-5x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

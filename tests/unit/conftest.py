"""Fixtures shared by the unit tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run the module's tests with one torch thread: small elementwise ops on 2 shared cores are
    ~30x slower with 2 OpenMP threads. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

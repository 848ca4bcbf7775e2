"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``). Tiny models gain nothing from a second
    thread, and on a shared 2-core machine 2-thread kernels stall behind other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

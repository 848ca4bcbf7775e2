"""Fixtures shared by the test modules, and one torch thread for every process the suite starts."""

import os

# Every test process (the two workers and the ranks, demos and kernels they launch) computes on one
# thread: the suite's models are tiny, and on two cores two multi-process tests side by side would
# otherwise run many spinning OpenMP threads per core. Set before torch is imported, so that the
# workers get it too; children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module's tests (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``). Tiny models gain nothing from a second
    thread, and on a shared 2-core machine 2-thread kernels stall behind other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""BLAS thread control for the solvers' small matrices."""

from __future__ import annotations

import functools
from contextlib import nullcontext


def one_blas_thread(func):
    """Run ``func`` with BLAS/LAPACK limited to one thread (through threadpoolctl, if installed).

    The solvers' matrices have tens of rows and columns, where a BLAS thread pool costs more than
    it saves: SLSQP, which calls LAPACK at every iteration, ran 5-50x slower with OpenBLAS's two
    threads than with one on a busy 2-core machine (threads spinning against other processes).
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # a dependency of scikit-learn, so normally present
            limit = nullcontext()
        else:
            limit = threadpool_limits(limits=1, user_api="blas")
        with limit:
            return func(*args, **kwargs)

    return wrapper

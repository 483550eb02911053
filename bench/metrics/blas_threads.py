"""How many BLAS/LAPACK threads the statistics at the end of a metric (FID, KID) may use.

Measured on this shared 2-core machine (scripts/bench_metrics.py --frechet): with another
engineer's processes on the cores, OpenBLAS's default of one thread per core made the 2048-d
eigenvalue and SVD steps 3-8x *slower* than one thread (the threads wait for each other at every
BLAS-2 step of the tridiagonalisation while one of them is descheduled; numpy and scipy each
bundle their own OpenBLAS, whose idle threads spin against each other); idle, two threads gained
at most ~1.6x. One thread is the robust choice; change ``STATISTICS_THREADS`` on a dedicated
many-core machine.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

STATISTICS_THREADS = 1


@contextlib.contextmanager
def statistics_threads(limit: Optional[int] = None) -> Iterator[None]:
    """Limit every loaded BLAS (numpy's and scipy's OpenBLAS alike) to ``limit`` threads inside
    (default ``STATISTICS_THREADS``, read at call time)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=limit or STATISTICS_THREADS, user_api="blas"):
        yield

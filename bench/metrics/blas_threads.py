"""How many BLAS/LAPACK threads the statistics at the end of a metric (FID, KID) may use.

Measured on this shared 2-core machine with another engineer's jobs on the cores (load 4-6;
scripts/bench_metrics.py --frechet): the harness's FID + KID pair on 2048-d features took 1.2 s
with one BLAS thread and 7.5 s with two at N = 1000, 6.3 s and 15.0 s at N = 2993. The likely
cause: OpenBLAS's threads wait for each other at every BLAS-2 step of the tridiagonalisation while
one of them is descheduled, and numpy and scipy each bundle an OpenBLAS whose idle threads spin. Two threads only win on idle cores (2048-d ``eigvalsh``: 0.6 s vs 1.2 s at load ~2). One
thread is the robust choice here; raise ``STATISTICS_THREADS`` on a dedicated many-core machine.
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

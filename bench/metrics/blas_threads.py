"""How many BLAS/LAPACK threads the statistics at the end of a metric (FID, KID) may use.

Measured on this shared 2-core machine while another engineer's jobs ran on it (load 6-8), the
harness's FID + KID pair on 2048-d features, best of 3, one BLAS thread / two threads: N = 200
0.16 / 0.88 s, N = 1000 0.78 / 3.2 s, N = 2000 2.9 / 17.7 s, N = 2993 11.3 / 41.4 s; only the LAPACK
steps on one thread and the matrix products on two: 0.70, 1.2, 6.4, 18.8 s. Two threads won only
in a quieter moment (N = 2993 at load ~4: 4.9 s vs 8.4 s). The likely cause: OpenBLAS's threads
wait for each other at every BLAS-2 step of a decomposition while one of them is descheduled, and
numpy and scipy each bundle an OpenBLAS whose idle threads spin. One thread is the robust choice
here; raise ``STATISTICS_THREADS`` on a dedicated many-core machine.
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

"""Threads BLAS may use inside one screening worker (config ``blas_threads``, default 1).

A worker's matrix products are small (a batch of rows times a few directions, a 20,000-row probe),
and OpenBLAS's threads spin against the other work of the process: the in-memory engine's reader
and writer threads (``engines.overlap``), a Beam runner's other workers. On this project's 2-core
benchmark machine one BLAS thread made a 1M x 128 scan 22.6-23.8 s -> 18.7 s and the probe's six
fits 1.3-1.6 s -> 0.66 s. One thread also makes the floating-point sums independent of the
machine's core count. Parallelism comes from Beam's workers and the in-memory engine's reader and
writer threads instead.
"""

from __future__ import annotations

from contextlib import contextmanager

_worker_limit: int | None = None


@contextmanager
def blas_threads(n: int):
    """Limit BLAS to ``n`` threads for the block, then restore what the caller had (notebooks)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(n, user_api="blas"):
        yield


def limit_worker(n: int) -> None:
    """In a worker process (Beam): limit BLAS to ``n`` threads once, for the process's life."""
    global _worker_limit
    if _worker_limit != n:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n, user_api="blas")
        _worker_limit = n

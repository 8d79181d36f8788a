"""BLAS threads beside other threads: one BLAS thread per worker thread.

Used by the analysis (Dask's threads run Gram products side by side) and by
the extraction (its writer threads compute Grams for ``--grams`` while torch's
threads run the forward pass).
"""

from __future__ import annotations

from contextlib import contextmanager

from threadpoolctl import threadpool_limits


@contextmanager
def single_threaded_blas(active: bool):
    """One BLAS thread per task while other threads run beside it (Dask's tasks, or
    torch's forward pass during an extraction with ``--grams``).

    Each task's Gram products would otherwise start a BLAS thread per core, and
    the oversubscribed, spinning BLAS threads cost more CPU than the products.
    Distributed workers already get one BLAS thread (Dask sets
    OPENBLAS_NUM_THREADS=1 for them).
    """
    if not active:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield

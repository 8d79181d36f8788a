"""The Gram accumulator: each layer's U-centered Gram triangle of a minibatch, made where the features
are (a GPU's stream, or CPU cores that the forward leaves free), stacked with every other layer's into
the minibatch's HSIC_1 block (Song et al. 2012, eq. 5; docs/design.md, "The analysis algorithm").

    gram_pool(xp, precision, spare, busy)   where a pass's Gram kernels run (``GramPool``)
    GramPool(arrays)                        each layer's U-centered triangle of one minibatch's features
    GramPool.queue(array)                   the same for one layer, queued as its hook records it
    cache_rows_and_triangles(pool, arrays)  the Gram cache's rows and the triangles that follow from them
    stacked_run_triangles(sources, ks, m)   the triangles of every layer of runs read, not run (their Grams)
    minibatch_hsic1(triangles, xp)          the L × L HSIC_1 block of one minibatch, on the host

``compare`` stacks a minibatch's triangles of every model, the permutation test
(``analyze.uncertainty``) those of every analysed run. The analysis engine's linear HSIC_1 comes from
the centered Grams as read, without U-centering them (``measures.linear_hsic1``: faster, and another
order of operations), so it does not go through ``minibatch_hsic1``.

Arrays in, arrays out: no torch here (``import ckapipe.analyze`` stays torch-free); the features come
from the extraction's feature source (``ckapipe.extract.features``) as NumPy or CuPy arrays.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ckapipe.analyze.grams import RunSource, run_triangles
from ckapipe.blas import single_threaded_blas
from ckapipe.kernels import (
    hsic1_matrix, minibatch_grams, to_host, u_centered_triangle_from_features, u_centered_triangle_from_packed,
)


@dataclass
class GramPool:
    """Where a pass's Gram kernels run: on this thread (a GPU's stream), or on a pool of CPU workers."""

    precision: str
    pool: ThreadPoolExecutor | None
    queues: bool  # the hooks queue each layer's Gram on the pool as the forward goes on

    def __call__(self, arrays: list, kernel=u_centered_triangle_from_features) -> list:
        """``kernel`` of each array (m × D): the largest first, so that the workers' shares are even."""
        if self.pool is None:
            return [kernel(x, self.precision) for x in arrays]
        order = sorted(range(len(arrays)), key=lambda i: -arrays[i].size)
        done = dict(zip(order, self.pool.map(lambda i: kernel(arrays[i], self.precision), order)))
        return [done[i] for i in range(len(arrays))]

    def queue(self, features: np.ndarray) -> Future:
        """The U-centered Gram triangle of one layer's features (m × D, an array the caller no longer changes),
        on a worker."""
        return self.pool.submit(u_centered_triangle_from_features, features, self.precision)


@contextlib.contextmanager
def gram_pool(xp, precision: str, spare: int, busy: int):
    """The Gram work of a pass (``GramPool``): each layer's kernel (default: its U-centered Gram triangle;
    ``kernels.minibatch_grams`` for a run's Gram cache) of a list of features, or of features queued as they arrive.

    On the GPU the kernels are queued on the stream one layer after another. On the CPU, where ``spare``
    cores are left beside the forward's ``busy`` intra-op threads, a layer's Gram is queued on one of them as
    soon as its hook has copied the features, so the products run while the forward goes on. Where the
    forward's threads take every core, the Grams wait for the end of each forward and then take its
    ``busy`` cores: a worker beside the forward deschedules one of its threads, and every operator of the
    forward waits at its barrier for it (docs/benchmarks.md, "compare against the forward passes"). Each
    worker has one BLAS thread: a multi-threaded BLAS call waits for all its threads at every step.
    """
    if xp is not np:
        yield GramPool(precision, None, queues=False)
        return
    with single_threaded_blas(True), ThreadPoolExecutor(spare or busy, "ckapipe-gram") as pool:
        yield GramPool(precision, pool, queues=spare > 0)


def cache_rows_and_triangles(grams: GramPool, arrays: list, xp):
    """(each layer's Gram cache row on the host, (L, m(m-1)/2) U-centered triangles on the device) of the
    layers' features ``arrays`` (m × D each): the row (``kernels.minibatch_grams``) is what a run's Gram cache
    keeps, and the triangles follow from it (``kernels.u_centered_triangle_from_packed``), one Gram per layer."""
    rows = grams(arrays, minibatch_grams)
    centered = xp.stack([c for c, _ in rows])
    host = [(to_host(c), to_host(a)) for c, a in rows]
    return host, u_centered_triangle_from_packed(centered)


def stacked_run_triangles(sources: Sequence[RunSource], ks: Sequence[int], m: int, xp=np):
    """(len(ks), L, m(m-1)/2) U-centered triangles of every layer of every run (in order) of minibatches ks,
    from the runs' Grams (``grams.run_triangles``: the Gram cache, or the activations)."""
    return xp.concatenate([run_triangles(source, ks, m, xp) for source in sources], axis=1)


def minibatch_hsic1(triangles: list, xp) -> np.ndarray:
    """(L, L) HSIC_1 of every pair of layers of one minibatch, on the host, from the stacked (L_i, m(m-1)/2)
    U-centered triangles of each model or run (``kernels.hsic1_matrix``: one product, Song et al. 2012)."""
    return to_host(hsic1_matrix(xp.concatenate(triangles)))


__all__ = ["GramPool", "gram_pool", "cache_rows_and_triangles", "stacked_run_triangles", "minibatch_hsic1"]

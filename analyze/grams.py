"""U-centred Grams of one run for a list of minibatches: from the Gram cache or
from the activations, filling the cache on the way.

The cache is the run's ``grams/m<m>`` group (``ckapipe.store.GramCache``): row k
holds the strict upper triangle of U(X_k X_kᵀ) of every layer of full minibatch
k, in one chunk, and a ``done`` marker set after the row. It is stamped with
the run's key and layer list when created, so a run never gets another's Grams.

Activations are read with ``Run.read_chunk`` only, each stored chunk once per
call (consecutive analysis minibatches inside one chunk share the read).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ckapipe.atomic import describe_os_error
from ckapipe.kernels import sub_triangles, to_host, ucentered_gram
from ckapipe.errors import StoreError
from ckapipe.store import GramCache, Run, open_run

@dataclass(frozen=True)
class RunSource:
    """Where the Grams of one run come from, in plain (picklable) data."""

    path: str
    name: str
    layers: tuple[str, ...]
    chunk: int  # stored chunk size c
    read_cache: bool  # use cached Grams at m when marked done
    write_cache: bool  # store the Grams computed from activations
    coarser: int | None = None  # grams-only run: cached size m' that m divides


def plan_source(run: Run, m: int, use_gram_cache: bool, fill_cache: bool = True) -> RunSource:
    """How to get the run's Grams at m, deciding without writing anything.

    A grams-only run must have them cached at m or at a multiple of m.
    ``fill_cache=False`` reads the cache but never writes it. A Gram cache that
    is not this run's is refused here, before any work (``Run.grams``).
    """
    common = dict(path=str(run.path), name=run.name, layers=tuple(run.layer_names), chunk=run.batch_size)
    if not run.grams_only:
        if use_gram_cache:
            run.grams(m)  # refuses a foreign cache
        writable = use_gram_cache and fill_cache and os.access(run.path, os.W_OK)
        return RunSource(**common, read_cache=use_gram_cache, write_cache=writable)
    sizes = [s for s in run.gram_sizes() if s % m == 0 and run.grams(s) is not None]
    if not sizes:
        have = ", ".join(map(str, run.gram_sizes())) or "none"
        raise StoreError(
            f"run {run.name} stores Grams only (no activations), cached for minibatch sizes {have}: "
            f"analyse it at one of these sizes or a divisor of one (--batch-size)"
        )
    coarser = None if m in sizes else sizes[0]
    return RunSource(**common, read_cache=True, write_cache=False, coarser=coarser)


def create_gram_caches(sources: Sequence[RunSource], m: int) -> list[RunSource]:
    """Execution's first step: create (and stamp) the Gram caches the plan will fill.

    Done once, before the tasks start, so that tasks only ever open them; a
    store that turns out not to be writable is read but not filled.
    """
    out = []
    for source in sources:
        if source.write_cache:
            try:
                open_run(source.path).grams(m, create=True)
            except (OSError, PermissionError):
                source = dataclasses.replace(source, write_cache=False)
        out.append(source)
    return out


def run_triangles(source: RunSource, ks: Sequence[int], m: int, xp=np, product: str = "float64"):
    """(len(ks), layers, m(m-1)/2) float64 U-centred Gram triangles of one run
    (``product``: precision of the Gram products computed here, see kernels.gram_linear)."""
    run = open_run(source.path)
    width = m * (m - 1) // 2
    out = xp.empty((len(ks), len(source.layers), width), dtype=xp.float64)
    if source.coarser is not None:
        _fill_from_coarser(run, source, ks, m, out, xp)
        return out
    cache = run.grams(m) if source.read_cache else None
    cached = cache.done(ks) if cache is not None else np.zeros(len(ks), dtype=bool)
    if run.grams_only and not cached.all():
        k = ks[int(np.flatnonzero(~cached)[0])]
        raise StoreError(f"run {run.name} stores Grams only and lacks the Gram of minibatch {k} at m={m}")
    from_cache = [i for i in range(len(ks)) if cached[i]]
    computed = [i for i in range(len(ks)) if not cached[i]]
    if len(from_cache) == len(ks) and xp is np:
        _read_cached(cache, ks, out)  # every Gram cached: straight into the task's array
    elif from_cache:
        out[from_cache] = xp.asarray(_read_cached(cache, [ks[i] for i in from_cache]))
    for li, layer in enumerate(source.layers):
        for i, x in zip(computed, minibatch_features(run, layer, [ks[i] for i in computed], m)):
            out[i, li] = ucentered_gram(xp.asarray(x), product)
    if source.write_cache and computed and cache is not None:
        fill_cache(cache, [ks[i] for i in computed], to_host(out[computed]))
    return out


def fill_cache(cache: GramCache, ks: Sequence[int], triangles: np.ndarray) -> None:
    """Store computed Grams; a full disk or a read-only store only leaves them uncached (rows
    are marked done after they are written, so a failed write leaves no row marked)."""
    try:
        cache.write(ks, triangles)
    except OSError as err:
        warnings.warn(f"the Gram cache of run {cache.run_name} (m={cache.m}) was not filled: "
                      f"{describe_os_error(err)}; the analysis goes on without it")


def minibatch_features(run: Run, layer: str, ks: Sequence[int], m: int) -> Iterator[np.ndarray]:
    """Rows k*m .. (k+1)*m of one layer for each k (sorted), reading each stored chunk once."""
    c = run.batch_size
    held: dict[int, np.ndarray] = {}
    for k in ks:
        first, last = k * m // c, ((k + 1) * m - 1) // c
        held = {j: x for j, x in held.items() if j >= first}
        for j in range(first, last + 1):
            if j not in held:
                held[j] = checked_chunk(run, layer, j)
        rows = np.concatenate([held[j] for j in range(first, last + 1)]) if last > first else held[first]
        start = k * m - first * c
        yield rows[start:start + m]


def checked_chunk(run: Run, layer: str, j: int) -> np.ndarray:
    """Stored chunk j of one layer; a clear error when it is unreadable or not finite."""
    try:
        x = run.read_chunk(layer, j)
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
        raise StoreError(
            f"chunk {j} of layer {layer!r} in run {run.name} cannot be read ({type(err).__name__}: {err}): "
            f"it is corrupted; re-extract the run"
        ) from None
    if not np.isfinite(x).all():
        raise StoreError(
            f"NaN or inf in run {run.name}, layer {layer!r}, minibatch (chunk) {j}: the chunk file is missing "
            f"or the model produced non-finite activations"
        )
    return x


def _read_cached(cache: GramCache, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Rows ks of the Gram cache (into ``out`` when given), refusing NaN in a row marked done."""
    tri = cache.read(ks, out)
    if not np.isfinite(tri).all():
        raise StoreError(
            f"the Gram cache of run {cache.run_name} (m={cache.m}) holds NaN for a minibatch marked done: "
            f"delete its grams/m{cache.m} folder and analyse again"
        )
    return tri


def _fill_from_coarser(run: Run, source: RunSource, ks: Sequence[int], m: int, out, xp) -> None:
    """Grams at m from a Gram cache at a multiple m' of m (sub-blocks, re-U-centred)."""
    big = source.coarser
    ratio = big // m
    cache = run.grams(big)
    parents = sorted({k // ratio for k in ks})
    done = cache.done(parents)
    if not done.all():
        raise StoreError(
            f"run {run.name} stores Grams only and lacks the Gram of minibatch {parents[int(np.flatnonzero(~done)[0])]} at m={big}"
        )
    rows = xp.asarray(_read_cached(cache, parents))
    for li in range(len(source.layers)):
        subs = {p: sub_triangles(t, m) for p, t in zip(parents, rows[:, li])}
        for i, k in enumerate(ks):
            out[i, li] = subs[k // ratio][k % ratio]

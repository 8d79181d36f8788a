"""The Grams of one run for a list of minibatches: from the Gram cache or from the
activations, filling the cache on the way.

The cache is the run's ``grams/m<m>`` group (``ckapipe.store.GramCache``): row k
holds, for every layer of full minibatch k, the upper triangle with the diagonal
of the centered Gram C = X̃ X̃ᵀ and the mean products [c_i·μ, μ·μ], in one chunk,
and a marker set after the row. It is stamped with the run's key and layer list
when created, so a run never gets another's Grams. Every measure of
``ckapipe.analyze.measures`` is computed from these rows (``GramRows``).

A cache of store version 2 holds U-centered strict triangles only: it still serves
linear CKA (``legacy`` rows); a measure that needs more fills a version-3 cache
beside it from the activations.

Activations are read with ``Run.read_chunk`` only, each stored chunk once per
call (consecutive analysis minibatches inside one chunk share the read).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from ckapipe.atomic import describe_os_error
from ckapipe.errors import StoreError
from ckapipe.kernels import (
    diagonal_positions, gram_parts, minibatch_size, square_from_triangle, strict_in_diagonal_triangle, sub_gram_parts,
    sub_triangles, to_host, u_centered_triangle_from_packed, upper_triangle,
)
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


class GramRows(NamedTuple):
    """The Grams of one run's minibatches, every layer: what every measure is computed from.

    ``centered``: (n, L, m(m+1)/2) upper triangles with the diagonal of C = X̃ X̃ᵀ;
    ``means``: (n, L, m + 1) mean products [c_i·μ, μ·μ], None for version-2 rows;
    ``sums``: (n, L, m) row sums of C with its diagonal zeroed (the unbiased HSIC's
    r_i): -C_ii, since the rows of a centered Gram sum to 0 (float64 rounding apart),
    so that cached and freshly computed Grams give the same numbers; summed exactly
    for float32 products, whose rounding is not negligible.
    Version-2 rows (``means`` None) are the U-centered triangles, diagonal and sums 0:
    they serve the unbiased linear HSIC only.
    """

    centered: object
    means: object
    sums: object


def plan_source(run: Run, m: int, use_gram_cache: bool, fill_cache: bool = True, centered: bool = False,
                minibatches: Sequence[int] = ()) -> RunSource:
    """How to get the run's Grams at m, deciding without writing anything.

    ``centered``: the measures need the version-3 rows (centered Grams with their
    diagonal and mean products), not only the unbiased linear HSIC. A version-2
    cache serves linear CKA when every minibatch is in it; otherwise a version-3
    cache is filled beside it. A grams-only run must have the Grams it needs cached
    at m or at a multiple of m. ``fill_cache=False`` reads the cache but never
    writes it. A Gram cache that is not this run's is refused here, before any
    work (``Run.grams``).
    """
    common = dict(path=str(run.path), name=run.name, layers=tuple(run.layer_names), chunk=run.batch_size)
    if not run.grams_only:
        cache = run.grams(m) if use_gram_cache else None  # refuses a foreign cache
        writable = use_gram_cache and fill_cache and os.access(run.path, os.W_OK)
        legacy = cache is not None and cache.layout == 2
        if legacy and (centered or not cache.done(minibatches).all()):  # version 3 filled beside it, or computed here
            return RunSource(**common, read_cache=writable, write_cache=writable)
        return RunSource(**common, read_cache=use_gram_cache, write_cache=writable and not legacy)
    sizes = [s for s in run.gram_sizes() if s % m == 0 and run.grams(s) is not None]
    usable = [s for s in sizes if not centered or run.grams(s).layout == 3]
    if not usable:
        have = ", ".join(map(str, run.gram_sizes())) or "none"
        if sizes:
            raise StoreError(
                f"run {run.name} stores Grams only, in the layout of ckapipe store version 2 (U-centered, without "
                f"the diagonal): it serves linear CKA only; extract it again with --grams-only for the other measures"
            )
        raise StoreError(
            f"run {run.name} stores Grams only (no activations), cached for minibatch sizes {have}: "
            f"analyse it at one of these sizes or a divisor of one (--batch-size)"
        )
    coarser = None if m in usable else usable[0]
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


def run_grams(source: RunSource, ks: Sequence[int], m: int, xp=np, product: str = "float64") -> GramRows:
    """The Grams of minibatches ks (sorted) of one run (``product``: precision of the Gram products
    computed here from activations, see kernels.gram_linear)."""
    run = open_run(source.path)
    n_layers = len(source.layers)
    if source.coarser is not None:
        return _from_coarser(run, source, ks, m, xp)
    cache = run.grams(m) if source.read_cache else None
    cached = cache.done(ks) if cache is not None else np.zeros(len(ks), dtype=bool)
    if run.grams_only and not cached.all():
        k = ks[int(np.flatnonzero(~cached)[0])]
        raise StoreError(f"run {run.name} stores Grams only and lacks the Gram of minibatch {k} at m={m}")
    if cache is not None and cache.layout == 2 and cached.all():
        return _legacy_rows(_read_cached(cache, ks), xp)
    rows = GramRows(xp.empty((len(ks), n_layers, m * (m + 1) // 2)), xp.empty((len(ks), n_layers, m + 1)),
                    xp.empty((len(ks), n_layers, m)))
    from_cache = [i for i in range(len(ks)) if cached[i]] if cache is not None and cache.layout == 3 else []
    computed = [i for i in range(len(ks)) if i not in set(from_cache)]
    if from_cache:
        picked = [ks[i] for i in from_cache]
        if len(from_cache) == len(ks) and xp is np:
            _read_cached(cache, picked, rows.centered)  # every Gram cached: straight into the task's array
        else:
            rows.centered[from_cache] = xp.asarray(_read_cached(cache, picked))
        rows.means[from_cache] = xp.asarray(_read_cached(cache, picked, means=True))
        diagonal = rows.centered[from_cache][..., diagonal_positions(xp, m)]
        rows.sums[from_cache] = -diagonal
    for li, layer in enumerate(source.layers):
        for i, x in zip(computed, minibatch_features(run, layer, [ks[i] for i in computed], m)):
            c, a, s = gram_parts(xp.asarray(x), product)
            rows.centered[i, li] = upper_triangle(c, diagonal=True)
            rows.means[i, li, :m] = a
            rows.means[i, li, m] = s
            rows.sums[i, li] = (c.sum(axis=1) if product == "float32" else 0.0) - xp.diagonal(c)
    if source.write_cache and computed and cache is not None:  # created at execution's first step: version 3
        fill_cache(cache, [ks[i] for i in computed], to_host(rows.centered[computed]), to_host(rows.means[computed]))
    return rows


def _legacy_rows(triangles, xp) -> GramRows:
    """Version-2 rows (U-centered strict triangles) in the layout of version 3 (zero diagonal, zero sums)."""
    n, n_layers, width = triangles.shape
    m = minibatch_size(width)
    wide = xp.zeros((n, n_layers, m * (m + 1) // 2))
    wide[..., strict_in_diagonal_triangle(xp, m)] = xp.asarray(triangles)
    return GramRows(wide, None, xp.zeros((n, n_layers, m)))


def fill_cache(cache: GramCache, ks: Sequence[int], centered: np.ndarray, means: np.ndarray) -> None:
    """Store computed Grams; a full disk or a read-only store only leaves them uncached (rows
    are marked done after they are written, so a failed write leaves no row marked)."""
    try:
        cache.write(ks, centered, means)
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


def _read_cached(cache: GramCache, ks: Sequence[int], out: np.ndarray | None = None, means: bool = False) -> np.ndarray:
    """Rows ks of the Gram cache (centered triangles, or version 2's U-centered ones, into ``out`` when
    given; or the mean products), refusing NaN in a row marked done."""
    if means:
        tri = cache.read_means(ks)
    else:
        tri = cache.read_centered(ks, out) if cache.layout == 3 else cache.read(ks, out)
    if not np.isfinite(tri).all():
        raise StoreError(
            f"the Gram cache of run {cache.run_name} (m={cache.m}) holds NaN for a minibatch marked done: "
            f"delete its grams/m{cache.m} folder and analyse again"
        )
    return tri


def _from_coarser(run: Run, source: RunSource, ks: Sequence[int], m: int, xp) -> GramRows:
    """Grams at m from a Gram cache at a multiple m' of m: the diagonal blocks of the coarser Grams,
    centered again on their own rows (kernels.sub_gram_parts; version 2: sub_triangles)."""
    big = source.coarser
    ratio = big // m
    cache = run.grams(big)
    parents = sorted({k // ratio for k in ks})
    done = cache.done(parents)
    if not done.all():
        raise StoreError(
            f"run {run.name} stores Grams only and lacks the Gram of minibatch {parents[int(np.flatnonzero(~done)[0])]} at m={big}"
        )
    at = {p: i for i, p in enumerate(parents)}
    rows = xp.asarray(_read_cached(cache, parents))
    picks = ([at[k // ratio] for k in ks], [k % ratio for k in ks])
    if cache.layout == 2:
        subs = xp.stack([xp.stack([sub_triangles(t, m) for t in per_layer]) for per_layer in rows])  # (p, L, r, ·)
        return _legacy_rows(subs[picks[0], :, picks[1]], xp)
    sub_c, sub_means = sub_gram_parts(square_from_triangle(rows, diagonal=True),
                                      xp.asarray(_read_cached(cache, parents, means=True)), m)
    centered = sub_c[picks[0], :, picks[1]]  # (n, L, m, m)
    sums = centered.sum(axis=-1) - xp.diagonal(centered, axis1=-2, axis2=-1)
    return GramRows(upper_triangle(centered, diagonal=True), sub_means[picks[0], :, picks[1]], sums)


def run_triangles(source: RunSource, ks: Sequence[int], m: int, xp=np, product: str = "float64"):
    """(len(ks), layers, m(m-1)/2) float64 strict upper triangles of U(X Xᵀ) of one run (the unbiased
    HSIC's rows), from whatever ``run_grams`` gives."""
    rows = run_grams(source, ks, m, xp, product)
    if rows.means is None:
        return rows.centered[..., strict_in_diagonal_triangle(xp, m)]
    return u_centered_triangle_from_packed(rows.centered)


def layer_dim(run: Run, layer: str) -> int:
    """D of a stored layer (0 in a grams-only run, which keeps no activations)."""
    return 0 if run.grams_only else int(run.layer(layer).shape[1])


def feature_sizes(run: Run, m: int) -> np.ndarray:
    """(layers, 1) max(m, D) of each layer: the rounding tolerance of its minibatch Grams' eigenvalues."""
    return np.array([[max(m, layer_dim(run, layer))] for layer in run.layer_names])


__all__ = ["RunSource", "GramRows", "plan_source", "create_gram_caches", "run_grams", "run_triangles",
           "minibatch_features", "checked_chunk"]

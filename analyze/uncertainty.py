"""The statistics of ``ckapipe.analyze.stats`` applied to analysis results: permutation p-values
read from the runs' U-centered Gram triangles, and paired differences named by ``run:layer``.

    from ckapipe.analyze import load_results, diff
    diff("results/default", a=("cnn3-s0:head", "cnn3-s1:head"), b=("cnn3-s0:head", "cnn2-s0:head"))

See docs/uncertainty.md for how to read the numbers.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ckapipe.analyze import stats
from ckapipe.analyze.accumulate import stacked_run_triangles
from ckapipe.analyze.grams import RunSource, plan_source
from ckapipe.analyze.pairing import task_groups
from ckapipe.analyze.results import Results, check_combinable, load_results
from ckapipe.blas import single_threaded_blas
from ckapipe.store.integrity import is_results_store
from ckapipe.errors import CkapipeError, StoreError, suggest
from ckapipe.progress import Progress
from ckapipe.store import open_run

# --------------------------------------------------------------------------- permutation test


def permutation_test(results: Results, permutations: int = 1000, seed: int = 0, progress: bool = True,
                     threads: int | None = None) -> np.ndarray:
    """(L, L) permutation p-values of CKA > 0 for every pair of layers of two different runs of the results
    (NaN within a run), from the runs' Gram cache (or their activations where it lacks a minibatch).

    Costs R times the HSIC products of the analysis: opt-in (``analyze(..., permutations=1000)``).
    Groups of minibatches that share stored chunks run on ``threads`` threads (default: one per
    core), one BLAS thread each, and their permuted sums are added.
    """
    if permutations < 1:
        raise CkapipeError(f"--permutations {permutations}: the permutation test needs at least 1 permutation")
    sources = [_source(entry, results.m) for entry in results.runs]
    ks = [int(k) for k in results.minibatches]
    groups = task_groups(ks, results.m, [s.chunk for s in sources])
    sizes = [len(r.layers) for r in results.runs]
    bar = Progress(len(ks), "permutations", "minibatches", enabled=progress and len(ks) > 1)

    def group_sums(group: tuple[int, ...]) -> np.ndarray:
        triangles = stacked_run_triangles(sources, group, results.m)
        sums = stats.permuted_sums(zip(group, triangles), sizes, permutations, seed)
        bar.update(len(group))
        return sums

    try:
        with single_threaded_blas(True), ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
            sums = sum(pool.map(group_sums, groups))
    finally:
        bar.close()
    return stats.permutation_p_values(results.hsic_sum.values, sums)


def _source(entry, m: int) -> RunSource:
    """Where the Grams of one analysed run come from: its store, checked to be the one analysed."""
    try:
        run = open_run(entry.path)
    except (CkapipeError, OSError):
        raise StoreError(f"the permutation test reads the Gram triangles of run {entry.name} from its store "
                         f"{entry.path or '(no path recorded)'}, which cannot be opened: analyse again where the "
                         f"cache is") from None
    if run.key != entry.key:
        raise StoreError(f"run {entry.name} at {entry.path} has changed since the analysis (key {run.key}, "
                         f"analysed {entry.key}): analyse again")
    return plan_source(run, m, use_gram_cache=True, fill_cache=False)


def add_permutation_test(results: Results, permutations: int, seed: int | None = None, progress: bool = True) -> Results:
    """The results with their permutation p-values (and the settings recorded); returns them."""
    seed = results.resampling.seed if seed is None else seed
    results.p_value_all = permutation_test(results, permutations, seed, progress)
    results.resampling = dataclasses.replace(results.resampling, permutations=permutations, seed=seed)
    return results


# --------------------------------------------------------------------------- paired differences


@dataclass(frozen=True)
class LayerPair:
    """Two layers, each ``run:layer``, whose CKA enters a difference."""

    run_a: str
    layer_a: str
    run_b: str
    layer_b: str

    def __str__(self) -> str:
        return f"{self.run_a}:{self.layer_a} ~ {self.run_b}:{self.layer_b}"


def diff(results, a, b, *, ci: float = 0.95, bootstrap: int = 2000, seed: int = 0, method: str = "bca") -> list[stats.Difference]:
    """CKA(a) - CKA(b_i) for each pair b_i, each with its bootstrap interval and the fraction of
    resamples on the other side of 0, from one set of resamples of the shared minibatches.

    ``results``: a Results, a results directory, a study's results directory (every
    results store in it) or a list of these. ``a``: a pair of layers, as
    ``("run:layer", "run:layer")``; ``b``: one such pair or a list of them. The pairs
    may come from different results stores over the same minibatches and samples
    (stores that share a run and its minibatches).
    """
    resampling = stats.Resampling(ci=ci, bootstrap=bootstrap, seed=seed, method=method)
    stores = results_stores(results)
    pairs = [layer_pair(a)] + [layer_pair(p) for p in (b if _is_list_of_pairs(b) else [b])]
    found = [locate(stores, pair) for pair in pairs]
    check_combinable([res for res, _ in found])  # the same measure, m, pairing, minibatches and samples
    hsic = np.zeros((len(found[0][0].minibatches), 2 * len(pairs), 2 * len(pairs)))
    for q, (res, (i, j)) in enumerate(found):  # block-diagonal: pair q's HSIC at rows and columns 2q, 2q+1
        block = res.hsic[:, [i, j]][:, :, [i, j]]
        hsic[:, 2 * q:2 * q + 2, 2 * q:2 * q + 2] = block
    entries_a = [(0, 1)] * (len(pairs) - 1)
    entries_b = [(2 * q, 2 * q + 1) for q in range(1, len(pairs))]
    out = stats.paired_differences(hsic, entries_a, entries_b, resampling)
    return [dataclasses.replace(d, a=str(pairs[0]), b=str(pair)) for d, pair in zip(out, pairs[1:])]


def _is_list_of_pairs(b) -> bool:
    return not isinstance(b, (str, LayerPair)) and len(b) > 0 and not isinstance(b[0], str)


def layer_pair(pair) -> LayerPair:
    """A LayerPair from ("run:layer", "run:layer"), ((run, layer), (run, layer)) or a LayerPair."""
    if isinstance(pair, LayerPair):
        return pair
    if isinstance(pair, str) or len(pair) != 2:
        raise CkapipeError(f"a layer pair is two layers, each RUN:LAYER; got {pair!r}")
    (ra, la), (rb, lb) = (_run_layer(x) for x in pair)
    return LayerPair(ra, la, rb, lb)


def _run_layer(x) -> tuple[str, str]:
    if isinstance(x, str):
        if ":" not in x:
            raise CkapipeError(f"{x!r} is not RUN:LAYER (for example cnn3-s0:head)")
        run, layer = x.split(":", 1)
        return run, layer
    run, layer = x
    return str(run), str(layer)


def results_stores(results) -> list[Results]:
    """Results from a Results, a results directory, a directory of results directories, or a list of these."""
    if isinstance(results, Results):
        return [results]
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if is_results_store(path):
            return [load_results(path)]
        inner = sorted(p for p in path.iterdir() if is_results_store(p)) if path.is_dir() else []
        if not inner:
            raise CkapipeError(f"{path} is neither a results directory (ckapipe analyze --out) nor a study's "
                               f"results directory holding some")
        return [load_results(p) for p in inner]
    return [store for item in results for store in results_stores(item)]


def locate(stores: Sequence[Results], pair: LayerPair) -> tuple[Results, tuple[int, int]]:
    """The first results holding both runs of the pair, and the pair's (row, column) in its L × L matrices."""
    for res in stores:
        try:
            ia, ib = res.run_index(pair.run_a), res.run_index(pair.run_b)
        except CkapipeError:
            continue
        return res, (res.stacked_index(ia, pair.layer_a), res.stacked_index(ib, pair.layer_b))
    names = sorted({n for res in stores for n in res.run_names})
    missing = next((r for r in (pair.run_a, pair.run_b) if r not in names), pair.run_b)
    raise CkapipeError(f"no results hold both {pair.run_a} and {pair.run_b}{suggest(missing, names)} "
                       f"(runs found: {', '.join(names)})")

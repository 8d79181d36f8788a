"""Piece M of the suite: what each measure costs from the cached Grams, against linear CKA from
the same cache in the same run, and what the Gram cache holds against D.

The study (W1's two random-init ResNets at 32 px) is extracted once with ``--grams``;
every analysis below reads the Gram cache only (no activation), and each is held against
the linear analysis of the same cache. RankMe per minibatch comes from the same Grams;
the full-data RankMe (a QR of the stored features) reads every activation and is held
against the analysis from activations. Then the Gram cache's bytes per minibatch and layer
for the layer with the fewest features against the one with the most.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import Row, timed
from bench.workloads import Study, analysis, extract_all

MEASURES = ("linear_biased", "rbf:0.5", "rbf_biased:0.5", "mutual_knn:10", "cknna:10")


def measure_rows(study: Study, workdir: Path) -> list[Row]:
    W = study.workload
    cache = workdir / W
    took, runs = timed(lambda: extract_all(study, cache, grams=True))
    if isinstance(runs, Exception):
        return [Row(W, "extraction with --grams", "extract", None, "", None, note=f"ERROR: {runs}", ckapipe_failure=True)]
    names = [r.name for r in runs]
    with reads_counted() as reads:
        t_linear, linear = timed(lambda: analysis(cache, names, study.device), repeat=3)
        if isinstance(linear, Exception) or reads[0]:
            return [Row(W, "linear CKA from cached Grams", "linear", None, "", None,
                        note=f"ERROR: {linear if isinstance(linear, Exception) else 'activations were read'}",
                        ckapipe_failure=True)]
        layers = sum(len(r.layer_names) for r in runs)
        m = runs[0].batch_size
        rows = []
        for measure in MEASURES + (",".join(("linear",) + MEASURES),):
            t, results = timed(lambda: analysis(cache, names, study.device, measures=measure), repeat=2)
            failed = isinstance(results, Exception) or reads[0] > 0
            what = "all six measures in one analysis" if "," in measure else measure
            rows.append(Row(W, f"{what} from cached Grams vs linear CKA", what, t, "linear", t_linear,
                            note=(f"ERROR: {results}" if isinstance(results, Exception) else
                                  "ERROR: activations were read" if failed else
                                  f"{layers} layers, m = {m}, {len(linear.minibatches)} minibatches; no activation read"),
                            ckapipe_failure=failed))
    t_rank, ranked = timed(lambda: analysis(cache, names, study.device, rankme=True), repeat=2)
    rows.append(Row(W, "linear CKA + minibatch RankMe from cached Grams vs linear CKA", "with RankMe", t_rank,
                    "linear", t_linear, note="an m × m eigendecomposition per layer and minibatch",
                    ckapipe_failure=isinstance(ranked, Exception)))
    rows += _full_rankme_rows(study, cache, names, runs)
    rows += _conversion_rows(W, runs, m)
    rows += _size_rows(W, runs, m)
    return rows


def _full_rankme_rows(study: Study, cache: Path, names: list[str], runs) -> list[Row]:
    """The full-data RankMe of the first run's layers against that run's linear CKA from its activations."""
    from ckapipe.analyze.rank import rank

    first = names[:1]
    t_full, full = timed(lambda: rank(cache, first, minibatch=False, progress=False))
    t_acts, _ = timed(lambda: analysis(cache, first, study.device, use_gram_cache=False))
    routes = ", ".join(f"{row.layer} {row.route} (D = {row.dim})" for row in full) if not isinstance(full, Exception) else ""
    return [Row(study.workload, f"full-data RankMe of every layer of {first[0]} vs its linear CKA from activations",
                "RankMe", t_full, "CKA", t_acts, note=f"ERROR: {full}" if isinstance(full, Exception) else
                f"N = {study.n}; {routes}; both read every activation", ckapipe_failure=isinstance(full, Exception))]


def _conversion_rows(workload: str, runs, m: int) -> list[Row]:
    """Why linear HSIC is computed from the centered Grams as read: U-centering each on read costs more."""
    from ckapipe.kernels import diagonal_positions
    from ckapipe.analyze.measures import linear_hsic1
    from ckapipe.kernels import hsic1_matrix

    caches = [run.grams(m) for run in runs]
    ks = list(range(caches[0].n_minibatches))

    def u_on_read():
        for cache in caches:
            for u in cache.read(ks):
                hsic1_matrix(u)

    def as_read():
        for cache in caches:
            for c in cache.read_centered(ks):
                diagonal = c[:, diagonal_positions(np, m)]
                linear_hsic1({"rows": c, "diagonal": diagonal, "sums": -diagonal}, {"rows": c, "diagonal": diagonal,
                                                                                  "sums": -diagonal})

    t_u, _ = timed(u_on_read, repeat=2)
    t_read, _ = timed(as_read, repeat=2)
    return [Row(workload, "linear HSIC from the cache: U-centering each Gram on read vs from the centered Grams as read",
                "U on read", t_u, "as read", t_read, note="each run's own layers, every minibatch, one thread each")]


def _size_rows(workload: str, runs, m: int) -> list[Row]:
    dims = {(run.name, layer): int(run.layer(layer).shape[1]) for run in runs for layer in run.layer_names}
    small, large = min(dims, key=dims.get), max(dims, key=dims.get)
    per_layer = (m * (m + 1) // 2 + m + 1) * 8  # centered triangle and mean products, float64
    files = [f for run in runs for f in (Path(run.path) / "grams" / f"m{m}").rglob("*") if f.is_file()]
    cache_bytes = sum(f.stat().st_size for f in files)
    activations = sum(run.layer(layer).nbytes for run in runs for layer in run.layer_names)
    return [
        Row(workload, "Gram cache bytes per minibatch and layer: largest D vs smallest D", f"D = {dims[large]}",
            per_layer, f"D = {dims[small]}", per_layer, unit="B",
            note=f"{large[1]} vs {small[1]}: m(m+1)/2 + m + 1 float64, whatever D"),
        Row(workload, "Gram cache on disk vs the activations it replaces", "Gram cache", cache_bytes, "activations",
            activations, unit="B", note=f"{len(files)} files"),
    ]


@contextmanager
def reads_counted():
    """[number of Run.read_chunk calls] while the block runs (the Gram-only analyses must read none)."""
    from ckapipe.store import Run

    count = [0]
    real = Run.read_chunk

    def counting(self, layer, k):
        count[0] += 1
        return real(self, layer, k)

    Run.read_chunk = counting
    try:
        yield count
    finally:
        Run.read_chunk = real

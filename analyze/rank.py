"""RankMe of every layer of a run (Garrido et al. 2023), on all its samples and per minibatch.

RankMe(X) = exp(-Σ_k p_k log p_k), p = σ / Σ σ, σ the singular values of the N × D
features as stored (uncentered, as Garrido et al. define it): the effective rank,
between 1 and min(N, D). The singular values come from the eigenvalues of a Gram:

- **full data, QR route** (D ≤ COVARIANCE_MAX_DIM and D ≤ N): the R factor of
  X = Q R (D × D, float64, Rᵀ R = Xᵀ X) accumulated over the stored chunks with
  Dask, one QR per group of chunks and a tree of QRs of stacked pairs of R
  (tall-skinny QR), then the singular values of R, which are X's to
  ε·σ_max. Forming Xᵀ X instead would square the condition number: its
  eigenvalues carry ε·λ_max, so singular values below about 1.5e-8 σ_max would
  be lost. One D × D factor per task in flight (512 MiB at D = 8,192, 2 GiB at
  16,384, hence the bound);
- **full data, Gram route** (otherwise): the N × N Gram X Xᵀ built block by block
  from the stored chunks, a panel of rows at a time (X is never held whole), then
  its eigenvalues: N² float64 in memory (3.2 GB at N = 20,000; refused beyond
  GRAM_MAX_SAMPLES);
- **minibatch** (``rankme_minibatch``): the RankMe of each m × D minibatch from its
  raw Gram in the Gram cache (no activation read once the cache is filled), averaged
  over minibatches: cheap, but at most m, so not the full-data number.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import dask
import numpy as np

from ckapipe.analyze.engine import per_task
from ckapipe.analyze.grams import checked_chunk, create_gram_caches, feature_sizes, layer_dim, plan_source, run_grams
from ckapipe.analyze.measures import layer_rankme
from ckapipe.analyze.pairing import analysis_batch_size, plan_pairing, task_groups
from ckapipe.blas import single_threaded_blas
from ckapipe.devices import array_namespace, resolve_device
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.kernels import rankme, singular_values_from_gram, to_host
from ckapipe.progress import Progress
from ckapipe.store import Run, find_runs, open_run

COVARIANCE_MAX_DIM = 8192  # the QR route up to this D (one 512 MiB float64 R factor per task in flight)
GRAM_MAX_SAMPLES = 50_000  # the N × N Gram route holds N² float64 (20 GB at 50,000)
PANEL_BYTES = 512 * 2**20  # rows held at once while the N × N Gram is built
TASK_BYTES = 256 * 2**20  # activations read by one task of the features route


@dataclass(frozen=True)
class LayerRank:
    """RankMe of one layer of one run."""

    run: str
    layer: str
    dim: int  # D, features per sample (0 for a grams-only run)
    n: int  # samples of the full-data RankMe
    rankme: float  # full data (NaN when not asked)
    route: str  # "qr" (R of X = QR), "gram" (X Xᵀ) or "-"
    m: int  # minibatch size of the minibatch RankMe
    rankme_minibatch: float  # mean over minibatches (NaN when not asked)
    rankme_minibatch_sd: float  # standard deviation over minibatches


def rank(cache, runs, *, full: bool = True, minibatch: bool = True, batch_size: int | None = None,
         device: str = "auto", use_gram_cache: bool = True, progress: bool = True,
         max_dim: int = COVARIANCE_MAX_DIM) -> list[LayerRank]:
    """RankMe of every layer of the named runs (names or globs), full data and/or per minibatch."""
    if not (full or minibatch):
        raise CkapipeError("ask for the full-data RankMe, the minibatch RankMe, or both")
    chosen = runs if runs and all(isinstance(r, Run) for r in runs) else find_runs(cache, list(runs))
    if not chosen:
        raise CkapipeError("name at least one run")
    device = resolve_device(device, "cupy")
    out = []
    for run in chosen:
        m = analysis_batch_size([run], batch_size) if minibatch else run.batch_size
        per_minibatch = minibatch_rankme(run, m, device, use_gram_cache, progress) if minibatch else None
        for i, layer in enumerate(run.layer_names):
            value, route, n = (full_rankme(run, layer, max_dim, progress) if full else (math.nan, "-", 0))
            mb = per_minibatch[:, i] if per_minibatch is not None else np.full(1, np.nan)
            out.append(LayerRank(run.slug, layer, layer_dim(run, layer), n, value, route, m,
                                 float(mb.mean()), float(mb.std())))
    return out


# --------------------------------------------------------------------------- full data


def full_rankme(run: Run, layer: str, max_dim: int = COVARIANCE_MAX_DIM, progress: bool = False) -> tuple[float, str, int]:
    """(RankMe, route, N) of one layer over every stored sample."""
    if run.grams_only:
        raise StoreError(f"run {run.name} stores Grams only: its full-data RankMe needs the activations "
                         f"(use the minibatch RankMe alone: --no-full)")
    missing = run.missing_chunks()
    if missing:
        raise StoreError(f"run {run.name} is incomplete ({len(missing)} chunks missing, first {missing[0]}): "
                         f"the full-data RankMe needs every sample")
    n, d = run.n_samples, layer_dim(run, layer)
    if d <= max_dim and d <= n:
        return float(rankme(np.linalg.svd(r_factor(run, layer), compute_uv=False))), "qr", n
    if n > GRAM_MAX_SAMPLES:
        raise CkapipeError(
            f"layer {layer!r} of run {run.name} has D = {d} > {max_dim} features and N = {n} samples: the "
            f"full-data RankMe would hold an N × N Gram of {n * n * 8 / 1e9:.0f} GB; use the minibatch RankMe "
            f"(--no-full) or a run with fewer samples (--limit)")
    return float(rankme(singular_values_from_gram(sample_gram(run, layer, progress), max(n, d)))), "gram", n


def r_factor(run: Run, layer: str) -> np.ndarray:
    """R of X = Q R (at most D × D, float64) over every stored chunk, with Dask: a QR per group of chunks,
    then QRs of stacked pairs of R in a tree (tall-skinny QR: [R_1; R_2] = Q' R has the same Rᵀ R)."""
    per_chunk = run.batch_size * layer_dim(run, layer) * 8
    size = max(1, TASK_BYTES // max(per_chunk, 1))
    groups = [range(j, min(j + size, run.n_chunks)) for j in range(0, run.n_chunks, size)]
    parts = [dask.delayed(_chunks_r)(str(run.path), layer, list(g)) for g in groups]
    while len(parts) > 1:
        parts = [dask.delayed(_stacked_r)(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    (r,) = dask.compute(parts[0], scheduler="threads")  # few, large products: BLAS threads help
    return r


def _chunks_r(path: str, layer: str, chunks: Sequence[int]) -> np.ndarray:
    run = open_run(path)
    x = np.concatenate([checked_chunk(run, layer, j) for j in chunks]).astype(np.float64)
    return np.linalg.qr(x, mode="r")


def _stacked_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.qr(np.concatenate([a, b]), mode="r")


def sample_gram(run: Run, layer: str, progress: bool = False) -> np.ndarray:
    """X Xᵀ (N × N, float64) block by block: a panel of whole chunks held at a time, multiplied with
    itself and with every later chunk (each later chunk read once per panel)."""
    n, d, c = run.n_samples, layer_dim(run, layer), run.batch_size
    gram = np.empty((n, n))
    per_panel = max(1, PANEL_BYTES // max(c * d * 8, 1))
    panels = range(0, run.n_chunks, per_panel)
    bar = Progress(len(panels), f"rankme {run.slug}:{layer}", "panels", enabled=progress and len(panels) > 1)
    try:
        for start in panels:
            chunks = range(start, min(start + per_panel, run.n_chunks))
            rows = slice(run.chunk_slice(chunks[0]).start, run.chunk_slice(chunks[-1]).stop)
            panel = np.concatenate([checked_chunk(run, layer, j) for j in chunks]).astype(np.float64)
            gram[rows, rows] = panel @ panel.T
            for j in range(chunks[-1] + 1, run.n_chunks):
                cols = run.chunk_slice(j)
                block = panel @ checked_chunk(run, layer, j).astype(np.float64).T
                gram[rows, cols] = block
                gram[cols, rows] = block.T
            bar.update(1)
    finally:
        bar.close()
    return gram


# --------------------------------------------------------------------------- per minibatch


def minibatch_rankme(run: Run, m: int, device: str = "cpu", use_gram_cache: bool = True,
                     progress: bool = False) -> np.ndarray:
    """(n_minibatches, layers) RankMe of each full minibatch of m rows, from the Gram cache
    (filled from the activations on the way, as an analysis fills it)."""
    pairing = plan_pairing([run], m)
    source = plan_source(run, m, use_gram_cache, centered=True, minibatches=pairing.minibatches)
    (source,) = create_gram_caches([source], m)
    groups = task_groups(pairing.minibatches, m, [run.batch_size], per_task(m, [run]))
    sizes = feature_sizes(run, m)

    def task(ks):
        return to_host(layer_rankme(run_grams(source, ks, m, array_namespace(device)), sizes))

    with single_threaded_blas(device == "cpu"):
        parts = dask.compute(*[dask.delayed(task)(ks) for ks in groups], scheduler="threads")
    return np.concatenate(parts, axis=0)


# --------------------------------------------------------------------------- tables


FIELDS = [f for f in LayerRank.__dataclass_fields__]


def to_csv(rows: Sequence[LayerRank]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in asdict(row).items()})
    return buf.getvalue()


def to_text(rows: Sequence[LayerRank]) -> str:
    header = ("run", "layer", "D", "N", "RankMe", "route", "m", "RankMe per minibatch (mean ± sd)")
    cells = [header] + [
        (r.run, r.layer, str(r.dim or "-"), str(r.n or "-"), _num(r.rankme), r.route, str(r.m),
         "-" if math.isnan(r.rankme_minibatch) else f"{r.rankme_minibatch:.2f} ± {r.rankme_minibatch_sd:.2f}")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


__all__ = ["rank", "LayerRank", "full_rankme", "minibatch_rankme", "r_factor", "sample_gram", "to_csv", "to_text",
           "COVARIANCE_MAX_DIM", "GRAM_MAX_SAMPLES"]

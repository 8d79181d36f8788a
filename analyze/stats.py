"""Uncertainty of minibatch CKA from the per-minibatch HSIC: bootstrap intervals, paired
differences and permutation p-values. Arrays in, arrays out (NumPy, float64).

Minibatch CKA is a ratio of sums over minibatches k of the unbiased HSIC_1
matrices H_k (n_minibatches × L × L; Nguyen, Raghu & Kornblith 2021):

    CKA_ab = S_ab / sqrt(S_aa S_bb),   S = Σ_k H_k.

- **Bootstrap** (Efron & Tibshirani 1993): draw n minibatches with replacement,
  S* = Σ_k c_k H_k with c the resampling counts (one GEMM, counts × HSIC, for every
  entry at once), CKA* the ratio of the resampled sums, never a mean of
  per-minibatch CKAs. Valid because the stored sample order is a seeded random
  permutation of the dataset, so the minibatches are independent random samples
  of it. Percentile and BCa intervals (BCa's acceleration from the jackknife over
  minibatches, the same GEMM with weights 1 - I).
- **Paired differences**: CKA(a) - CKA(b) on the same resamples; pairs that share
  minibatches have correlated noise, which the difference cancels.
- **Permutation test** of "no relation": within minibatch k, permute the samples of
  the later run, HSIC^π = 2 <triu U_a, triu(P U_b Pᵀ)> / (m(m-3)) from the cached
  U-centered Gram triangles (U(P K Pᵀ) = P U(K) Pᵀ, so permuting the cached triangle
  is exact). S_aa and S_bb do not change under P, so CKA^π ≥ CKA exactly when
  S^π_ab ≥ S_ab, and p = (1 + #{S^π_ab ≥ S_ab}) / (R + 1).
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from ckapipe.blas import single_threaded_blas
from ckapipe.errors import CkapipeError
from ckapipe.kernels import minibatch_size

METHODS = ("bca", "percentile")
MIN_MINIBATCHES = 10  # fewer: the bootstrap has too few units to mimic their distribution
MIN_INTERVAL = 2  # fewer: every resample is the estimate, a zero-width interval that says nothing
BLOCK_BYTES = 4 * 2**20  # bootstrap values held at a time: a block stays in cache through its passes
PERMUTED_BYTES = 16 * 2**20  # permuted triangles gathered at a time
NORMAL = NormalDist()


@dataclass(frozen=True)
class Resampling:
    """The settings of the intervals and p-values of one analysis (recorded in the results).

    ``ci``: confidence level of the bootstrap intervals (None: no intervals);
    ``bootstrap``: resamples; ``seed``: of the resamples and the permutations;
    ``method``: "bca" or "percentile"; ``permutations``: permutation-test draws
    (0: no test; it costs R times the HSIC products of the analysis).
    """

    ci: float | None = 0.95
    bootstrap: int = 2000
    seed: int = 0
    method: str = "bca"
    permutations: int = 0

    def __post_init__(self):
        if self.ci is not None and not 0 < self.ci < 1:
            raise CkapipeError(f"confidence level {self.ci} is not between 0 and 1 (--ci 0.95; --ci 0 for no intervals)")
        if self.ci is not None and self.bootstrap < 2:
            raise CkapipeError(f"--bootstrap {self.bootstrap}: the intervals need at least 2 resamples (2000 is usual)")
        if self.method not in METHODS:
            raise CkapipeError(f"interval method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.permutations < 0:
            raise CkapipeError(f"--permutations {self.permutations} is negative (0 for no permutation test)")

    @classmethod
    def from_dict(cls, data: dict | None) -> Resampling:
        fields = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self) | {"p_resolution": 1 / (self.permutations + 1) if self.permutations else None}

    def describe(self, n_minibatches: int) -> str:
        """One line: what the intervals and p-values are."""
        parts = []
        if self.ci is not None and n_minibatches < MIN_INTERVAL:
            parts.append(f"no bootstrap intervals: {minibatch_count(n_minibatches)} (an interval needs {MIN_INTERVAL})")
        elif self.ci is not None:
            parts.append(f"{self.ci * 100:g} % bootstrap intervals ({self.method}, {self.bootstrap} resamples "
                         f"of {n_minibatches} minibatches, seed {self.seed})")
        if self.permutations:
            parts.append(f"permutation p-values ({self.permutations} permutations, resolution "
                         f"{1 / (self.permutations + 1):.2g})")
        return "; ".join(parts) or "no intervals (--ci 0)"


# --------------------------------------------------------------------------- resampling weights


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) indices of minibatches drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(resamples, n) float64 counts c_rk: how often resample r drew minibatch k."""
    resamples = indices.shape[0]
    flat = (indices + n * np.arange(resamples)[:, None]).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def jackknife_weights(n: int) -> np.ndarray:
    """(n, n) weights 1 - I: row i leaves minibatch i out."""
    return 1.0 - np.eye(n)


# --------------------------------------------------------------------------- CKA of weighted sums


def weighted_cka(hsic: np.ndarray, weights: np.ndarray, rows, cols) -> np.ndarray:
    """(W, E) CKA of the entries (rows[e], cols[e]) from the weighted sums S_w = Σ_k w_k H_k.

    ``hsic`` (n, L, L), ``weights`` (W, n): ones for the estimate, resampling counts
    for the bootstrap, 1 - I for the jackknife. One GEMM for the E entries and one
    for the L diagonal sums. NaN where S_aa or S_bb is not positive.
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    scale = inverse_roots(np.diagonal(hsic, axis1=1, axis2=2).T @ weights.T)  # (L, W)
    out = hsic[:, rows, cols].T @ weights.T  # (E, W): each entry's values contiguous, for the gathers and sorts
    out *= scale[rows]
    out *= scale[cols]
    return out.T


def inverse_roots(diagonal):
    """1 / sqrt(S_aa), NaN where S_aa is not positive (a constant layer: CKA undefined; callers warn once)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diagonal > 0, 1.0 / np.sqrt(diagonal), np.nan)


# --------------------------------------------------------------------------- intervals


def interval(estimate: np.ndarray, resampled: np.ndarray, jackknife: np.ndarray | None, level: float,
             method: str = "bca") -> tuple[np.ndarray, np.ndarray]:
    """(low, high), each (E,), of the bootstrap distribution ``resampled`` (R, E) of ``estimate`` (E,).

    percentile: the α/2 and 1 - α/2 quantiles. BCa (Efron 1987): the quantiles at
    Φ(z0 + (z0 + z)/(1 - â(z0 + z))) for z = z_{α/2}, z_{1-α/2}, with the bias
    correction z0 = Φ⁻¹(fraction of resamples below the estimate, ties counted half)
    and the acceleration â = Σ d³ / (6 (Σ d²)^{3/2}), d = mean jackknife - jackknife
    values (``jackknife``, (n, E)). Quantiles interpolate linearly between order
    statistics (numpy's default). An entry with a non-finite resample gets NaN.
    """
    alpha = 1.0 - level
    levels = np.array([alpha / 2, 1 - alpha / 2])
    R, E = resampled.shape
    if method == "percentile":
        q = np.broadcast_to(levels[:, None], (2, E))
    else:
        below = (resampled < estimate).sum(axis=0) + 0.5 * (resampled == estimate).sum(axis=0)
        z0 = normal_ppf(np.clip(below / R, 0.5 / R, 1 - 0.5 / R))
        d = jackknife.mean(axis=0) - jackknife
        spread = (d**2).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            accel = np.where(spread > 0, (d**3).sum(axis=0) / (6 * spread**1.5), 0.0)
        z = normal_ppf(levels)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = normal_cdf(z0 + (z0 + z) / (1 - accel * (z0 + z)))
        q = np.where(np.isfinite(q), q, levels[:, None])  # â(z0 + z) ≥ 1 only on degenerate entries
    low, high = column_quantiles(np.sort(resampled, axis=0), q)
    bad = ~np.isfinite(resampled).all(axis=0) | ~np.isfinite(estimate)
    return np.where(bad, np.nan, low), np.where(bad, np.nan, high)


def column_quantiles(ordered: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(len(q), E): quantile q[i, e] of column e of ``ordered`` (sorted along axis 0), linear interpolation."""
    R = ordered.shape[0]
    position = np.clip(q, 0, 1) * (R - 1)
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, R - 1)
    frac = position - lower
    take = lambda i: np.take_along_axis(ordered, i, axis=0)  # noqa: E731
    return take(lower) + frac * (take(upper) - take(lower))


def normal_cdf(x):
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def normal_ppf(p):
    p = np.asarray(p, dtype=np.float64)
    return np.vectorize(NORMAL.inv_cdf, otypes=[np.float64])(p) if p.size else p


_erf = np.vectorize(math.erf, otypes=[np.float64])


# --------------------------------------------------------------------------- bootstrap of every entry


def minibatch_count(n: int) -> str:
    """``1 minibatch``, ``3 minibatches``."""
    return f"{n} minibatch" if n == 1 else f"{n} minibatches"


def few_minibatches_warning(n: int) -> None:
    if n < MIN_INTERVAL:
        warnings.warn(f"only {minibatch_count(n)} of data: no bootstrap interval (an interval needs {MIN_INTERVAL}, a "
                      f"reliable one {MIN_MINIBATCHES}); use more samples or a smaller --batch-size", stacklevel=3)
    elif n < MIN_MINIBATCHES:
        warnings.warn(f"only {n} minibatches enter the bootstrap (fewer than {MIN_MINIBATCHES}): its intervals "
                      f"are unreliable; use more samples or a smaller --batch-size", stacklevel=3)


def bootstrap_weights(n: int, resampling: Resampling) -> tuple[np.ndarray, slice]:
    """(1 + n + R, n) weights: ones (the estimate), the jackknife (BCa only), the resampling counts;
    and the rows of the jackknife."""
    counts = resample_counts(resample_indices(n, resampling.bootstrap, resampling.seed), n)
    jack = jackknife_weights(n) if resampling.method == "bca" else np.zeros((0, n))
    return np.vstack([np.ones((1, n)), jack, counts]), slice(1, 1 + len(jack))


def bootstrap_bounds(hsic: np.ndarray, resampling: Resampling = Resampling(), threads: int | None = None) -> np.ndarray:
    """(2, L, L): the bootstrap interval [low, high] of every CKA entry (NaN when ``ci`` is None, and
    with fewer than 2 minibatches: one minibatch has no interval).

    Entries are done in blocks of the upper triangle (CKA is symmetric), each one
    GEMM of the resampling counts with the block's HSIC, the blocks on ``threads``
    threads (default: one per core) with one BLAS thread each (the products are
    thin; spinning BLAS threads cost more than they give). Warns when fewer than
    10 minibatches enter.
    """
    n, L, _ = hsic.shape
    bounds = np.full((2, L, L), np.nan)
    if resampling.ci is None or n == 0:
        return bounds
    few_minibatches_warning(n)
    if n < MIN_INTERVAL:  # one minibatch: no interval, never the zero-width [x, x]
        return bounds
    weights, jackknife = bootstrap_weights(n, resampling)
    rows, cols = np.triu_indices(L)
    threads = threads or os.cpu_count() or 1
    block = max(1, min(BLOCK_BYTES // (8 * len(weights)), -(-len(rows) // threads)))

    def fill(start: int) -> None:
        r, c = rows[start:start + block], cols[start:start + block]
        values = weighted_cka(hsic, weights, r, c)  # one GEMM: the estimate, the jackknife and the resamples
        low, high = interval(values[0], values[jackknife.stop:], values[jackknife] if jackknife.stop > 1 else None,
                             resampling.ci, resampling.method)
        bounds[0, r, c] = bounds[0, c, r] = low  # blocks write disjoint entries
        bounds[1, r, c] = bounds[1, c, r] = high

    with single_threaded_blas(True), ThreadPoolExecutor(threads) as pool:
        list(pool.map(fill, range(0, len(rows), block)))
    return bounds


# --------------------------------------------------------------------------- paired differences


@dataclass(frozen=True)
class Difference:
    """CKA(a) - CKA(b) on the same bootstrap resamples."""

    cka_a: float
    cka_b: float
    estimate: float  # cka_a - cka_b
    low: float
    high: float
    other_side: float  # fraction of resamples on the other side of 0 from the estimate (ties with 0 included)
    resampling: Resampling
    n_minibatches: int
    a: str = ""  # what the two CKAs are of, for display
    b: str = ""

    def __str__(self) -> str:
        head = f"CKA({self.a}) - CKA({self.b}) = {self.cka_a:.3f} - {self.cka_b:.3f} = {self.estimate:+.3f}"
        if self.n_minibatches < MIN_INTERVAL:
            return f"{head} [no interval: {minibatch_count(self.n_minibatches)}]"
        return f"{head} [{self.low:+.3f}, {self.high:+.3f}], {self.other_side:.3g} of resamples on the other side of 0"


def paired_differences(hsic: np.ndarray, entries_a, entries_b, resampling: Resampling = Resampling()) -> list[Difference]:
    """CKA(a_i) - CKA(b_i) for pairs of entries ((row, col) into the L × L matrix), with its bootstrap
    interval and the fraction of resamples on the other side of 0, from one set of resamples for all."""
    level = resampling.ci if resampling.ci is not None else 0.95
    n = hsic.shape[0]
    few_minibatches_warning(n)
    (ra, ca), (rb, cb) = np.asarray(entries_a).T, np.asarray(entries_b).T
    rows, cols = np.concatenate([ra, rb]), np.concatenate([ca, cb])
    P = len(ra)

    weights, jack = bootstrap_weights(n, resampling)
    values = weighted_cka(hsic, weights, rows, cols)
    cka_a, cka_b = values[0, :P], values[0, P:]
    difference = values[:, :P] - values[:, P:]
    estimate, resampled = difference[0], difference[jack.stop:]
    low, high = interval(estimate, resampled, difference[jack] if jack.stop > 1 else None, level, resampling.method)
    if n < MIN_INTERVAL:
        low, high = np.full(P, np.nan), np.full(P, np.nan)
    other = np.where(estimate >= 0, (resampled <= 0).mean(axis=0), (resampled >= 0).mean(axis=0))
    return [Difference(float(cka_a[i]), float(cka_b[i]), float(estimate[i]), float(low[i]), float(high[i]),
                       float(other[i]), resampling, n) for i in range(P)]


# --------------------------------------------------------------------------- permutation test


def minibatch_permutations(m: int, permutations: int, seed: int, k: int) -> np.ndarray:
    """(permutations, m): the sample permutations of minibatch k, drawn from (seed, k), so that they do
    not depend on how minibatches are grouped into tasks."""
    rng = np.random.default_rng([seed, k])
    return rng.permuted(np.broadcast_to(np.arange(m), (permutations, m)), axis=1)


def permuted_positions(perms: np.ndarray) -> np.ndarray:
    """(R, m(m-1)/2) positions p with triu(P U Pᵀ) = triu(U)[p], (P U Pᵀ)_ij = U_{π(i) π(j)}.

    Entry (i, j), i < j, of the permuted matrix is entry (π(i), π(j)) of U, stored in
    the triangle at (lo, hi) = (min, max): position lo·m - lo(lo+1)/2 + hi - lo - 1.
    """
    m = perms.shape[1]
    i, j = np.triu_indices(m, k=1)
    pi, pj = perms[:, i], perms[:, j]
    lo, hi = np.minimum(pi, pj), np.maximum(pi, pj)
    return lo * m - lo * (lo + 1) // 2 + hi - lo - 1


def permuted_hsic(triangles_a: np.ndarray, triangles_b: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """(R, La, Lb): HSIC_1(U_a, P_r U_b P_rᵀ) of one minibatch for every permutation r.

    ``triangles_a`` (La, w) and ``triangles_b`` (Lb, w) are the U-centered Gram
    triangles of one minibatch. <U_a, P U_b Pᵀ> = <Pᵀ U_a P, U_b>, so the side with
    fewer layers is the one gathered (a by the inverse permutations): the gathers,
    not the products, are most of the cost.
    """
    if len(triangles_a) < len(triangles_b):
        return _permuted_hsic(triangles_b, triangles_a, np.argsort(perms, axis=1)).transpose(0, 2, 1)
    return _permuted_hsic(triangles_a, triangles_b, perms)


def _permuted_hsic(fixed: np.ndarray, moved: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """(R, L_fixed, L_moved) HSIC_1(U_fixed, P_r U_moved P_rᵀ): one GEMM per block of permutations."""
    lf, w = fixed.shape
    lm = moved.shape[0]
    m = minibatch_size(w)
    out = np.empty((len(perms), lf, lm))
    block = max(1, PERMUTED_BYTES // (8 * lm * max(w, 1)))
    for start in range(0, len(perms), block):
        positions = permuted_positions(perms[start:start + block])  # (B, w)
        permuted = np.take(moved, positions, axis=1)  # (Lm, B, w)
        product = fixed @ permuted.reshape(lm * len(positions), w).T  # (Lf, Lm·B)
        out[start:start + len(positions)] = product.reshape(lf, lm, len(positions)).transpose(2, 0, 1)
    return out * (2.0 / (m * (m - 3)))


def run_spans(sizes) -> list[slice]:
    """The rows of each run's layers among the stacked layers."""
    ends = np.cumsum(sizes)
    return [slice(int(e - s), int(e)) for s, e in zip(sizes, ends)]


def permuted_sums(minibatch_triangles, sizes, permutations: int, seed: int) -> np.ndarray:
    """(R, L, L) Σ_k HSIC^π_k of every pair of layers a, b of two runs, a's run before b's (b permuted);
    NaN elsewhere (within a run, and below the diagonal).

    ``minibatch_triangles`` yields (k, T_k), T_k the (L, w) triangles of every run of
    minibatch k, runs stacked in order with ``sizes`` layers each. Each later run is
    multiplied against every layer of the runs before it at once.
    """
    L = int(sum(sizes))
    sums = None
    spans = run_spans(sizes)
    for k, triangles in minibatch_triangles:
        if sums is None:
            sums = np.zeros((permutations, L, L))
        perms = minibatch_permutations(minibatch_size(triangles.shape[1]), permutations, seed, k)
        for later in spans[1:]:
            sums[:, :later.start, later] += permuted_hsic(triangles[:later.start], triangles[later], perms)
    if sums is None:
        raise CkapipeError("the permutation test needs at least one minibatch")
    tested = np.zeros((L, L), dtype=bool)
    for later in spans[1:]:
        tested[:later.start, later] = True
    sums[:, ~tested] = np.nan
    return sums


def permutation_p_values(observed: np.ndarray, permuted: np.ndarray) -> np.ndarray:
    """(L, L) p = (1 + #{S^π_ab ≥ S_ab}) / (R + 1) from the observed sums S (L, L) and the permuted sums
    (R, L, L, upper blocks filled: ``permuted_sums``); symmetric, NaN where there is no test.

    The p-value of CKA > 0 under "the samples of a and b are unrelated": S_aa and S_bb are
    permutation-invariant, so comparing the cross sums compares the CKAs. Its resolution is 1/(R+1).
    """
    R = permuted.shape[0]
    with np.errstate(invalid="ignore"):
        exceed = (permuted >= observed[None]).sum(axis=0)
    p = (1.0 + exceed) / (R + 1)
    tested = np.isfinite(permuted).all(axis=0)
    p = np.where(tested, p, np.nan)
    return np.where(np.isnan(p), p.T, p)


# --------------------------------------------------------------------------- reading intervals


def ties_with_best(cka: np.ndarray, low: np.ndarray, high: np.ndarray, exclude_diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(best (La,) column index or -1, tied (La, Lb) bool): per row, the best entry and the entries whose
    interval overlaps the best's (high ≥ the best's low), the best excluded. A conservative reading:
    overlapping 95 % intervals can still differ on a paired test (``paired_differences``)."""
    matrix = np.array(cka, dtype=np.float64)
    if exclude_diagonal:
        np.fill_diagonal(matrix, np.nan)
    best = np.full(matrix.shape[0], -1)
    tied = np.zeros(matrix.shape, dtype=bool)
    for i, row in enumerate(matrix):
        if np.isnan(row).all():
            continue
        j = int(np.nanargmax(row))
        best[i] = j
        with np.errstate(invalid="ignore"):
            tied[i] = np.isfinite(row) & (high[i] >= low[i, j])
        tied[i, j] = False
    return best, tied

"""CKA-like measures of every pair of layers, minibatch by minibatch, from the cached Grams.

Every measure is a function of the Grams the cache keeps (``analyze.grams.GramRows``).
The analysis computes it in two steps on the same Dask graph as linear CKA:

- ``layer_features``: on each run's task, the run's Grams of a minibatch group become
  per-layer features (kernels, neighbour masks; m² numbers per layer at most,
  independent of D);
- ``pair_statistics``: on the group's task, the features of two runs become the
  statistic of every pair of their layers, minibatch by minibatch, with one matrix
  product (or one batched product) for all pairs at once.

A measure's per-minibatch statistic S_k (L × L, each layer with itself on the
diagonal) is kept in the results, and its value is either a ratio of sums,
Σ_k S_k[a, b] / sqrt(Σ_k S_k[a, a] Σ_k S_k[b, b]) (the HSIC measures: minibatch CKA,
Nguyen et al. 2021), or a mean of ratios, mean_k S_k[a, b] / sqrt(S_k[a, a] S_k[b, b])
(the neighbour measures, averaged over minibatches as Huh et al. average over
their samples). With one minibatch (``--batch-size`` N) both are the full-data measure.

=================  ========================================================  ===========
spelling           statistic                                                  value
=================  ========================================================  ===========
linear             HSIC_1 of linear kernels (Song et al. 2012; default)       ratio of sums
linear_biased      HSIC_0 of linear kernels (Kornblith et al. 2019's CKA)     ratio of sums
rbf:T              HSIC_1 of RBF kernels, σ = T × median distance             ratio of sums
rbf_biased:T       HSIC_0 of the same RBF kernels (Kornblith et al.'s RBF CKA)  ratio of sums
mutual_knn:K       mutual k-NN alignment (Huh et al. 2024), K neighbours      mean over minibatches
cknna:K            CKNNA similarity (Huh et al. 2024), K neighbours           mean over minibatches
=================  ========================================================  ===========
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

from ckapipe.analyze.grams import diagonal_positions
from ckapipe.errors import CkapipeError, suggest
from ckapipe.kernels import (
    array_module, biased_triangles, cknna_hsic, cknna_parts, cosine_gram, double_center, hsic0_matrix,
    hsic1_matrix, knn_mask, mutual_knn_matrix, rankme, raw_gram, rbf_gram, singular_values_from_gram,
    square_from_triangle, ucentered_triangle,
)
from ckapipe.kernels import cka as ratio_of_sums

SUMS, MEAN = "ratio of sums", "mean over minibatches"
DEFAULT = "linear"
KINDS = {  # kind: (parameter name, default, aggregation)
    "linear": (None, None, SUMS),
    "linear_biased": (None, None, SUMS),
    "rbf": ("T", 0.5, SUMS),
    "rbf_biased": ("T", 0.5, SUMS),
    "mutual_knn": ("K", 10, MEAN),
    "cknna": ("K", 10, MEAN),
}
SPELLING = re.compile(r"^([a-z_]+)(?::(.+))?$")


@dataclass(frozen=True)
class Measure:
    """One measure: its kind and parameter (the RBF bandwidth fraction T, or the neighbours K)."""

    kind: str
    param: float | int | None = None

    @property
    def name(self) -> str:
        """The canonical spelling: ``linear``, ``rbf:0.5``, ``mutual_knn:10``."""
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def aggregate(self) -> str:
        return KINDS[self.kind][2]

    @property
    def centred(self) -> bool:
        """Needs the centred Grams with their diagonal (store version 3), not only U-centred ones."""
        return self.kind != "linear"

    @property
    def symmetric(self) -> bool:
        """S[a, b] = S[b, a]. Not for CKNNA: its masked kernels M∘K are not symmetric, and Huh et al.'s
        HSIC of them sums A B, not B A."""
        return self.kind != "cknna"

    @property
    def label(self) -> str:
        """What a figure's colour bar says."""
        labels = {"linear": "minibatch CKA", "linear_biased": "minibatch CKA (biased HSIC)",
                  "rbf": "RBF CKA (σ = {} × median distance)", "rbf_biased": "RBF CKA, biased (σ = {} × median distance)",
                  "mutual_knn": "mutual {}-NN alignment", "cknna": "CKNNA (k = {})"}
        return labels[self.kind].format("" if self.param is None else f"{self.param:g}")

    def check(self, m: int) -> None:
        """A one-line error when minibatches of m samples cannot give this measure."""
        if self.kind in ("mutual_knn", "cknna") and self.param >= m:
            raise CkapipeError(f"measure {self.name} needs minibatches of more than {self.param} samples "
                               f"(analysis minibatch size {m}): use a smaller K or a larger --batch-size")

    def width(self, m: int) -> int:
        """Numbers per layer and minibatch of this measure's features besides the Grams (for the task sizes):
        linear uses the Grams as they are."""
        return {"linear": 2 * m, "mutual_knn": m * m, "cknna": 3 * m * m}.get(self.kind, m * (m + 1) // 2)


def parse_measures(spec) -> tuple[Measure, ...]:
    """``"linear,rbf:0.5,mutual_knn:10"`` (or a list of such spellings) -> measures, in order, once each."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    out: list[Measure] = []
    for item in items:
        measure = parse_measure(item)
        if measure not in out:
            out.append(measure)
    if not out:
        raise CkapipeError(f"no measure given: use one or more of {', '.join(KINDS)} (for example --measure {DEFAULT})")
    return tuple(out)


def parse_measure(item) -> Measure:
    if isinstance(item, Measure):
        return item
    match = SPELLING.match(str(item))
    kind = match.group(1) if match else str(item)
    if not match or kind not in KINDS:
        raise CkapipeError(f"unknown measure {item!r}{suggest(kind, list(KINDS))} "
                           f"(measures: linear, linear_biased, rbf:T, rbf_biased:T, mutual_knn:K, cknna:K)")
    name, default, _ = KINDS[kind]
    text = match.group(2)
    if name is None:
        if text is not None:
            raise CkapipeError(f"measure {kind} takes no parameter (got {item!r})")
        return Measure(kind)
    if text is None:
        return Measure(kind, default)
    try:
        value = float(text) if name == "T" else int(text)
    except ValueError:
        value = None
    if value is None or value <= 0 or (name == "K" and kind == "cknna" and value < 2):
        what = "a positive number (the bandwidth as a fraction of the median distance)" if name == "T" else \
            f"a whole number of neighbours{' of at least 2' if kind == 'cknna' else ''}"
        raise CkapipeError(f"measure {item!r}: {text!r} is not {what}")
    return Measure(kind, value)


# --------------------------------------------------------------------------- per-layer features


def layer_features(measure: Measure, rows) -> dict:
    """One run's features for ``measure`` from its ``GramRows`` (n minibatches × L layers)."""
    if measure.kind == "linear":
        m = rows.sums.shape[-1]
        xp = array_module(rows.centred)
        return {"rows": rows.centred, "diagonal": rows.centred[..., diagonal_positions(xp, m)], "sums": rows.sums}
    centred = square_from_triangle(rows.centred, diagonal=True)  # (n, L, m, m)
    if measure.kind == "linear_biased":
        return {"rows": biased_triangles(centred)}
    if measure.kind == "rbf":
        return {"rows": ucentered_triangle(rbf_gram(centred, measure.param))}
    if measure.kind == "rbf_biased":
        return {"rows": biased_triangles(double_center(rbf_gram(centred, measure.param)))}
    cosine = cosine_gram(raw_gram(centred, rows.means))
    features = knn_mask(cosine, measure.param) if measure.kind == "mutual_knn" else cknna_parts(cosine, measure.param)
    features[~(rows.centred != 0).any(axis=-1)] = np.nan  # every row equal: no neighbours, only ties (NaN, as CKA)
    return {"masks" if measure.kind == "mutual_knn" else "parts": features}


def layer_rankme(rows, size: int | None = None):
    """(n, L) RankMe of each minibatch's features (m × D), from the singular values of its raw Gram."""
    raw = raw_gram(square_from_triangle(rows.centred, diagonal=True), rows.means)
    return rankme(singular_values_from_gram(raw, size))


# --------------------------------------------------------------------------- pairs of layers


def pair_statistics(measure: Measure, fa: dict, fb: dict):
    """(La, Lb) statistic of every pair of layers of two runs in one minibatch (their features' k-th rows)."""
    if measure.kind == "linear":
        return linear_hsic1(fa, fb)
    if measure.kind in ("linear_biased", "rbf_biased"):
        return hsic0_matrix(fa["rows"], fb["rows"])
    if measure.kind == "rbf":
        return hsic1_matrix(fa["rows"], fb["rows"])
    if measure.kind == "mutual_knn":
        return mutual_knn_matrix(fa["masks"], fb["masks"], measure.param)
    return cknna_hsic(fa["parts"], fb["parts"])


def linear_hsic1(fa: dict, fb: dict):
    """HSIC_1 of every pair of layers from centred Grams C, without U-centring them (Song et al. 2012, eq. 5):

    m(m-3) HSIC_1 = 2 (T_a·T_b - d_a·d_b) + (Σr_a)(Σr_b)/((m-1)(m-2)) - 2/(m-2) r_a·r_b,

    T the upper triangles with the diagonal d, r the row sums of C with its diagonal zeroed.
    Products of the cached rows as they are read: U-centring every Gram first would cost
    more than the product itself.
    """
    m = fa["sums"].shape[-1]
    sa, sb = fa["sums"].sum(axis=-1), fb["sums"].sum(axis=-1)
    total = 2.0 * (fa["rows"] @ fb["rows"].T - fa["diagonal"] @ fb["diagonal"].T)
    total += sa[:, None] * sb[None, :] / ((m - 1) * (m - 2))
    total -= 2.0 / (m - 2) * (fa["sums"] @ fb["sums"].T)
    return total / (m * (m - 3))


def group_statistics(measure: Measure, features: list[dict]) -> np.ndarray:
    """(n, L, L) statistic of every pair of layers of every run, per minibatch, from each run's features
    (in run order), block by block: no concatenated copy of every run's features."""
    sizes = [len(next(iter(f.values()))[0]) for f in features]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    n = len(next(iter(features[0].values())))
    out = np.empty((n, ends[-1], ends[-1]))
    for a, fa in enumerate(features):
        for b in range(a, len(features)):
            rows, cols = slice(starts[a], ends[a]), slice(starts[b], ends[b])
            for k in range(n):
                out[k, rows, cols] = pair_statistics(measure, _row(fa, k), _row(features[b], k))
                if b != a:
                    out[k, cols, rows] = (out[k, rows, cols].T if measure.symmetric
                                          else pair_statistics(measure, _row(features[b], k), _row(fa, k)))
    return out


def _row(features: dict, k: int) -> dict:
    return {name: values[k] for name, values in features.items()}


# --------------------------------------------------------------------------- values


def measure_values(measure: Measure, statistics: np.ndarray, labels=None) -> np.ndarray:
    """(L, L) value of the measure from its per-minibatch statistics (n, L, L); NaN (with a
    warning naming the layers) where a layer's own statistic is not positive."""
    if measure.aggregate == SUMS:
        total = statistics.sum(axis=0)
        diagonal = np.diag(total)
        return ratio_of_sums(total, diagonal, diagonal, labels, labels)
    values = minibatch_values(statistics)
    dead = np.flatnonzero(~(np.diagonal(statistics, axis1=1, axis2=2) > 0).all(axis=0))
    if dead.size:
        which = ", ".join(str(labels[i]) if labels is not None else str(i) for i in dead)
        warnings.warn(f"{measure.name} is undefined in some minibatch for layers: {which}", stacklevel=2)
    return values.mean(axis=0)


def minibatch_values(statistics: np.ndarray) -> np.ndarray:
    """(n, L, L) S_k[a, b] / sqrt(S_k[a, a] S_k[b, b]) per minibatch; NaN where that is undefined."""
    diagonal = np.diagonal(statistics, axis1=1, axis2=2)
    root = np.sqrt(np.clip(diagonal, 0, None))
    denominator = root[:, :, None] * root[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, statistics / denominator, np.nan)


__all__ = ["Measure", "parse_measures", "parse_measure", "layer_features", "layer_rankme", "pair_statistics",
           "group_statistics", "measure_values", "minibatch_values", "KINDS", "DEFAULT", "SUMS", "MEAN"]

"""The results of one analysis or compare: per-minibatch HSIC of every layer pair, CKA, exports.

``compare``, ``analyze`` and ``load_results`` all return ``Results``. Every accessor is labelled
(xarray, see ckapipe.analyze.labelled; NumPy with ``.values``), one name per idea: ``res.cka`` (for
two runs the a-layers x b-layers matrix, as torch-cka gives it), ``res.cka_all_runs`` (a, b) and
``res.minibatch_cka`` (minibatch, a, b) over the stacked layers, each side indexed by (run, layer),
``res.interval``, ``res.p_value``, ``res.hsic_sum``; ``res.to_xarray()`` is the Dataset,
``res.to_dataframe()`` a tidy table. The older synonyms warn for one release.

Results store (a Zarr v3 group written by xarray: ``xarray.open_zarr(OUT)`` opens it, plain
``zarr`` reads it)::

    OUT/
      zarr.json        attrs["ckapipe_results"]: runs (name, slug, key, path,
                       layers), m, pairing, minibatches used, notes, versions;
                       the seal (ckapipe.store.integrity): arrays (dtype, shape, chunks),
                       key (sha256 of the record), checksums (every chunk's tag);
                       consolidated metadata of the arrays
      hsic             float64 (minibatch, a, b): HSIC_1 of every pair of the L layers
                       of all runs stacked in run order, per minibatch
      minibatch        int64 (minibatch,): the minibatch index k of each row
      run_a, layer_a   str (a,): run label and layer name of each stacked layer (and run_b, layer_b)
      hsic_sum         float64 (a, b): the sums over minibatches
      cka              float64 (a, b): S_ab / sqrt(S_aa S_bb)
      cka_low          float64 (a, b): bootstrap interval of cka, lower end (analyze/stats.py);
      cka_high         upper end; attrs["ckapipe_results"]["resampling"] says how
      p_value          float64 (a, b): permutation p-value of CKA > 0 between runs (NaN: not tested)
      minibatch_cka    float64 (minibatch, a, b): CKA within each minibatch
      measure_cka      float64 (measure, a, b), with ``--measure``: the CKA-like matrix of every measure
      measure_stats    float64 (measure, minibatch, a, b): the per-minibatch statistic of every measure
                       (``analyze.measures``), the first one's = hsic
      rankme           float64 (minibatch, a), with ``--rankme``: RankMe of every layer per minibatch
      cka.json         every pair of runs: layer names, CKA matrix and its interval, HSIC sums
      cka.csv          long form: run_a, layer_a, run_b, layer_b, cka, hsic_ab, hsic_aa, hsic_bb,
                       cka_low, cka_high, p_value (then one column per other measure)
      summary.txt      best-matching layer per layer

Everything but ``hsic``, ``measure_stats``, ``rankme`` and ``minibatch`` is derived from them. Every chunk
ends with its crc32c and is tagged in the seal (version 3); ``load_results`` refuses a store whose seal does
not match, naming the array and chunk (docs/guarantees.md). Stores of version 1 (an array ``minibatches``,
labels in attributes) and 2 (no seal) still load.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd  # xarray's own dependency
import xarray as xr

from ckapipe.analyze import labelled, plots

from ckapipe.analyze.measures import DEFAULT, SUMS, measure_values, minibatch_values, parse_measure
from ckapipe.analyze.stats import MIN_INTERVAL, Resampling, bootstrap_bounds, minibatch_count
from ckapipe.errors import CkapipeError, suggest
from ckapipe.store.results import check_out, open_results_store, write_results_store
from ckapipe.store.specs import library_versions, now

ANALYSIS_LIBRARIES = ("ckapipe", "numpy", "zarr", "dask", "xarray", "cupy-cuda12x")
COLUMNS = ["run_a", "layer_a", "run_b", "layer_b", "cka", "hsic_ab", "hsic_aa", "hsic_bb"]


@dataclass(frozen=True)
class RunEntry:
    """One analysed run, as recorded in the results."""

    name: str  # store name, slug-key
    slug: str
    key: str
    layers: tuple[str, ...]
    path: str = ""
    modules: tuple[str, ...] = ()  # each layer's module type (``Linear``); empty when not recorded

    def to_dict(self) -> dict:
        return {"name": self.name, "slug": self.slug, "key": self.key, "layers": list(self.layers), "path": self.path,
                "modules": list(self.modules)}


@dataclass
class Results:
    """Per-minibatch HSIC of every pair of layers of every run, and what follows from it.

    Runs are named by label (slug, or slug-key when two runs share a slug), store
    name, key, or position.
    """

    runs: list[RunEntry]
    hsic: np.ndarray  # (n_minibatches, L, L)
    minibatches: np.ndarray  # (n_minibatches,)
    inputs: dict  # what determines the numbers: run keys, m, pairing, minibatches
    notes: list[str] = field(default_factory=list)
    path: Path | None = None
    measure_stats: dict = field(default_factory=dict)  # measure name -> (n_minibatches, L, L); hsic is the first's
    rankme: np.ndarray | None = None  # (n_minibatches, L) minibatch RankMe of every layer, when asked for
    resampling: Resampling = field(default_factory=Resampling)  # how the intervals and p-values are drawn
    bounds: np.ndarray | None = None  # (2, L, L) bootstrap [low, high] of cka_all; drawn on first use
    p_value_all: np.ndarray | None = None  # (L, L) permutation p-values, when the test ran

    # ---- naming
    @property
    def m(self) -> int:
        return int(self.inputs["m"])

    @property
    def pairing(self) -> str:
        return self.inputs["pairing"]

    @property
    def run_names(self) -> list[str]:
        """Readable labels, one per run: the slug, or the full name when slugs collide."""
        slugs = [r.slug for r in self.runs]
        return [r.slug if slugs.count(r.slug) == 1 else r.name for r in self.runs]

    @property
    def run_keys(self) -> list[str]:
        return [r.key for r in self.runs]

    def layer_names(self, run) -> list[str]:
        return list(self.runs[self.run_index(run)].layers)

    def run_index(self, run) -> int:
        if isinstance(run, (int, np.integer)):
            return int(run)
        for names in (self.run_names, [r.name for r in self.runs], [r.key for r in self.runs], [r.slug for r in self.runs]):
            if run in names:
                return names.index(run)
        raise CkapipeError(f"no run {run!r} in these results{suggest(str(run), self.run_names)}")

    def layer_index(self, run, layer) -> int:
        layers = self.layer_names(run)
        if isinstance(layer, (int, np.integer)):
            return int(layer)
        if layer not in layers:
            raise CkapipeError(f"run {self.run_names[self.run_index(run)]} has no layer {layer!r}{suggest(layer, layers)}")
        return layers.index(layer)

    @property
    def labels(self) -> list[str]:
        """``run:layer`` for each of the L stacked layers."""
        return [f"{name}:{layer}" for name, r in zip(self.run_names, self.runs) for layer in r.layers]

    def _span(self, run) -> slice:
        i = self.run_index(run)
        start = sum(len(r.layers) for r in self.runs[:i])
        return slice(start, start + len(self.runs[i].layers))

    def pairs(self) -> list[tuple[str, str]]:
        """Every pair of runs (a, b) with a before or equal to b."""
        names = self.run_names
        return [(names[i], names[j]) for i in range(len(names)) for j in range(i, len(names))]

    # ---- numbers (NumPy, for the exports below; the public views are the labelled ones further down)
    def _values(self, measure=None) -> np.ndarray:
        """(L, L) value of a measure for every pair of stacked layers (NaN where undefined, with a warning)."""
        name = self.measure_name(measure)
        cached = self.__dict__.setdefault("_measure_values", {})
        if name not in cached:
            cached[name] = measure_values(parse_measure(name), self._statistics(name), self.labels)
        return cached[name]

    def _bounds(self, measure=None) -> np.ndarray:
        """(2, L, L) bootstrap [low, high] of every entry of a measure's matrix, drawn once per measure."""
        name = self.measure_name(measure)
        if name == self.measures[0]:
            if self.bounds is None:
                self.bounds = self._bootstrap(name)
            return self.bounds
        drawn = self.__dict__.setdefault("_measure_bounds", {})
        if name not in drawn:
            drawn[name] = self._bootstrap(name)
        return drawn[name]

    def _p_values(self) -> np.ndarray:
        """(L, L) permutation p-values (NaN within a run, or everywhere when no test ran)."""
        return self.p_value_all if self.p_value_all is not None else np.full(self.hsic.shape[1:], np.nan)

    def _block(self, matrix: np.ndarray, a, b=None) -> np.ndarray:
        """The (..., La, Lb) block of runs a and b (b defaults to a) of a stacked (..., L, L) array."""
        return matrix[..., self._span(a), self._span(a if b is None else b)]

    def _sums(self, a, b=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """S_ab (La, Lb), S_aa (La,), S_bb (Lb,): sums over minibatches of HSIC_1."""
        b = a if b is None else b
        total = self.hsic.sum(axis=0)
        diag = np.diag(total)
        return self._block(total, a, b), diag[self._span(a)], diag[self._span(b)]

    @property
    def measures(self) -> list[str]:
        """The measures computed (``analyze.measures``), the first being ``cka``'s."""
        return list(self.inputs.get("measures", [DEFAULT]))

    def measure_name(self, measure=None) -> str:
        """The canonical name of a measure of these results (default: the first)."""
        if measure is None:
            return self.measures[0]
        name = parse_measure(measure).name
        if name not in self.measures:
            raise CkapipeError(f"these results hold no measure {measure!r}{suggest(name, self.measures)} "
                               f"(they hold {', '.join(self.measures)}: analyse with --measure {name})")
        return name

    def _statistics(self, measure=None) -> np.ndarray:
        """(n_minibatches, L, L) per-minibatch statistic of a measure (HSIC_1 for linear)."""
        name = self.measure_name(measure)
        return self.hsic if name == self.measures[0] else self.measure_stats[name]

    def _bootstrap(self, name: str) -> np.ndarray:
        """The bootstrap over minibatches of a ratio-of-sums measure; NaN for one that is not."""
        if parse_measure(name).aggregate != SUMS:
            return np.full((2, *self.hsic.shape[1:]), np.nan)
        return bootstrap_bounds(self._statistics(name), self.resampling)

    def stacked_index(self, run, layer) -> int:
        """Position of ``run:layer`` among the L stacked layers (rows of hsic and cka_all_runs)."""
        return self._span(run).start + self.layer_index(run, layer)

    # ---- labelled views: one name per idea, each an xarray.DataArray (NumPy: .values)
    def side_layers(self, a, b=None) -> tuple[list[str], list[str]]:
        """The layer names of runs a and b as coordinates: ``run:layer`` when two different runs share
        a layer name, so that a row and a column never read alike."""
        b = a if b is None else b
        la, lb = self.layer_names(a), self.layer_names(b)
        if self.run_index(a) != self.run_index(b) and set(la) & set(lb):
            la = [f"{self.run_names[self.run_index(a)]}:{n}" for n in la]
            lb = [f"{self.run_names[self.run_index(b)]}:{n}" for n in lb]
        return la, lb

    def _labelled_pair(self, matrix: np.ndarray, a, b, name: str, lead: tuple = ()) -> xr.DataArray:
        """The block of runs a and b of a stacked (..., L, L) array as a DataArray (*lead, layer_a, layer_b),
        the two run labels as scalar coordinates run_a and run_b."""
        b = a if b is None else b
        la, lb = self.side_layers(a, b)
        coords = {"layer_a": la, "layer_b": lb, "run_a": self.run_names[self.run_index(a)],
                  "run_b": self.run_names[self.run_index(b)], **dict(lead)}
        dims = (*(dim for dim, _ in lead), "layer_a", "layer_b")
        return xr.DataArray(self._block(matrix, a, b).copy(), dims=dims, coords=coords, name=name)

    def _cka_pair(self, a=None, b=None, measure=None) -> xr.DataArray:
        """CKA (or ``measure``) of runs a and b: DataArray (layer_a, layer_b); a and b default to the
        first two runs (to the one run, if only one)."""
        if a is None:
            a, b = self.run_names[0], (self.run_names[min(1, len(self.runs) - 1)] if b is None else b)
        return self._labelled_pair(self._values(measure), a, b, self.measure_name(measure))

    @cached_property
    def cka(self):
        """The main CKA view: for two runs (a two-model compare) the a-layers × b-layers DataArray
        (layer_a, layer_b), for one run that run against itself, for more runs ``cka_all_runs``.
        Called, ``res.cka(a, b, measure=None)`` is the DataArray (layer_a, layer_b) of runs a and b."""
        view = self._cka_pair() if len(self.runs) <= 2 else self.cka_all_runs
        return labelled.callable_array(view, self._cka_pair)

    @cached_property
    def cka_all_runs(self) -> xr.DataArray:
        """Minibatch CKA of every pair of the layers of all runs stacked, self-pairs included: DataArray
        (a, b), each side indexed by (run, layer): ``.sel(run_a="r18", run_b="r34")``."""
        return self._labelled["cka"]

    @cached_property
    def minibatch_cka(self):
        """CKA within each minibatch, DataArray (minibatch, a, b) over the stacked layers.
        Called, ``res.minibatch_cka(a, b, layer_a, layer_b, measure=None)`` is one pair's DataArray (minibatch,)."""
        return labelled.callable_array(self._labelled["minibatch_cka"], self._minibatch_pair)

    def _minibatch_pair(self, a, b, layer_a, layer_b, measure=None) -> xr.DataArray:
        ia, ib = self.stacked_index(a, layer_a), self.stacked_index(b, layer_b)
        h = self._statistics(measure)[:, [ia, ib]][:, :, [ia, ib]]
        return xr.DataArray(minibatch_values(h)[:, 0, 1], dims=("minibatch",), name="minibatch_cka",
                            coords={"minibatch": self.minibatches, "layer_a": self.layer_names(a)[self.layer_index(a, layer_a)],
                                    "layer_b": self.layer_names(b)[self.layer_index(b, layer_b)]})

    def interval(self, a=None, b=None, measure=None) -> xr.DataArray:
        """Bootstrap interval of the CKA (or ``measure``) over minibatches: DataArray (bound, layer_a,
        layer_b) of runs a and b, bound = ["low", "high"]; without a, of all runs stacked (bound, a, b).
        NaN when the bootstrap was switched off or the measure is not a ratio of sums."""
        bounds = self._bounds(measure)
        if a is None:
            return self._stacked(bounds, "interval", (("bound", ["low", "high"]),))
        return self._labelled_pair(bounds, a, b, "interval", (("bound", ["low", "high"]),))

    def p_value(self, a=None, b=None) -> xr.DataArray:
        """Permutation p-values of CKA > 0: DataArray (layer_a, layer_b), or of all runs stacked (a, b)
        without a; NaN within a run, and everywhere when no permutation test ran."""
        return self._stacked(self._p_values(), "p_value") if a is None else self._labelled_pair(self._p_values(), a, b, "p_value")

    @cached_property
    def hsic_sum(self):
        """S = sum over minibatches of HSIC_1, DataArray (a, b) over the stacked layers.
        Called, ``res.hsic_sum(a, b)`` is the DataArray (layer_a, layer_b) of runs a and b (S_aa: its diagonal for a = b)."""
        return labelled.callable_array(self._labelled["hsic_sum"], lambda a, b=None: self._labelled_pair(
            self.hsic.sum(axis=0), a, b, "hsic_sum"))

    def minibatch_hsic(self, a, b=None) -> xr.DataArray:
        """HSIC_1 of runs a and b in each minibatch: DataArray (minibatch, layer_a, layer_b)."""
        return self._labelled_pair(self.hsic, a, b, "hsic", (("minibatch", self.minibatches),))

    def minibatch_rankme(self, run) -> xr.DataArray:
        """RankMe of the run's layers in each minibatch: DataArray (minibatch, layer) (analyse with rankme=True)."""
        if self.rankme is None:
            raise CkapipeError("these results hold no RankMe: analyse with --rankme")
        return xr.DataArray(self.rankme[:, self._span(run)], dims=("minibatch", "layer"), name="rankme",
                            coords={"minibatch": self.minibatches, "layer": self.layer_names(run)})

    def layer_rankme(self, run) -> xr.DataArray:
        """Minibatch RankMe of the run's layers averaged over minibatches: DataArray (layer,)."""
        return self.minibatch_rankme(run).mean("minibatch")

    def _stacked(self, matrix: np.ndarray, name: str, lead: tuple = ()) -> xr.DataArray:
        """A stacked (..., L, L) array on cka_all_runs' (run, layer) coordinates."""
        dims = (*(dim for dim, _ in lead), "a", "b")
        return xr.DataArray(matrix.copy(), dims=dims, coords={**self.cka_all_runs.coords, **dict(lead)}, name=name)

    def statistics(self, measure=None) -> xr.DataArray:
        """The per-minibatch statistic of a measure (HSIC_1 for linear) that its value aggregates:
        DataArray (minibatch, a, b) over the stacked layers."""
        return self._stacked(self._statistics(measure), self.measure_name(measure), (("minibatch", self.minibatches),))

    def best_matches(self, a, b):
        """For every layer of a, the layer of b with the highest CKA (another layer when a is b): a
        pandas.DataFrame with columns layer_a, layer_b, cka (layer_b "-" and cka NaN where none is defined)."""
        matrix = self._block(self._values(), a, b).copy()
        if self.run_index(a) == self.run_index(b):
            np.fill_diagonal(matrix, np.nan)
        names_b = self.layer_names(b)
        rows = []
        for layer, row in zip(self.layer_names(a), matrix):
            j = None if np.isnan(row).all() else int(np.nanargmax(row))
            rows.append((layer, "-" if j is None else names_b[j], float("nan") if j is None else float(row[j])))
        return pd.DataFrame(rows, columns=["layer_a", "layer_b", "cka"])

    # ---- deprecated names (one release): each warns and names its replacement
    @property
    def cka_all(self) -> np.ndarray:
        return _deprecated("cka_all", "cka_all_runs", lambda: self._values())

    def cka_matrix(self, a, b=None, measure=None) -> np.ndarray:
        return _deprecated("cka_matrix(a, b)", "cka(a, b)", lambda: self._block(self._values(measure), a, b))

    def values(self, measure=None) -> np.ndarray:
        return _deprecated("values(measure)", "cka_all_runs (other measures: to_xarray().measure_cka)",
                           lambda: self._values(measure))

    @property
    def minibatch_cka_all(self) -> np.ndarray:
        return _deprecated("minibatch_cka_all", "minibatch_cka", lambda: minibatch_values(self.hsic))

    def minibatch_cka_pair(self, a, b, layer_a, layer_b, measure=None) -> np.ndarray:
        return _deprecated("minibatch_cka_pair", "minibatch_cka(a, b, layer_a, layer_b)",
                           lambda: self._minibatch_pair(a, b, layer_a, layer_b, measure).values)

    @property
    def cka_bounds(self) -> np.ndarray:
        return _deprecated("cka_bounds", "interval()", lambda: self._bounds())

    def measure_bounds(self, measure=None) -> np.ndarray:
        return _deprecated("measure_bounds(measure)", "interval(measure=measure)", lambda: self._bounds(measure))

    def cka_interval(self, a, b=None, measure=None) -> tuple[np.ndarray, np.ndarray]:
        return _deprecated("cka_interval(a, b)", "interval(a, b)", lambda: tuple(self._block(self._bounds(measure), a, b)))

    def hsic_sums(self, a, b=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _deprecated("hsic_sums(a, b)", "hsic_sum(a, b)", lambda: self._sums(a, b))

    # ---- labelled arrays (xarray)
    def to_xarray(self):
        """The xarray.Dataset of these results: cka and hsic_sum (a, b), hsic and minibatch_cka
        (minibatch, a, b); a and b indexed by (run, layer) (see ckapipe.analyze.labelled)."""
        runs = [name for name, r in zip(self.run_names, self.runs) for _ in r.layers]
        layers = [layer for r in self.runs for layer in r.layers]
        modules = [module for r in self.runs for module in (r.modules or ("",) * len(r.layers))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant layers: said once, when the CKA was computed
            cka, per_minibatch = self._values().copy(), minibatch_values(self.hsic)
            measures = {name: (self._values(name).copy(), self._statistics(name).copy()) for name in self.measures}
            low, high = self._bounds()
            p = self._p_values()
        return labelled.results_dataset(runs, layers, self.minibatches, self.hsic.copy(), cka, per_minibatch,
                               {"m": self.m, "pairing": self.pairing, "notes": list(self.notes),
                                "resampling": self.resampling.describe(len(self.minibatches))},
                               measures=measures if self.measures != [DEFAULT] else None, rankme=self.rankme,
                               uncertainty=(low.copy(), high.copy(), p.copy(), self.resampling.to_dict()),
                               modules=modules)

    @cached_property
    def _labelled(self):
        return self.to_xarray()

    # ---- exports
    def to_dict(self) -> dict:
        pairs = []
        for a, b in self.pairs():
            s_ab, s_aa, s_bb = self._sums(a, b)
            pairs.append({
                "run_a": a, "run_b": b,
                "layers_a": self.layer_names(a), "layers_b": self.layer_names(b),
                "cka": _nan_to_none(self._block(self._values(), a, b)),
                "cka_low": _nan_to_none(self._block(self._bounds(), a, b)[0]),
                "cka_high": _nan_to_none(self._block(self._bounds(), a, b)[1]),
                "p_value": _nan_to_none(self._block(self._p_values(), a, b)),
                "hsic_ab": s_ab.tolist(), "hsic_aa": s_aa.tolist(), "hsic_bb": s_bb.tolist(),
                **({"measures": {name: _nan_to_none(self._block(self._values(name), a, b)) for name in self.measures}}
                   if self.measures != [DEFAULT] else {}),
            })
        rankme = {"rankme": [self.layer_rankme(n).values.tolist() for n in self.run_names]} if self.rankme is not None else {}
        return {
            **rankme,
            "runs": [dict(r.to_dict(), label=n) for r, n in zip(self.runs, self.run_names)],
            "m": self.m, "pairing": self.pairing, "n_minibatches": int(len(self.minibatches)),
            "notes": self.notes, "resampling": self.resampling.to_dict(), "pairs": pairs,
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        others = self.measures[1:]
        writer.writerow([*COLUMNS, *UNCERTAINTY_COLUMNS, *others])
        for a, b in self.pairs():
            s_ab, s_aa, s_bb = self._sums(a, b)
            matrix = self._block(self._values(), a, b)
            extra = [self._block(self._values(name), a, b) for name in others]
            low, high = self._block(self._bounds(), a, b)
            p = self._block(self._p_values(), a, b)
            for i, la in enumerate(self.layer_names(a)):
                for j, lb in enumerate(self.layer_names(b)):
                    writer.writerow([a, la, b, lb, repr(float(matrix[i, j])), repr(float(s_ab[i, j])),
                                     repr(float(s_aa[i])), repr(float(s_bb[j])),
                                     repr(float(low[i, j])), repr(float(high[i, j])), repr(float(p[i, j])),
                                     *(repr(float(values[i, j])) for values in extra)])
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_dataframe(self, all_pairs: bool = False):
        """A tidy pandas.DataFrame, one row per pair of layers: run_a, layer_a, run_b, layer_b, cka, hsic_ab,
        hsic_aa, hsic_bb, cka_low, cka_high, p_value (only when a permutation test ran: ``permutations=R``),
        and a column per other measure.

        Each pair once: every layer of a with every layer of b for two runs (a before b), and
        within a run each unordered pair of different layers. ``all_pairs`` gives every ordered
        pair of the stacked layers instead, each layer with itself too (L² rows).
        """
        names = self.run_names
        pairs = itertools.product(names, names) if all_pairs else self.pairs()
        tested = self.p_value_all is not None
        columns = [*COLUMNS, *UNCERTAINTY_COLUMNS[:2 + tested], *self.measures[1:]]
        frames = []
        for a, b in pairs:
            s_ab, s_aa, s_bb = self._sums(a, b)
            i, j = np.meshgrid(np.arange(len(s_aa)), np.arange(len(s_bb)), indexing="ij")
            keep = (j > i) if (a == b and not all_pairs) else np.ones_like(i, dtype=bool)
            i, j = i[keep], j[keep]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cka = self._block(self._values(), a, b)[i, j]
                low, high = (bound[i, j] for bound in self._block(self._bounds(), a, b))
            frames.append(pd.DataFrame({
                "run_a": a, "layer_a": np.asarray(self.layer_names(a), dtype=object)[i],
                "run_b": b, "layer_b": np.asarray(self.layer_names(b), dtype=object)[j],
                "cka": cka, "hsic_ab": s_ab[i, j], "hsic_aa": s_aa[i], "hsic_bb": s_bb[j],
                "cka_low": low, "cka_high": high,
                **({"p_value": self._block(self._p_values(), a, b)[i, j]} if tested else {}),
                **{name: self._block(self._values(name), a, b)[i, j] for name in self.measures[1:]},
            }, columns=columns))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    def plot(self, a=None, b=None, measure=None, *, ax=None, save=None, **style):
        """The heatmap of runs a and b (default: the first two, or the one run with itself: its layer x layer
        self-similarity); with no run named and more than two runs, the grid of every pair. Returns the
        Figure (a notebook shows it); writes nothing unless ``save=PATH``. ``style``: see
        ``ckapipe.analyze.plots.heatmap_figure`` (vmin, vmax, cmap, annotate, widths, ...)."""
        if a is None and b is None and len(self.runs) > 2 and measure is None and ax is None:
            return plots.grid_figure(self, save=save, **style)
        a, b = (a, b) if a is not None else plots.default_pair(self)
        return plots.heatmap_figure(self, a, b, measure, ax=ax, save=save, **style)

    def summary(self) -> str:
        """Best-matching layer per layer, for every pair of different runs (or within the one run)."""
        names = self.run_names
        pairs = [(a, b) for a, b in self.pairs() if a != b] or [(names[0], names[0])]
        first = self.measures[0]
        what = "minibatch CKA" if first == DEFAULT else first
        n = len(self.minibatches)
        lines = [f"{what}, m={self.m}, {minibatch_count(n)}, pairing by {self.pairing}",
                 self.resampling.describe(n)]
        others = self.measures[1:]
        if others or self.rankme is not None:
            lines.append("columns: layer, best layer, " + ", ".join([first, *others] + ["RankMe"] * (self.rankme is not None)))
        for a, b in pairs:
            matches = list(self.best_matches(a, b).itertuples(index=False))
            width = max(len(la) for la, _, _ in matches)
            widest = max(len(lb) for _, lb, _ in matches)
            low, high = self._block(self._bounds(), a, b)
            p = self._block(self._p_values(), a, b)
            title = f"{a} -> best layer of {b}" if a != b else f"{a}: most similar other layer"
            extra = [self._block(self._values(name), a, b) for name in others]
            ranks = self.layer_rankme(a).values if self.rankme is not None else None
            lines += ["", title]
            for i, (la, lb, value) in enumerate(matches):
                j = self.layer_index(b, lb) if lb != "-" else None
                number = (format_interval(value, low[i, j], high[i, j], p[i, j], self.resampling.permutations,
                                          n if self.resampling.ci is not None else None)
                          if j is not None else f"{value:.4f}")
                cells = [f"{values[i, j]:.4f}" if j is not None else "-" for values in extra]
                cells += [f"{ranks[i]:.1f}"] if ranks is not None else []
                lines.append(f"  {la:<{width}}  {lb:<{widest}}  {number}" + "".join(f"  {c}" for c in cells))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Results(runs={self.run_names}, m={self.m}, n_minibatches={len(self.minibatches)}, path={self.path})"


# --------------------------------------------------------------------------- store


def write_results(results: Results, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the results store (ckapipe.store.results): the arrays through xarray (dimension names,
    coordinates, consolidated metadata: ``xarray.open_zarr`` opens the directory), every chunk checksummed
    and then tagged (ckapipe.store.integrity.seal), the exports beside them; swapped into place whole."""
    check_out(out, overwrite)
    per_minibatch = (1, *results.hsic.shape[1:])
    chunks = {"hsic": per_minibatch, "minibatch_cka": per_minibatch, "measure_stats": (1, *per_minibatch)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant layers: said once, when the CKA was computed
        dataset = labelled.stored(results.to_xarray())
        exports = {"cka.json": results.to_json(), "cka.csv": results.to_csv(), "summary.txt": results.summary() + "\n"}
    results.path = write_results_store(out, dataset, _record(results), exports, chunks=chunks, overwrite=overwrite)
    return results.path


def _record(results: Results) -> dict:
    """What the results store records beside the arrays: the runs, the inputs, notes, resampling, provenance."""
    return {
        "runs": [r.to_dict() for r in results.runs],
        "inputs": results.inputs,
        "notes": results.notes,
        "resampling": results.resampling.to_dict(),
        "created": now(),
        "versions": library_versions(ANALYSIS_LIBRARIES),
    }


def load_results(path: str | os.PathLike) -> Results:
    """Open a results store written by ``analyze(..., out=path)``, refusing one that is damaged: an edited
    attribute, a missing array or chunk, a chunk changed or copied from elsewhere (one line naming it)."""
    store = open_results_store(path)
    meta = store.record
    runs = [RunEntry(r["name"], r["slug"], r["key"], tuple(r["layers"]), r.get("path", ""), tuple(r.get("modules", ())))
            for r in meta["runs"]]
    minibatches = store.read("minibatch" if "minibatch" in store else "minibatches")  # version 1: "minibatches"
    stats = (dict(zip((str(name) for name in store.read("measure")), store.read("measure_stats")))
             if "measure_stats" in store else {})
    rankme = store.read("rankme") if "rankme" in store else None
    hsic = store.read_finite("hsic")  # a store without checksums whose hsic chunk was deleted reads as NaN
    results = Results(runs, hsic, minibatches, meta["inputs"], list(meta["notes"]), store.path,
                      measure_stats=stats, rankme=rankme)
    if "resampling" in meta and "cka_low" in store:  # a store written before them gets intervals drawn on first use
        results.resampling = Resampling.from_dict(meta["resampling"])
        results.bounds = np.stack([store.read("cka_low"), store.read("cka_high")])
        p = store.read("p_value")
        results.p_value_all = None if np.isnan(p).all() else p
    return results


def incompatibility(a: Results, b: Results) -> str | None:
    """What keeps two results from being combined (their numbers subtracted, set side by side), or None:
    the one check of everything that combines results (``diff``, a study's comparisons). Their first
    measures (kind, kernel, bandwidth or k), minibatch size, pairing, minibatches and samples must agree."""
    ma, mb = parse_measure(a.measures[0]), parse_measure(b.measures[0])
    if ma.kind != mb.kind:
        return f"measure {ma.name} against {mb.name}"
    if ma.param != mb.param:
        what = "bandwidth" if ma.kind.startswith("rbf") else "k"
        return f"{ma.kind} {what} {ma.param:g} against {mb.param:g} ({ma.name} against {mb.name})"
    if a.m != b.m:
        return f"minibatch size m={a.m} against m={b.m}"
    if a.pairing != b.pairing:
        return f"minibatches paired by {a.pairing} against by {b.pairing}"
    if not np.array_equal(a.minibatches, b.minibatches):
        return (f"other minibatches ({len(a.minibatches)} from {int(a.minibatches[0])} against "
                f"{len(b.minibatches)} from {int(b.minibatches[0])}): analyse the runs together")
    if not set(a.run_keys) & set(b.run_keys):  # a run's key names its samples and their order
        return "no run in common, so nothing says their minibatches hold the same samples: analyse the runs together"
    return None


def check_combinable(stores: list[Results]) -> None:
    """Refuse, in one line naming the difference, results that ``incompatibility`` keeps apart."""
    first = stores[0]
    for other in stores[1:]:
        why = None if other is first else incompatibility(first, other)
        if why:
            raise CkapipeError(f"cannot combine {describe_source(first)} with {describe_source(other)}: {why}")


def describe_source(results: Results) -> str:
    return f"results {results.path}" if results.path is not None else f"the results of {', '.join(results.run_names)}"


UNCERTAINTY_COLUMNS = ("cka_low", "cka_high", "p_value")


def format_interval(value: float, low: float, high: float, p: float = float("nan"), permutations: int = 0,
                    minibatches: int | None = None) -> str:
    """``0.842 [0.831, 0.853]``, and ``p = 0.004`` when tested (``p <= 0.001``: at the resolution 1/(R+1));
    ``0.914 [no interval: 1 minibatch]`` when too few ``minibatches`` give none."""
    if np.isnan(low) and minibatches is not None and minibatches < MIN_INTERVAL:
        text = f"{value:.3f} [no interval: {minibatch_count(minibatches)}]"
    else:
        text = f"{value:.3f}" if np.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"
    if np.isfinite(p):
        floor = 1 / (permutations + 1) if permutations else 0.0
        text += f"  p <= {floor:.2g}" if p <= floor else f"  p = {p:.2g}"
    return text


def _deprecated(old: str, new: str, value):
    """``value()``, after a DeprecationWarning that ``Results.old`` is now ``Results.new``."""
    warnings.warn(f"Results.{old} is deprecated: use Results.{new}", DeprecationWarning, stacklevel=3)
    return value()


def _nan_to_none(matrix: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]

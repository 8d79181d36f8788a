"""The results of one analysis: per-minibatch HSIC of every layer pair, CKA, exports.

Results store (a Zarr v3 group; readable with plain ``zarr``)::

    OUT/
      zarr.json        attrs["ckapipe_results"]: runs (name, slug, key, path,
                       layers), m, pairing, minibatches used, notes, versions
      hsic             float64 (n_minibatches, L, L): HSIC_1 of every pair of the
                       L layers of all runs stacked in run order, per minibatch
      minibatches      int64 (n_minibatches,): the minibatch index k of each row
      hsic_sum         float64 (L, L): the sums over minibatches
      cka              float64 (L, L): S_ab / sqrt(S_aa S_bb); attrs["labels"]
      cka_low          float64 (L, L): bootstrap interval of cka, lower end (analyze/stats.py);
      cka_high         upper end; attrs["resampling"] (and the group's) say how
      p_value          float64 (L, L): permutation p-value of CKA > 0 between runs (NaN: not tested)
      cka.json         every pair of runs: layer names, CKA matrix and its interval, HSIC sums
      cka.csv          long form: run_a, layer_a, run_b, layer_b, cka, hsic_ab, hsic_aa, hsic_bb,
                       cka_low, cka_high, p_value
      summary.txt      best-matching layer per layer

Everything but ``hsic`` and ``minibatches`` is derived from them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
import numpy as np
import zarr

from ckapipe.analyze.stats import Resampling, bootstrap_bounds
from ckapipe.atomic import atomic_path
from ckapipe.errors import CkapipeError, suggest
from ckapipe.kernels import cka as cka_from_sums
from ckapipe.store import library_versions, now

ATTRS = "ckapipe_results"
RESULTS_VERSION = 1
ANALYSIS_LIBRARIES = ("ckapipe", "numpy", "zarr", "dask", "cupy-cuda12x")


@dataclass(frozen=True)
class RunEntry:
    """One analysed run, as recorded in the results."""

    name: str  # store name, slug-key
    slug: str
    key: str
    layers: tuple[str, ...]
    path: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "slug": self.slug, "key": self.key, "layers": list(self.layers), "path": self.path}


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

    # ---- numbers
    @cached_property
    def hsic_sum(self) -> np.ndarray:
        """(L, L) float64 sums over minibatches of HSIC_1."""
        return self.hsic.sum(axis=0)

    @cached_property
    def cka_all(self) -> np.ndarray:
        """(L, L) minibatch CKA of every pair of stacked layers (NaN for constant layers, with a warning)."""
        diag = np.diag(self.hsic_sum)
        return cka_from_sums(self.hsic_sum, diag, diag, self.labels, self.labels)

    def cka(self, a, b=None) -> np.ndarray:
        """(La, Lb) CKA matrix of runs a and b (b defaults to a)."""
        b = a if b is None else b
        return self.cka_all[self._span(a), self._span(b)]

    @property
    def cka_bounds(self) -> np.ndarray:
        """(2, L, L) bootstrap interval [low, high] of every entry of cka_all (NaN when ci is None)."""
        if self.bounds is None:
            self.bounds = bootstrap_bounds(self.hsic, self.resampling)
        return self.bounds

    def cka_interval(self, a, b=None) -> tuple[np.ndarray, np.ndarray]:
        """(low, high), each (La, Lb): the bootstrap interval of cka(a, b)."""
        b = a if b is None else b
        low, high = self.cka_bounds
        return low[self._span(a), self._span(b)], high[self._span(a), self._span(b)]

    def p_value(self, a, b=None) -> np.ndarray:
        """(La, Lb) permutation p-values of CKA > 0 (NaN within a run, or when no test ran)."""
        b = a if b is None else b
        p = self.p_value_all if self.p_value_all is not None else np.full(self.cka_all.shape, np.nan)
        return p[self._span(a), self._span(b)]

    def stacked_index(self, run, layer) -> int:
        """Position of ``run:layer`` among the L stacked layers (rows of hsic and cka_all)."""
        return self._span(run).start + self.layer_index(run, layer)

    def hsic_sums(self, a, b=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """S_ab (La, Lb), S_aa (La,), S_bb (Lb,)."""
        b = a if b is None else b
        diag = np.diag(self.hsic_sum)
        return self.hsic_sum[self._span(a), self._span(b)], diag[self._span(a)], diag[self._span(b)]

    def minibatch_hsic(self, a, b=None) -> np.ndarray:
        """(n_minibatches, La, Lb) per-minibatch HSIC_1."""
        b = a if b is None else b
        return self.hsic[:, self._span(a), self._span(b)]

    def minibatch_cka(self, a, b, layer_a, layer_b) -> np.ndarray:
        """(n_minibatches,) CKA of one layer pair computed within each minibatch."""
        ia = self._span(a).start + self.layer_index(a, layer_a)
        ib = self._span(b).start + self.layer_index(b, layer_b)
        h = self.hsic
        with np.errstate(divide="ignore", invalid="ignore"):
            return h[:, ia, ib] / np.sqrt(h[:, ia, ia] * h[:, ib, ib])

    def best_matches(self, a, b) -> list[tuple[str, str, float]]:
        """For every layer of a: the layer of b with the highest CKA (another layer when a is b)."""
        matrix = self.cka(a, b).copy()
        if self.run_index(a) == self.run_index(b):
            np.fill_diagonal(matrix, np.nan)
        names_b = self.layer_names(b)
        out = []
        for layer, row in zip(self.layer_names(a), matrix):
            if np.isnan(row).all():
                out.append((layer, "-", float("nan")))
            else:
                j = int(np.nanargmax(row))
                out.append((layer, names_b[j], float(row[j])))
        return out

    # ---- exports
    def to_dict(self) -> dict:
        pairs = []
        for a, b in self.pairs():
            s_ab, s_aa, s_bb = self.hsic_sums(a, b)
            pairs.append({
                "run_a": a, "run_b": b,
                "layers_a": self.layer_names(a), "layers_b": self.layer_names(b),
                "cka": _nan_to_none(self.cka(a, b)),
                "cka_low": _nan_to_none(self.cka_interval(a, b)[0]),
                "cka_high": _nan_to_none(self.cka_interval(a, b)[1]),
                "p_value": _nan_to_none(self.p_value(a, b)),
                "hsic_ab": s_ab.tolist(), "hsic_aa": s_aa.tolist(), "hsic_bb": s_bb.tolist(),
            })
        return {
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
        writer.writerow(["run_a", "layer_a", "run_b", "layer_b", "cka", "hsic_ab", "hsic_aa", "hsic_bb",
                         *UNCERTAINTY_COLUMNS])
        for a, b in self.pairs():
            s_ab, s_aa, s_bb = self.hsic_sums(a, b)
            matrix = self.cka(a, b)
            low, high = self.cka_interval(a, b)
            p = self.p_value(a, b)
            for i, la in enumerate(self.layer_names(a)):
                for j, lb in enumerate(self.layer_names(b)):
                    writer.writerow([a, la, b, lb, repr(float(matrix[i, j])), repr(float(s_ab[i, j])),
                                     repr(float(s_aa[i])), repr(float(s_bb[j])),
                                     repr(float(low[i, j])), repr(float(high[i, j])), repr(float(p[i, j]))])
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def summary(self) -> str:
        """Best-matching layer per layer, for every pair of different runs (or within the one run)."""
        names = self.run_names
        pairs = [(a, b) for a, b in self.pairs() if a != b] or [(names[0], names[0])]
        lines = [f"minibatch CKA, m={self.m}, {len(self.minibatches)} minibatches, pairing by {self.pairing}",
                 self.resampling.describe(len(self.minibatches))]
        for a, b in pairs:
            matches = self.best_matches(a, b)
            width = max(len(la) for la, _, _ in matches)
            width_b = max(len(lb) for _, lb, _ in matches)
            low, high = self.cka_interval(a, b)
            p = self.p_value(a, b)
            title = f"{a} -> best layer of {b}" if a != b else f"{a}: most similar other layer"
            lines += ["", title]
            for i, (la, lb, value) in enumerate(matches):
                j = self.layer_index(b, lb) if lb != "-" else None
                number = (format_interval(value, low[i, j], high[i, j], p[i, j], self.resampling.permutations)
                          if j is not None else f"{value:.4f}")
                lines.append(f"  {la:<{width}}  {lb:<{width_b}}  {number}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Results(runs={self.run_names}, m={self.m}, n_minibatches={len(self.minibatches)}, path={self.path})"


# --------------------------------------------------------------------------- store


def write_results(results: Results, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the results store, then swap it into place (a half-written store is never visible)."""
    out = Path(out)
    check_out(out, overwrite)
    with atomic_path(out, replace=True) as tmp:
        _write_store(results, tmp)
    results.path = out
    return out


def _write_store(results: Results, tmp: Path) -> None:
    group = zarr.open_group(tmp, mode="w")
    L = results.hsic.shape[1]
    group.create_array("hsic", data=results.hsic, chunks=(1, L, L))
    group.create_array("minibatches", data=np.asarray(results.minibatches, dtype="int64"))
    group.create_array("hsic_sum", data=results.hsic_sum)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka_array = group.create_array("cka", data=results.cka_all)
    cka_array.attrs["labels"] = results.labels
    _write_uncertainty(group, results)
    group.attrs[ATTRS] = {
        "results_version": RESULTS_VERSION,
        "runs": [r.to_dict() for r in results.runs],
        "inputs": results.inputs,
        "notes": results.notes,
        "resampling": results.resampling.to_dict(),
        "created": now(),
        "versions": library_versions(ANALYSIS_LIBRARIES),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results.to_json(tmp / "cka.json")
        results.to_csv(tmp / "cka.csv")
        (tmp / "summary.txt").write_text(results.summary() + "\n")


def _write_uncertainty(group, results: Results) -> None:
    """cka_low, cka_high and p_value beside cka, with the resampling settings in their attributes."""
    low, high = results.cka_bounds
    p = results.p_value_all if results.p_value_all is not None else np.full(low.shape, np.nan)
    for name, data in (("cka_low", low), ("cka_high", high), ("p_value", p)):
        array = group.create_array(name, data=np.asarray(data, dtype=np.float64))
        array.attrs["labels"] = results.labels
        array.attrs["resampling"] = results.resampling.to_dict()


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not overwrite:
        raise CkapipeError(f"output directory {out} exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CkapipeError(f"output path {out} is a file, not a results directory")


def load_results(path: str | os.PathLike) -> Results:
    """Open a results store written by ``analyze(..., out=path)``."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        meta = group.attrs[ATTRS]
    except Exception:  # noqa: BLE001
        raise CkapipeError(f"{path} is not a ckapipe results directory (written by ckapipe analyze --out)") from None
    runs = [RunEntry(r["name"], r["slug"], r["key"], tuple(r["layers"]), r.get("path", "")) for r in meta["runs"]]
    results = Results(runs, group["hsic"][:], group["minibatches"][:], meta["inputs"], list(meta["notes"]), path)
    _read_uncertainty(group, meta, results)
    return results


def _read_uncertainty(group, meta: dict, results: Results) -> None:
    """The stored intervals and p-values (a store written before them gets intervals drawn on first use)."""
    if "resampling" not in meta or "cka_low" not in group:
        return
    results.resampling = Resampling.from_dict(meta["resampling"])
    results.bounds = np.stack([group["cka_low"][:], group["cka_high"][:]])
    p = group["p_value"][:]
    results.p_value_all = None if np.isnan(p).all() else p


def recorded_inputs(path: str | os.PathLike) -> dict | None:
    """The inputs an existing results store was computed from; None if unreadable."""
    try:
        return zarr.open_group(Path(path), mode="r").attrs[ATTRS]["inputs"]
    except Exception:  # noqa: BLE001
        return None


UNCERTAINTY_COLUMNS = ("cka_low", "cka_high", "p_value")


def format_interval(value: float, low: float, high: float, p: float = float("nan"), permutations: int = 0) -> str:
    """``0.842 [0.831, 0.853]``, and ``p = 0.004`` when tested (``p <= 0.001``: at the resolution 1/(R+1))."""
    text = f"{value:.3f}" if np.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"
    if np.isfinite(p):
        floor = 1 / (permutations + 1) if permutations else 0.0
        text += f"  p <= {floor:.2g}" if p <= floor else f"  p = {p:.2g}"
    return text


def _nan_to_none(matrix: np.ndarray) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]

"""Results as labelled arrays (xarray): dimensions and coordinates that name the runs and layers.

Every array over pairs of layers has the dimensions ``a`` and ``b``, each indexed by
(run, layer): the coordinates ``run_a``, ``layer_a`` and ``run_b``, ``layer_b``; per-minibatch
arrays add ``minibatch`` (the index k of each minibatch used). So::

    res.cka_all_runs.sel(run_a="r18", run_b="r34")        # dims (layer_a, layer_b), layer names as coordinates
    res.cka_all_runs.sel(run_a="r18", layer_a="layer4.1")  # one layer of r18 against every layer of every run

The Dataset (``Results.to_xarray``) holds ``cka``, ``hsic_sum``, per-minibatch ``hsic`` and
``minibatch_cka``; further measures go beside them on the same dimensions (``cka_low``,
``cka_high``, ``p_value`` over (a, b), or a ``measure`` dimension). On disk the (run, layer)
index is stored as its plain coordinate arrays, which ``stored`` and ``indexed`` convert.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

SIDES = ("a", "b")


class CallableArray(xr.DataArray):
    """A DataArray that is also the Results method it took the name of: ``res.cka`` is the
    labelled array, ``res.cka(a, b)`` the labelled (layer_a, layer_b) array of one pair of runs.

    Arrays derived from it (``res.cka.sel(...)``, ``res.cka * 2``) are plain labelled arrays; calling
    one says so.
    """

    __slots__ = ("_method",)

    def __call__(self, *args, **kwargs):
        method = getattr(self, "_method", None)
        if method is None:
            raise TypeError(f"this {self.name!r} array was derived from the results' own: select with .sel(run_a=..., run_b=...)")
        return method(*args, **kwargs)


def callable_array(array: xr.DataArray, method) -> CallableArray:
    out = CallableArray(array)
    object.__setattr__(out, "_method", method)
    return out


def layer_coordinates(runs: list[str], layers: list[str], side: str) -> xr.Coordinates:
    """The (run, layer) index of dimension ``side`` ("a" or "b") over the stacked layers of every run."""
    index = pd.MultiIndex.from_arrays([np.array(runs, dtype=object), np.array(layers, dtype=object)],
                                      names=[f"run_{side}", f"layer_{side}"])
    return xr.Coordinates.from_pandas_multiindex(index, side)


def results_dataset(runs: list[str], layers: list[str], minibatches: np.ndarray, hsic: np.ndarray,
                    cka: np.ndarray, minibatch_cka: np.ndarray, attrs: dict | None = None,
                    measures: dict | None = None, rankme: np.ndarray | None = None,
                    uncertainty: tuple | None = None, modules: list[str] | None = None) -> xr.Dataset:
    """The labelled arrays of one analysis: stacked layers ``runs[i]:layers[i]`` on a and b.

    ``modules`` (each stacked layer's module type, ``Linear``) adds the coordinates ``module_a`` and
    ``module_b``, so ``1 Linear`` can label a Sequential's layer ``1``.
    ``uncertainty`` (low, high, p, settings), each array (L, L), adds ``cka_low``, ``cka_high`` and
    ``p_value``, with the resampling settings in their attributes.

    ``measures`` (name -> (values (L, L), per-minibatch statistics (n, L, L))) adds ``measure_cka``
    and ``measure_stats`` over a ``measure`` dimension; ``rankme`` (n, L) adds RankMe per minibatch.
    """
    pair, per_minibatch = ("a", "b"), ("minibatch", "a", "b")
    data = {
        "cka": (pair, cka, {"long_name": "minibatch CKA", "formula": "S_ab / sqrt(S_aa S_bb), S = sum over minibatches of HSIC_1"}),
        "hsic_sum": (pair, hsic.sum(axis=0), {"long_name": "sum over minibatches of HSIC_1"}),
        "hsic": (per_minibatch, hsic, {"long_name": "HSIC_1 of each minibatch (Song et al. 2012)"}),
        "minibatch_cka": (per_minibatch, minibatch_cka, {"long_name": "CKA within each minibatch"}),
    }
    if measures:
        data["measure_cka"] = (("measure", *pair), np.stack([v for v, _ in measures.values()]),
                               {"long_name": "the CKA-like value of every measure (ckapipe.analyze.measures)"})
        data["measure_stats"] = (("measure", *per_minibatch), np.stack([s for _, s in measures.values()]),
                                 {"long_name": "the per-minibatch statistic of every measure"})
    if uncertainty is not None:
        low, high, p, settings = uncertainty
        data["cka_low"] = (pair, low, {"long_name": "bootstrap interval of cka, lower end", "resampling": settings})
        data["cka_high"] = (pair, high, {"long_name": "bootstrap interval of cka, upper end", "resampling": settings})
        data["p_value"] = (pair, p, {"long_name": "permutation p-value of CKA > 0 between runs (NaN: not tested)",
                                     "resampling": settings})
    if rankme is not None:
        data["rankme"] = (("minibatch", "a"), rankme, {"long_name": "RankMe of each layer in each minibatch (Garrido et al. 2023)"})
    ds = xr.Dataset(data, coords=layer_coordinates(runs, layers, "a")).assign_coords(layer_coordinates(runs, layers, "b"))
    ds = ds.assign_coords(minibatch=("minibatch", np.asarray(minibatches, dtype=np.int64)))
    if modules is not None:
        ds = ds.assign_coords({f"module_{side}": (side, np.array(modules, dtype=object)) for side in SIDES})
    if measures:
        ds = ds.assign_coords(measure=("measure", np.array(list(measures), dtype=object)))
    ds.attrs.update(attrs or {})
    return ds


def stored(ds: xr.Dataset) -> xr.Dataset:
    """The Dataset as written to Zarr: the (run, layer) indexes as plain coordinate arrays."""
    return ds.reset_index(list(SIDES))


def indexed(ds: xr.Dataset) -> xr.Dataset:
    """A stored Dataset (``xarray.open_zarr`` of a results directory) with its (run, layer) indexes back."""
    return ds.set_index({side: [f"run_{side}", f"layer_{side}"] for side in SIDES})

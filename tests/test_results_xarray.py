"""Results as labelled arrays, one name per idea: res.cka (the a x b matrix of two runs), res.cka_all_runs
(stacked), res.minibatch_cka, res.interval, res.p_value, res.hsic_sum; the old names as deprecated aliases;
the tidy table, and the results directory opened by xarray.open_zarr with its coordinates.
No torch: the runs are written from NumPy arrays."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import xarray as xr

import ckapipe.analyze as analyze
from ckapipe.analyze.labelled import indexed
from ckapipe.analyze.results import Results, RunEntry
from tests.numpy_runs import make_run, random_layers
from tests.reference import hsic1_reference

M = 16


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xr")
    rng = np.random.default_rng(0)
    small = random_layers(rng, 96, [10, 20, 5])
    big = {f"layer{i}.0.conv1": x @ rng.standard_normal((x.shape[1], 8)).astype(np.float32) for i, x in enumerate(small.values())}
    make_run(tmp / "cache", "small", small, M)
    make_run(tmp / "cache", "big", big, M)
    out = tmp / "results"
    return out, analyze.analyze(tmp / "cache", ["small", "big"], out=out, progress=False), small, big


def by_hand(x: np.ndarray, y: np.ndarray, m: int = M) -> tuple[np.ndarray, float]:
    """Per-minibatch HSIC_1 (Song et al. 2012, eq. 5, explicit traces, float64) and minibatch CKA of two layers."""
    terms = []
    for k in range(len(x) // m):
        a, b = x[k * m:(k + 1) * m].astype(np.float64), y[k * m:(k + 1) * m].astype(np.float64)
        ka, kb = a @ a.T, b @ b.T
        terms.append((hsic1_reference(ka, kb), hsic1_reference(ka, ka), hsic1_reference(kb, kb)))
    terms = np.array(terms)
    per_minibatch = terms[:, 0] / np.sqrt(terms[:, 1] * terms[:, 2])
    total = terms.sum(axis=0)
    return per_minibatch, total[0] / np.sqrt(total[1] * total[2])


def stacked_results(layers: dict[str, dict[str, np.ndarray]], m: int = M) -> Results:
    """Results built from per-minibatch HSIC_1 computed by hand (tests/reference.py), no analysis:
    ``layers`` is {run: {layer: (N, D) features}}."""
    features = [x.astype(np.float64) for run in layers.values() for x in run.values()]
    grams = [[x[k * m:(k + 1) * m] @ x[k * m:(k + 1) * m].T for x in features] for k in range(len(features[0]) // m)]
    hsic = np.array([[[hsic1_reference(ka, kb) for kb in row] for ka in row] for row in grams])
    runs = [RunEntry(name, name, f"key{i}", tuple(run)) for i, (name, run) in enumerate(layers.items())]
    return Results(runs, hsic, np.arange(len(hsic)), {"m": m, "pairing": "sample_ids"})


def test_cka_of_two_runs_is_the_a_by_b_matrix_with_layer_names(study):
    _, res, small, big = study
    assert isinstance(res.cka, xr.DataArray) and res.cka.dims == ("layer_a", "layer_b")
    assert list(res.cka.layer_a.values) == ["l0", "l1", "l2"]
    assert list(res.cka.layer_b.values) == ["layer0.0.conv1", "layer1.0.conv1", "layer2.0.conv1"]
    assert (str(res.cka.run_a.values), str(res.cka.run_b.values)) == ("small", "big")
    _, exact = by_hand(small["l1"], big["layer2.0.conv1"])
    assert abs(float(res.cka.sel(layer_a="l1", layer_b="layer2.0.conv1")) - exact) < 1e-6
    called = res.cka("small", "big")
    assert isinstance(called, xr.DataArray) and called.identical(xr.DataArray(res.cka))
    within = res.cka("small")
    assert within.dims == ("layer_a", "layer_b") and list(within.layer_b.values) == ["l0", "l1", "l2"]
    np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)


def test_cka_all_runs_is_the_stacked_matrix_self_pairs_included(study):
    _, res, small, big = study
    stacked = res.cka_all_runs
    assert stacked.dims == ("a", "b") and stacked.shape == (6, 6)
    np.testing.assert_array_equal(stacked.sel(run_a="small", run_b="big").values, res.cka.values)
    _, exact = by_hand(big["layer0.0.conv1"], big["layer2.0.conv1"])
    assert abs(float(stacked.sel(run_a="big", layer_a="layer0.0.conv1", run_b="big", layer_b="layer2.0.conv1")) - exact) < 1e-6


def test_two_runs_that_share_layer_names_get_model_qualified_names():
    rng = np.random.default_rng(1)
    net_a, net_b = random_layers(rng, 64, [6, 9]), random_layers(rng, 64, [7, 4])
    res = stacked_results({"net_a": net_a, "net_b": net_b})
    assert list(res.cka.layer_a.values) == ["net_a:l0", "net_a:l1"]
    assert list(res.cka.layer_b.values) == ["net_b:l0", "net_b:l1"]
    _, exact = by_hand(net_a["l0"], net_b["l1"])
    assert abs(float(res.cka.sel(layer_a="net_a:l0", layer_b="net_b:l1")) - exact) < 1e-12
    assert list(res.cka("net_b").layer_a.values) == ["l0", "l1"]  # one run against itself: no clash


def test_cka_of_more_than_two_runs_is_the_stacked_view_and_called_picks_a_pair():
    rng = np.random.default_rng(2)
    runs = {name: random_layers(rng, 48, [5, 8]) for name in ("x", "y", "z")}
    res = stacked_results(runs)
    assert res.cka.dims == ("a", "b") and res.cka.shape == (6, 6)
    pair = res.cka("z", "x")
    assert pair.dims == ("layer_a", "layer_b") and list(pair.layer_a.values) == ["z:l0", "z:l1"]
    _, exact = by_hand(runs["z"]["l1"], runs["x"]["l0"])
    assert abs(float(pair.sel(layer_a="z:l1", layer_b="x:l0")) - exact) < 1e-12


def test_cka_of_one_run_is_that_run_against_itself():
    layers = random_layers(np.random.default_rng(3), 48, [5, 8, 3])
    res = stacked_results({"solo": layers})
    assert res.cka.dims == ("layer_a", "layer_b") and list(res.cka.layer_b.values) == ["l0", "l1", "l2"]
    _, exact = by_hand(layers["l2"], layers["l0"])
    assert abs(float(res.cka.sel(layer_a="l2", layer_b="l0")) - exact) < 1e-12


def test_minibatch_cka_is_a_labelled_array_and_one_pair_when_called(study):
    _, res, small, big = study
    assert res.minibatch_cka.dims == ("minibatch", "a", "b")
    one = res.minibatch_cka.sel(run_a="small", layer_a="l0", run_b="big", layer_b="layer1.0.conv1")
    per_minibatch, _ = by_hand(small["l0"], big["layer1.0.conv1"])
    np.testing.assert_allclose(one.values, per_minibatch, rtol=0, atol=1e-9)
    called = res.minibatch_cka("small", "big", "l0", "layer1.0.conv1")
    assert called.dims == ("minibatch",) and list(called.minibatch.values) == list(range(6))
    np.testing.assert_allclose(called.values, per_minibatch, rtol=0, atol=1e-9)
    with pytest.raises(TypeError, match="derived"):
        (res.cka * 1)("small", "big")


def test_interval_p_value_and_hsic_sum_are_labelled(study):
    _, res, small, big = study
    bounds = res.interval("small", "big")
    assert bounds.dims == ("bound", "layer_a", "layer_b") and list(bounds.bound.values) == ["low", "high"]
    assert ((bounds.sel(bound="low") <= res.cka) & (res.cka <= bounds.sel(bound="high"))).all()
    stacked = res.interval()
    assert stacked.dims == ("bound", "a", "b")
    np.testing.assert_array_equal(stacked.sel(run_a="small", run_b="big").values, bounds.values)
    p = res.p_value("small", "big")
    assert p.dims == ("layer_a", "layer_b") and bool(p.isnull().all())  # no permutation test ran
    sums = res.hsic_sum("small", "big")
    expected = sum(hsic1_reference(x @ x.T, y @ y.T) for x, y in minibatch_pairs(small["l2"], big["layer1.0.conv1"]))
    assert sums.dims == ("layer_a", "layer_b") and abs(float(sums.sel(layer_a="l2", layer_b="layer1.0.conv1")) - expected) < 1e-6 * expected
    assert res.minibatch_hsic("small", "big").dims == ("minibatch", "layer_a", "layer_b")


def minibatch_pairs(x: np.ndarray, y: np.ndarray, m: int = M):
    return [(x[k * m:(k + 1) * m].astype(np.float64), y[k * m:(k + 1) * m].astype(np.float64)) for k in range(len(x) // m)]


@pytest.mark.parametrize("old, new", [
    ("cka_all", "cka_all_runs"), ("cka_matrix", "cka(a, b)"), ("values", "cka_all_runs"),
    ("minibatch_cka_all", "minibatch_cka"), ("minibatch_cka_pair", "minibatch_cka(a, b, layer_a, layer_b)"),
    ("cka_bounds", "interval()"), ("measure_bounds", "interval(measure=measure)"), ("cka_interval", "interval(a, b)"),
    ("hsic_sums", "hsic_sum(a, b)"),
])
def test_old_names_warn_and_name_the_new_one(study, old, new):
    _, res, _, _ = study
    args = {"cka_matrix": ("small", "big"), "values": (), "minibatch_cka_pair": ("small", "big", "l0", "layer1.0.conv1"),
            "measure_bounds": (), "cka_interval": ("small", "big"), "hsic_sums": ("small", "big")}
    with pytest.warns(DeprecationWarning, match=rf"Results\.{old}.* is deprecated: use Results\.{re.escape(new)}"):
        value = getattr(res, old)
        value = value(*args[old]) if old in args else value
    expected = {"cka_all": res.cka_all_runs.values, "cka_matrix": res.cka.values, "values": res.cka_all_runs.values,
                "minibatch_cka_all": res.minibatch_cka.values,
                "minibatch_cka_pair": res.minibatch_cka("small", "big", "l0", "layer1.0.conv1").values,
                "cka_bounds": res.interval().values, "measure_bounds": res.interval().values,
                "cka_interval": res.interval("small", "big").values, "hsic_sums": res.hsic_sum("small", "big").values}[old]
    np.testing.assert_array_equal(value[0] if old == "hsic_sums" else np.asarray(value), expected)


def test_to_dataframe_gives_each_pair_of_layers_once(study):
    _, res, small, big = study
    table = res.to_dataframe()
    assert list(table.columns) == ["run_a", "layer_a", "run_b", "layer_b", "cka", "hsic_ab", "hsic_aa", "hsic_bb",
                                   "cka_low", "cka_high"]  # no p_value: no permutation test was asked for
    assert (table.cka_low < table.cka_high).all()
    within = table[table.run_a == table.run_b]
    assert len(table) == 3 + 9 + 3 and len(within) == 6  # 3 + 3 unordered pairs of different layers within a run
    assert not ((within.layer_a == within.layer_b).any())
    keys = set(zip(table.run_a, table.layer_a, table.run_b, table.layer_b))
    assert not any((rb, lb, ra, la) in keys for ra, la, rb, lb in keys)  # no pair in both orders
    row = table[(table.layer_a == "l2") & (table.layer_b == "layer0.0.conv1")].iloc[0]
    _, exact = by_hand(small["l2"], big["layer0.0.conv1"])
    assert abs(row.cka - exact) < 1e-6 and abs(row.cka - row.hsic_ab / np.sqrt(row.hsic_aa * row.hsic_bb)) < 1e-12
    assert len(res.to_dataframe(all_pairs=True)) == 36


def test_to_dataframe_has_a_p_value_column_when_permutations_ran(study, tmp_path):
    out, res, _, _ = study
    tested = analyze.analyze(out.parent / "cache", ["small", "big"], progress=False, permutations=19)
    table = tested.to_dataframe()
    assert list(table.columns)[-1] == "p_value"
    between = table[table.run_a != table.run_b]
    assert between.p_value.notna().all() and ((between.p_value >= 1 / 20) & (between.p_value <= 1)).all()
    assert table[table.run_a == table.run_b].p_value.isna().all()  # within a run: not tested


def test_the_results_directory_opens_with_xarray_and_its_coordinates(study):
    out, res, small, big = study
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # opens as is: no fallback, no missing dimension names
        ds = xr.open_zarr(out)
    assert set(ds.data_vars) >= {"cka", "hsic", "hsic_sum", "minibatch_cka"}
    assert ds.cka.dims == ("a", "b") and ds.hsic.dims == ("minibatch", "a", "b")
    assert [str(v) for v in ds.run_a.values] == ["small"] * 3 + ["big"] * 3
    assert [str(v) for v in ds.layer_b.values] == ["l0", "l1", "l2", "layer0.0.conv1", "layer1.0.conv1", "layer2.0.conv1"]
    assert list(ds.minibatch.values) == list(range(6))
    assert ds.attrs["ckapipe_results"]["inputs"]["m"] == M
    pair = indexed(ds).cka.sel(run_a="small", run_b="big")
    assert pair.dims == ("layer_a", "layer_b")
    np.testing.assert_array_equal(pair.values, res.cka("small", "big").values)
    loaded = analyze.load_results(out)
    np.testing.assert_array_equal(loaded.hsic, res.hsic)
    np.testing.assert_array_equal(loaded.minibatches, np.arange(6))


def test_results_of_store_version_1_still_load(study, tmp_path):
    import zarr

    _, res, _, _ = study
    group = zarr.open_group(tmp_path / "v1", mode="w")  # the layout of version 1: "minibatches", no coordinates
    group.create_array("hsic", data=res.hsic, chunks=(1, *res.hsic.shape[1:]))
    group.create_array("minibatches", data=np.arange(6, dtype="int64"))
    group.attrs["ckapipe_results"] = {"results_version": 1, "runs": [r.to_dict() for r in res.runs],
                                      "inputs": res.inputs, "notes": []}
    loaded = analyze.load_results(tmp_path / "v1")
    np.testing.assert_array_equal(loaded.minibatches, np.arange(6))
    np.testing.assert_array_equal(loaded.cka("small", "big").values, res.cka("small", "big").values)


def test_best_matches_is_a_table_and_statistics_a_labelled_array(study):
    """best_matches: each small layer's most similar big layer, from CKA computed by hand; statistics:
    the per-minibatch HSIC_1 of every stacked pair, on (minibatch, a, b) with run and layer coordinates."""
    _, res, small, big = study
    table = res.best_matches("small", "big")
    assert list(table.columns) == ["layer_a", "layer_b", "cka"] and list(table.layer_a) == list(small)
    for row in table.itertuples(index=False):
        by_layer = {name: by_hand(small[row.layer_a], y)[1] for name, y in big.items()}
        assert row.layer_b == max(by_layer, key=by_layer.get)
        np.testing.assert_allclose(row.cka, by_layer[row.layer_b], rtol=0, atol=1e-9)
    stats = res.statistics()
    assert stats.dims == ("minibatch", "a", "b") and stats.shape == (96 // M, 6, 6)
    one = stats.sel(run_a="small", layer_a="l1", run_b="big", layer_b="layer2.0.conv1").values
    x, y = small["l1"].astype(np.float64), big["layer2.0.conv1"].astype(np.float64)
    expected = [hsic1_reference(x[k * M:(k + 1) * M] @ x[k * M:(k + 1) * M].T, y[k * M:(k + 1) * M] @ y[k * M:(k + 1) * M].T)
                for k in range(96 // M)]
    np.testing.assert_allclose(one, expected, rtol=1e-9)

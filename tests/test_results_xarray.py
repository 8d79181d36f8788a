"""Results as labelled arrays: res.cka and res.minibatch_cka (xarray, still callable as before),
the tidy table, and the results directory opened by xarray.open_zarr with its coordinates.
No torch: the runs are written from NumPy arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

import ckapipe.analyze as analyze
from ckapipe.analyze.labelled import indexed
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


def test_cka_is_a_labelled_array_over_run_and_layer(study):
    _, res, small, big = study
    assert isinstance(res.cka, xr.DataArray) and res.cka.dims == ("a", "b")
    pair = res.cka.sel(run_a="small", run_b="big")
    assert pair.dims == ("layer_a", "layer_b")
    assert list(pair.layer_a.values) == ["l0", "l1", "l2"]
    assert list(pair.layer_b.values) == ["layer0.0.conv1", "layer1.0.conv1", "layer2.0.conv1"]
    _, exact = by_hand(small["l1"], big["layer2.0.conv1"])
    assert abs(float(pair.sel(layer_a="l1", layer_b="layer2.0.conv1")) - exact) < 1e-6
    np.testing.assert_array_equal(res.cka("small", "big"), pair.values)  # the old call still answers
    np.testing.assert_array_equal(res.cka("small"), res.cka.sel(run_a="small", run_b="small").values)


def test_minibatch_cka_is_a_labelled_array_and_still_callable(study):
    _, res, small, big = study
    assert res.minibatch_cka.dims == ("minibatch", "a", "b")
    one = res.minibatch_cka.sel(run_a="small", layer_a="l0", run_b="big", layer_b="layer1.0.conv1")
    per_minibatch, _ = by_hand(small["l0"], big["layer1.0.conv1"])
    np.testing.assert_allclose(one.values, per_minibatch, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(res.minibatch_cka("small", "big", "l0", "layer1.0.conv1"), one.values)
    assert list(one.minibatch.values) == list(range(6))
    with pytest.raises(TypeError, match="derived"):
        (res.cka * 1)("small", "big")


def test_to_dataframe_gives_each_pair_of_layers_once(study):
    _, res, small, big = study
    table = res.to_dataframe()
    assert list(table.columns) == ["run_a", "layer_a", "run_b", "layer_b", "cka", "hsic_ab", "hsic_aa", "hsic_bb",
                                   "cka_low", "cka_high", "p_value"]
    assert (table.cka_low < table.cka_high).all() and table.p_value.isna().all()  # no permutation test asked
    within = table[table.run_a == table.run_b]
    assert len(table) == 3 + 9 + 3 and len(within) == 6  # 3 + 3 unordered pairs of different layers within a run
    assert not ((within.layer_a == within.layer_b).any())
    keys = set(zip(table.run_a, table.layer_a, table.run_b, table.layer_b))
    assert not any((rb, lb, ra, la) in keys for ra, la, rb, lb in keys)  # no pair in both orders
    row = table[(table.layer_a == "l2") & (table.layer_b == "layer0.0.conv1")].iloc[0]
    _, exact = by_hand(small["l2"], big["layer0.0.conv1"])
    assert abs(row.cka - exact) < 1e-6 and abs(row.cka - row.hsic_ab / np.sqrt(row.hsic_aa * row.hsic_bb)) < 1e-12
    assert len(res.to_dataframe(all_pairs=True)) == 36


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
    np.testing.assert_array_equal(pair.values, res.cka("small", "big"))
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
    np.testing.assert_array_equal(loaded.cka("small", "big"), res.cka("small", "big"))

"""RankMe (analyze/rank.py) against numpy.linalg.svd of the stored features: full data by both routes
(Xᵀ X and the N × N Gram), per minibatch from the Gram cache, in the analysis, and its invariances."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
from ckapipe.analyze.rank import rank
from ckapipe.errors import StoreError
from tests.numpy_runs import make_run

N, M = 96, 32


def rankme_reference(x):
    """Garrido et al. (2023), eq. 1 without their ε: exp of the entropy of σ / Σσ, σ from numpy's SVD."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def stored(run, layer):
    return zarr.open_group(run, mode="r")[f"layers/{layer}"][:].astype(np.float64)


@pytest.fixture
def cache(tmp_path):
    """One run, float32 storage: a narrow layer of rank 8 (D = 24 < N: singular values at the float32
    rounding of the stored values, which the QR route resolves), a wide one (D = 200 > N) with a decaying
    spectrum, and an offset one."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((N, 40))
    layers = {
        "narrow": base[:, :8] @ rng.standard_normal((8, 24)),
        "wide": rng.standard_normal((N, 200)) * np.exp(-np.arange(200) / 60),
        "offset": base[:, :20] + 7.0,
    }
    make_run(tmp_path / "cache", "net", {k: v.astype(np.float32) for k, v in layers.items()}, M)
    return tmp_path / "cache"


def by_layer(rows):
    return {row.layer: row for row in rows}


def test_full_data_rankme_equals_the_svd_of_the_stored_features_by_both_routes(cache):
    rows = by_layer(rank(cache, ["net"], minibatch=False, progress=False))
    path = next(iter(analyze.analyze(cache, ["net"], progress=False).runs)).path
    assert (rows["narrow"].route, rows["wide"].route) == ("qr", "gram")
    for layer, row in rows.items():
        expected = rankme_reference(stored(path, layer))
        assert abs(row.rankme - expected) <= 1e-8 * expected, layer
        assert row.n == N and row.dim == stored(path, layer).shape[1]
    gram_route = by_layer(rank(cache, ["net"], minibatch=False, progress=False, max_dim=4))
    assert {row.route for row in gram_route.values()} == {"gram"}
    for layer in ("wide", "offset"):  # every singular value well above the Gram route's floor, √(N ε) σ_max
        assert abs(gram_route[layer].rankme - rows[layer].rankme) <= 1e-8 * rows[layer].rankme
    # rank 8 stored in float32: 16 singular values at the rounding of the stored values, near the floor
    # (docs/measures.md), which the QR route keeps and the Gram route cannot tell from 0
    assert 0 < rows["narrow"].rankme - gram_route["narrow"].rankme < 1e-5 * rows["narrow"].rankme


@pytest.mark.parametrize("m", [M, M // 2])
def test_minibatch_rankme_equals_the_svd_of_each_stored_minibatch(cache, m):
    rows = by_layer(rank(cache, ["net"], full=False, batch_size=m, progress=False))
    path = next(iter(analyze.analyze(cache, ["net"], progress=False).runs)).path
    for layer, row in rows.items():
        x = stored(path, layer)
        values = [rankme_reference(x[k * m:(k + 1) * m]) for k in range(N // m)]
        # from the minibatch Grams: exact above the floor √(max(m, D) ε) σ_max; the narrow layer's
        # float32-rounding singular values lie near it (see the full-data test)
        tolerance = 1e-5 if layer == "narrow" else 1e-8
        assert abs(row.rankme_minibatch - np.mean(values)) <= tolerance * np.mean(values), layer
        assert abs(row.rankme_minibatch_sd - np.std(values)) <= 1e-5 * np.mean(values)
        assert row.m == m and np.isnan(row.rankme)


def test_the_analysis_gives_the_same_minibatch_rankme_and_a_summary_column(cache):
    results = analyze.analyze(cache, ["net"], rankme=True, progress=False)
    rows = by_layer(rank(cache, ["net"], full=False, progress=False))
    np.testing.assert_array_equal(results.layer_rankme("net").values, [rows[layer].rankme_minibatch for layer in rows])
    assert results.rankme.shape == (N // M, 3)
    summary = results.summary()
    columns = [line for line in summary.splitlines() if line.startswith("columns: ")]
    assert columns and columns[0].endswith(", RankMe")
    assert f"{rows['narrow'].rankme_minibatch:.1f}" in summary


def test_rankme_is_invariant_to_rotation_and_scale_but_not_to_translation(tmp_path):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((N, 16)) * np.linspace(2, 0.2, 16)
    q = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    cache = tmp_path / "cache"
    for name, data in (("x", x), ("turned", 0.3 * x @ q), ("shifted", x + 2.0)):
        make_run(cache, name, {"f": data}, M, dtype="float64")
    values = {name: rank(cache, [name], progress=False)[0] for name in ("x", "turned", "shifted")}
    assert abs(values["turned"].rankme - values["x"].rankme) < 1e-9 * values["x"].rankme
    assert abs(values["turned"].rankme_minibatch - values["x"].rankme_minibatch) < 1e-9 * values["x"].rankme
    assert abs(values["shifted"].rankme - values["x"].rankme) > 0.1  # RankMe is of the un-centered features


def test_rank_command_prints_the_table_and_writes_csv(cache, tmp_path, capsys):
    from ckapipe.cli import main

    out = tmp_path / "rank.csv"
    main(["rank", "--cache", str(cache), "net", "--csv", str(out), "-q"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:6] == ["run", "layer", "D", "N", "RankMe", "route"] and len(printed) == 4
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [row["layer"] for row in table] == ["narrow", "wide", "offset"]
    assert float(table[0]["rankme"]) == by_layer(rank(cache, ["net"], minibatch=False, progress=False))["narrow"].rankme


def test_a_grams_only_run_has_a_minibatch_rankme_only(tmp_path):
    x = np.random.default_rng(9).standard_normal((64, 30))
    make_run(tmp_path, "only", {"f": x.astype(np.float32)}, M, grams_only=True)
    with pytest.raises(StoreError, match="stores Grams only: its full-data RankMe needs the activations"):
        rank(tmp_path, ["only"], progress=False)
    (row,) = rank(tmp_path, ["only"], full=False, progress=False)
    expected = np.mean([rankme_reference(x.astype(np.float32)[k * M:(k + 1) * M]) for k in range(2)])
    assert abs(row.rankme_minibatch - expected) <= 1e-8 * expected

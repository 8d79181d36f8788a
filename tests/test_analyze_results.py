"""The results store, its exports, is_up_to_date, the plots and the command line."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
from tests.numpy_runs import make_run, random_layers


@pytest.fixture
def analyzed(tmp_path):
    """Runs small and big analyzed into tmp_path/results: (cache, out, results)."""
    cache = tmp_path / "cache"
    rng = np.random.default_rng(0)
    a = random_layers(rng, 96, [10, 20, 5])
    make_run(cache, "small", a, 16)
    make_run(cache, "big", {f"stage{i}": x @ rng.standard_normal((x.shape[1], 8)).astype(np.float32)
                            for i, x in enumerate(a.values())}, 16)
    out = tmp_path / "results"
    results = analyze.analyze(cache, ["small", "big"], out=out, progress=False)
    return cache, out, results


def test_results_round_trip_through_the_store(analyzed):
    _, out, results = analyzed
    loaded = analyze.load_results(out)
    assert loaded.run_names == ["small", "big"] and loaded.run_keys == results.run_keys
    assert loaded.layer_names("big") == ["stage0", "stage1", "stage2"]
    np.testing.assert_array_equal(loaded.hsic, results.hsic)
    np.testing.assert_array_equal(loaded.cka("small", "big").values, results.cka("small", "big").values)
    assert loaded.minibatch_hsic("small", "big").shape == (6, 3, 3)
    s_ab = loaded.hsic_sum("small", "big").values
    s_aa, s_bb = np.diag(loaded.hsic_sum("small").values), np.diag(loaded.hsic_sum("big").values)
    np.testing.assert_allclose(s_ab / np.sqrt(np.outer(s_aa, s_bb)), loaded.cka("small", "big").values)


def test_results_store_is_readable_with_plain_zarr(analyzed):
    _, out, results = analyzed
    group = zarr.open_group(out, mode="r")
    np.testing.assert_allclose(group["cka"][:], results.cka_all_runs.values)
    assert group["cka"].metadata.dimension_names == ("a", "b")
    assert [str(v) for v in group["run_a"][:4]] == ["small"] * 3 + ["big"]
    assert [str(v) for v in group["layer_a"][:4]] == ["l0", "l1", "l2", "stage0"]
    assert group.attrs["ckapipe_results"]["inputs"]["m"] == 16


def test_json_and_csv_exports(analyzed):
    _, out, results = analyzed
    data = json.loads((out / "cka.json").read_text())
    assert [(p["run_a"], p["run_b"]) for p in data["pairs"]] == [("small", "small"), ("small", "big"), ("big", "big")]
    np.testing.assert_allclose(data["pairs"][1]["cka"], results.cka("small", "big").values)
    rows = list(csv.DictReader(io.StringIO(results.to_csv())))
    assert len(rows) == 9 + 9 + 9
    row = next(r for r in rows if (r["run_a"], r["layer_a"], r["run_b"], r["layer_b"]) == ("small", "l1", "big", "stage2"))
    assert float(row["cka"]) == results.cka("small", "big").values[1, 2]


def test_summary_gives_the_best_matching_layer(analyzed):
    _, out, results = analyzed
    text = results.summary()
    best = results.layer_names("big")[int(np.argmax(results.cka("small", "big").values[0]))]
    assert f"l0  {best}" in text
    assert (out / "summary.txt").read_text().strip() == text


def test_is_up_to_date_tracks_the_inputs(analyzed):
    cache, out, _ = analyzed
    assert analyze.is_up_to_date(out, cache, ["small", "big"])
    assert not analyze.is_up_to_date(out, cache, ["big", "small"])
    assert not analyze.is_up_to_date(out, cache, ["small", "big"], batch_size=32)
    assert not analyze.is_up_to_date(out.parent / "nowhere", cache, ["small", "big"])
    make_run(cache, "third", random_layers(np.random.default_rng(1), 96, [4]), 16)
    assert not analyze.is_up_to_date(out, cache, ["small", "big", "third"])


def test_plots_put_the_first_run_on_the_y_axis_bottom_to_top(analyzed, tmp_path):
    from ckapipe.analyze.plots import heatmap_figure

    _, out, results = analyzed
    paths = analyze.plot_results(out, tmp_path / "plots", pair=("small", "big"), layers=("l1", "stage1"))
    names = {p.name for p in paths}
    assert {"cka_small__big.png", "cka_small__big.pdf", "cka_grid.png", "cka_grid.pdf",
            "minibatch_cka_small_l1__big_stage1.png"} <= names
    assert all(p.stat().st_size > 0 for p in paths)
    ax = heatmap_figure(results, "small", "big").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l0", "l1", "l2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["stage0", "stage1", "stage2"]
    bottom, top = ax.get_ylim()
    assert bottom < top  # first layer at the bottom
    assert ax.get_ylabel() == "small layers" and ax.get_xlabel() == "big layers"


def test_cli_analyze_then_plot(tmp_path, analyzed, capsys):
    from ckapipe.cli import main

    cache, _, results = analyzed
    out = tmp_path / "cli-results"
    main(["analyze", "--cache", str(cache), "small", "b*", "--out", str(out), "--batch-size", "32", "--no-gram-cache"])
    printed = capsys.readouterr().out
    assert "small -> best layer of big" in printed
    assert analyze.load_results(out).m == 32
    main(["plot", str(out), "--pair", "big", "small", "--layers", "stage0", "l2"])
    assert (out / "plots" / "minibatch_cka_big_stage0__small_l2.pdf").exists()


def test_analysis_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; import ckapipe.analyze, ckapipe.analyze.cli, ckapipe.analyze.plots; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr

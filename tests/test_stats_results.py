"""Intervals and p-values where the numbers appear: the results store, CSV, JSON, summary,
plots, ``analyze(..., permutations=R)`` against permutations done by hand on the stored
features, ``diff`` across results stores, and the command line."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
from ckapipe.analyze import stats
from ckapipe.cli import main
from ckapipe.errors import CkapipeError
from tests.numpy_runs import make_run, random_layers
from tests.test_stats import song_hsic

M = 8
N = 96  # 12 minibatches


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Three runs over the same samples: a teacher and two students (two noisy copies of one map)."""
    tmp = tmp_path_factory.mktemp("stats")
    cache = tmp / "cache"
    rng = np.random.default_rng(0)
    teacher = random_layers(rng, N, [6, 5])
    mix = rng.standard_normal((5, 4))
    students = {name: {"s0": (teacher["l1"] @ mix + noise * rng.standard_normal((N, 4))).astype(np.float32)}
                for name, noise in (("kd", 0.5), ("ce", 1.0))}
    make_run(cache, "teacher", teacher, M)
    for name, layers in students.items():
        make_run(cache, name, layers, M)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 12 minibatches: no warning about too few
        results = analyze.analyze(cache, ["teacher", "kd", "ce"], out=tmp / "all", progress=False,
                                  interval="percentile", bootstrap=500, seed=3, permutations=40)
    features = {"teacher": teacher, **students}
    return cache, tmp, results, features


def loop_percentile_interval(hsic, i, j, resamples, seed, level=0.95):
    """The percentile interval of CKA_ij, resample by resample, minibatch by minibatch."""
    n = hsic.shape[0]
    values = []
    for picks in stats.resample_indices(n, resamples, seed):
        s_ij = sum(hsic[k, i, j] for k in picks)
        s_ii = sum(hsic[k, i, i] for k in picks)
        s_jj = sum(hsic[k, j, j] for k in picks)
        values.append(s_ij / np.sqrt(s_ii * s_jj))
    return np.quantile(values, [(1 - level) / 2, (1 + level) / 2])


def test_the_store_holds_intervals_and_p_values_beside_cka(study):
    _, tmp, results, _ = study
    group = zarr.open_group(tmp / "all", mode="r")
    i, j = results.stacked_index("teacher", "l1"), results.stacked_index("kd", "s0")
    expected = loop_percentile_interval(group["hsic"][:], i, j, 500, 3)
    np.testing.assert_allclose([group["cka_low"][i, j], group["cka_high"][i, j]], expected, rtol=0, atol=1e-12)
    assert group["cka_low"].shape == group["cka_high"].shape == group["p_value"].shape == group["cka"].shape
    settings = group.attrs["ckapipe_results"]["resampling"]
    assert settings | {} == group["cka_low"].attrs["resampling"]
    assert (settings["ci"], settings["bootstrap"], settings["seed"], settings["method"], settings["permutations"]) == \
        (0.95, 500, 3, "percentile", 40)
    assert settings["p_resolution"] == pytest.approx(1 / 41)
    p = group["p_value"][:]
    assert np.isnan(p[0, 1]) and np.isfinite(p[i, j]) and p[i, j] == p[j, i]


def test_p_values_equal_permutations_of_the_stored_features_done_by_hand(study):
    _, _, results, features = study
    hsic = results.hsic
    for (run_a, layer_a), (run_b, layer_b) in [(("teacher", "l0"), ("ce", "s0")), (("kd", "s0"), ("ce", "s0"))]:
        i, j = results.stacked_index(run_a, layer_a), results.stacked_index(run_b, layer_b)
        x, y = features[run_a][layer_a].astype(np.float64), features[run_b][layer_b].astype(np.float64)
        permuted = np.zeros(40)
        for k in range(N // M):
            a, b = x[k * M:(k + 1) * M], y[k * M:(k + 1) * M]
            for r, perm in enumerate(stats.minibatch_permutations(M, 40, 3, k)):
                permuted[r] += song_hsic(a @ a.T, b[perm] @ b[perm].T)
        observed = hsic[:, i, j].sum()
        assert results.p_value(run_a, run_b)[results.layer_index(run_a, layer_a), 0] == \
            (1 + (permuted >= observed).sum()) / 41


def test_p_values_without_the_gram_cache_are_the_same(study):
    cache, _, results, _ = study
    again = analyze.analyze(cache, ["teacher", "kd", "ce"], progress=False, use_gram_cache=False,
                            interval="percentile", bootstrap=500, seed=3, permutations=40)
    np.testing.assert_array_equal(again.p_value_all, results.p_value_all)


def test_csv_json_and_summary_carry_the_intervals(study):
    _, tmp, results, _ = study
    low, high = results.interval("teacher", "kd").values
    rows = list(csv.DictReader(io.StringIO((tmp / "all" / "cka.csv").read_text())))
    row = next(r for r in rows if (r["run_a"], r["layer_a"], r["run_b"], r["layer_b"]) == ("teacher", "l1", "kd", "s0"))
    assert (float(row["cka_low"]), float(row["cka_high"])) == (low[1, 0], high[1, 0])
    assert float(row["p_value"]) == results.p_value("teacher", "kd")[1, 0]
    data = json.loads((tmp / "all" / "cka.json").read_text())
    pair = next(p for p in data["pairs"] if (p["run_a"], p["run_b"]) == ("teacher", "kd"))
    assert pair["cka_low"][1][0] == low[1, 0] and data["resampling"]["bootstrap"] == 500
    text = (tmp / "all" / "summary.txt").read_text()
    value = results.cka("teacher", "kd").values[1, 0]
    assert f"l1  s0  {value:.3f} [{low[1, 0]:.3f}, {high[1, 0]:.3f}]" in text
    assert "95 % bootstrap intervals (percentile, 500 resamples of 12 minibatches, seed 3)" in text
    assert re.search(r"p (=|<=) 0\.0\d+", text)


def test_loading_gives_back_the_stored_intervals(study):
    _, tmp, results, _ = study
    loaded = analyze.load_results(tmp / "all")
    np.testing.assert_array_equal(loaded.interval().values, results.interval().values)
    np.testing.assert_array_equal(loaded.p_value_all, results.p_value_all)
    assert loaded.resampling == results.resampling


def test_a_store_written_before_intervals_draws_them_on_use(study, tmp_path):
    import shutil

    _, tmp, results, _ = study
    old = tmp_path / "old"
    shutil.copytree(tmp / "all", old)
    for name in ("cka_low", "cka_high", "p_value"):
        shutil.rmtree(old / name)
    group = zarr.open_group(old, mode="r+")
    meta = dict(group.attrs["ckapipe_results"])
    del meta["resampling"], meta["key"], meta["checksums"]  # a store of that age was not sealed either
    group.attrs["ckapipe_results"] = meta
    loaded = analyze.load_results(old)
    assert loaded.p_value_all is None and loaded.resampling == stats.Resampling()
    np.testing.assert_allclose(loaded.interval().values, stats.bootstrap_bounds(results.hsic), rtol=0, atol=0)


def test_diff_across_two_stores_equals_diff_within_one(study):
    cache, tmp, results, _ = study
    analyze.analyze(cache, ["teacher", "kd"], out=tmp / "kd", progress=False, overwrite=True)
    analyze.analyze(cache, ["teacher", "ce"], out=tmp / "ce", progress=False, overwrite=True)
    a, b = ("teacher:l1", "kd:s0"), ("teacher:l1", "ce:s0")
    (within,) = analyze.diff(results, a, b)
    (across,) = analyze.diff([tmp / "kd", tmp / "ce"], a, b)
    for field in ("cka_a", "cka_b", "estimate", "low", "high", "other_side"):
        assert getattr(across, field) == pytest.approx(getattr(within, field), abs=1e-12)
    assert within.a == "teacher:l1 ~ kd:s0" and within.estimate > 0


def test_diff_refuses_pairs_over_other_minibatches(study, tmp_path):
    cache, tmp, _, _ = study
    analyze.analyze(cache, ["teacher", "ce"], out=tmp_path / "m16", batch_size=16, progress=False)
    with pytest.raises(CkapipeError, match=f"^cannot combine results {tmp / 'all'} with results {tmp_path / 'm16'}: "
                                           r"minibatch size m=8 against m=16$"):
        analyze.diff([tmp_path / "m16", tmp / "all"], ("teacher:l1", "kd:s0"), ("teacher:l0", "ce:s0"))


def test_cli_diff_prints_the_table_and_names_bad_layers(study, capsys):
    _, tmp, _, _ = study
    main(["diff", str(tmp / "all"), "--a", "teacher:l1", "kd:s0", "--b", "teacher:l1", "ce:s0",
          "--b", "teacher:l0", "kd:s0", "--bootstrap", "300", "--interval", "percentile"])
    out = capsys.readouterr().out
    rows = analyze.diff(tmp / "all", ("teacher:l1", "kd:s0"), [("teacher:l1", "ce:s0"), ("teacher:l0", "kd:s0")],
                        bootstrap=300, method="percentile")
    for r in rows:
        assert f"{r.estimate:+.3f}" in out and f"[{r.low:+.3f}, {r.high:+.3f}]" in out
    with pytest.raises(SystemExit) as exit_:
        main(["diff", str(tmp / "all"), "--a", "teacher:l9", "kd:s0", "--b", "teacher:l1", "ce:s0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckapipe: error: run teacher has no layer 'l9'")


def test_cli_refuses_bad_settings_in_one_line(study, tmp_path, capsys):
    cache, _, _, _ = study
    for flags in (["--ci", "1.5"], ["--bootstrap", "1"], ["--permutations", "-3"]):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", "--cache", str(cache), "teacher", "kd", "--out", str(tmp_path / "x"), *flags])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ckapipe: error: "), err
        assert not (tmp_path / "x").exists()


def test_ci_0_turns_the_intervals_off(study, tmp_path, capsys):
    cache, _, _, _ = study
    main(["analyze", "--cache", str(cache), "teacher", "kd", "--out", str(tmp_path / "plain"), "--ci", "0", "-q"])
    loaded = analyze.load_results(tmp_path / "plain")
    assert np.isnan(loaded.interval().values).all() and loaded.resampling.ci is None
    assert "[" not in loaded.summary().split("\n", 2)[2]


def test_cli_warns_in_one_line_when_few_minibatches_enter(study, tmp_path):
    cache, _, _, _ = study
    done = subprocess.run([sys.executable, "-m", "ckapipe", "analyze", "--cache", str(cache), "teacher", "kd",
                           "--out", str(tmp_path / "few"), "--batch-size", "16", "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "minibatches enter the bootstrap" in line]
    assert warned == ["ckapipe: warning: only 6 minibatches enter the bootstrap (fewer than 10): its intervals are "
                      "unreliable; use more samples or a smaller --batch-size"], done.stderr


def test_heatmap_frames_the_best_and_dots_the_entries_whose_interval_overlaps_it(study):
    from ckapipe.analyze.plots import heatmap_figure

    _, _, results, _ = study
    cka = results.cka("ce", "teacher").values[0]  # one row: ce:s0 against teacher l0, l1
    best, other = int(np.argmax(cka)), int(np.argmin(cka))
    i = results.stacked_index("ce", "s0")
    j_best, j_other = (results.stacked_index("teacher", f"l{j}") for j in (best, other))
    results.bounds = results.interval().values.copy()
    for high in (cka[best] - 0.02, 1.0):  # the other's interval below the best's, then reaching it
        results.bounds[0, i, j_best] = results.bounds[0, j_best, i] = cka[best] - 0.01
        results.bounds[1, i, j_other] = results.bounds[1, j_other, i] = high
        ax = heatmap_figure(results, "ce", "teacher").axes[0]
        assert [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_gid() == "best"] == [(best, 0)]
        ties = [c.get_offsets().round().tolist() for c in ax.collections if c.get_label() == "interval overlaps the best's"]
        assert ties == ([] if high < 1 else [[[other, 0]]])  # a mark in the cell's corner
    results.bounds = None


def test_study_table_prints_intervals():
    from ckapipe.pipelines.report import rows_to_csv, rows_to_text

    rows = [{"comparison": "seeds", "run_a": "a", "layer_a": "l1", "run_b": "b", "best_layer_b": "l1", "cka": 0.8421,
             "cka_same_position": 0.8421, "cka_low": 0.8312, "cka_high": 0.8533}]
    assert "  l1           l1           0.842 [0.831, 0.853]" in rows_to_text(rows)
    assert rows_to_csv(rows).splitlines()[0].endswith("cka_low,cka_high")

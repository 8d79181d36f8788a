"""The default study run in-process: what a researcher expects of it, idempotence, tasks."""

from __future__ import annotations

import csv
import re
import shutil

import numpy as np
import pytest
import torch
import zarr

import ckapipe.analyze as analyze
from ckapipe.store import list_runs, open_run
from ckapipe.pipelines import run_study
from ckapipe.pipelines.local import ExtractTask, extract_tasks
from ckapipe.store import share_range
from ckapipe.pipelines.study import PipelineError, load_study
from ckapipe.pipelines.manifest import recorded_store
from tests.pipeline_helpers import DEFAULT, copy_models
from tests.reference import minibatch_cka_matrix_reference


def quiet(line):
    pass


def test_every_comparison_equals_the_float64_formula_on_what_was_extracted(default_study):
    """End to end: every CKA of every comparison against minibatch CKA from Song et al.'s formula
    (reference.py) on the activations as plain zarr reads them, minibatch by minibatch in stored
    order; and those activations against each model run by hand on the recorded samples."""
    from ckapipe.extract.models import load_model
    from ckapipe.extract.zoo import digits_tensors

    study = default_study["study"]
    stored = {name: zarr.open_group(study.cache / recorded_store(study, run), mode="r") for name, run in study.runs.items()}
    layers = {name: [group[f"layers/{layer}"][:] for layer in group.attrs["ckapipe"]["layers"]] for name, group in stored.items()}
    ids = stored["cnn3-s0"]["sample_ids"][:]
    assert sorted(ids) == list(range(1797)) and not np.array_equal(ids, np.arange(1797))  # a permutation
    digits, _ = digits_tensors()
    for name, run in study.runs.items():
        np.testing.assert_array_equal(stored[name]["sample_ids"][:], ids)  # the same order seed: runs pair
        with torch.no_grad():
            logits = load_model(run.model, cache=study.cache).module(digits[ids[:64]]).numpy()
        np.testing.assert_allclose(layers[name][-1][:64], logits, rtol=1e-5, atol=1e-6)  # head, minibatch 0
    for comparison_name, comparison in study.comparisons.items():
        results = analyze.load_results(study.results / comparison_name)
        assert results.m == 64 and len(results.minibatches) == 1797 // 64
        for a, b in comparison.pairs:
            expected = minibatch_cka_matrix_reference(layers[a], layers[b], 64)
            np.testing.assert_allclose(results.cka(a, b).values, expected, rtol=0, atol=1e-9, err_msg=f"{comparison_name}: {a} vs {b}")


def test_same_architecture_different_seeds_match_layer_to_layer(default_study):
    """For most layers of cnn3 seed 0, the most similar layer of cnn3 seed 1 is the same one."""
    results = analyze.load_results(default_study["results"] / "default" / "seeds")
    cka = results.cka("cnn3-s0", "cnn3-s1").values
    layers = results.layer_names("cnn3-s0")
    assert layers == results.layer_names("cnn3-s1") and len(layers) >= 4
    matches = [results.layer_names("cnn3-s1")[j] for j in np.argmax(cka, axis=1)]
    assert sum(a == b for a, b in zip(layers, matches)) > len(layers) / 2, (layers, matches, cka)
    assert np.all(np.diag(cka) > 0.8)


def test_the_study_leaves_heatmaps_and_a_results_table(default_study):
    out = default_study["results"] / "default"
    for comparison in ("seeds", "depth", "architecture"):
        assert list((out / comparison).glob("*.png")), comparison
        assert (out / comparison / "cka.csv").exists()
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    seeds = [r for r in rows if r["comparison"] == "seeds"]
    assert [r["layer_a"] for r in seeds] == ["block1", "block2", "block3", "head"]
    assert all(0 < float(r["cka"]) <= 1 for r in rows)


def test_running_again_redoes_nothing(default_study):
    before = sorted(p.name for p in default_study["cache"].iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in (default_study["results"] / "default").glob("*/zarr.json")}
    lines = []
    run_study(DEFAULT, cache=default_study["cache"], results=default_study["results"], progress=False, say=lines.append)
    assert sorted(p.name for p in default_study["cache"].iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sum("up to date" in line for line in lines) == 3, lines


def test_a_changed_input_is_analyzed_again(default_study, tmp_path):
    """Re-extracting one run (new store) makes its comparisons stale, only those."""
    cache, results = tmp_path / "cache", tmp_path / "results"
    shutil.copytree(default_study["cache"], cache)
    shutil.copytree(default_study["results"], results)
    pipeline = tmp_path / "study.yaml"
    pipeline.write_text(DEFAULT.read_text().replace("mlp3-s0: zoo:mlp3?seed=0", "mlp3-s0: zoo:mlp2?seed=0"))
    with pytest.raises(PipelineError, match="run 'mlp3-s0' changed since it was extracted"):
        run_study(pipeline, "analyze", cache=cache, results=results, progress=False, say=quiet)
    lines = []
    run_study(pipeline, cache=cache, results=results, progress=False, say=lines.append)
    assert "analyze seeds: up to date" in " ".join(lines)
    assert any(line.startswith("analyze architecture: cnn3-s0, mlp3-s0") for line in lines), lines


def test_analyze_before_extract_says_what_to_do(tmp_path):
    with pytest.raises(PipelineError, match=r"run 'cnn3-s0' has not been extracted .*--stage extract\)$"):
        run_study(DEFAULT, "analyze", cache=tmp_path / "c", results=tmp_path / "r", progress=False, say=quiet)


def test_chunk_range_tasks_fill_one_run_between_them(default_study, tmp_path):
    """tasks_per_run: 3 splits a run into disjoint chunk ranges; together they complete it."""
    pipeline = tmp_path / "study.yaml"
    pipeline.write_text(DEFAULT.read_text() + "slurm:\n  tasks_per_run: 3\n")
    cache = tmp_path / "cache"
    copy_models(default_study["cache"], cache)
    loaded = load_study(pipeline, cache=cache, results=tmp_path / "r")
    tasks = extract_tasks(loaded)
    assert tasks[:3] == [ExtractTask("cnn3-s0", k, 3) for k in range(3)]
    ranges = [share_range(t.part, t.parts, 29) for t in tasks[:3]]  # 1797 digits in minibatches of 64: 29 chunks
    assert ranges == [range(0, 9), range(9, 19), range(19, 29)]
    for index in (2, 0):
        run_study(pipeline, "extract", tasks=[index], cache=cache, results=tmp_path / "r", progress=False, say=quiet)
    (run,) = list_runs(cache)
    assert run.missing_chunks() == list(range(9, 19))
    run_study(pipeline, "extract", tasks=[1], cache=cache, results=tmp_path / "r", progress=False, say=quiet)
    assert run.missing_chunks() == [] and open_run(run.path).status == "complete"
    reference = [r for r in list_runs(default_study["cache"]) if r.slug == "cnn3-s0"][0]
    assert run.name == reference.name
    np.testing.assert_array_equal(run.layer("block2")[:], reference.layer("block2")[:])


def test_the_summary_shows_intervals_and_diff_sets_the_two_seeds_against_the_shallower_network(default_study, capsys):
    """The default study's summary gives each CKA its bootstrap interval; ``ckapipe diff`` across
    its comparisons (seeds, depth) gives CKA(cnn3-s0:block3, cnn3-s1:block3) - CKA(cnn3-s0:block3,
    cnn2-s0:block2), whose two terms equal Song et al.'s formula on the stored features."""
    from tests.cli_calls import ckapipe_cli
    from tests.reference import minibatch_cka_reference

    out = default_study["results"] / "default"
    summary = (out / "seeds" / "summary.txt").read_text()
    assert "95 % bootstrap intervals (bca, 2000 resamples of 28 minibatches, seed 0)" in summary
    intervals = re.findall(r"^  (\S+)\s+(\S+)\s+(0\.\d{3}) \[(0\.\d{3}), (0\.\d{3})\]$", summary, re.M)
    assert [(la, lb) for la, lb, *_ in intervals[:4]] == [(f"block{i}", f"block{i}") for i in (1, 2, 3)] + [("head", "head")]
    assert all(float(low) <= float(value) <= float(high) for *_, value, low, high in intervals)

    study = default_study["study"]
    features = {name: zarr.open_group(study.cache / recorded_store(study, run), mode="r")
                for name, run in study.runs.items()}
    a = minibatch_cka_reference(features["cnn3-s0"]["layers/block3"][:], features["cnn3-s1"]["layers/block3"][:], 64)
    b = minibatch_cka_reference(features["cnn3-s0"]["layers/block3"][:], features["cnn2-s0"]["layers/block2"][:], 64)
    (row,) = analyze.diff([out], ("cnn3-s0:block3", "cnn3-s1:block3"), [("cnn3-s0:block3", "cnn2-s0:block2")])
    assert abs(row.cka_a - a) < 1e-9 and abs(row.cka_b - b) < 1e-9 and abs(row.estimate - (a - b)) < 1e-9
    assert row.low <= row.estimate <= row.high and row.n_minibatches == 28

    code, printed, _ = ckapipe_cli(capsys, "diff", out, "--a", "cnn3-s0:block3", "cnn3-s1:block3",
                                   "--b", "cnn3-s0:block3", "cnn2-s0:block2")
    lines = printed.splitlines()
    assert code == 0 and lines[0].startswith("CKA(a) - CKA(b) with 95 % bootstrap intervals")
    assert f"{row.estimate:+.3f}" in lines[-1] and f"[{row.low:+.3f}, {row.high:+.3f}]" in lines[-1]

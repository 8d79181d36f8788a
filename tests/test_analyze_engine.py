"""The analysis engine on stores written from NumPy: exact against the float64
formula, every chunk read once, Gram cache reuse, grams-only runs, minibatch
sizes, schedulers."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.errors import StoreError
from ckapipe.store import find_runs
from tests.numpy_runs import make_run, random_layers
from tests.reference import minibatch_cka_reference

M = 16


def assert_matches_reference(results, runs, m, minibatches=None):
    """Every CKA entry of every pair of runs against the float64 formula, within 1e-6."""
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i:]:
            ours = results.cka(a, b).values
            for p, x in enumerate(runs[a].values()):
                for q, y in enumerate(runs[b].values()):
                    assert abs(ours[p, q] - minibatch_cka_reference(x, y, m, minibatches)) < 1e-6, (a, b, p, q)


def test_analysis_matches_the_float64_formula(cache, two_runs):
    a, b = two_runs
    results = analyze.analyze(cache, ["net-a", "net-b"], progress=False)
    assert results.run_names == ["net-a", "net-b"]
    assert results.layer_names("net-b") == ["block0", "block1", "block2"]
    assert len(results.minibatches) == 100 // M
    assert any("4 of 100 samples not used" in note for note in results.notes)
    assert_matches_reference(results, {"net-a": a, "net-b": b}, M)
    np.testing.assert_allclose(np.diag(results.cka("net-a").values), 1, atol=1e-12)
    np.testing.assert_allclose(results.cka("net-a", "net-b").values, results.cka("net-b", "net-a").values.T, atol=1e-15)


def test_each_chunk_of_each_layer_is_read_once(cache, two_runs, reads):
    analyze.analyze(cache, ["net-a", "net-b"], progress=False, use_gram_cache=False)
    assert set(reads.values()) == {1}
    assert len(reads) == 2 * 3 * (100 // M)  # runs x layers x full minibatches (the ragged chunk is not read)


@pytest.mark.parametrize("stored, m", [(32, 8), (8, 32), (16, 16)])
def test_analysis_minibatch_size_divides_or_multiplies_the_chunk_size(cache, reads, stored, m):
    rng = np.random.default_rng(5)
    a = random_layers(rng, 128, [10, 20])
    make_run(cache, "a", a, stored)
    results = analyze.analyze(cache, ["a"], batch_size=m, progress=False, use_gram_cache=False)
    assert results.m == m and len(results.minibatches) == 128 // m
    assert_matches_reference(results, {"a": a}, m)
    assert set(reads.values()) == {1} and len(reads) == 2 * 128 // stored


def test_runs_stored_with_different_chunk_sizes_pair(cache):
    rng = np.random.default_rng(6)
    a = random_layers(rng, 96, [10, 20])
    b = random_layers(rng, 96, [7])
    make_run(cache, "a", a, 16)
    make_run(cache, "b", b, 32)
    results = analyze.analyze(cache, ["a", "b"], progress=False)
    assert results.m == 16  # the smaller stored size divides the other
    assert_matches_reference(results, {"a": a, "b": b}, 16)
    assert_matches_reference(analyze.analyze(cache, ["a", "b"], batch_size=32, progress=False), {"a": a, "b": b}, 32)


def test_gram_cache_is_reused_and_a_new_run_reads_only_its_own_activations(cache, two_runs, reads):
    first = analyze.analyze(cache, ["net-a", "net-b"], progress=False)
    assert {name for name, _, _ in reads} == {"net-a", "net-b"}
    rng = np.random.default_rng(9)
    c = random_layers(rng, 100, [9, 9])
    make_run(cache, "net-c", c, M)
    reads.clear()
    both = analyze.analyze(cache, ["net-a", "net-b", "net-c"], progress=False)
    assert {name for name, _, _ in reads} == {"net-c"}
    np.testing.assert_allclose(both.cka("net-a", "net-b").values, first.cka("net-a", "net-b").values, atol=1e-12)
    assert_matches_reference(both, {"net-a": two_runs[0], "net-c": c}, M)
    reads.clear()
    again = analyze.analyze(cache, ["net-a", "net-b", "net-c"], progress=False)
    assert not reads
    np.testing.assert_array_equal(again.hsic, both.hsic)


def test_no_gram_cache_reads_activations_every_time(cache, two_runs, reads):
    analyze.analyze(cache, ["net-a"], progress=False)
    reads.clear()
    analyze.analyze(cache, ["net-a"], progress=False, use_gram_cache=False)
    assert len(reads) == 3 * (100 // M)


def test_grams_only_runs_are_analysed_from_the_gram_cache(cache, reads):
    rng = np.random.default_rng(7)
    a = random_layers(rng, 64, [10, 30])
    b = random_layers(rng, 64, [5])
    make_run(cache, "acts", a, 16)
    make_run(cache, "grams", b, 16, grams_only=True)
    results = analyze.analyze(cache, ["acts", "grams"], progress=False)
    assert {name for name, _, _ in reads} == {"acts"}
    assert_matches_reference(results, {"acts": a, "grams": b}, 16)
    # a divisor of the cached size: sub-blocks of the cached Grams, re-U-centered
    finer = analyze.analyze(cache, ["acts", "grams"], batch_size=8, progress=False)
    assert_matches_reference(finer, {"acts": a, "grams": b}, 8)


def test_positional_pairing_pairs_minibatch_k_with_k(cache):
    rng = np.random.default_rng(8)
    a = random_layers(rng, 64, [10])
    b = random_layers(rng, 80, [12])
    make_run(cache, "one", a, 16, sample_ids=np.arange(64))
    make_run(cache, "two", b, 16, sample_ids=np.arange(1000, 1080))
    results = analyze.analyze(cache, ["one", "two"], pair_by_position=True, progress=False)
    assert results.pairing == "position" and len(results.minibatches) == 4
    assert_matches_reference(results, {"one": a, "two": b}, 16)


def test_completed_only_uses_the_chunks_complete_in_every_run(cache):
    rng = np.random.default_rng(10)
    a = random_layers(rng, 80, [10, 4])
    b = random_layers(rng, 80, [6])
    make_run(cache, "done", a, 16)
    make_run(cache, "partial", b, 16, chunks=[0, 1, 3])
    results = analyze.analyze(cache, ["done", "partial"], completed_only=True, progress=False)
    assert list(results.minibatches) == [0, 1, 3]
    assert_matches_reference(results, {"done": a, "partial": b}, 16, minibatches=[0, 1, 3])


def test_constant_layer_gives_nan_with_a_warning(cache, tmp_path):
    rng = np.random.default_rng(11)
    layers = random_layers(rng, 64, [10])
    layers["dead"] = np.full((64, 5), 0.7, dtype=np.float32)
    make_run(cache, "net", layers, 16)
    with pytest.warns(UserWarning, match="dead"):
        results = analyze.analyze(cache, ["net"], out=tmp_path / "out", progress=False)
        matrix = results.cka("net").values
    assert np.isnan(matrix[1]).all() and matrix[0, 0] == pytest.approx(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert analyze.load_results(tmp_path / "out").to_dict()["pairs"][0]["cka"][1] == [None, None]


def test_threaded_and_distributed_schedulers_agree(cache, two_runs, tmp_path):
    distributed = pytest.importorskip("distributed")
    threaded = analyze.analyze(cache, ["net-a", "net-b"], progress=False, use_gram_cache=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = analyze.analyze(cache, ["net-a", "net-b"], scheduler=cluster.scheduler_address, progress=False,
                                 use_gram_cache=False)
        scheduler_file = tmp_path / "scheduler.json"
        scheduler_file.write_text(json.dumps({"address": cluster.scheduler_address}))
        from_file = analyze.analyze(cache, ["net-a", "net-b"], scheduler_file=str(scheduler_file), progress=False)
    np.testing.assert_allclose(remote.hsic, threaded.hsic, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(from_file.hsic, threaded.hsic, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_cupy_path_agrees_with_numpy(cache, two_runs):
    cpu = analyze.analyze(cache, ["net-a", "net-b"], device="cpu", progress=False, use_gram_cache=False)
    gpu = analyze.analyze(cache, ["net-a", "net-b"], device="cuda", progress=False, use_gram_cache=False)
    np.testing.assert_allclose(gpu.hsic, cpu.hsic, rtol=1e-9, atol=1e-9)


def test_tasks_group_minibatches_without_splitting_chunks():
    from ckapipe.analyze.engine import task_groups

    groups = task_groups(range(20), 8, [32, 16])
    assert all(len(g) == 4 for g in groups)
    assert all(g[0] % 4 == 0 for g in groups)  # a chunk of 32 rows = 4 minibatches never straddles tasks
    assert [k for g in task_groups([0, 1, 5, 6, 7], 4, [4]) for k in g] == [0, 1, 5, 6, 7]


def test_float32_products_stay_within_1e6_and_are_never_cached(cache, two_runs, reads):
    a, b = two_runs
    results = analyze.analyze(cache, ["net-a", "net-b"], precision="float32", progress=False)
    assert_matches_reference(results, {"net-a": a, "net-b": b}, M)
    reads.clear()
    analyze.analyze(cache, ["net-a", "net-b"], progress=False)
    assert len(reads) == 2 * 3 * (100 // M)  # nothing was cached by the float32 analysis


def test_large_minibatches_make_smaller_tasks(cache):
    from ckapipe.analyze.engine import per_task
    from ckapipe.store import find_runs

    make_run(cache, "wide", random_layers(np.random.default_rng(12), 64, [4] * 8), 16)
    runs = find_runs(cache, ["wide"])
    assert per_task(16, runs) == 4
    assert per_task(4096, runs) == 1  # 8 layers x 8.4e6 triangle entries x 8 bytes > 512 MiB for 4 minibatches


def test_grams_stamped_with_another_key_are_refused(cache, two_runs, reads):
    analyze.analyze(cache, ["net-a"], progress=False)
    run = find_runs(cache, ["net-a"])[0]
    run.grams(M).attrs["run_key"] = "0123456789"  # as if the store had been copied over another run's
    reads.clear()
    with pytest.raises(StoreError, match=rf"Gram cache of run {run.name} at m={M} is not this run's \(run key 0123456789\)"):
        analyze.analyze(cache, ["net-a"], progress=False)
    assert not reads  # refused while planning, before any chunk is read


def test_a_large_offset_in_float64_stores_changes_nothing(cache):
    rng = np.random.default_rng(13)
    x = rng.standard_normal((64, 20))
    y = np.tanh(x @ rng.standard_normal((20, 9)))
    make_run(cache, "plain", {"x": x, "y": y}, 16, dtype="float64")
    make_run(cache, "offset", {"x": x + 1e4, "y": y - 1e4}, 16, dtype="float64")
    plain = analyze.analyze(cache, ["plain"], progress=False).cka("plain").values
    shifted = analyze.analyze(cache, ["offset"], progress=False).cka("offset").values
    assert np.abs(plain - shifted).max() < 1e-6

"""Bad input gets a clear one-line error naming the thing to fix."""

from __future__ import annotations

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.errors import CkapipeError
from tests.numpy_runs import make_run, random_layers


@pytest.fixture
def layers():
    return random_layers(np.random.default_rng(0), 64, [8, 12])


def refused(match, *args, **kwargs):
    with pytest.raises(CkapipeError, match=match) as info:
        analyze.analyze(*args, progress=False, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def chunk_file(run, layer, k):
    return run.path / "layers" / layer / "c" / str(k) / "0"


def test_unknown_run_suggests_the_nearest(cache, layers):
    make_run(cache, "resnet18@digits", layers, 16)
    refused(r"no run 'resnet81@digits'.*did you mean: resnet18@digits", cache, ["resnet81@digits"])


def test_different_samples_need_positional_pairing(cache, layers):
    make_run(cache, "a", layers, 16, sample_ids=np.arange(64))
    make_run(cache, "b", layers, 16, sample_ids=np.arange(64)[::-1])
    refused("hold different samples.*--pair-by-position", cache, ["a", "b"])


def test_minibatch_under_four_is_refused(cache, layers):
    make_run(cache, "a", layers, 16)
    refused("minibatch size 2 is too small", cache, ["a"], batch_size=2)


def test_incompatible_minibatch_sizes_are_explained(cache, layers):
    make_run(cache, "a", {k: v[:48] for k, v in layers.items()}, 12)
    make_run(cache, "b", {k: v[:48] for k, v in layers.items()}, 16)
    refused(r"12 \(a-.*16 \(b-.*--batch-size.*4 or 48", cache, ["a", "b"])
    refused("minibatch size 8 does not fit run a-.*chunks of 12", cache, ["a", "b"], batch_size=8)


def test_nan_in_activations_names_run_layer_and_minibatch(cache, layers):
    layers["l1"][37, 3] = np.nan
    make_run(cache, "net", layers, 16)
    refused(r"NaN or inf in run net-\w+, layer 'l1', minibatch \(chunk\) 2", cache, ["net"])


def test_missing_chunk_file_is_named(cache, layers):
    run = make_run(cache, "net", layers, 16)
    chunk_file(run, "l0", 1).unlink()
    refused(r"chunk 1 of layer 'l0' in run net-\w+ cannot be read: its file is missing.*ckapipe verify", cache, ["net"])


def test_corrupt_chunk_is_named(cache, layers):
    run = make_run(cache, "net", layers, 16)
    chunk_file(run, "l1", 3).write_bytes(b"not a chunk")
    refused(r"chunk 3 of layer 'l1' in run net-\w+ cannot be read", cache, ["net"])


def test_incomplete_run_is_refused_unless_completed_only(cache, layers):
    make_run(cache, "net", layers, 16, chunks=[0, 2])
    refused(r"run net-\w+ is incomplete.*--completed-only", cache, ["net"])
    assert list(analyze.analyze(cache, ["net"], completed_only=True, progress=False).minibatches) == [0, 2]


def test_existing_output_is_refused_unless_overwrite(cache, layers, tmp_path):
    make_run(cache, "net", layers, 16)
    out = tmp_path / "results"
    analyze.analyze(cache, ["net"], out=out, progress=False)
    refused("output directory .* exists.*--overwrite", cache, ["net"], out=out)
    analyze.analyze(cache, ["net"], out=out, overwrite=True, progress=False)
    assert (out / "cka.json").exists()


def test_grams_only_run_needs_a_cached_size(cache, layers):
    make_run(cache, "grams", layers, 16, grams_only=True)
    refused(r"stores Grams only.*cached for minibatch sizes 16", cache, ["grams"], batch_size=32)


def test_a_gram_cache_of_the_old_per_layer_layout_is_named(cache, layers):
    run = make_run(cache, "net", layers, 16)
    old = run.group.require_group("grams/m16")  # store version 1: an array per layer next to done
    old.create_array("done", shape=(4,), chunks=(1,), dtype="uint8", fill_value=1)
    message = refused(r"Gram cache of run net-\w+ at m=16 has the per-layer layout.*delete .*grams/m16", cache, ["net"])
    assert "grams/m16" in message


def test_cuda_without_a_gpu_is_refused(cache, layers):
    from ckapipe.devices import gpu_available

    if gpu_available("cupy"):
        pytest.skip("this machine has CuPy and a GPU")
    make_run(cache, "net", layers, 16)
    refused("--device cuda needs CuPy and a CUDA GPU", cache, ["net"], device="cuda")


def test_cli_prints_one_line_and_exits_2(cache, layers, capsys):
    from ckapipe.cli import main

    make_run(cache, "net", layers, 16)
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--cache", str(cache), "nett", "--out", str(cache.parent / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ckapipe: error: no run 'nett'") and "\n" not in err

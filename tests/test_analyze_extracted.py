"""The analysis on activations from a real extraction (trained zoo networks on digits)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
from ckapipe.store import Run, open_run
from tests.reference import minibatch_cka_reference

pytest.importorskip("torch")

M = 64


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """An MLP (with its Grams filled during extraction) and a CNN over the same 384 digits."""
    from ckapipe.extract.runner import extract_run

    cache = tmp_path_factory.mktemp("extracted")
    paths = [
        extract_run("zoo:mlp2?seed=0", "digits", cache=cache, batch_size=M, limit=384, grams=True, progress=False),
        extract_run("zoo:cnn2?seed=0", "digits", cache=cache, batch_size=M, limit=384, progress=False),
    ]
    return cache, [open_run(p) for p in paths]


def stored_arrays(run: Run) -> dict[str, np.ndarray]:
    """The layers as plain zarr reads them (float32), independent of ckapipe's reader."""
    group = zarr.open_group(run.path, mode="r")
    return {name: group[f"layers/{name}"][:] for name in run.layer_names}


def test_extracted_runs_match_the_float64_formula(extracted, monkeypatch):
    cache, (mlp, cnn) = extracted
    reads: Counter = Counter()
    real = Run.read_chunk
    monkeypatch.setattr(Run, "read_chunk", lambda self, layer, k: reads.update([self.slug]) or real(self, layer, k))
    results = analyze.analyze(cache, [mlp.name, cnn.name], progress=False)
    assert set(reads) == {cnn.slug}  # the MLP's Grams were filled while it was extracted
    features = {mlp.slug: stored_arrays(mlp), cnn.slug: stored_arrays(cnn)}
    for a, xs in features.items():
        for b, ys in features.items():
            ours = results.cka(a, b).values
            for i, x in enumerate(xs.values()):
                for j, y in enumerate(ys.values()):
                    assert abs(ours[i, j] - minibatch_cka_reference(x, y, M)) < 1e-6, (a, b, i, j)
    assert results.cka(mlp.slug, cnn.slug).values[-1, -1] > 0.5  # two trained classifiers' logits agree


def test_grams_filled_at_extraction_equal_grams_from_activations(extracted, tmp_path):
    cache, (mlp, cnn) = extracted
    cached = analyze.analyze(cache, [mlp.name], progress=False)
    fresh = analyze.analyze(cache, [mlp.name], progress=False, use_gram_cache=False)
    np.testing.assert_allclose(cached.hsic, fresh.hsic, rtol=1e-9, atol=1e-12)

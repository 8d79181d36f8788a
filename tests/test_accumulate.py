"""The two pieces ``compare`` is built from: the analysis's Gram accumulator (ckapipe.analyze.accumulate)
against the float64 formulas, and the extraction's feature source (ckapipe.extract.features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ckapipe.analyze.accumulate import cache_rows_and_triangles, gram_pool, minibatch_hsic1
from ckapipe.errors import DataError, LayerError
from ckapipe.extract.features import feature_source, probe_inputs
from ckapipe.extract.minibatches import minibatches
from ckapipe.extract.models import LoadedModel
from tests.reference import hsic1_reference, linear_gram, u_centered_reference

M = 16


def layers_of_a_minibatch(seed: int = 0) -> list[np.ndarray]:
    """Three layers' features (m × D) of one minibatch, of different widths and offsets, float32."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((M, d)) + offset).astype(np.float32) for d, offset in ((5, 0.0), (40, 3.0), (7, -2.0))]


@pytest.mark.parametrize("spare", [0, 2])
def test_the_pool_gives_each_layers_u_centered_triangle_queued_or_not(spare):
    """On workers beside the forward (spare cores) or after it, queued one layer at a time or given a list,
    each layer's triangle is the strict upper triangle of U(X Xᵀ) (Székely & Rizzo, element by element)."""
    arrays = layers_of_a_minibatch()
    i, j = np.triu_indices(M, k=1)
    with gram_pool(np, "float64", spare, 1) as pool:
        assert pool.queues == (spare > 0)
        listed = pool(arrays)
        queued = [pool.queue(x).result() for x in arrays]
    for x, mine, one in zip(arrays, listed, queued):
        u = u_centered_reference(linear_gram(x))
        assert np.abs(mine - u[i, j]).max() <= 1e-10 * np.abs(u).max()
        assert np.array_equal(mine, one)


def test_the_minibatch_block_is_song_et_al_for_every_pair_of_stacked_layers():
    """Triangles stacked per model (2 layers, then 1) give the 3 × 3 HSIC_1 block of Song et al.'s eq. 5."""
    arrays = layers_of_a_minibatch(1)
    with gram_pool(np, "float64", 0, 1) as pool:
        triangles = pool(arrays)
    block = minibatch_hsic1([np.stack(triangles[:2]), np.stack(triangles[2:])], np)
    grams = [linear_gram(x) for x in arrays]
    reference = np.array([[hsic1_reference(k, l) for l in grams] for k in grams])
    assert block.shape == (3, 3)
    assert np.abs(block - reference).max() <= 1e-10 * np.abs(reference).max()


def test_the_cache_rows_are_the_centered_grams_and_give_the_same_triangles():
    """What a compare leaves in a run's Gram cache: the centered Gram's upper triangle with its diagonal and
    the mean products [c_i·μ, μ·μ]; the triangles derived from them are U(X Xᵀ)'s."""
    arrays = layers_of_a_minibatch(2)
    with gram_pool(np, "float64", 0, 1) as pool:
        host, triangles = cache_rows_and_triangles(pool, arrays, np)
    i, j = np.triu_indices(M, k=1)
    for x, (packed, means), tri in zip(arrays, host, triangles):
        x = x.astype(np.float64)
        mu = x.mean(axis=0)
        centered = x - mu
        c = centered @ centered.T
        assert np.abs(packed - c[np.triu_indices(M, k=0)]).max() <= 1e-10 * np.abs(c).max()
        assert np.abs(means - np.append(centered @ mu, mu @ mu)).max() <= 1e-10 * (mu @ mu)
        u = u_centered_reference(linear_gram(x))
        assert np.abs(tri - u[i, j]).max() <= 1e-10 * np.abs(u).max()


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.act, self.second = nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.second(self.act(self.first(x)))


def source_of(model, inputs, layers="first,second", name_errors=False):
    feed = minibatches(inputs, 8, order_seed=None)
    device = torch.device("cpu")
    return feature_source(LoadedModel(model, "module:TwoLayers", ""), layers, "flatten", probe_inputs(feed, device),
                          device, "net", "the inputs", "check them", name_errors=name_errors)


def test_the_feature_source_gives_each_layers_features_of_a_minibatch():
    """The probed layers in forward order with their widths, and one forward's features: the layers' outputs."""
    model, x = TwoLayers().eval(), torch.randn(16, 6)
    source = source_of(model, x)
    assert source.layers == ["first", "second"] and [info.dim for info in source.infos.values()] == [4, 3]
    assert [spec.name for spec in source.layer_specs] == ["first", "second"]
    with source.hooked():
        features = source.features(x[:8])
    with torch.no_grad():
        assert torch.equal(features["first"], model.first(x[:8]))
        assert torch.equal(features["second"], model(x[:8]))
    with source.hooked(), source.taking(lambda array: array.sum()):
        assert source.queued
        taken = source.features(x[:8])
    assert not source.queued
    assert taken["first"] == pytest.approx(float(features["first"].sum()))


def test_the_feature_source_refuses_half_inputs_and_names_the_model_when_asked():
    with pytest.raises(DataError) as refused:
        source_of(TwoLayers(), torch.randn(16, 6).half())
    assert str(refused.value) == ("the tensor 16x6 torch.float16 holds float16 inputs: ckapipe runs models in float32; "
                                  "give the inputs as float32 (inputs.float())")
    for name_errors, prefix in ((True, "model net: "), (False, "")):
        with pytest.raises(LayerError) as refused:
            source_of(TwoLayers(), torch.randn(16, 6), layers="third", name_errors=name_errors)
        assert str(refused.value) == f"{prefix}no layer 'third' in the model (list them with: ckapipe layers MODEL)"

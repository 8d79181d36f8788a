"""extract_run on data given as objects (a tensor, an array, a Dataset, a DataLoader): the run key
holds the data's identity, the sha256 of its minibatches as they stream or the name the user gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckapipe import store
from ckapipe.errors import DataError
from ckapipe.extract.minibatches import BY_HASH, BY_NAME, rebatch
from ckapipe.extract.runner import extract_run
from ckapipe.extract.zoo import digits_tensors
from tests.spec_factories import BlockNet, LoggedDataset

M = 32


@pytest.fixture(scope="module")
def data():
    x, y = digits_tensors()
    return x[:200], y[:200]


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = BlockNet().eval()
    model.calls = []
    model.register_forward_pre_hook(lambda module, args: model.calls.append(args[0].shape[0]))
    return model


def extract(model, dataset, cache, **kw):
    return store.open_run(extract_run(model, dataset, ["stem", "block"], cache=cache, batch_size=M, progress=False, **kw))


def test_a_tensor_is_keyed_by_the_hash_of_its_minibatches_and_an_equal_array_hits_the_cache(data, net, tmp_path):
    x, _ = data
    run = extract(net, x, tmp_path)
    assert run.status == store.COMPLETE and run.spec.dataset.startswith("sha256:")
    assert run.meta["data"]["identified_by"] == BY_HASH and run.meta["data"]["given"].startswith("tensor 200x1x8x8")
    order = run.sample_ids()
    with torch.no_grad():
        expected = net.stem(x[torch.from_numpy(order)]).reshape(len(order), -1).numpy()
    np.testing.assert_allclose(run.layer("stem")[:], expected, rtol=1e-6, atol=1e-6)
    net.calls.clear()
    assert extract(net, x.numpy(), tmp_path).path == run.path  # the same inputs as an array: the same run
    assert sum(net.calls) == 4  # the probe only
    changed = x.clone()
    changed[7, 0, 3, 3] += 1
    assert extract(net, changed, tmp_path).path != run.path


def test_a_named_dataset_is_not_hashed(data, net, tmp_path):
    x, y = data
    logged = LoggedDataset(x, y)
    run = extract(net, logged, tmp_path, data_name="digits-200")
    assert run.spec.dataset == "name:digits-200" and run.meta["data"]["identified_by"] == BY_NAME
    assert len(logged.loaded) == 4 + 200  # the probe, then every sample once: no hashing pass


def test_a_loader_is_read_in_its_order_and_a_ragged_last_chunk_is_kept(data, net, tmp_path):
    x, y = data
    run = extract(net, DataLoader(TensorDataset(x, y), batch_size=M), tmp_path)
    assert run.n_samples == 200 and run.n_chunks == 7 and run.spec.order_seed is None
    np.testing.assert_array_equal(run.sample_ids(), np.arange(200))
    with torch.no_grad():
        np.testing.assert_allclose(run.layer("stem")[192:], net.stem(x[192:]).reshape(8, -1).numpy(), rtol=1e-6, atol=1e-6)


def test_a_shuffling_loader_fails_the_run_it_would_corrupt(data, net, tmp_path):
    x, y = data
    with pytest.raises(DataError, match="other inputs on this pass"):
        extract(net, DataLoader(TensorDataset(x, y), batch_size=M, shuffle=True), tmp_path)
    (run,) = store.list_runs(tmp_path)
    assert run.status == store.FAILED and "other inputs" in run.meta["error"]


def test_rebatch_cuts_any_batches_into_minibatches_of_m():
    parts = [torch.arange(n) for n in (5, 3, 8, 1, 7)]
    out = list(rebatch(iter(parts), 8))
    assert [len(b) for b in out] == [8, 8, 8]
    np.testing.assert_array_equal(torch.cat(out).numpy(), torch.cat(parts).numpy())
    dicts = list(rebatch(iter([{"ids": torch.ones(3, 2)}, {"ids": torch.zeros(3, 2)}]), 4))
    assert [len(b["ids"]) for b in dicts] == [4, 2]

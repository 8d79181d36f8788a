"""The run key sees the model's code: a swapped submodule, a changed setting or another forward is a new run;
an unchanged model is a cache hit; a forward without Python source makes a reuse warn."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ckapipe import compare, store
from ckapipe.extract.runner import extract_run
from tests.reference import minibatch_cka_matrix_reference

M = 16
LAYERS = ["act", "head"]


class Net(nn.Module):
    """fc -> act -> scaled head: small enough to compute its features by hand."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 4)
        self.scale = scale

    def forward(self, x):
        return self.head(self.act(self.fc(x)) * self.scale)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


@pytest.fixture
def x():
    return torch.from_numpy(np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32))


def extract(model, x, cache):
    return extract_run(model, x, LAYERS, cache=cache, batch_size=M, order_seed=None, data_name="x64", progress=False)


def features(model: Net, x: torch.Tensor) -> list[np.ndarray]:
    """act and head outputs in float64, written out from the layers' own weights (not through hooks)."""
    w1, b1 = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    w2, b2 = model.head.weight.detach().double().numpy(), model.head.bias.detach().double().numpy()
    pre = x.double().numpy() @ w1.T + b1
    act = np.tanh(pre) if isinstance(model.act, nn.Tanh) else np.maximum(pre, 0)
    return [act, (act * model.scale) @ w2.T + b2]


def test_a_swapped_activation_module_is_a_new_run_with_the_right_cka(x, tmp_path):
    a, b = net(0), net(1)
    first = compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, order_seed=None, data_name="x64",
                    cache=tmp_path, progress=False)
    a.act = nn.Tanh()  # no new weights: only the code changed
    again = compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, order_seed=None, data_name="x64",
                    cache=tmp_path, progress=False)
    assert len(store.list_runs(tmp_path)) == 3  # a with ReLU, a with Tanh, b once
    assert again.runs[1].path == first.runs[1].path and again.runs[0].path != first.runs[0].path
    exact = minibatch_cka_matrix_reference(features(a, x), features(b, x), M)
    assert np.abs(again.cka("a", "b") - exact).max() < 1e-6
    assert np.abs(first.cka("a", "b") - exact).max() > 0.01  # the stale numbers the old key served


def test_an_unchanged_model_and_a_copy_of_it_hit_the_cache(x, tmp_path):
    model = net(0)
    path = extract(model, x, tmp_path)
    assert extract(model, x, tmp_path) == path
    assert extract(copy.deepcopy(model), x, tmp_path) == path
    assert len(store.list_runs(tmp_path)) == 1


def test_a_changed_setting_or_forward_is_a_new_run(x, tmp_path):
    model = net(0)
    paths = {extract(model, x, tmp_path)}
    model.scale = 2.0  # a plain attribute forward reads
    paths.add(extract(model, x, tmp_path))
    model.scale = torch.tensor(1.0)  # a tensor attribute, not a buffer: its value counts
    paths.add(extract(model, x, tmp_path))
    model.scale = torch.tensor(3.0)
    paths.add(extract(model, x, tmp_path))
    model.scale = 1.0
    model.act = nn.LeakyReLU(0.2)
    paths.add(extract(model, x, tmp_path))
    model.act = nn.LeakyReLU(0.3)  # same class, another setting (extra_repr)
    paths.add(extract(model, x, tmp_path))
    model.act = nn.ReLU()

    def doubled(self, x):
        return self.head(self.act(self.fc(x)) * 2 * self.scale)

    other = type("Net", (Net,), {"forward": doubled, "__qualname__": Net.__qualname__, "__module__": Net.__module__})
    twin = other()
    twin.load_state_dict(model.state_dict())
    paths.add(extract(twin.eval(), x, tmp_path))  # same name, same weights, another forward
    assert len(paths) == 7
    assert len(store.list_runs(tmp_path)) == 7


def test_a_forward_without_python_source_warns_when_a_run_is_reused(x, tmp_path):
    scope: dict = {"nn": nn}
    exec(compile("class Typed(nn.Module):\n"
                 "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(8, 4)\n"
                 "    def forward(self, x):\n        return self.fc(x)\n", "<typed in a REPL>", "exec"), scope)
    torch.manual_seed(0)
    model = scope["Typed"]().eval()
    args = dict(cache=tmp_path, batch_size=M, order_seed=None, data_name="x64", progress=False)
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        name = store.open_run(extract_run(model, x, ["fc"], **args)).name
    assert [str(w.message) for w in first] == []  # nothing reused the first time
    message = (f"run {name} is reused, but the cache key cannot see the code of builtins.Typed.forward "
               f"(no Python source): if that code changed, delete the run")
    with pytest.warns(UserWarning, match=f"^{re.escape(message)}$"):
        extract_run(model, x, ["fc"], **args)


def test_a_store_of_the_old_key_scheme_keeps_its_key_and_is_not_reused(x, tmp_path):
    run = store.open_run(extract(net(0), x, tmp_path))
    assert len(run.spec.code_hash) == 64
    old = store.RunSpec.from_dict({k: v for k, v in run.spec.to_dict().items() if k != "code_hash"})
    fields = {k: v for k, v in old.to_dict().items() if k not in ("name", "code_hash")}
    written = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    assert old.key == written != run.key

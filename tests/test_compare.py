"""compare: one pass over in-memory models and data, the same numbers as extract + analyze and as an
independent float64 computation, every kind of data alike, ragged minibatches, the cache, faults."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckapipe.analyze as analyze
from ckapipe import compare, store
from ckapipe.errors import ActivationError, CkapipeError, DataError
from ckapipe.extract.features import spare_cores
from ckapipe.extract.runner import extract_run
from ckapipe.extract.zoo import digits_tensors
from tests.reference import minibatch_cka_matrix_reference
from tests.spec_factories import BlockNet, LoggedDataset, Poisoned

M = 64
LAYERS = ["stem", "block.conv1", "block", "head"]


@pytest.fixture(scope="module")
def digits():
    """517 digits: 8 full minibatches of 64 and a ragged one of 5."""
    x, y = digits_tensors()
    return x[:517], y[:517]


def nets(*seeds):
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(BlockNet().eval())
    return out


def counted(model: nn.Module) -> list[int]:
    """The batch sizes of every forward call of ``model`` from now on."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


# --------------------------------------------------------------------------- the features, captured by hand


def features_of(model: nn.Module, x: torch.Tensor, layers: list[str], batch: int) -> list[np.ndarray]:
    """The flattened float32 outputs of ``layers``, captured by hooks written here, minibatch by minibatch."""
    captured: dict[str, list] = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda mod, args, out, name=name: captured[name].append(out.detach().reshape(out.shape[0], -1).clone().numpy()))
        for name in layers]
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    for handle in handles:
        handle.remove()
    return [np.concatenate(captured[name]) for name in layers]


class Wide(nn.Module):
    """Larger inputs (3 × 48 × 48): ReLU maps with a large common offset, where float32 Grams cancel."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.head = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


# --------------------------------------------------------------------------- the numbers


def test_compare_equals_extract_then_analyze(digits, tmp_path):
    x, y = digits
    loader = DataLoader(TensorDataset(x, y), batch_size=M)
    a, b = nets(0, 1)
    res = compare(a, b, loader, layers=LAYERS, progress=False)
    names = [store.open_run(extract_run(net, loader, LAYERS, cache=tmp_path, name=name, progress=False)).name
             for name, net in (("a", a), ("b", b))]
    offline = analyze.analyze(tmp_path, names, progress=False)
    assert res.run_names == ["BlockNet-1", "BlockNet-2"] and res.layer_names("BlockNet-1") == LAYERS
    np.testing.assert_allclose(res.cka_all_runs.values, offline.cka_all_runs.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.hsic, offline.hsic, rtol=1e-12, atol=0)
    assert len(res.minibatches) == len(offline.minibatches) == 8


def test_compare_matches_an_independent_float64_reference_at_a_larger_input_size(tmp_path):
    torch.manual_seed(3)
    a, b = Wide().eval(), Wide().eval()
    x = torch.rand(96, 3, 48, 48) * 4 + 2  # all-positive inputs: every ReLU map carries a large offset
    res = compare({"a": a, "b": b}, x, layers=["conv", "act", "pool", "head"], batch_size=16, order_seed=None,
                  progress=False)
    layers = ["conv", "act", "pool", "head"]
    exact = minibatch_cka_matrix_reference(features_of(a, x, layers, 16), features_of(b, x, layers, 16), 16)
    assert np.abs(res.cka("a", "b").values - exact).max() < 1e-6
    assert np.abs(np.diag(res.cka("a").values)[:] - 1).max() < 1e-12



class InPlace(nn.Module):
    """Recorded outputs that the rest of the forward changes in place: ``relu_`` on the conv's output, ``+=``
    on the block's (as torchvision's ResNets do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        y = torch.relu_(self.conv(x))
        z = self.block(y)
        z += y
        z.mul_(-2.0)
        return self.head(z.flatten(1))


@pytest.fixture(params=["one torch thread", "every core"])
def torch_threads(request):
    """torch on one thread (a core left: the Grams queued beside the forward) or on every core (after it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if request.param == "one torch thread" else len(os.sched_getaffinity(0)))
    yield spare_cores() > 0
    torch.set_num_threads(before)


def test_grams_see_the_features_before_later_in_place_ops(digits, torch_threads):
    """The Grams, whether queued on workers while the forward goes on (issue 21) or computed after it, are
    those of the features the layers returned, not of what a later in-place op made of them: against the
    float64 reference on copies taken by hand."""
    x, _ = digits
    torch.manual_seed(5)
    a, b = InPlace().eval(), InPlace().eval()
    layers = ["conv", "block", "head"]
    res = compare({"a": a, "b": b}, x[:256], layers=layers, batch_size=M, order_seed=None, progress=False)
    assert torch_threads == (torch.get_num_threads() == 1 and len(os.sched_getaffinity(0)) > 1)
    exact = minibatch_cka_matrix_reference(features_of(a, x[:256], layers, M), features_of(b, x[:256], layers, M), M)
    assert np.abs(res.cka("a", "b") - exact).max() < 1e-10
    assert np.abs(np.diag(res.cka("a")) - 1).max() < 1e-12

def test_a_dataloader_a_dataset_a_tensor_and_an_array_give_the_same_result(digits):
    x, y = digits
    a, b = nets(0, 1)
    kinds = {
        "loader": DataLoader(TensorDataset(x, y), batch_size=M),
        "dataset": TensorDataset(x, y),
        "tensor": x,
        "array": x.numpy(),
    }
    results = {kind: compare({"a": a, "b": b}, data, layers=LAYERS, batch_size=M, order_seed=None, progress=False)
               for kind, data in kinds.items()}
    for kind, res in results.items():
        np.testing.assert_allclose(res.hsic, results["loader"].hsic, rtol=1e-13, atol=0, err_msg=kind)
    permuted = compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, progress=False)  # order seed 0
    assert np.abs(permuted.cka_all_runs.values - results["tensor"].cka_all_runs.values).max() > 1e-6  # other minibatches, other numbers


def test_a_ragged_last_minibatch_is_dropped_and_noted(digits):
    x, y = digits
    a, b = nets(0, 1)
    ragged = compare(a, b, DataLoader(TensorDataset(x, y), batch_size=M), layers=LAYERS, progress=False)
    assert any("5 of 64 samples" in note and "dropped" in note for note in ragged.notes)
    even = compare(a, b, DataLoader(TensorDataset(x[:512], y[:512]), batch_size=M), layers=LAYERS, progress=False)
    assert not even.notes
    np.testing.assert_array_equal(ragged.hsic, even.hsic)


def test_batch_size_recuts_the_loaders_batches(digits):
    x, y = digits
    a, b = nets(0, 1)
    recut = compare(a, b, DataLoader(TensorDataset(x, y), batch_size=48), layers=LAYERS, batch_size=M, progress=False)
    direct = compare(a, b, DataLoader(TensorDataset(x, y), batch_size=M), layers=LAYERS, progress=False)
    np.testing.assert_allclose(recut.hsic, direct.hsic, rtol=1e-13, atol=0)


def test_every_pair_in_one_pass_loads_each_batch_once(digits):
    x, y = digits
    logged = LoggedDataset(x, y)
    three = dict(zip("abc", nets(0, 1, 2)))
    res = compare(three, DataLoader(logged, batch_size=M), layers=LAYERS, progress=False)
    probe = M  # the probe's first batch
    assert len(logged.loaded) == probe + len(x)
    assert res.pairs() == [("a", "a"), ("a", "b"), ("a", "c"), ("b", "b"), ("b", "c"), ("c", "c")]
    pairwise = compare({"a": three["a"], "c": three["c"]}, DataLoader(TensorDataset(x, y), batch_size=M),
                       layers=LAYERS, progress=False)
    np.testing.assert_allclose(res.cka("a", "c").values, pairwise.cka("a", "c").values, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the cache


def test_cache_leaves_grams_only_runs_that_analyze_and_compare_reuse_without_the_models(digits, tmp_path):
    x, y = digits
    loader = DataLoader(TensorDataset(x, y), batch_size=M)
    a, b = nets(0, 1)
    calls = {"a": counted(a), "b": counted(b)}
    first = compare({"a": a, "b": b}, loader, layers=LAYERS, cache=tmp_path, progress=False)
    assert sum(calls["a"]) == 4 + 512  # the probe, then every full minibatch once
    runs = store.find_runs(tmp_path, ["a", "b"])
    assert [r.grams_only for r in runs] == [True, True] and all(r.status == store.COMPLETE for r in runs)
    assert runs[0].meta["data"]["identified_by"].startswith("sha256")
    for c in calls.values():
        c.clear()
    offline = analyze.analyze(tmp_path, ["a", "b"], progress=False)
    np.testing.assert_allclose(offline.cka_all_runs.values, first.cka_all_runs.values, rtol=0, atol=1e-12)
    again = compare({"a": a, "b": b}, loader, layers=LAYERS, cache=tmp_path, progress=False)
    assert sum(calls["a"]) == sum(calls["b"]) == 4  # the probe only: no minibatch ran through a model
    np.testing.assert_allclose(again.hsic, first.hsic, rtol=1e-13, atol=0)
    assert again.runs[0].path == str(runs[0].path)


def test_keep_activations_leaves_full_runs_and_a_named_dataset_needs_no_hashing_pass(digits, tmp_path):
    x, _ = digits
    a, b = nets(0, 1)
    calls = counted(a)
    res = compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, cache=tmp_path, keep_activations=True,
                  data_name="digits-517", progress=False)
    assert sum(calls) == 4 + 512  # no pass over the data without the models
    run = store.find_runs(tmp_path, ["a"])[0]
    assert not run.grams_only and run.spec.dataset == "name:digits-517"
    reference = features_of(a, x[torch.from_numpy(run.sample_ids())], ["block"], M)[0]
    np.testing.assert_allclose(run.layer("block")[:], reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(analyze.analyze(tmp_path, ["a", "b"], progress=False).cka_all_runs.values, res.cka_all_runs.values, atol=1e-12)


def test_a_loader_that_streams_other_inputs_each_pass_is_refused_with_a_cache(digits, tmp_path):
    x, y = digits
    a, b = nets(0, 1)
    shuffled = DataLoader(TensorDataset(x, y), batch_size=M, shuffle=True)
    with pytest.raises(DataError, match="other inputs on this pass"):
        compare({"a": a, "b": b}, shuffled, layers=LAYERS, cache=tmp_path, progress=False)
    assert all(r.status == store.FAILED for r in store.list_runs(tmp_path))
    compare({"a": a, "b": b}, shuffled, layers=LAYERS, progress=False)  # without a cache, any order will do


# --------------------------------------------------------------------------- faults and arguments


def test_nan_activations_name_the_model_and_layer():
    x, _ = digits_tensors()  # 14 of the 1797 digits poison the layer
    with pytest.raises(ActivationError, match="model bad: layer\\(s\\) fc.*minibatch"):
        compare({"good": nets(0)[0], "bad": Poisoned()}, x, layers={"good": "stem", "bad": "fc"}, batch_size=M,
                progress=False)


@pytest.mark.parametrize("call, message", [
    (lambda a, x: compare(a, x, layers={"nobody": "stem"}), "nobody"),
    (lambda a, x: compare(a, 42), "cannot read inputs from a int"),
    (lambda a, x: compare(a, "not-a-model", x), "model spec"),
    (lambda a, x: compare(a, x, layers="stemm"), "no layer 'stemm'.*did you mean: stem"),
    (lambda a, x: compare(a, x[:10]), "not one full minibatch of 256"),
    (lambda a, x: compare(a, x, precision="float16"), "precision"),
    (lambda a, x: compare(a, x, keep_activations=True), "cache"),
])
def test_bad_arguments_are_one_line_errors(digits, call, message):
    x, _ = digits
    with pytest.raises(CkapipeError, match=message):
        call(nets(0)[0], x)


def test_gpu_path_has_a_cpu_twin_that_hands_views_to_the_kernels():
    from ckapipe.extract.features import device_arrays, feature_arrays

    features = {"x": torch.randn(8, 5)}
    arrays = feature_arrays(features)
    assert isinstance(arrays["x"], np.ndarray) and np.shares_memory(arrays["x"], features["x"].numpy())
    assert device_arrays(torch.device("cpu")) is np


@pytest.mark.gpu
def test_compare_on_cuda_equals_compare_on_the_cpu(digits):
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available() or cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("needs a CUDA GPU")
    x, y = digits
    a, b = nets(0, 1)
    on_cpu = compare(a, b, x, layers=LAYERS, batch_size=M, device="cpu", progress=False)
    on_gpu = compare(a, b, x, layers=LAYERS, batch_size=M, device="cuda", progress=False)
    np.testing.assert_allclose(on_gpu.cka_all_runs.values, on_cpu.cka_all_runs.values, rtol=0, atol=1e-6)


def test_command_line_compare_prints_the_summary_and_writes_results_and_figures(tmp_path, capsys):
    from ckapipe.cli import main

    out = tmp_path / "results"
    main(["compare", "a=tests.spec_factories:block_net", "b=tests.spec_factories:block_net?init_seed=1",
          "--layers", "block.conv1,block.conv2,head", "--batch-size", "32", "--limit", "128", "--out", str(out),
          "--format", "png", "--cache", str(tmp_path / "cache")])
    printed = capsys.readouterr().out
    assert "a -> best layer of b" in printed and "block.conv2" in printed
    loaded = analyze.load_results(out)
    assert loaded.run_names == ["a", "b"] and loaded.m == 32 and len(loaded.minibatches) == 4
    figures = sorted(p.name for p in (out / "plots").iterdir())
    assert "minibatch_cka_a_head__b_head.png" in figures and not any(f.endswith(".pdf") for f in figures)
    assert {r.slug for r in store.list_runs(tmp_path / "cache")} == {"a", "b"}

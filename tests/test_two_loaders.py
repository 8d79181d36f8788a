"""compare with one data per model (torch-cka's second DataLoader): samples paired by position, the
numbers of an independent float64 computation on each model's own inputs, and the one-line errors
when the two data do not hold the same samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckapipe import compare
from ckapipe.errors import CkapipeError, DataError
from ckapipe.extract.zoo import digits_tensors
from tests.cli_calls import ckapipe_cli
from tests.reference import minibatch_cka_matrix_reference

M = 32


@pytest.fixture(scope="module")
def digits():
    """160 digits (5 minibatches of 32) and a second view of them: mirrored left to right, brighter."""
    x, y = digits_tensors()
    x, y = x[:160], y[:160]
    return x, torch.flip(x, dims=[-1]) * 1.5 + 0.25, y


def nets():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)).eval()
    b = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.Tanh(), nn.Linear(9, 10)).eval()
    return a, b


def features(net: nn.Sequential, x: torch.Tensor, layers: list[str]) -> list[np.ndarray]:
    """Each layer's (N, D) output, computed by calling the Sequential's first modules in turn."""
    with torch.no_grad():
        return [net[: int(name) + 1](x).flatten(1).double().numpy() for name in layers]


LAYERS = ["1", "2", "3"]


def test_two_loaders_pair_samples_by_position_and_match_the_reference(digits):
    x_a, x_b, y = digits
    a, b = nets()
    loader_a = DataLoader(TensorDataset(x_a, y), batch_size=M)
    loader_b = DataLoader(TensorDataset(x_b, y), batch_size=16)  # another batch size: re-cut into minibatches of m
    res = compare(a, b, loader_a, loader_b, layers=LAYERS, batch_size=M, progress=False)
    exact = minibatch_cka_matrix_reference(features(a, x_a, LAYERS), features(b, x_b, LAYERS), M)
    assert np.abs(np.asarray(res.cka("Sequential-1", "Sequential-2")) - exact).max() < 1e-6
    one_loader = compare(a, b, loader_a, layers=LAYERS, batch_size=M, progress=False)  # b sees x_a: other numbers
    assert np.abs(np.asarray(one_loader.cka("Sequential-1", "Sequential-2")) - exact).max() > 1e-3


def test_a_list_and_a_dict_of_data_are_the_two_positional_loaders(digits):
    x_a, x_b, y = digits
    a, b = nets()
    loaders = [DataLoader(TensorDataset(x, y), batch_size=M) for x in (x_a, x_b)]
    positional = compare({"a": a, "b": b}, *loaders, layers=LAYERS, progress=False)
    as_list = compare({"a": a, "b": b}, data=loaders, layers=LAYERS, progress=False)
    as_dict = compare({"a": a, "b": b}, data={"b": loaders[1], "a": loaders[0]}, layers=LAYERS, progress=False)
    tensors = compare({"a": a, "b": b}, data=[x_a, x_b], layers=LAYERS, batch_size=M, order_seed=None, progress=False)
    for res in (as_list, as_dict, tensors):
        np.testing.assert_array_equal(res.hsic, positional.hsic)
    exact = minibatch_cka_matrix_reference(features(a, x_a, LAYERS), features(b, x_b, LAYERS), M)
    assert np.abs(np.asarray(positional.cka("a", "b")) - exact).max() < 1e-6


def test_loaders_of_different_lengths_are_one_line_naming_both(digits):
    x_a, x_b, y = digits
    a, b = nets()
    short = DataLoader(TensorDataset(x_b[:128], y[:128]), batch_size=M)
    with pytest.raises(DataError) as err:
        compare({"a": a, "b": b}, DataLoader(TensorDataset(x_a, y), batch_size=M), short, progress=False)
    assert str(err.value) == ("the data of a (DataLoader over a TensorDataset) holds 160 samples and the data of b "
                              "(DataLoader over a TensorDataset) 128: give both the same samples")


def test_loaders_with_other_labels_stop_at_the_first_differing_sample(digits):
    x_a, x_b, y = digits
    a, b = nets()
    shuffled = y.clone()
    shuffled[[70, 71]] = shuffled[[71, 70]]
    assert y[70] != y[71]
    loaders = [DataLoader(TensorDataset(x_a, y), batch_size=M), DataLoader(TensorDataset(x_b, shuffled), batch_size=M)]
    with pytest.raises(DataError) as err:
        compare({"a": a, "b": b}, *loaders, progress=False)
    assert str(err.value) == (f"the data of a (DataLoader over a TensorDataset) and of b (DataLoader over a "
                              f"TensorDataset) differ at sample 70: label {y[70].item()} and {y[71].item()}; give "
                              f"both the same samples in the same order")


def test_the_number_of_data_must_be_one_or_one_per_model(digits):
    x_a, x_b, _ = digits
    a, b = nets()
    with pytest.raises(CkapipeError) as err:
        compare({"a": a, "b": b}, data=[x_a, x_b, x_a], progress=False)
    assert str(err.value) == ("compare got 2 models and 3 data: give one data for every model, or one per model "
                              "in the models' order")
    with pytest.raises(CkapipeError) as err:
        compare({"a": a, "b": b}, data={"a": x_a, "c": x_b}, progress=False)
    assert str(err.value) == "data is given for a, c: give it for every model and no other (a, b)"
    with pytest.raises(CkapipeError) as err:
        compare({"a": a, "b": b}, data=[x_a, x_b], data_name="digits", progress=False)
    assert str(err.value) == ("give data_name as one name for one data, or one name per model for one data per "
                              "model")


@pytest.fixture
def npy_pair(tmp_path, digits):
    x_a, x_b, _ = digits
    paths = tmp_path / "a.npy", tmp_path / "b.npy"
    for path, x in zip(paths, (x_a, x_b)):
        np.save(path, x.numpy())
    return paths


def test_the_cli_takes_one_dataset_per_model(capsys, tmp_path, npy_pair, digits):
    x_a, x_b, _ = digits
    out = tmp_path / "res"
    code, _, err = ckapipe_cli(capsys, "compare", "zoo:mlp2?seed=0", "zoo:mlp2?seed=1", "-d", npy_pair[0],
                               "-d", npy_pair[1], "-b", M, "-l", "block1,head", "--cache", tmp_path / "cache",
                               "--out", out, "--format", "png", "-q")
    assert code == 0 and "error" not in err
    written = json.loads((out / "cka.json").read_text())
    assert [run["name"].rsplit("-", 1)[0] for run in written["runs"]] == ["mlp2-seed0@a.npy", "mlp2-seed1@b.npy"]
    cka = next(p["cka"] for p in written["pairs"] if (p["run_a"], p["run_b"]) == ("mlp2-seed0", "mlp2-seed1"))
    api = compare("zoo:mlp2?seed=0", "zoo:mlp2?seed=1", data=[x_a.numpy(), x_b.numpy()], layers="block1,head",
                  batch_size=M, progress=False)  # the same permutation of order seed 0 over each array
    np.testing.assert_allclose(cka, np.asarray(api.cka("mlp2-seed0", "mlp2-seed1")), rtol=0, atol=1e-12)


def test_the_cli_refuses_more_datasets_than_models_in_one_line(capsys, tmp_path, npy_pair):
    code, out, err = ckapipe_cli(capsys, "compare", "zoo:mlp2?seed=0", "zoo:mlp2?seed=1", "-d", npy_pair[0],
                                 "-d", npy_pair[1], "-d", npy_pair[0], "--out", tmp_path / "res", "-q")
    assert (code, out) == (2, "")
    assert err == ("ckapipe: error: compare got 2 models and 3 data: give one data for every model, or one per "
                   "model in the models' order\n")
    assert not (tmp_path / "res").exists()

"""Model and dataset sources: every spelling, its errors, and the weights hash."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ckapipe.extract.datasets import load_dataset
from ckapipe.extract.models import load_model, weights_hash
from ckapipe.extract.runner import extract_run, list_layers
from ckapipe.extract.specs import MissingExtra, SpecError
from ckapipe import store
from tests.spec_factories import BlockNet

FIXTURES = "tests.spec_factories"


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "spec, message",
    [
        ("foo:bar", r"unknown model spec 'foo:bar'.*use zoo:NAME, torchvision:NAME"),
        ("resnet18", r"unknown model spec 'resnet18'"),
        ("zoo:cnn4", r"no zoo network 'cnn4'; did you mean: cnn[23], cnn[23]"),
        ("torchvison:resnet18", r"unknown model spec.*did you mean: torchvision"),
        ("weights.pt", r"checkpoint weights.pt does not exist"),
        (f"{FIXTURES}:not_a_module", r"gave a int, not a torch.nn.Module"),
        (f"{FIXTURES}:nothing_here", r"has no attribute 'nothing_here'"),
        ("zoo:", r"names no model"),
    ],
)
def test_bad_model_specs(spec, message, tmp_path):
    with pytest.raises(SpecError, match=message):
        load_model(spec, cache=tmp_path)


@pytest.mark.parametrize("spec, module, extra", [("torchvision:resnet18", "torchvision", "vision"), ("timm:resnet18", "timm", "vision"), ("hf:bert-base-uncased", "transformers", "hf")])
def test_missing_optional_dependency_names_the_extra(spec, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=rf"{module} is not installed.*pip install 'ckapipe\[{extra}\]'"):
        load_model(spec)


def test_factory_with_keyword_arguments():
    model = load_model(f"{FIXTURES}:slow?delay=0.25").module
    assert model.delay == 0.25 and not model.training


def test_random_init_is_reproducible_and_changes_the_hash():
    a, b = load_model(f"{FIXTURES}:block_net"), load_model(f"{FIXTURES}:block_net")
    c = load_model(f"{FIXTURES}:block_net?init_seed=1")
    assert a.weights_hash == b.weights_hash != c.weights_hash


def test_state_dict_checkpoint_into_an_architecture(tmp_path):
    torch.manual_seed(5)
    trained = BlockNet()
    path = tmp_path / "block.pt"
    torch.save(trained.state_dict(), path)
    loaded = load_model(f"{path}?arch={FIXTURES}:block_net")
    assert loaded.weights_hash == weights_hash(trained)
    with pytest.raises(SpecError, match=r"holds weights, not a model: name its architecture with .*\?arch=SPEC"):
        load_model(str(path))
    with pytest.raises(SpecError, match=r"does not fit architecture"):
        load_model(f"{path}?arch={FIXTURES}:slow")


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": BlockNet().state_dict(), "hook": print}, path)  # an arbitrary object: refused
    with pytest.raises(SpecError, match="holds Python objects besides tensors, which ckapipe does not unpickle"):
        load_model(f"{path}?arch={FIXTURES}:block_net")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, still what many archives are
def test_torchscript_checkpoint_records_its_output(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5)))
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    assert [name for name, _ in list_layers(str(path), "digits")] == ["output"]
    run = store.open_run(extract_run(str(path), "digits", ["output"], cache=tmp_path / "cache", batch_size=50, limit=100, progress=False))
    x = load_dataset("digits").take(run.sample_ids()[:50])
    np.testing.assert_allclose(run.read_chunk("output", 0), scripted(x).detach().numpy(), rtol=1e-5)


def test_zoo_checkpoint_is_cached_and_reused(tmp_path):
    first = load_model("zoo:mlp2?seed=1", cache=tmp_path)
    assert (tmp_path / "models" / "zoo-mlp2-seed1.pt").exists()
    again = load_model("zoo:mlp2?seed=1", cache=tmp_path)
    assert first.weights_hash == again.weights_hash != load_model("zoo:mlp2?seed=1&weights=none", cache=tmp_path).weights_hash


@pytest.mark.extras
def test_torchvision_random_init(tmp_path):
    loaded = load_model("torchvision:resnet18", random_init=True)
    assert loaded.spec == "torchvision:resnet18?weights=none"
    names = [name for name, _ in list_layers("torchvision:resnet18?weights=none")]
    assert "layer1.0.relu#0" in names and "layer1.0.relu#1" in names
    with pytest.raises(SpecError, match="torchvision has no model 'resnet19'; did you mean"):
        load_model("torchvision:resnet19")


@pytest.mark.extras
def test_timm_random_init():
    loaded = load_model("timm:resnet18?weights=none")
    assert isinstance(loaded.module, torch.nn.Module)


@pytest.mark.extras
def test_hf_random_init_needs_config_offline():
    with pytest.raises(SpecError, match="cannot load its (configuration|weights) for hf:"):
        load_model("hf:no-such-org/no-such-model-ckapipe?weights=none")


# --------------------------------------------------------------------------- datasets


def test_digits_and_upscaled_digits():
    digits = load_dataset("digits")
    assert len(digits) == 1797 and digits.take(np.array([3, 1])).shape == (2, 1, 8, 8)
    big = load_dataset("digits?size=16")
    assert big.take(np.array([0])).shape == (1, 1, 16, 16) and "resize(16" in big.transform


def test_npy_and_zarr_inputs_in_the_asked_order(tmp_path):
    import zarr

    data = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.save(tmp_path / "x.npy", data)
    zarr.save_array(str(tmp_path / "x.zarr"), data)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("inputs", data=data)
    for spec in (str(tmp_path / "x.npy"), f"npy:{tmp_path / 'x.npy'}", str(tmp_path / "x.zarr"), f"zarr:{tmp_path / 'g.zarr'}?array=inputs"):
        np.testing.assert_array_equal(load_dataset(spec).take(np.array([7, 2, 5])).numpy(), data[[7, 2, 5]])
    with pytest.raises(SpecError, match=r"has no array 'input'; did you mean: inputs"):
        load_dataset(f"zarr:{tmp_path / 'g.zarr'}?array=input")


def test_callable_dataset_of_pairs_gives_inputs(tmp_path):
    ds = load_dataset(f"{FIXTURES}:pairs?n=12")
    batch = next(ds.batches([np.array([4, 0, 9])]))
    torch.testing.assert_close(batch, torch.tensor([[4.0, 4.0], [0.0, 0.0], [9.0, 9.0]]))


def test_callables_returning_an_array_or_a_tensor_give_rows_in_the_asked_order():
    expected = np.arange(36, dtype=np.float32).reshape(12, 3) / 3
    array = load_dataset(f"{FIXTURES}:ramp_array")
    tensor = load_dataset(f"{FIXTURES}:ramp_tensor?n=12")
    assert len(array) == len(tensor) == 12 and array.transform == "none" and tensor.transform == "callable"
    for data in (array, tensor):
        np.testing.assert_array_equal(next(data.batches([np.array([9, 0, 4])])).numpy(), expected[[9, 0, 4]])
    with pytest.raises(SpecError, match=r"dataset callable tests.spec_factories:not_a_dataset returned a int, not a map-style dataset or array"):
        load_dataset(f"{FIXTURES}:not_a_dataset")


def test_a_zarr_input_that_cannot_be_opened(tmp_path):
    (tmp_path / "broken.zarr").mkdir()
    (tmp_path / "broken.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(SpecError, match=r"cannot open Zarr inputs .*broken.zarr \("):
        load_dataset(str(tmp_path / "broken.zarr"))


def test_dict_items_are_padded_and_labels_dropped():
    ds = load_dataset(f"{FIXTURES}:two_token_rows")
    batch = next(ds.batches([np.array([0, 1])]))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("digitz", SpecError, r"unknown dataset spec 'digitz'.*did you mean: digits"),
        ("missing.npy", SpecError, r"input array missing.npy does not exist"),
        ("tests.spec_factories:nothing", SpecError, r"has no attribute 'nothing'"),
    ],
)
def test_bad_dataset_specs(spec, error, message):
    with pytest.raises(error, match=message):
        load_dataset(spec)


def test_torchvision_dataset_without_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingExtra, match=r"'cifar10' is not a built-in source.*pip install 'ckapipe\[vision\]'"):
        load_dataset("cifar10:/data/cifar?split=test")


@pytest.mark.extras
def test_torchvision_dataset_missing_root(tmp_path):
    with pytest.raises(SpecError, match=r"cannot read dataset cifar10 at .*add \?download=True"):
        load_dataset(f"cifar10:{tmp_path}?split=test")


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in torchvision whose pretrained weights cannot be downloaded (offline)."""
    import types

    def get_model(name, weights=None):
        if weights is not None:
            raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")
        return BlockNet()

    models = types.SimpleNamespace(list_models=lambda: ["resnet18", "resnet34"], get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(models=models))


def test_offline_without_weights_says_how_to_get_them_or_use_random_init(fake_torchvision):
    with pytest.raises(SpecError, match=r"cannot load its weights for torchvision:resnet18.*download them once.*\?weights=none \(--random-init\)"):
        load_model("torchvision:resnet18")
    assert load_model("torchvision:resnet18", random_init=True).spec == "torchvision:resnet18?weights=none"
    with pytest.raises(SpecError, match="torchvision has no model 'resnet19'; did you mean: resnet18"):
        load_model("torchvision:resnet19?weights=none")


@pytest.mark.extras
def test_hf_model_from_a_local_config_honours_the_padding_mask(tmp_path):
    """A real transformers BERT (random init from a config saved here): the token mean of a
    padded minibatch equals the mean over each unpadded sequence run alone."""
    import transformers

    from tests.spec_factories import token_rows

    config = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8)
    config.save_pretrained(tmp_path / "bert")
    spec = f"hf:{tmp_path / 'bert'}?weights=none"
    names = [name for name, _ in list_layers(spec, "tests.spec_factories:token_rows")]
    assert "encoder.layer.1" in names
    run = store.open_run(extract_run(spec, "tests.spec_factories:token_rows", ["encoder.layer.1:mean"],
                               cache=tmp_path / "cache", batch_size=4, progress=False))
    model = load_model(spec).module.eval()
    rows = token_rows()
    for row, i in enumerate(run.sample_ids()):
        ids = torch.tensor([rows[i]["input_ids"]])
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        np.testing.assert_allclose(run.layer("encoder.layer.1")[row], states.mean(0).numpy(), rtol=1e-4, atol=1e-5)

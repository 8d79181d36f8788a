"""Layer hooks, names per call, selectors, reductions and the layer listing."""

from __future__ import annotations

import pytest
import torch

from ckapipe.extract.layers import LayerError, glob_match, parse_selection, prepare, reduce
from ckapipe.extract.runner import list_layers
from tests.cli_calls import ckapipe_cli
from tests.spec_factories import BlockNet, Structured


def _record(model, items, x):
    recorder, infos = prepare(model, parse_selection(items), x, x.shape[0])
    with recorder.hooked():
        return recorder.forward(x), infos


@pytest.fixture
def blocknet():
    torch.manual_seed(0)
    model = BlockNet().eval()
    for bn in (model.block.bn1, model.block.bn2):  # non-trivial running stats
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_inplace_relu_and_reused_module_match_hand_computation(blocknet):
    x = torch.rand(6, 1, 8, 8)
    got, infos = _record(blocknet, ["block.relu", "block.bn2", "block"], x)
    b = blocknet.block
    with torch.no_grad():
        stem = blocknet.stem(x)
        relu0 = torch.relu(b.bn1(b.conv1(stem)))
        bn2 = b.bn2(b.conv2(relu0))
        relu1 = torch.relu(bn2 + stem)
    assert list(infos) == ["block.relu#0", "block.bn2", "block.relu#1", "block"]
    torch.testing.assert_close(got["block.relu#0"], relu0.flatten(1))
    torch.testing.assert_close(got["block.bn2"], bn2.flatten(1))  # before `out += identity` and the in-place relu
    torch.testing.assert_close(got["block.relu#1"], relu1.flatten(1))
    torch.testing.assert_close(got["block"], relu1.flatten(1))
    assert not torch.equal(got["block.bn2"], got["block.relu#1"])


def test_one_call_of_a_reused_module(blocknet):
    got, infos = _record(blocknet, ["block.relu#1"], torch.rand(4, 1, 8, 8))
    assert list(infos) == ["block.relu#1"]
    with pytest.raises(LayerError, match=r"called 2 time\(s\).*#0\.\.#1"):
        _record(blocknet, ["block.relu#2"], torch.rand(4, 1, 8, 8))


def test_listing_names_calls_and_shapes(blocknet):
    rows = list_layers(blocknet, "digits", with_types=True)
    names = [name for name, _, _ in rows]
    assert names[:3] == ["stem", "block.conv1", "block.bn1"]
    assert "block.relu#0" in names and "block.relu#1" in names and "block.relu" not in names
    assert ("head.1", "Linear", "10") in rows
    assert dict((n, s) for n, _, s in rows)["block.conv2"] == "4x8x8"


def test_typo_gets_nearest_names_before_any_forward(blocknet):
    calls = []
    blocknet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(LayerError, match=r"no layer 'block.bn3'.*did you mean: block.bn2, block.bn1"):
        prepare(blocknet, parse_selection(["block.bn3"]), torch.rand(4, 1, 8, 8), 4)
    assert not calls


def test_globs_stay_within_one_name_part():
    assert glob_match("layer*.?", "layer1.0") and not glob_match("layer*.?", "layer1.0.downsample.0")
    assert glob_match("**.relu", "layer1.0.relu") and not glob_match("*.relu", "layer1.0.relu")


def test_tuple_and_dict_outputs_first_tensor_or_selector():
    torch.manual_seed(0)
    model = Structured().eval()
    x = torch.rand(4, 1, 8, 8)
    got, _ = _record(model, ["pair", "named"], x)
    second, _ = _record(model, ["pair@1"], x)
    recorder, _ = prepare(model, parse_selection(["pair"]), x, 4)
    assert recorder.specs["pair"].select == "0"
    tokens = model.embed(x.reshape(4, 8, 8)).detach()
    torch.testing.assert_close(got["pair"], (tokens * 2).flatten(1))
    torch.testing.assert_close(second["pair"], (tokens + 1).flatten(1))
    recorder, _ = prepare(model, parse_selection(["named"]), x, 4)
    assert recorder.specs["named"].select == "logits"  # dict order: the first tensor, recorded
    torch.testing.assert_close(got["named"], (tokens + 1).sum(-1))


def test_layer_without_tensor_is_refused():
    with pytest.raises(LayerError, match=r"layer 'nothing' \(Nothing\) returns no tensor"):
        prepare(Structured().eval(), parse_selection(["nothing"]), torch.rand(4, 1, 8, 8), 4)
    with pytest.raises(LayerError, match=r"no tensor at selector 'missing'"):
        prepare(Structured().eval(), parse_selection(["named@missing"]), torch.rand(4, 1, 8, 8), 4)


def test_reductions():
    maps = torch.rand(3, 5, 4, 4)
    torch.testing.assert_close(reduce(maps, "mean"), maps.mean(dim=(2, 3)))
    assert reduce(maps, "flatten").shape == (3, 80)
    tokens = torch.rand(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = reduce(tokens, "mean", mask)
    torch.testing.assert_close(mean[0], tokens[0, :2].mean(0))  # padding excluded
    torch.testing.assert_close(mean[1], tokens[1].mean(0))
    torch.testing.assert_close(reduce(tokens, "cls"), tokens[:, 0])
    with pytest.raises(LayerError, match="cls needs token outputs"):
        reduce(maps, "cls")
    with pytest.raises(LayerError, match="unknown reduction 'avg'"):
        parse_selection(["x:avg"])


def test_reduced_output_is_a_copy():
    x = torch.rand(2, 3)
    out = reduce(x, "flatten")
    x.zero_()
    assert out.abs().sum() > 0


class _Dynamic(torch.nn.Module):
    """Calls its ``step`` once per unit of the batch's first input value: control flow that depends on the data."""

    def __init__(self):
        super().__init__()
        self.step = torch.nn.Identity()

    def forward(self, x):
        for _ in range(int(x[0, 0]) + 1):
            x = self.step(x)
        return x


def test_input_dependent_control_flow_is_an_error_not_a_silent_overwrite():
    model = _Dynamic()
    probe = torch.zeros(4, 2)
    recorder, infos = prepare(model, parse_selection(["step"]), probe, 4)
    assert list(infos) == ["step"]
    with recorder.hooked():
        recorder.forward(probe)
        with pytest.raises(LayerError, match="'step' ran more often in this minibatch than in the probe"):
            recorder.forward(torch.ones(4, 2))


class _Spare(torch.nn.Module):
    """A module registered but never called in forward (a head kept for another task)."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(2, 2)
        self.spare = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def test_a_layer_never_called_in_the_forward_pass_is_named():
    with pytest.raises(LayerError, match=r"layer 'spare' is never called in the forward pass: choose another layer"):
        prepare(_Spare(), parse_selection(["spare"]), torch.zeros(4, 2), 4)


def test_a_star_alone_selects_every_leaf_module_in_forward_order(blocknet):
    x = torch.rand(4, 1, 8, 8)
    _, infos = _record(blocknet, ["*"], x)
    assert list(infos) == ["stem", "block.conv1", "block.bn1", "block.relu#0", "block.conv2", "block.bn2",
                           "block.relu#1", "head.0", "head.1"]  # the relu called twice: once per call


def test_globs_match_part_by_part_and_double_star_takes_containers_too(blocknet):
    x = torch.rand(4, 1, 8, 8)
    assert list(_record(blocknet, ["block.*"], x)[1]) == ["block.conv1", "block.bn1", "block.relu#0", "block.conv2",
                                                         "block.bn2", "block.relu#1"]
    assert list(_record(blocknet, ["b*"], x)[1]) == ["block"]
    assert list(_record(blocknet, ["**.bn?"], x)[1]) == ["block.bn1", "block.bn2"]


def test_layers_command_shows_what_a_pattern_selects(capsys, tmp_path):
    code, out, err = ckapipe_cli(capsys, "layers", "zoo:mlp2", "*", "--cache", tmp_path)
    assert (code, err) == (0, "")
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["block1.0", "Flatten"], ["block1.1", "Linear"], ["block1.2", "ReLU"],
        ["block2.0", "Linear"], ["block2.1", "ReLU"], ["head", "Linear"]]
    code, out, _ = ckapipe_cli(capsys, "layers", "zoo:mlp2", "block*", "head", "--cache", tmp_path)
    assert [line.split()[:3] for line in out.splitlines()] == [["block1", "Sequential", "64"],
                                                             ["block2", "Sequential", "64"], ["head", "Linear", "10"]]


def test_layers_command_with_a_pattern_that_selects_nothing_is_one_line_and_status_2(capsys, tmp_path):
    code, out, err = ckapipe_cli(capsys, "layers", "zoo:mlp2", "blok*", "--cache", tmp_path)
    assert (code, out) == (2, "")
    assert err == "ckapipe: error: no layer 'blok*' in the model; did you mean: block2, block1, block2.1? (list them with: ckapipe layers MODEL)\n"


def test_each_layer_records_its_module_type_from_the_run_to_the_results(tmp_path):
    from ckapipe import analyze, compare, store
    from ckapipe.analyze.results import load_results
    from ckapipe.extract.runner import extract_run

    run = store.open_run(extract_run("zoo:mlp2?seed=0", "digits", "*", cache=tmp_path, batch_size=16, limit=64,
                                     name="mlp", progress=False))
    assert list(zip(run.layer_names, run.layer_modules)) == [
        ("block1.0", "Flatten"), ("block1.1", "Linear"), ("block1.2", "ReLU"), ("block2.0", "Linear"),
        ("block2.1", "ReLU"), ("head", "Linear")]
    res = analyze.analyze(tmp_path, ["mlp"], out=tmp_path / "res", progress=False)
    for ds in (res.to_xarray(), load_results(tmp_path / "res").to_xarray()):
        assert list(ds.module_a.values) == run.layer_modules and list(ds.module_b.values) == run.layer_modules
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU())
    pair = compare({"a": net, "b": net}, torch.rand(32, 1, 8, 8), layers="*", batch_size=16, progress=False).to_xarray()
    assert list(pair.module_a.sel(run_a="b").values) == ["Flatten", "Linear", "ReLU"]


def test_no_layers_means_every_leaf_module_in_compare_and_extract(blocknet, tmp_path):
    """As in torch-cka: without a selection, compare and extract record what "*" records."""
    from ckapipe import compare, extract_run, store

    leaves = ["stem", "block.conv1", "block.bn1", "block.relu#0", "block.conv2", "block.bn2", "block.relu#1",
              "head.0", "head.1"]
    x = torch.rand(32, 1, 8, 8)
    res = compare(blocknet, blocknet, x, batch_size=16, progress=False)
    assert res.layer_names(res.run_names[0]) == leaves
    run = store.open_run(extract_run(blocknet, x, cache=tmp_path / "cache", data_name="x", batch_size=16, progress=False))
    assert run.layer_names == leaves

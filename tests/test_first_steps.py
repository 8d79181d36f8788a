"""First steps never end in a traceback: inputs the CLI guards are one-line CkapipeErrors through the Python
API too (exit 2 on the command line), and too little data warns once and gives no interval, never [x, x]."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ckapipe.analyze as analyze
from ckapipe import compare, store
from ckapipe.errors import ActivationError, CkapipeError, DataError, LayerError, SpecError
from ckapipe.extract.runner import extract_run
from ckapipe.pipelines import run_study
from tests.cli_calls import ckapipe_cli
from tests.numpy_runs import make_run, random_layers
from tests.reference import minibatch_cka_matrix_reference

REPO = Path(__file__).resolve().parents[1]
M = 16
LAYERS = ["act", "head"]
ONE_MINIBATCH = ("only 1 minibatch of data: no bootstrap interval (an interval needs 2, a reliable one 10); "
                 "use more samples or a smaller --batch-size")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.act = nn.ReLU()
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def nets(*seeds) -> list[Net]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(Net().eval())
    return out


def inputs(n: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32))


def features(model: Net, x: torch.Tensor) -> list[np.ndarray]:
    """act and head outputs in float64 from the layers' weights, written out here."""
    w1, b1 = (t.detach().double().numpy() for t in (model.fc.weight, model.fc.bias))
    w2, b2 = (t.detach().double().numpy() for t in (model.head.weight, model.head.bias))
    act = np.maximum(x.double().numpy() @ w1.T + b1, 0)
    return [act, act @ w2.T + b2]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m ckapipe ARGS`` in a child: its stderr as a user sees it (warnings included)."""
    return subprocess.run([sys.executable, "-m", "ckapipe", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO)


def caught(call) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in seen]


def caught_value(call):
    """call()'s value, its warnings (the one-minibatch warning, said again by diff) kept out of the test's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call()


# --------------------------------------------------------------------------- too little data


def test_compare_on_one_minibatch_warns_once_and_reports_no_interval():
    a, b = nets(0, 1)
    x = inputs(M)
    results = []
    assert caught(lambda: results.append(compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M,
                                                 order_seed=None, progress=False))) == [ONE_MINIBATCH]
    res = results[0]
    low, high = res.interval("a", "b").values
    assert np.isnan(low).all() and np.isnan(high).all()
    exact = minibatch_cka_matrix_reference(features(a, x), features(b, x), M)
    best = exact.argmax(axis=1)
    lines = res.summary().splitlines()
    assert lines[:2] == ["minibatch CKA, m=16, 1 minibatch, pairing by sample_ids",
                         "no bootstrap intervals: 1 minibatch (an interval needs 2)"]
    assert lines[3:] == ["a -> best layer of b"] + [
        f"  {la:<4}  {LAYERS[j]:<4}  {exact[i, j]:.3f} [no interval: 1 minibatch]" for i, (la, j) in
        enumerate(zip(LAYERS, best))]
    (difference,) = caught_value(lambda: analyze.diff(res, ("a:act", "b:act"), ("a:act", "b:head")))
    assert np.isnan(difference.low) and np.isnan(difference.high)
    assert str(difference) == (f"CKA(a:act ~ b:act) - CKA(a:act ~ b:head) = {exact[0, 0]:.3f} - {exact[0, 1]:.3f} = "
                               f"{exact[0, 0] - exact[0, 1]:+.3f} [no interval: 1 minibatch]")


def test_the_compare_command_on_one_minibatch_warns_in_one_line(tmp_path):
    done = cli("compare", "zoo:mlp2?weights=none", "zoo:cnn2?weights=none", "--limit", 64, "-b", 64,
               "--out", tmp_path / "out", "--format", "png", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"ckapipe: warning: {ONE_MINIBATCH}"]
    assert "[no interval: 1 minibatch]" in (tmp_path / "out" / "summary.txt").read_text()


def test_analyze_on_one_minibatch_warns_in_one_line_and_shows_no_interval(tmp_path):
    rng = np.random.default_rng(2)
    make_run(tmp_path, "net", random_layers(rng, M, [6, 5]), M)
    done = cli("analyze", "--cache", tmp_path, "net", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"ckapipe: warning: {ONE_MINIBATCH}"]
    rows = [line for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 2 and all(row.endswith(" [no interval: 1 minibatch]") for row in rows)


def test_the_study_runner_on_one_minibatch_warns_once(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent("""\
        study: few
        cache: cache
        results: results
        extract: {dataset: digits, batch_size: 64, limit: 64, device: cpu}
        runs:
          a: zoo:mlp2?weights=none
          b: zoo:cnn2?weights=none
        comparisons:
          ab: {runs: [a, b]}
        """))
    results = {}
    seen = caught(lambda: results.update(run_study(path, cache=tmp_path / "cache", results=tmp_path / "results",
                                                   progress=False, say=lambda line: None)))
    assert [w for w in seen if "minibatch" in w] == [ONE_MINIBATCH]
    low, high = results["ab"].interval("a", "b").values
    assert np.isnan(low).all() and np.isnan(high).all()


# --------------------------------------------------------------------------- inputs the Python API receives


def test_a_wrong_input_shape_is_one_line_through_compare_and_extract_run(tmp_path):
    a, b = nets(0, 1)
    wrong = torch.zeros(64, 9)
    fit = "(RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x9 and 8x12))"
    with pytest.raises(LayerError) as err:
        compare({"a": a, "b": b}, wrong, layers=LAYERS, batch_size=M, progress=False)
    assert str(err.value) == f"model a cannot run on the inputs of the tensor 64x9 torch.float32 {fit}: check that " \
                             f"the model and the data fit"
    with pytest.raises(LayerError) as err:
        extract_run(a, wrong, LAYERS, cache=tmp_path, batch_size=M, progress=False)
    assert str(err.value) == (f"model module:{__name__}.Net cannot run on the inputs of tensor 64x9 torch.float32 "
                              f"{fit}: check that the model and dataset fit")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_models_are_refused(dtype, tmp_path):
    a, b = nets(0, 1)
    word = str(dtype).removeprefix("torch.")
    x = inputs().to(dtype)
    message = f"the tensor 64x8 {dtype} holds {word} inputs: ckapipe runs models in float32; give the inputs as " \
              f"float32 (inputs.float())"
    with pytest.raises(DataError) as err:
        compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, progress=False)
    assert str(err.value) == message
    with pytest.raises(DataError) as err:
        extract_run(a, x, LAYERS, cache=tmp_path, batch_size=M, progress=False)
    assert str(err.value) == message
    with pytest.raises(SpecError) as err:
        compare({"a": a.to(dtype), "b": b}, inputs(), layers=LAYERS, batch_size=M, progress=False)
    assert str(err.value) == (f"model a has {word} weights (fc.weight): ckapipe runs models in float32; pass "
                              f"model.float() (the activations are stored as --dtype says)")
    assert store.list_runs(tmp_path) == []


def test_meta_device_models_and_inputs_are_refused(tmp_path):
    a, b = nets(0, 1)
    with pytest.raises(DataError) as err:
        compare({"a": a, "b": b}, torch.empty(64, 8, device="meta"), layers=LAYERS, batch_size=M, progress=False)
    assert str(err.value) == ("the tensor 64x8 torch.float32 is on the meta device and holds no data: give tensors "
                              "with their values")
    with torch.device("meta"):
        empty = Net()
    with pytest.raises(SpecError) as err:
        extract_run(empty, inputs(), LAYERS, cache=tmp_path, batch_size=M, progress=False)
    assert str(err.value) == (f"model module:{__name__}.Net has weights on the meta device (fc.weight: never loaded): "
                              f"load them (module.to_empty(device='cpu'), then load_state_dict) before passing it")
    assert store.list_runs(tmp_path) == []


class Shifted(Net):
    """A tensor kept as a plain attribute, not a buffer: ``module.to(device)`` leaves it where it is."""

    def __init__(self, device):
        super().__init__()
        self.shift = torch.ones(4, device=device)

    def forward(self, x):
        return super().forward(x) + self.shift


def test_a_tensor_on_another_device_than_the_model_is_refused(tmp_path):
    torch.manual_seed(0)
    model, (b,) = Shifted("meta").eval(), nets(1)
    message = ("keeps tensor shift on meta, not on the model's device cpu (module.to does not move plain attributes): "
               "register it as a buffer (self.register_buffer('shift', tensor))")
    with pytest.raises(SpecError) as err:
        compare({"a": model, "b": b}, inputs(), layers=LAYERS, batch_size=M, device="cpu", progress=False)
    assert str(err.value) == f"model a {message}"
    with pytest.raises(SpecError) as err:
        extract_run(model, inputs(), LAYERS, cache=tmp_path, batch_size=M, device="cpu", progress=False)
    assert str(err.value) == f"model module:{__name__}.Shifted {message}"
    assert store.list_runs(tmp_path) == []


@pytest.mark.gpu
def test_a_cuda_tensor_attribute_of_a_model_run_on_the_cpu_is_refused_and_cuda_inputs_are_moved():
    torch.manual_seed(0)
    model, (a, b) = Shifted("cuda").eval(), nets(0, 1)
    with pytest.raises(SpecError) as err:
        compare({"a": model, "b": b}, inputs(), layers=LAYERS, batch_size=M, device="cpu", progress=False)
    assert str(err.value) == ("model a keeps tensor shift on cuda:0, not on the model's device cpu (module.to does "
                              "not move plain attributes): register it as a buffer "
                              "(self.register_buffer('shift', tensor))")
    x = inputs()
    on_gpu = compare({"a": a, "b": b}, x.cuda(), layers=LAYERS, batch_size=M, order_seed=None, device="cpu",
                     progress=False)
    exact = minibatch_cka_matrix_reference(features(a, x), features(b, x), M)
    assert np.abs(on_gpu.cka("a", "b") - exact).max() < 1e-6


def test_one_model_under_two_names_with_a_cache_is_refused_before_anything_is_written(tmp_path):
    a, = nets(0)
    with pytest.raises(CkapipeError) as err:
        compare({"p": a, "q": a}, inputs(), layers=LAYERS, batch_size=M, cache=tmp_path, progress=False)
    assert str(err.value) == ("models 'p' and 'q' are the same model (same weights, code and layers): with a cache "
                              "each name is one run; compare it once")
    assert store.list_runs(tmp_path) == []
    compare({"p": a, "q": a}, inputs(), layers=LAYERS, batch_size=M, progress=False)  # without a cache: fine


def test_a_nan_in_a_minibatch_with_a_cache_fails_the_run_and_marks_nothing_done(tmp_path, capsys):
    a, b = nets(0, 1)
    x = inputs()
    x[20, 3] = float("nan")  # minibatch 1 of 4
    with pytest.raises(ActivationError) as err:
        compare({"a": a, "b": b}, x, layers=LAYERS, batch_size=M, order_seed=None, cache=tmp_path, progress=False)
    assert str(err.value) == "model a: layer(s) act, head have NaN or Inf activations in minibatch 1"
    runs = store.list_runs(tmp_path)
    assert len(runs) == 2 and all(r.status == store.FAILED for r in runs)
    for run in runs:
        assert not run.done()[1:].any() and not run.grams(M).done()[1:].any()
    code, out, _ = ckapipe_cli(capsys, "verify", "--cache", tmp_path)
    assert code == 0, out


@pytest.mark.parametrize("option, message", [
    (dict(order_seed=-1), "--order-seed -1 is not a non-negative integer"),
    (dict(batch_size=16.0), "batch_size=16.0 is not an integer"),
    (dict(limit=32.5), "limit=32.5 is not an integer"),
    (dict(workers=-1), "workers=-1 is negative: give 0 (load in this process) or more"),
])
def test_options_of_the_python_api_the_cli_types_are_checked_too(option, message, tmp_path):
    a, b = nets(0, 1)
    settings = {"batch_size": M, **option}
    with pytest.raises(CkapipeError) as err:
        compare({"a": a, "b": b}, inputs(), layers=LAYERS, progress=False, **settings)
    assert str(err.value) == message
    with pytest.raises(CkapipeError) as err:
        extract_run(a, inputs(), LAYERS, cache=tmp_path, progress=False, **settings)
    assert str(err.value) == message
    assert store.list_runs(tmp_path) == []


# --------------------------------------------------------------------------- the command line


def test_a_model_name_given_twice_on_the_command_line_is_refused(tmp_path, capsys):
    code, _, err = ckapipe_cli(capsys, "compare", "a=zoo:mlp2?weights=none", "a=zoo:cnn2?weights=none",
                               "--out", tmp_path / "out")
    assert (code, err.splitlines()) == (2, ["ckapipe: error: model name a is given twice: give every model its own "
                                            "NAME= (see ckapipe compare --help)"])
    assert not (tmp_path / "out").exists()


def test_a_wrong_shape_npy_for_compare_names_the_file(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.ones((64, 5), np.float32))
    code, _, err = ckapipe_cli(capsys, "compare", "zoo:mlp2?weights=none", "zoo:cnn2?weights=none", "-d",
                               tmp_path / "bad.npy", "-b", M, "--out", tmp_path / "out", "-q")
    assert (code, err.splitlines()) == (2, [
        f"ckapipe: error: model mlp2-weightsnone cannot run on the inputs of the {tmp_path / 'bad.npy'} "
        f"(RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 64x64)): check that the model and the "
        f"data fit"])


def test_a_bare_pickle_checkpoint_is_one_line_without_torchs_warning(tmp_path):
    with open(tmp_path / "net.pt", "wb") as f:
        pickle.dump({"w": np.ones(3)}, f, protocol=4)
    done = cli("extract", "-m", f"{tmp_path / 'net.pt'}?arch=zoo:mlp2", "--cache", tmp_path / "cache", "-q")
    assert (done.returncode, done.stderr.splitlines()) == (2, [
        f"ckapipe: error: checkpoint {tmp_path / 'net.pt'} holds Python objects besides tensors, which ckapipe does "
        f"not unpickle (unpickling can run any code): save the model's state_dict, or a TorchScript archive, instead"])

"""One settings object for a run (ckapipe.settings): its checks, and the same settings through the
Python API, a study's YAML keys, ``ckapipe extract``'s flags and a SLURM job's notes."""

from __future__ import annotations

import shlex
from dataclasses import fields, replace

import numpy as np
import pytest
import yaml

from ckapipe.errors import CkapipeError, PipelineError
from ckapipe.extract.cli import extract
from ckapipe.extract.runner import extract_run
from ckapipe.pipelines.slurm import plan_jobs
from ckapipe.pipelines.study import load_study
from ckapipe import settings, store
from ckapipe.settings import RunSettings
from tests import REPO
from tests.cli_calls import ckapipe_cli

NOT_SETTINGS = ("model", "dataset", "cache", "quiet")  # ckapipe extract's other parameters


def from_flags(args: list[str]) -> RunSettings:
    """The settings ``ckapipe extract -m M ARGS`` would run with (its flags parsed by click, nothing run)."""
    params = extract.make_context("extract", ["-m", "zoo:mlp2", *args]).params
    return RunSettings(**{key: value for key, value in params.items() if key not in NOT_SETTINGS})


@pytest.mark.parametrize("options, message", [
    (dict(batch_size=2), "minibatch size 2 is too small: the unbiased HSIC needs minibatches of at least 4 samples "
                         "(use --batch-size >= 4)"),
    (dict(batch_size=16.0), "batch_size=16.0 is not an integer"),
    (dict(limit=32.5), "limit=32.5 is not an integer"),
    (dict(limit=0), "--limit 0 must be positive"),
    (dict(workers=True), "workers=True is not an integer"),
    (dict(workers=-1), "workers=-1 is negative: give 0 (load in this process) or more"),
    (dict(order_seed=-1), "--order-seed -1 is not a non-negative integer"),
    (dict(order_seed=1.5), "--order-seed 1.5 is not a non-negative integer"),
])
def test_every_check_says_one_line(options, message):
    with pytest.raises(CkapipeError) as err:
        RunSettings(**options)
    assert str(err.value) == message
    with pytest.raises(CkapipeError) as err:
        replace(RunSettings(), **options)  # a changed copy is checked as well
    assert str(err.value) == message


def test_an_unknown_yaml_key_is_named_with_the_nearest_and_the_allowed_ones():
    with pytest.raises(CkapipeError) as err:
        RunSettings.from_mapping({"batch_sise": 64})
    assert str(err.value) == ("batch_sise: unknown key; did you mean: batch_size? (allowed: layers, batch_size, "
                              "order_seed, dtype, device, reduction, limit, grams, grams_only)")


def test_a_python_only_setting_has_no_flags():
    with pytest.raises(CkapipeError) as err:
        RunSettings(share=(0, 2)).cli_args()
    assert str(err.value) == "share=(0, 2) has no command-line flag"


def test_one_layer_item_is_one_item_and_no_items_are_every_leaf_module():
    assert RunSettings(layers="block*").layers == ("block*",)
    assert RunSettings(layers=["a", "b"]).layers == ("a", "b")
    assert RunSettings(layers=()).layers is None


EXTRACT = """\
layers: ["block?", head]
batch_size: 64
order_seed: 3
dtype: float64
device: cpu
reduction: mean
limit: 512
grams: true
grams_only: true
"""


def test_yaml_to_settings_to_flags_to_settings_is_the_same():
    settings = RunSettings.from_mapping(yaml.safe_load(EXTRACT))
    assert settings == RunSettings(layers=("block?", "head"), batch_size=64, order_seed=3, dtype="float64",
                                   device="cpu", reduction="mean", limit=512, grams=True, grams_only=True)
    assert from_flags(settings.cli_args()) == settings


def test_the_flags_only_settings_make_the_round_trip_too():
    settings = RunSettings(name="a-run", chunks=(2, 5), random_init=True, compression="zstd3", workers=2,
                           order_seed=7)
    assert settings.cli_args() == ["--order-seed", "7", "--name", "a-run", "--chunks", "2:5", "--random-init",
                                   "--compression", "zstd3", "--workers", "2"]
    assert from_flags(settings.cli_args()) == settings


def test_the_flags_defaults_are_the_settings_defaults():
    params = extract.make_context("extract", ["-m", "zoo:mlp2"]).params
    flagged = {f.name: f.default for f in fields(RunSettings) if f.metadata["flags"]}
    assert set(params) - set(NOT_SETTINGS) == set(flagged)
    assert {key: params[key] for key in flagged if key != "layers"} == {
        key: default for key, default in flagged.items() if key != "layers"}
    assert params["layers"] == () and from_flags([]) == RunSettings()  # no --layers: every leaf module (None)


def test_a_bad_setting_on_the_command_line_is_one_line_and_status_2(tmp_path, capsys):
    code, out, err = ckapipe_cli(capsys, "extract", "-m", "zoo:mlp2", "-b", "2", "--cache", tmp_path / "cache")
    assert (code, out) == (2, "")
    assert err == ("ckapipe: error: minibatch size 2 is too small: the unbiased HSIC needs minibatches of at least "
                   "4 samples (use --batch-size >= 4)\n")
    assert not (tmp_path / "cache").exists()


def test_extract_run_refuses_a_keyword_it_does_not_know(tmp_path):
    with pytest.raises(TypeError) as err:
        extract_run("zoo:mlp2", "digits", cache=tmp_path, batch_sise=64)
    assert str(err.value) == "extract_run() got an unexpected keyword argument 'batch_sise'"
    assert not tmp_path.joinpath("runs").exists()


STUDY = """\
extract:
  dataset: digits
{extract}runs:
  a: zoo:mlp2?seed=0
  b: {{model: "zoo:cnn2?seed=1", batch_size: 32, grams: true}}
"""


def write_study(tmp_path, extract: str):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(extract="".join(f"  {line}\n" for line in extract.splitlines())))
    return path


def test_a_study_run_holds_the_settings_of_its_yaml_keys(tmp_path):
    study = load_study(write_study(tmp_path, EXTRACT), cache=tmp_path / "cache", results=tmp_path / "results")
    settings = RunSettings.from_mapping(yaml.safe_load(EXTRACT))
    assert study.runs["a"].settings == replace(settings, name="a")
    assert study.runs["b"].settings == replace(settings, name="b", batch_size=32, grams=True)
    assert study.runs["b"].model == "zoo:cnn2?seed=1" and study.runs["b"].dataset == "digits"


def test_a_study_without_a_batch_size_extracts_minibatches_of_256(tmp_path):
    study = load_study(write_study(tmp_path, ""), cache=tmp_path / "cache")
    assert study.runs["a"].settings == RunSettings(name="a", batch_size=256)


def test_a_settings_error_in_a_study_names_the_file_line_and_run(tmp_path):
    path = write_study(tmp_path, "order_seed: -1")
    with pytest.raises(PipelineError) as err:
        load_study(path)
    assert str(err.value) == f"{path}:5: runs.a: --order-seed -1 is not a non-negative integer"


def test_the_extraction_job_shows_each_run_as_its_extract_command(tmp_path):
    study = load_study(write_study(tmp_path, "device: cpu"), cache=tmp_path / "cache", results=tmp_path / "r")
    (job,) = plan_jobs(study, "extract", tasks=[1])
    (line,) = [line for line in job.text.splitlines() if line.startswith("#   ckapipe extract ")]
    args = shlex.split(line.removeprefix("#   ckapipe extract "))
    assert args[:6] == ["-m", "zoo:cnn2?seed=1", "-d", "digits", "--cache", str(tmp_path / "cache")]
    assert from_flags(args[6:]) == study.runs["b"].settings


def test_a_study_refuses_a_reduction_no_flag_takes_on_its_line(tmp_path):
    path = write_study(tmp_path, "reduction: max")
    with pytest.raises(PipelineError) as err:
        load_study(path)
    assert str(err.value) == f"{path}:3: extract.reduction: 'max' is not one of flatten, mean, cls"


def test_every_settings_choice_is_one_the_store_takes(tmp_path):
    """Each compression a setting may name builds the store's codec chain and reads back; each dtype is one a store holds."""
    import zarr

    from ckapipe.store.integrity import compression_name, compressors

    for name in settings.COMPRESSION_CHOICES:
        array = zarr.create_array(tmp_path / name, shape=(4, 3), chunks=(2, 3), dtype="float32",
                                  compressors=compressors(name))
        array[:] = np.arange(12, dtype="float32").reshape(4, 3)
        assert compression_name(zarr.open_array(tmp_path / name).compressors) == name
    for dtype in settings.DTYPES:
        assert store.check_dtype(dtype) == dtype


def test_a_study_run_keeps_the_fingerprint_its_manifest_recorded():
    """The fingerprint (pipelines/manifest.py) hashes the run's name, model, dataset and the keys that
    make its store, as it did before the settings object: recorded stores are still found."""
    import hashlib
    import json

    for run in load_study(REPO / "pipelines" / "default.yaml").runs.values():
        made = dict(name=run.name, model=run.model, dataset=run.dataset, layers=run.layers, batch_size=run.batch_size,
                    order_seed=run.order_seed, dtype=run.dtype, reduction=run.reduction, limit=run.limit,
                    grams_only=run.grams_only)
        assert run.fingerprint == hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:12]


def test_the_data_s_own_order_has_no_flag():
    with pytest.raises(CkapipeError) as err:
        RunSettings(order_seed=None).cli_args()
    assert str(err.value) == "order_seed=None has no command-line flag"

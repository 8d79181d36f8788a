"""Pipeline files: the schema, and one-line errors that name file, line and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ckapipe.pipelines.study import PipelineError, load_study
from tests import REPO

GOOD = """\
study: kd
extract:
  dataset: digits
  batch_size: 32
runs:
  teacher: zoo:cnn3?seed=0
  s1: {model: "zoo:cnn2?seed=1", batch_size: 64}
  s2: zoo:mlp2?seed=2
comparisons:
  distill: {teacher: teacher, students: [s1, s2]}
  all-pairs: {runs: all}
  explicit: {pairs: [[s1, s2]], pair_by_position: true}
  ens: {ensemble: [s1, s2, teacher]}
slurm:
  partition: gpu
  tasks_per_run: 2
  analyze: {gres: "gpu:1"}
dask: {cluster: local, workers: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_full_study_loads(tmp_path):
    study = load_study(write(tmp_path, GOOD), cache=tmp_path / "c", results=tmp_path / "r")
    assert list(study.runs) == ["teacher", "s1", "s2"]
    assert study.runs["s1"].batch_size == 64 and study.runs["s2"].batch_size == 32
    assert study.runs["s2"].dataset == "digits" and study.runs["s2"].name == "s2"
    assert study.comparisons["distill"].pairs == (("teacher", "s1"), ("teacher", "s2"))
    assert study.comparisons["all-pairs"].runs == ("teacher", "s1", "s2")
    assert len(study.comparisons["all-pairs"].pairs) == 3
    assert study.comparisons["explicit"].pair_by_position
    assert len(study.comparisons["ens"].pairs) == 3
    assert study.results == (tmp_path / "r" / "kd").resolve()
    assert study.slurm["analyze"] == {"gres": "gpu:1"} and study.dask["workers"] == 2


def test_shipped_pipelines_load():
    files = [REPO / "pipelines" / "default.yaml", *sorted((REPO / "pipelines" / "examples").glob("*.yaml"))]
    assert len(files) >= 5
    for path in files:
        load_study(path)


def test_a_changed_run_gets_a_new_fingerprint(tmp_path):
    a = load_study(write(tmp_path, GOOD)).runs["s1"]
    b = load_study(write(tmp_path, GOOD.replace("batch_size: 64", "batch_size: 16"))).runs["s1"]
    assert a.fingerprint != b.fingerprint


BAD = {
    "unknown top-level key": ("runs: {a: zoo:cnn2}\nresutls: out\n", 2, "resutls: unknown key; did you mean: results"),
    "unknown run key": ("runs:\n  a: {model: zoo:cnn2, dataset: digits, batchsize: 8}\n", 2,
                        "runs.a.batchsize: unknown key; did you mean: batch_size"),
    "unknown extract key": ("extract:\n  datset: digits\nruns: {a: zoo:cnn2}\n", 2, "extract.datset: unknown key"),
    "wrong type": ("extract: {dataset: digits}\nruns:\n  a:\n    model: zoo:cnn2\n    batch_size: ten\n", 5,
                   "runs.a.batch_size: expected an integer, got 'ten'"),
    "bool is not an int": ("extract: {dataset: digits, order_seed: true}\nruns: {a: zoo:cnn2}\n", 1,
                           "extract.order_seed: expected an integer, got True"),
    "list expected": ("extract: {dataset: digits, layers: block1}\nruns: {a: zoo:cnn2}\n", 1,
                      "extract.layers: expected a list, got 'block1'"),
    "unknown run in comparison": (
        "extract: {dataset: digits}\nruns:\n  a: zoo:cnn2\n  bb: zoo:cnn3\ncomparisons:\n  c:\n    runs: [a, b]\n", 7,
        "comparisons.c.runs[1]: no run 'b' in this study; did you mean: bb?"),
    "unknown teacher": ("extract: {dataset: digits}\nruns: {a: zoo:cnn2}\ncomparisons:\n  kd: {teacher: t, students: [a]}\n",
                        4, "comparisons.kd.teacher: no run 't' in this study"),
    "two kinds": ("extract: {dataset: digits}\nruns: {a: zoo:cnn2, b: zoo:cnn3}\ncomparisons:\n  c: {runs: [a, b], ensemble: [a, b]}\n",
                  4, "comparisons.c: give exactly one of runs, teacher (with students), ensemble, pairs, trajectory (got runs, ensemble)"),
    "a pair of three": ("extract: {dataset: digits}\nruns: {a: zoo:cnn2, b: zoo:cnn3}\ncomparisons:\n  c:\n    pairs:\n      - [a, b, a]\n",
                        6, "comparisons.c.pairs[0]: a pair names two runs, got 3"),
    "missing checkpoint": ("extract: {dataset: digits}\nruns:\n  a: checkpoints/nowhere.pt\n", 3,
                           "runs.a.model: checkpoint file checkpoints/nowhere.pt does not exist"),
    "no dataset": ("runs:\n  a: zoo:cnn2\n", 2, "runs.a: no dataset: give it here or in the extract section"),
    "duplicate run": ("extract: {dataset: digits}\nruns:\n  a: zoo:cnn2\n  a: zoo:cnn3\n", 4, "runs.a: duplicate key"),
    "batch size under 4": ("extract: {dataset: digits, batch_size: 2}\nruns: {a: zoo:cnn2}\n", 1,
                           "extract.batch_size: 2 is under 4"),
    "bad dtype": ("extract: {dataset: digits, dtype: float8}\nruns: {a: zoo:cnn2}\n", 1,
                  "extract.dtype: 'float8' is not one of float32, float16, float64"),
    "unknown slurm key": ("extract: {dataset: digits}\nruns: {a: zoo:cnn2}\nslurm:\n  partiton: gpu\n", 4,
                          "slurm.partiton: unknown key; did you mean: partition?"),
    "unknown dask cluster": ("extract: {dataset: digits}\nruns: {a: zoo:cnn2}\ndask:\n  cluster: k8s\n", 4,
                             "dask.cluster: 'k8s' is not one of threads, local, slurm"),
    "no runs": ("study: x\n", None, "runs: missing: a study needs at least one run"),
    "invalid yaml": ("runs: [a\n", 2, "invalid YAML"),
    "not a mapping": ("- a\n- b\n", 1, "expected a mapping, got a list"),
    "python tags are not loaded": ("runs:\n  a: !!python/object/apply:os.system [touch pwned]\n", 2,
                                   "invalid YAML: could not determine a constructor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipeline_files_get_one_line_naming_the_place(tmp_path, case):
    text, line, message = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as err:
        load_study(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}:" if line else f"{path}:"), text
    assert message in text, text


def test_a_missing_pipeline_file(tmp_path):
    with pytest.raises(PipelineError, match=r"nowhere\.yaml: no such pipeline file$"):
        load_study(tmp_path / "nowhere.yaml")


def test_the_command_line_prints_the_error_on_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, BAD["unknown run in comparison"][0])
    proc = subprocess.run([sys.executable, "-c", "from ckapipe.cli import main; main()", "run", str(path),
                           "--slurm", "--dry-run"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"ckapipe: error: {path}:7: comparisons.c.runs[1]: no run 'b' in this study; did you mean: bb?"]

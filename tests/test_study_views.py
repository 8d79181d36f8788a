"""The views of an ensemble study and of a teacher/students study, drawn by ``ckapipe run`` on the
offline examples: what each panel plots is what the results store holds.

Expected values are computed here from the store's raw arrays (``hsic``: per-minibatch HSIC_1
of every pair of stacked layers) with CKA = S_ab / sqrt(S_aa S_bb), S the sum over minibatches,
and the runs named through the study's run records (``runs/RUN.json``), not through the view.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from ckapipe.analyze import load_results
from ckapipe.analyze import views
from ckapipe.pipelines import run_study
from ckapipe.pipelines.study import PipelineError, load_study
from tests import REPO

EXAMPLES = REPO / "pipelines" / "examples"
TEACHER = EXAMPLES / "teacher-students-digits.yaml"
ENSEMBLE = EXAMPLES / "ensemble.yaml"


@pytest.fixture(scope="module")
def study(default_study):
    return default_study


def run_example(path: Path, study, base: Path) -> Path:
    """``ckapipe run EXAMPLE`` with a copy of the default study's cache (its runs and trained
    models are reused: the examples' runs of the same settings become aliases of them)."""
    shutil.copytree(study["cache"], base / "cache")
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "run", str(path), "--cache", str(base / "cache"),
                           "--out", str(base / "results"), "-q"], capture_output=True, text=True, cwd=base)
    assert proc.returncode == 0, proc.stderr
    return base / "results" / load_study(path).name


@pytest.fixture(scope="module")
def teacher_study(study, tmp_path_factory):
    return run_example(TEACHER, study, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="module")
def ensemble_study(study, tmp_path_factory):
    return run_example(ENSEMBLE, study, tmp_path_factory.mktemp("ensemble"))


class Store:
    """A results store read with plain zarr; runs named by the study's labels through its run records."""

    def __init__(self, directory: Path, study_dir: Path):
        group = zarr.open_group(directory, mode="r")
        meta = group.attrs["ckapipe_results"]
        self.hsic = group["hsic"][:]
        self.sums = self.hsic.sum(axis=0)
        self.index, start = {}, 0
        for run in meta["runs"]:
            self.index.update({(run["name"], layer): start + i for i, layer in enumerate(run["layers"])})
            start += len(run["layers"])
        self.stores = {p.stem: json.loads(p.read_text())["store"] for p in (study_dir / "runs").glob("*.json")}
        self.layers = {label: [layer for (name, layer) in self.index if name == store]
                       for label, store in self.stores.items()}

    def at(self, label, layer) -> int:
        return self.index[(self.stores[label], layer)]

    def cka(self, a, la, b, lb) -> float:
        i, j = self.at(a, la), self.at(b, lb)
        return self.sums[i, j] / math.sqrt(self.sums[i, i] * self.sums[j, j])

    def matrix(self, a, b) -> np.ndarray:
        return np.array([[self.cka(a, la, b, lb) for lb in self.layers[b]] for la in self.layers[a]])

    def per_minibatch(self, a, la, b, lb) -> np.ndarray:
        i, j = self.at(a, la), self.at(b, lb)
        h = self.hsic
        return h[:, i, j] / np.sqrt(h[:, i, i] * h[:, j, j])


def images(fig) -> dict:
    return {im.get_gid(): im.get_array() for ax in fig.axes for im in ax.get_images()}


def drawn(directory: Path) -> set[str]:
    return {p.stem for p in directory.glob("*.png")}


# --------------------------------------------------------------------------- teacher and students

STUDENTS = ["student-cnn", "student-mlp"]
LAYER_PAIRS = [("head", "head"), ("block3", "block2")]


def test_one_panel_per_student_on_one_colour_scale(teacher_study):
    directory = teacher_study / "kd"
    store = Store(directory, teacher_study)
    fig = views.teacher_figures(load_results(directory), views.read_view(directory))["teacher_students"]
    panels = images(fig)
    assert sorted(panels) == [f"student-{s}" for s in STUDENTS]
    for student in STUDENTS:
        np.testing.assert_allclose(panels[f"student-{student}"], store.matrix("teacher", student), rtol=1e-12, atol=0)
    scales = {im.get_clim() for ax in fig.axes for im in ax.get_images()}
    assert len(scales) == 1, scales


def test_best_matching_layer_of_each_student_per_teacher_layer(teacher_study):
    store = Store(teacher_study / "kd", teacher_study)
    with open(teacher_study / "kd" / "best_matches.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["teacher_layer"] for row in rows] == store.layers["teacher"]
    for row, layer in zip(rows, store.layers["teacher"]):
        for student in STUDENTS:
            values = [store.cka("teacher", layer, student, lb) for lb in store.layers[student]]
            best = int(np.argmax(values))
            assert row[f"{student} layer"] == store.layers[student][best]
            assert float(row[f"{student} cka"]) == pytest.approx(values[best], rel=1e-12, abs=0)
    text = (teacher_study / "kd" / "best_matches.txt").read_text()
    assert all(student in text.splitlines()[2] for student in STUDENTS)


def test_the_per_minibatch_view_of_every_named_layer_pair_for_every_student(teacher_study):
    directory = teacher_study / "kd"
    store = Store(directory, teacher_study)
    figures = views.teacher_figures(load_results(directory), views.read_view(directory))
    for student in STUDENTS:
        for lt, ls in LAYER_PAIRS:
            fig = figures[f"minibatch_teacher_{lt}__{student}_{ls}"]
            expected = np.sort(store.per_minibatch("teacher", lt, student, ls))
            arrays = [np.asarray(im.get_array(), dtype=float) for ax in fig.axes for im in ax.get_images()]
            arrays += [np.asarray(line.get_ydata(), dtype=float) for ax in fig.axes for line in ax.get_lines()]
            shown = [np.sort(a[np.isfinite(a)]) for a in arrays]
            assert any(len(s) == len(expected) and np.allclose(s, expected, rtol=1e-12, atol=0) for s in shown)


def test_nothing_drawn_that_the_study_did_not_ask_for(teacher_study, tmp_path):
    directory = teacher_study / "kd"
    expected = {"teacher_students"} | {f"minibatch_teacher_{lt}__{s}_{ls}" for s in STUDENTS for lt, ls in LAYER_PAIRS}
    assert drawn(directory) == expected
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "plot", str(directory), "--out", str(tmp_path / "again")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert drawn(tmp_path / "again") == expected
    assert (tmp_path / "again" / "best_matches.csv").read_text() == (directory / "best_matches.csv").read_text()


# --------------------------------------------------------------------------- ensembles

MEMBERS = ["m0", "m1", "m2"]


def member_matrix(store: Store, members, layers) -> np.ndarray:
    return np.array([[store.cka(a, layers[a], b, layers[b]) for b in members] for a in members])


def relative_depth(n_layers: int, depth: int, depths: int) -> int:
    """The layer j of n whose relative depth (j + 1) / n is nearest (i + 1) / D (halves round up)."""
    return math.floor((depth + 1) * n_layers / depths + 0.5) - 1


def expected_depths(store: Store, comparison: str, members) -> list[dict]:
    if comparison == "mapped":
        mapping = {"m0": ["block1", "block3", "head"], "shallow": ["block1", "block2", "head"]}
        return [{m: mapping[m][i] for m in members} for i in range(3)]
    depths = min(len(store.layers[m]) for m in members)
    return [{m: store.layers[m][relative_depth(len(store.layers[m]), i, depths)] for m in members}
            for i in range(depths)]


@pytest.mark.parametrize("comparison, members", [
    ("members", MEMBERS), ("architectures", ["m0", "shallow", "mlp"]), ("mapped", ["m0", "shallow"])])
def test_member_by_member_cka_at_each_depth(ensemble_study, comparison, members):
    directory = ensemble_study / comparison
    store = Store(directory, ensemble_study)
    depths = expected_depths(store, comparison, members)
    if comparison == "architectures":  # cnn3 and mlp3 have 4 layers, cnn2 3: by relative depth
        assert [d["m0"] for d in depths] == ["block1", "block3", "head"]
        assert [d["shallow"] for d in depths] == ["block1", "block2", "head"]
    fig = views.ensemble_figures(load_results(directory), views.read_view(directory))["ensemble_layers"]
    panels = images(fig)
    assert sorted(panels) == [f"depth-{i + 1}" for i in range(len(depths))]
    for i, layers in enumerate(depths):
        np.testing.assert_allclose(panels[f"depth-{i + 1}"], member_matrix(store, members, layers), rtol=1e-12, atol=0)


@pytest.mark.parametrize("comparison, members", [("members", MEMBERS), ("architectures", ["m0", "shallow", "mlp"])])
def test_mean_and_spread_of_the_off_diagonal_cka_against_depth(ensemble_study, comparison, members):
    directory = ensemble_study / comparison
    store = Store(directory, ensemble_study)
    pairs = [[member_matrix(store, members, layers)[i, j] for i in range(len(members)) for j in range(i + 1, len(members))]
             for layers in expected_depths(store, comparison, members)]
    fig = views.ensemble_figures(load_results(directory), views.read_view(directory))["ensemble_diversity"]
    (ax,) = fig.axes
    lines = {line.get_gid(): line.get_ydata() for line in ax.get_lines() if line.get_gid()}
    np.testing.assert_allclose(lines["mean"], [np.mean(p) for p in pairs], rtol=1e-12)
    np.testing.assert_allclose(lines["min"], [np.min(p) for p in pairs], rtol=1e-12)
    np.testing.assert_allclose(lines["max"], [np.max(p) for p in pairs], rtol=1e-12)
    (bars,) = [c for c in ax.collections if c.get_gid() == "sd"]
    half = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
    np.testing.assert_allclose(half, [np.std(p) for p in pairs], rtol=1e-9)
    with open(directory / "ensemble.csv") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose([float(r["mean"]) for r in rows], [np.mean(p) for p in pairs], rtol=1e-12)
    assert [int(r["pairs"]) for r in rows] == [len(p) for p in pairs]


def test_an_ensemble_draws_its_views_not_every_pair(ensemble_study, tmp_path):
    for comparison in ("members", "architectures", "mapped"):
        assert drawn(ensemble_study / comparison) == {"ensemble_layers", "ensemble_diversity"}, comparison
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "plot", str(ensemble_study / "members"), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert drawn(ensemble_study / "members" / "plots") == {"ensemble_layers", "ensemble_diversity"}


# --------------------------------------------------------------------------- the pipeline file


def write(tmp_path, text) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text("extract: {dataset: digits, batch_size: 64}\n"
                    "runs: {a: 'zoo:cnn3?seed=0', b: 'zoo:cnn2?seed=0', c: 'zoo:mlp3?seed=0'}\n" + text)
    return path


def test_the_layers_of_a_view_in_the_pipeline_file(tmp_path):
    study = load_study(write(tmp_path, "comparisons:\n"
                                      "  kd: {teacher: a, students: [b, c], layers: [head, [block3, block2]]}\n"
                                      "  ens: {ensemble: [a, b], layers: {a: [block1, head], b: [block1, head]}}\n"
                                      "  same: {ensemble: [a, c], layers: [block1, head]}\n"))
    kd, ens, same = study.comparisons.values()
    assert kd.kind == "teacher" and kd.layers == (("head", "head"), ("block3", "block2"))
    assert ens.kind == "ensemble" and ens.layers == {"a": ("block1", "head"), "b": ("block1", "head")}
    assert same.layers == {"a": ("block1", "head"), "c": ("block1", "head")}


@pytest.mark.parametrize("text, message", [
    ("  x: {runs: [a, b], layers: [head]}\n", "comparisons.x.layers: layers go with an ensemble or a teacher"),
    ("  x: {ensemble: [a, b], layers: {a: [head], b: [block1, head]}}\n",
     "comparisons.x.layers: every member needs as many matched layers (a: 1, b: 2)"),
    ("  x: {ensemble: [a, b], layers: {a: [head]}}\n", "comparisons.x.layers: no layers for b"),
    ("  x: {ensemble: [a, b], layers: {a: [head], bb: [head]}}\n", "comparisons.x.layers.bb: unknown key; did you mean: b?"),
    ("  x: {teacher: a, students: [b], layers: [[head, head, head]]}\n",
     "comparisons.x.layers[0]: a layer pair names a teacher layer and a student layer, got 3"),
])
def test_bad_view_layers_are_one_line_naming_the_place(tmp_path, text, message):
    with pytest.raises(PipelineError) as err:
        load_study(write(tmp_path, "comparisons:\n" + text))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_layer_the_runs_do_not_have_is_named_before_the_analysis(study, tmp_path):
    path = tmp_path / "kd.yaml"
    path.write_text(TEACHER.read_text().replace("[block3, block2]", "[blok3, block2]"))
    shutil.copytree(study["cache"], tmp_path / "cache")
    lines = []
    with pytest.raises(PipelineError, match=r"kd\.yaml: comparisons\.kd\.layers: run teacher has no layer 'blok3'; "
                                            r"did you mean: block3, .*\(its layers: block1, block2, block3, head\)$"):
        run_study(path, cache=tmp_path / "cache", results=tmp_path / "r", progress=False, say=lines.append)
    assert not any(line.startswith("analyze") for line in lines), lines

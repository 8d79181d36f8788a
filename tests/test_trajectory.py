"""Trajectory studies: checkpoints trained here in seconds on digits (distilled and plain), extracted as
a study's runs, compared with a teacher layer by layer against the step, with RankMe, and plotted."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from ckapipe.errors import PipelineError
from ckapipe.pipelines.study import load_study
from tests.reference import minibatch_cka_reference

torch = pytest.importorskip("torch")

STEPS = [1, 10, 40, 160]
M = 64


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A teacher (mlp3 after 200 steps) and two trainings of mlp2 from seed 1: distilled from the teacher
    (kd) and on the labels (ce), saved as state_dicts after each of STEPS."""
    from ckapipe.extract import zoo

    root = tmp_path_factory.mktemp("trajectory")
    (teacher,) = zoo.trajectory("mlp3", 0, [200])
    torch.save(teacher.state_dict(), root / "teacher.pt")
    zoo.save_checkpoints("mlp2", 1, STEPS, str(root / "kd" / "step_{step}.pt"), teacher=teacher)
    zoo.save_checkpoints("mlp2", 1, STEPS, str(root / "ce" / "step_{step}.pt"))
    return root


def study_file(root: Path, extra: str = "", reference: str = "reference: teacher") -> Path:
    path = root / "study.yaml"
    kd, ce = (str(root / series / "step_{step}.pt") for series in ("kd", "ce"))
    path.write_text(textwrap.dedent(f"""\
        study: traj
        cache: {root / "cache"}
        results: {root / "results"}
        extract: {{dataset: digits, batch_size: {M}, limit: 256, device: cpu, layers: ["block?", head]}}
        runs:
          teacher: "{root / "teacher.pt"}?arch=zoo:mlp3"
        comparisons:
          training:
            trajectory:
              checkpoints: {{kd: "{kd}", ce: "{ce}"}}
              arch: zoo:mlp2
              steps: {STEPS}
              {reference}
            measures: [linear, mutual_knn:10]
        {extra}"""))
    return path


@pytest.fixture(scope="module")
def ran(checkpoints):
    from ckapipe.pipelines import run_study

    path = study_file(checkpoints)
    results = run_study(path, progress=False, say=lambda line: None)
    return checkpoints, load_study(path), results["training"]


def test_every_checkpoint_is_a_run_of_the_extraction_job_array(checkpoints):
    from ckapipe.pipelines.local import extract_tasks
    from ckapipe.pipelines.slurm import plan_jobs

    study = load_study(study_file(checkpoints))
    assert [t.run for t in extract_tasks(study)] == ["teacher"] + [f"training-{s}-step{n}" for s in ("kd", "ce") for n in STEPS]
    assert study.runs["training-kd-step40"].model == f"{checkpoints / 'kd' / 'step_40.pt'}?arch=zoo:mlp2"
    (job, _) = plan_jobs(study, "all", tasks=list(range(9)))
    assert job.array == "0-8"


def test_the_trajectory_study_writes_its_table_and_step_plots(ran):
    root, study, results = ran
    out = study.results / "training"
    for figure in ("trajectory_linear", "trajectory_mutual_knn_10", "trajectory_rankme"):
        assert (out / "plots" / f"{figure}.png").stat().st_size > 0 and (out / "plots" / f"{figure}.pdf").exists()
    assert not list((out / "plots").glob("cka_*")), "a trajectory draws step plots, not every pair's heatmap"
    rows = list(csv.DictReader((out / "trajectory.csv").open()))
    assert {r["series"] for r in rows} == {"kd", "ce"} and {int(r["step"]) for r in rows} == set(STEPS)
    assert {r["measure"] for r in rows} == {"linear", "mutual_knn:10", "rankme_minibatch"}
    assert all(r["reference_layer"] == r["layer"] for r in rows if r["measure"] == "linear")
    knn = [r for r in rows if r["measure"] == "mutual_knn:10"]
    assert all(float(r["low"]) <= float(r["value"]) <= float(r["high"]) for r in knn)  # intervals over minibatches
    summary = list(csv.DictReader((study.results / "summary.csv").open()))
    assert len(summary) == 8 * 4 and "rankme_a" in summary[0]  # the teacher (mlp3) has 4 layers


def test_trajectory_values_equal_cka_and_rankme_of_the_stored_features(ran):
    root, study, results = ran
    table = {(r["series"], int(r["step"]), r["layer"], r["measure"]): float(r["value"])
             for r in csv.DictReader((study.results / "training" / "trajectory.csv").open())}
    stores = {name: zarr.open_group(study.cache / entry.name, mode="r")
              for name, entry in zip(results.run_names, results.runs)}
    teacher = stores["teacher"]
    for series in ("kd", "ce"):
        for step in (1, 160):
            run = stores[f"training-{series}-step{step}"]
            for layer in ("block1", "block2", "head"):
                x = teacher[f"layers/{layer}"][:].astype(np.float64)
                y = run[f"layers/{layer}"][:].astype(np.float64)
                assert abs(table[(series, step, layer, "linear")] - minibatch_cka_reference(x, y, M)) < 1e-9
                expected = np.mean([_rankme(y[k * M:(k + 1) * M]) for k in range(256 // M)])
                assert abs(table[(series, step, layer, "rankme_minibatch")] - expected) < 1e-6 * expected


def test_the_step_plots_draw_the_table_with_its_intervals_as_bands_and_write_nothing(ran, tmp_path, monkeypatch):
    from ckapipe.analyze.trajectory import trajectory_figures, trajectory_view

    root, study, results = ran
    rows = list(csv.DictReader((study.results / "training" / "trajectory.csv").open()))
    series = {name: [(step, f"training-{name}-step{step}") for step in STEPS] for name in ("kd", "ce")}
    monkeypatch.chdir(tmp_path)
    figures = trajectory_figures(trajectory_view(results, series, "teacher"))
    assert sorted(figures) == ["trajectory_linear", "trajectory_mutual_knn_10", "trajectory_rankme"]
    assert list(tmp_path.iterdir()) == []
    fig = figures["trajectory_mutual_knn_10"]
    for ax in [ax for ax in fig.axes if ax.get_visible()]:
        layer = ax.get_title()
        bands = [c for c in ax.collections if str(c.get_gid()).startswith("band")]
        assert len(bands) == len(ax.get_lines()) == 2  # kd and ce, each with its band
        for line, band in zip(ax.get_lines(), bands):
            mine = [r for r in rows if (r["series"], r["layer"], r["measure"]) == (line.get_label(), layer, "mutual_knn:10")]
            assert list(line.get_xdata()) == [int(r["step"]) for r in mine] == STEPS
            np.testing.assert_allclose(line.get_ydata(), [float(r["value"]) for r in mine], rtol=1e-12)
            ys = band.get_paths()[0].vertices[:, 1]
            for value in [float(r["low"]) for r in mine] + [float(r["high"]) for r in mine]:
                assert np.isclose(ys, value, rtol=1e-12).any()


def _rankme(x):
    s = np.linalg.svd(x, compute_uv=False)
    p = s[s > 0] / s.sum()
    return np.exp(-(p * np.log(p)).sum())


def test_without_a_reference_each_series_ends_at_its_own_last_checkpoint(checkpoints):
    study = load_study(study_file(checkpoints, reference=""))
    comparison = study.comparisons["training"]
    assert comparison.trajectory.reference is None
    assert ("training-kd-step160", "training-kd-step1") in comparison.pairs
    assert ("training-ce-step160", "training-ce-step160") not in comparison.pairs
    assert "teacher" not in comparison.runs


@pytest.mark.parametrize("edit, message", [
    (("step_{step}.pt\", ce", "step.pt\", ce"), "comparisons.training.trajectory.checkpoints.kd: checkpoint pattern"),
    (("steps: [", "steps: [0, 0, "), "comparisons.training.trajectory.steps: give distinct steps"),
    (("reference: teacher", "reference: teachr"), "no run 'teachr' in this study; did you mean: teacher?"),
    (("measures: [linear,", "measures: [rbf_biasd,"), "comparisons.training.measures: unknown measure 'rbf_biasd'"),
    (("step_{step}.pt\"}", "step_{step}.pt\", xx: \"nowhere/step_{step}.pt\"}"), "checkpoint file nowhere/step_1.pt does not exist"),
])
def test_bad_trajectories_are_one_line_errors_naming_the_place(checkpoints, tmp_path, edit, message):
    text = study_file(checkpoints).read_text().replace(*edit, 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PipelineError) as err:
        load_study(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}:") and message in str(err.value)

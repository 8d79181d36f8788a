"""The default study as SLURM jobs on a real local cluster (started by .ci/slurm_setup.sh).

The jobs run this venv's ckapipe by absolute path, with the cache and results
in temporary directories on the local (shared) filesystem.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.store import open_run
from ckapipe.pipelines import run_study
from ckapipe.pipelines.manifest import recorded_store
from ckapipe.pipelines.slurm import pending_tasks
from tests.pipeline_helpers import DEFAULT, assert_same_results, copy_models, default_study, study_pairs


def slurm_unavailable() -> str | None:
    """Why SLURM cannot take jobs here, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found (CI installs and starts SLURM with .ci/slurm_setup.sh)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer: slurmctld is not running (start it with .ci/slurm_setup.sh)"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable SLURM node (sinfo: {(proc.stdout or proc.stderr).strip() or 'nothing'}); see .ci/slurm_setup.sh"
    return None


WHY_NOT = slurm_unavailable()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return default_study(tmp_path_factory.getbasetemp() / "default-study")


@pytest.fixture(scope="module")
def on_slurm(local, tmp_path_factory):
    """The default study submitted with sbatch: extraction array, then the dependent analysis job."""
    base = tmp_path_factory.mktemp("slurm-study")
    copy_models(local["cache"], base / "cache")  # the same trained weights, so the same run keys
    lines = []
    submitted = run_study(DEFAULT, slurm=True, wait=True, cache=base / "cache", results=base / "results",
                          say=lines.append)
    return {"cache": base / "cache", "results": base / "results", "submitted": submitted, "lines": lines}


def test_sbatch_array_then_dependent_analysis_gives_the_local_results(local, on_slurm):
    kinds = [s.kind for s in on_slurm["submitted"]]
    assert kinds == ["extract", "analyze"], on_slurm["lines"]
    extract_id = on_slurm["submitted"][0].job_id
    assert any(f"after {extract_id}" in line for line in on_slurm["lines"]), on_slurm["lines"]
    logs = on_slurm["results"] / "default" / "slurm" / "logs"
    assert len(list(logs.glob(f"extract-{extract_id}_*.out"))) == 4
    assert "LocalCluster" in next(logs.glob("analyze-*.out")).read_text()
    pairs = study_pairs(local["study"])
    load = {name: analyze.load_results(local["results"] / "default" / name) for name, _ in pairs}
    remote = {name: analyze.load_results(on_slurm["results"] / "default" / name) for name, _ in pairs}
    assert_same_results(load, remote, pairs)
    assert_same_summary(on_slurm["results"] / "default" / "summary.csv", local["results"] / "default" / "summary.csv")


def assert_same_summary(path_a, path_b):
    """The same rows and best-matching layers, the same CKA up to float64 rounding: NumPy's sums
    take their order from the alignment of their buffers, so a process with another allocation
    history (the ckapipe command's single malloc arena) can differ in the last bit."""
    rows_a = [line.split(",") for line in path_a.read_text().splitlines()]
    rows_b = [line.split(",") for line in path_b.read_text().splitlines()]
    assert [r[:5] for r in rows_a] == [r[:5] for r in rows_b]
    numbers = lambda rows: np.array([[float(v) for v in r[5:]] for r in rows[1:]])  # noqa: E731
    np.testing.assert_allclose(numbers(rows_a), numbers(rows_b), rtol=1e-12, atol=0)


def test_a_failed_task_is_resubmitted_alone_and_resumes(on_slurm, tmp_path):
    """Lose two chunks of one run: submitting the study again runs only that run's task."""
    study = run_study_loaded(on_slurm)
    run = study.runs["cnn2-s0"]
    store = open_run(study.cache / recorded_store(study, run))
    before = store.layer("block2")[:]
    store.group["done"][3:5] = 0  # as if the task died before writing chunks 3 and 4
    store.set_meta(status="in_progress")
    assert pending_tasks(study) == [list(study.runs).index("cnn2-s0")]
    lines = []
    submitted = run_study(DEFAULT, "extract", slurm=True, wait=True, cache=study.cache,
                          results=study.results.parent, say=lines.append)
    assert [s.kind for s in submitted] == ["extract"]
    assert any("(array 2)" in line for line in lines), lines
    assert store.missing_chunks() == [] and pending_tasks(study) == []
    np.testing.assert_array_equal(store.layer("block2")[:], before)


def run_study_loaded(on_slurm):
    from ckapipe.pipelines.study import load_study

    return load_study(DEFAULT, cache=on_slurm["cache"], results=on_slurm["results"])


def test_dask_jobqueue_workers_as_slurm_jobs(local, tmp_path):
    """``--dask-cluster slurm``: dask-jobqueue submits the Dask workers as SLURM jobs."""
    results = tmp_path / "results"
    shutil.copytree(local["results"] / "default" / "runs", results / "default" / "runs")
    lines = []
    out = run_study(DEFAULT, "analyze", cache=local["cache"], results=results, dask_cluster="slurm",
                    dask_workers=2, progress=False, say=lines.append)
    assert any("SLURMCluster, 2 worker jobs" in line for line in lines), lines
    pairs = study_pairs(local["study"])
    reference = {name: analyze.load_results(local["results"] / "default" / name) for name, _ in pairs}
    assert_same_results(reference, out, pairs)

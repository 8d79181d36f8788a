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
from ckapipe.errors import PipelineError
from tests.pipeline_helpers import DEFAULT, assert_same_results, copy_models, study_pairs

pytestmark = pytest.mark.slurm  # skipped without SLURM, failed when .ci/run started it (conftest.py)

JOB_TIMEOUT = 600  # seconds a submitted study may take before its test fails with the jobs' states


@pytest.fixture(scope="module", autouse=True)
def jobs_time_out():
    """Every wait for SLURM jobs in this module ends after JOB_TIMEOUT with the jobs' states (squeue),
    the jobs cancelled: a job stuck in PENDING fails its test instead of hanging CI."""
    from ckapipe.pipelines import slurm

    real = slurm.wait_for_jobs

    def wait_for_jobs(job_ids, poll=2.0, timeout=None):
        try:
            return real(job_ids, poll=poll, timeout=JOB_TIMEOUT if timeout is None else timeout)
        except PipelineError as err:
            states = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)],
                                    capture_output=True, text=True).stdout.strip()
            subprocess.run(["scancel", *job_ids], capture_output=True)
            pytest.fail(f"{err}; their states: {states or 'gone from the queue'}", pytrace=False)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(slurm, "wait_for_jobs", wait_for_jobs)
        yield


@pytest.fixture(scope="module")
def on_slurm(default_study, tmp_path_factory):
    """The default study submitted with sbatch: extraction array, then the dependent analysis job."""
    base = tmp_path_factory.mktemp("slurm-study")
    copy_models(default_study["cache"], base / "cache")  # the same trained weights, so the same run keys
    lines = []
    submitted = run_study(DEFAULT, slurm=True, wait=True, cache=base / "cache", results=base / "results",
                          say=lines.append)
    return {"cache": base / "cache", "results": base / "results", "submitted": submitted, "lines": lines}


def test_sbatch_array_then_dependent_analysis_gives_the_local_results(default_study, on_slurm):
    kinds = [s.kind for s in on_slurm["submitted"]]
    assert kinds == ["extract", "analyze"], on_slurm["lines"]
    extract_id = on_slurm["submitted"][0].job_id
    assert any(f"after {extract_id}" in line for line in on_slurm["lines"]), on_slurm["lines"]
    logs = on_slurm["results"] / "default" / "slurm" / "logs"
    assert len(list(logs.glob(f"extract-{extract_id}_*.out"))) == 4
    assert "LocalCluster" in next(logs.glob("analyze-*.out")).read_text()
    pairs = study_pairs(default_study["study"])
    load = {name: analyze.load_results(default_study["results"] / "default" / name) for name, _ in pairs}
    remote = {name: analyze.load_results(on_slurm["results"] / "default" / name) for name, _ in pairs}
    assert_same_results(load, remote, pairs)
    assert_same_summary(on_slurm["results"] / "default" / "summary.csv", default_study["results"] / "default" / "summary.csv")


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


@pytest.mark.timeout(JOB_TIMEOUT)  # a worker job stuck in PENDING: the failure report shows squeue (conftest.py)
def test_dask_jobqueue_workers_as_slurm_jobs(default_study, tmp_path):
    """``--dask-cluster slurm``: dask-jobqueue submits the Dask workers as SLURM jobs."""
    results = tmp_path / "results"
    shutil.copytree(default_study["results"] / "default" / "runs", results / "default" / "runs")
    lines = []
    out = run_study(DEFAULT, "analyze", cache=default_study["cache"], results=results, dask_cluster="slurm",
                    dask_workers=2, progress=False, say=lines.append)
    assert any("SLURMCluster, 2 worker jobs" in line for line in lines), lines
    pairs = study_pairs(default_study["study"])
    reference = {name: analyze.load_results(default_study["results"] / "default" / name) for name, _ in pairs}
    assert_same_results(reference, out, pairs)


def test_a_job_refused_by_sbatch_is_one_line_naming_the_script(default_study, tmp_path):
    """A partition this cluster does not have: sbatch refuses the job, the study says which and why."""
    with pytest.raises(PipelineError, match=r"sbatch extract.sh failed: .*[Ii]nvalid partition") as err:
        run_study(DEFAULT, "extract", slurm=True, slurm_options={"partition": "no-such-partition"},
                  cache=tmp_path / "cache", results=tmp_path / "results", say=lambda line: None)
    assert "\n" not in str(err.value)


BROKEN = """\
study: broken
extract: {dataset: digits, batch_size: 64, limit: 128, device: cuda}
runs:
  mlp: zoo:mlp2?seed=0
"""


def test_a_failed_job_fails_the_study_naming_its_state_and_logs(zoo_cache, tmp_path):
    """A task that fails on the node (--device cuda where there is no GPU): the submission that
    waits for it raises, naming the job, its state and the log directory, and the log says why."""
    from ckapipe.devices import gpu_available

    if gpu_available("torch"):  # the cluster is this machine
        pytest.skip("this node has a GPU: --device cuda would not fail")
    pipeline = tmp_path / "broken.yaml"
    pipeline.write_text(BROKEN)
    copy_models(zoo_cache, tmp_path / "cache")
    lines = []
    with pytest.raises(PipelineError, match=r"SLURM extract job \d+ \(FAILED\) did not complete: see .*logs") as err:
        run_study(pipeline, "extract", slurm=True, wait=True, cache=tmp_path / "cache", results=tmp_path / "results",
                  say=lines.append)
    assert "\n" not in str(err.value)
    (log,) = (tmp_path / "results" / "broken" / "slurm" / "logs").glob("extract-*.out")
    assert "ckapipe: error: --device cuda needs a CUDA GPU" in log.read_text(), log.read_text()

"""The study's analysis on a distributed Dask cluster of worker processes gives the local results."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckapipe.pipelines import run_study
from tests.pipeline_helpers import DEFAULT, assert_same_results, study_pairs

distributed = pytest.importorskip("distributed", reason="needs the cluster extra (distributed)")


@pytest.fixture(scope="module")
def local_results(default_study):
    return run_study(DEFAULT, "analyze", cache=default_study["cache"], results=default_study["results"], progress=False,
                     say=lambda line: None)


def analyze_elsewhere(default_study, tmp_path, **where):
    """Analyze the cached runs again into fresh results (nothing up to date), on ``where``."""
    results = tmp_path / "results"
    shutil.copytree(default_study["results"] / "default" / "runs", results / "default" / "runs")
    lines = []
    out = run_study(DEFAULT, "analyze", cache=default_study["cache"], results=results, progress=False,
                    say=lines.append, **where)
    assert not any("up to date" in line for line in lines)
    return out, lines


def test_a_scheduler_address_with_two_worker_processes(default_study, local_results, tmp_path):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        out, lines = analyze_elsewhere(default_study, tmp_path, scheduler=cluster.scheduler_address)
        worked = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert len(worked) == 2 and all(n > 0 for n in worked.values()), worked
    assert any(cluster.scheduler_address in line for line in lines)
    assert_same_results(local_results, out, study_pairs(default_study["study"]))


@pytest.fixture
def scheduler_file(tmp_path):
    """The README's recipe: ``dask scheduler --scheduler-file F`` and ``dask worker --scheduler-file F``
    with two worker processes, as separate processes (as separate jobs would be)."""
    dask_cli = str(Path(sys.executable).parent / "dask")
    path = tmp_path / "scheduler.json"
    common = ["--scheduler-file", str(path), "--no-dashboard"]
    procs = [subprocess.Popen([dask_cli, "scheduler", "--port", "0", *common], stderr=subprocess.DEVNULL)]
    try:
        wait_for(path.exists, "the scheduler file")
        procs.append(subprocess.Popen([dask_cli, "worker", "--nworkers", "2", "--nthreads", "1",
                                       "--local-directory", str(tmp_path), *common], stderr=subprocess.DEVNULL))
        with distributed.Client(scheduler_file=str(path)) as client:
            client.wait_for_workers(2, timeout=60)
        yield path
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=30)


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.1)


def test_a_scheduler_file_with_two_worker_processes(default_study, local_results, tmp_path, scheduler_file):
    out, lines = analyze_elsewhere(default_study, tmp_path, scheduler_file=str(scheduler_file))
    assert any(str(scheduler_file) in line for line in lines), lines
    assert_same_results(local_results, out, study_pairs(default_study["study"]))


def test_a_cluster_started_for_the_analysis(default_study, local_results, tmp_path):
    """What a SLURM analysis job does: a LocalCluster of worker processes on its allocation."""
    out, lines = analyze_elsewhere(default_study, tmp_path, dask_cluster="local", dask_workers=2)
    assert any("LocalCluster, 2 worker processes" in line for line in lines), lines
    assert_same_results(local_results, out, study_pairs(default_study["study"]))


def test_an_unknown_cluster_or_a_missing_package_is_one_line(monkeypatch):
    from ckapipe.errors import PipelineError
    from ckapipe.pipelines.dask_cluster import dask_scheduler

    with pytest.raises(PipelineError, match=r"unknown Dask cluster 'k8s': choose threads, local or slurm"):
        with dask_scheduler({}, cluster="k8s", say=lambda line: None):
            pass
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if not installed
    with pytest.raises(PipelineError, match=r"dask.cluster: slurm needs dask-jobqueue: pip install 'ckapipe\[cluster\]'"):
        with dask_scheduler({"cluster": "slurm"}, workers=1, say=lambda line: None):
            pass
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(PipelineError, match=r"a Dask cluster needs distributed: pip install 'ckapipe\[cluster\]'"):
        with dask_scheduler({"cluster": "local"}, workers=1, say=lambda line: None):
            pass

"""dask-jobqueue's SLURMCluster as ckapipe starts it, on a real local SLURM (started by
.ci/slurm_setup.sh): no dashboard unless asked, so a busy port 8787 on a shared node is no matter."""

from __future__ import annotations

import shutil
import socket
import warnings

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.pipelines import run_study
from tests.pipeline_helpers import DEFAULT

pytestmark = pytest.mark.slurm  # skipped without SLURM, failed when .ci/run started it (conftest.py)


@pytest.fixture(scope="module")
def local(default_study):
    return default_study


def test_worker_jobs_without_a_dashboard_beside_a_busy_port_8787(local, tmp_path):
    taken = socket.socket()
    try:
        taken.bind(("", 8787))
        taken.listen()
    except OSError:
        pass  # already taken by someone else: the same situation
    results = tmp_path / "results"
    shutil.copytree(local["results"] / "default" / "runs", results / "default" / "runs")
    lines = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*already in use")
            out = run_study(DEFAULT, "analyze", cache=local["cache"], results=results, dask_cluster="slurm",
                            dask_workers=1, progress=False, say=lines.append)
    finally:
        taken.close()
    started = [line for line in lines if "SLURMCluster, 1 worker jobs" in line]
    assert started and "dashboard" not in started[0], lines
    reference = analyze.load_results(local["results"] / "default" / "seeds")
    np.testing.assert_allclose(out["seeds"].hsic, reference.hsic, rtol=1e-12, atol=0)

"""Submitting a study again while its jobs are still queued, on a real local SLURM (started by
.ci/slurm_setup.sh): refused with the jobs' ids in one line, unless forced."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckapipe.pipelines import run_study
from ckapipe.pipelines.study import PipelineError
from tests.pipeline_helpers import DEFAULT

pytestmark = pytest.mark.slurm  # skipped without SLURM, failed when .ci/run started it (conftest.py)
HOLD = {"extra": ["--hold"]}  # the jobs stay queued (held) until released or cancelled


@pytest.fixture
def held(tmp_path):
    """The default study submitted with its jobs held in the queue; cancelled afterwards."""
    submitted = []
    where = {"cache": tmp_path / "cache", "results": tmp_path / "results"}
    submitted += run_study(DEFAULT, slurm=True, slurm_options=HOLD, say=lambda line: None, **where)
    try:
        yield where, submitted
    finally:
        subprocess.run(["scancel", *[s.job_id for s in submitted]], capture_output=True)


def test_a_study_still_queued_is_not_submitted_again(held):
    where, submitted = held
    ids = [s.job_id for s in submitted]
    assert [s.kind for s in submitted] == ["extract", "analyze"]
    with pytest.raises(PipelineError) as err:
        run_study(DEFAULT, slurm=True, slurm_options=HOLD, say=lambda line: None, **where)
    message = str(err.value)
    assert message.startswith("study default still has jobs in the SLURM queue: "), message
    assert f"{ids[0]} (ckapipe-extract-default, PENDING)" in message and f"{ids[1]} (ckapipe-analyze-default, PENDING)" in message
    assert f"scancel {ids[0]} {ids[1]}" in message and message.endswith("or submit again anyway with --force")
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "run", str(DEFAULT), "--slurm", "--cache", str(where["cache"]),
                           "--out", str(where["results"])], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"ckapipe: error: {message}"], proc.stderr


def test_another_results_directory_is_another_study(held, tmp_path):
    """Jobs of the same study name for other results are not this study's: submitted."""
    other = tmp_path / "other"
    submitted = run_study(DEFAULT, slurm=True, slurm_options=HOLD, cache=other / "cache", results=other / "results",
                          say=lambda line: None)
    held[1].extend(submitted)  # cancelled by the fixture
    assert [s.kind for s in submitted] == ["extract", "analyze"]


def test_force_submits_anyway(held):
    where, submitted = held
    again = run_study(DEFAULT, slurm=True, slurm_options=HOLD, force=True, say=lambda line: None, **where)
    submitted.extend(again)
    assert [s.kind for s in again] == ["extract", "analyze"]
    assert not {s.job_id for s in again} & {s.job_id for s in submitted[:2]}

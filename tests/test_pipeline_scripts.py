"""The SLURM job scripts a study becomes (no SLURM needed: --dry-run)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckapipe.errors import PipelineError
from ckapipe.pipelines import run_study
from tests import REPO
from tests.pipeline_helpers import DEFAULT

LARGE = REPO / "pipelines" / "examples" / "large-run-slurm.yaml"


def dry_run(path, tmp_path, **options) -> str:
    lines = []
    run_study(path, slurm=True, dry_run=True, cache=tmp_path / "cache", results=tmp_path / "results",
              say=lines.append, **options)
    return "\n".join(lines)


def test_an_extraction_array_and_a_dependent_analysis_job(tmp_path):
    text = dry_run(DEFAULT, tmp_path)
    ckapipe = str(Path(sys.executable).parent / "ckapipe")
    assert "#SBATCH --array=0-3" in text  # one task per run
    assert f'exec {ckapipe} run {DEFAULT} --stage extract' in text
    assert '--task "$SLURM_ARRAY_TASK_ID"' in text
    assert f"--cache {tmp_path / 'cache'}" in text
    assert "# sbatch --parsable --dependency=afterok:<extract job id>" in text
    assert "#SBATCH --kill-on-invalid-dep=yes" in text
    assert "--stage analyze" in text and "--dask-cluster local" in text
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_directives_from_the_file_and_the_command_line(tmp_path):
    text = dry_run(LARGE, tmp_path, slurm_options={"partition": "debug", "extra": ["--qos=long"]})
    extract, analyze = text.split("# ---- ")[1:]
    assert "#SBATCH --array=0-15" in extract  # 2 runs x tasks_per_run 8
    assert "#SBATCH --partition=debug" in extract and "partition=gpu" not in extract
    assert "#SBATCH --account=my-lab" in extract and "#SBATCH --gres=gpu:1" in extract
    assert "#SBATCH --qos=long" in extract and "#SBATCH --constraint=a100" not in extract
    assert "#SBATCH --time=00:30:00" in analyze  # slurm.analyze overrides slurm
    assert "--dask-cluster" not in analyze  # the file names a scheduler file: the job uses it


def test_chosen_tasks_and_a_given_scheduler(tmp_path):
    text = dry_run(DEFAULT, tmp_path, tasks=[1, 3], scheduler="tcp://10.0.0.5:8786")
    assert "#SBATCH --array=1,3" in text
    assert "--scheduler tcp://10.0.0.5:8786" in text


def test_submitting_without_sbatch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    with pytest.raises(PipelineError, match=r"sbatch not found: --slurm needs a SLURM cluster \(or use --dry-run"):
        run_study(DEFAULT, "extract", slurm=True, tasks=[0], cache=tmp_path / "cache", results=tmp_path / "results",
                  say=lambda line: None)

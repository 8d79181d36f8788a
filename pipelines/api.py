"""``run_study``: a pipeline file's stages, in this process or as SLURM jobs; and ``compare``, which
needs torch, imported on first use (``__getattr__`` below: the lazy boundary of docs/design.md)."""

from __future__ import annotations

import os
from typing import Callable

from ckapipe.errors import PipelineError
from ckapipe.pipelines import local, slurm
from ckapipe.pipelines.study import Study, load_study
from ckapipe.store.results import check_out

STAGES = ("extract", "analyze", "all")


def __getattr__(name: str):
    """``compare`` on first use: its module runs models, so it imports torch, which the rest of the
    API (run_study, analyze, load_results) does without."""
    if name == "compare":
        from ckapipe.pipelines.compare import compare  # optional: torch

        return compare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_study(
    path: str | os.PathLike,
    stage: str = "all",
    *,
    cache: str | os.PathLike | None = None,
    results: str | os.PathLike | None = None,
    slurm: bool = False,
    dry_run: bool = False,
    tasks: list[int] | None = None,
    slurm_options: dict | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    dask_cluster: str | None = None,
    dask_workers: int | None = None,
    wait: bool = False,
    force: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = print,
):
    """Run ``stage`` (extract, analyze or all) of the study in ``path``.

    In this process it returns the analysis results by comparison name (empty
    for the extract stage). With ``slurm`` it submits the jobs (or, with
    ``dry_run``, prints their scripts) and returns the submitted job ids;
    ``wait`` blocks until they leave the queue; a study whose jobs are still
    queued is refused unless ``force``. ``cache`` and ``results`` override the
    file's directories; ``tasks`` picks extraction tasks by index.
    """
    if stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}: choose {', '.join(STAGES)}")
    study = load_study(path, cache=cache, results=results)
    if dry_run and not slurm:
        raise PipelineError("dry_run shows the SLURM job scripts: it goes with slurm=True")
    if slurm:
        return submit_study(study, stage, tasks=tasks, slurm_options=slurm_options or {}, scheduler=scheduler,
                            scheduler_file=scheduler_file, dask_cluster=dask_cluster, dask_workers=dask_workers,
                            dry_run=dry_run, wait=wait, force=force, say=say)
    return run_here(study, stage, tasks=tasks, scheduler=scheduler, scheduler_file=scheduler_file,
                    dask_cluster=dask_cluster, dask_workers=dask_workers, progress=progress, say=say)


def run_here(study: Study, stage: str, *, tasks, scheduler, scheduler_file, dask_cluster, dask_workers,
             progress, say) -> dict:
    if stage in ("analyze", "all"):
        for comparison in study.comparisons.values():  # an unwritable results directory: said before any work
            check_out(study.comparison_dir(comparison), overwrite=True)
    if stage in ("extract", "all"):
        local.extract_stage(study, tasks=tasks, progress=progress, say=say)
    if stage in ("analyze", "all"):
        return local.analyze_stage(study, scheduler=scheduler, scheduler_file=scheduler_file,
                                   cluster=dask_cluster, workers=dask_workers, progress=progress, say=say)
    return {}


def submit_study(study: Study, stage: str, *, tasks, slurm_options, scheduler, scheduler_file, dask_cluster,
                 dask_workers, dry_run, wait, force=False, say) -> list:
    dask_args = slurm.analysis_dask_args(study, scheduler, scheduler_file, dask_cluster, dask_workers)
    jobs = slurm.plan_jobs(study, stage, tasks=tasks, overrides=slurm_options, dask_args=dask_args)
    if dry_run:
        say(slurm.describe(jobs))
        return []
    if not jobs:
        say(f"nothing to submit for stage {stage}: no unfinished extraction task, no comparison to analyze")
        return []
    slurm.require_slurm()
    if not force:
        slurm.refuse_if_queued(study)
    submitted = slurm.submit_jobs(jobs, say=say)
    if wait and submitted:
        states = slurm.wait_for_jobs([s.job_id for s in submitted])
        say("; ".join(f"{s.kind} job {s.job_id}: {states[s.job_id]}" for s in submitted))
        failed = [f"{s.kind} job {s.job_id} ({states[s.job_id]})" for s in submitted
                  if states[s.job_id] != "COMPLETED"]
        if failed:
            logs = slurm.log_dir(study)
            raise PipelineError(f"SLURM {', '.join(failed)} did not complete: see {logs}; "
                                f"submit the study again to rerun only what did not finish")
    return submitted

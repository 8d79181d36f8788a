"""Run a study's stages in this process, through the stage APIs.

Both stages are idempotent: ``extract_run`` skips a complete cached run and
resumes an interrupted one; an analysis whose results are up to date with its
inputs (``analyze.is_up_to_date``) is not redone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ckapipe.pipelines.dask_cluster import dask_scheduler
from ckapipe.pipelines.manifest import record_store, store_names
from ckapipe.pipelines.report import write_study_report
from ckapipe.errors import PipelineError
from ckapipe.pipelines.study import Comparison, RunConfig, Study

Say = Callable[[str], None]


@dataclass(frozen=True)
class ExtractTask:
    """One unit of extraction work: a run, or part ``part`` of ``parts`` of its chunks."""

    run: str
    part: int = 0
    parts: int = 1

    @property
    def label(self) -> str:
        return self.run if self.parts == 1 else f"{self.run} part {self.part + 1}/{self.parts}"


def extract_tasks(study: Study) -> list[ExtractTask]:
    """The study's extraction tasks in a stable order (SLURM array index = position)."""
    parts = study.slurm.get("tasks_per_run", 1)
    return [ExtractTask(name, part, parts) for name in study.runs for part in range(parts)]


def extract_one(study: Study, task: ExtractTask, *, progress: bool = True) -> Path:
    """Extract one task's chunks (a no-op when cached) and record the run's store."""
    from ckapipe.extract import extract_run

    run = study.runs[task.run]
    layers = list(run.layers) if run.layers else None
    share = (task.part, task.parts) if task.parts > 1 else None
    store = extract_run(run.model, run.dataset, layers, cache=study.cache, share=share, progress=progress,
                        **run.extract_kwargs())
    record_store(study, run, store)
    return Path(store)


def extract_stage(study: Study, *, tasks: list[int] | None = None, progress: bool = True,
                  say: Say = print) -> list[Path]:
    """Extract the study's runs (or the tasks with the given indices) one after another."""
    all_tasks = extract_tasks(study)
    chosen = all_tasks if tasks is None else [task_at(all_tasks, i) for i in tasks]
    stores = []
    for task in chosen:
        say(f"extract {task.label}")
        stores.append(extract_one(study, task, progress=progress))
    return stores


def task_at(tasks: list[ExtractTask], index: int) -> ExtractTask:
    if not 0 <= index < len(tasks):
        raise PipelineError(f"no extraction task {index}: the study has tasks 0-{len(tasks) - 1}")
    return tasks[index]


def analysis_options(study: Study, comparison: Comparison) -> dict:
    """The options that determine an analysis' numbers (shared by analyze and is_up_to_date)."""
    options = {key: study.analyze[key] for key in ("batch_size", "completed_only", "use_gram_cache", "device", "measures")
               if key in study.analyze}
    if comparison.batch_size is not None:
        options["batch_size"] = comparison.batch_size
    if comparison.measures is not None:
        options["measures"] = comparison.measures
    if comparison.trajectory is not None and comparison.trajectory.rankme == "minibatch":
        options["rankme"] = True
    options["pair_by_position"] = comparison.pair_by_position
    return options


def analyze_comparison(study: Study, comparison: Comparison, *, scheduler=None, scheduler_file=None,
                       progress: bool = True, say: Say = print):
    """Analyze one comparison unless its results are up to date; plot it. Returns the results."""
    import ckapipe.analyze as stage

    out = study.comparison_dir(comparison)
    runs = store_names(study, list(comparison.runs))
    options = analysis_options(study, comparison)
    if stage.is_up_to_date(out, study.cache, runs, **options):
        say(f"analyze {comparison.name}: up to date ({out})")
        return stage.load_results(out)
    say(f"analyze {comparison.name}: {', '.join(comparison.runs)}")
    results = stage.analyze(study.cache, runs, out=out, overwrite=True, scheduler=scheduler,
                            scheduler_file=scheduler_file, progress=progress, **options)
    if comparison.trajectory is not None:
        trajectory_figures(study, comparison, results, progress)
    else:
        stage.plot_results(results, out_dir=out)
    return results


def trajectory_figures(study: Study, comparison: Comparison, results, progress: bool = True) -> list[Path]:
    """trajectory.csv and the step plots of a trajectory comparison (analyze.trajectory), beside its results."""
    from ckapipe.analyze.trajectory import plot_trajectory, trajectory_view

    trajectory = comparison.trajectory
    names = dict(zip(comparison.runs, store_names(study, list(comparison.runs))))
    series = {label: [(step, names[run]) for step, run in points] for label, points in trajectory.series}
    reference = names[trajectory.reference] if trajectory.reference else None
    view = trajectory_view(results, series, reference, rankme=trajectory.rankme, cache=study.cache, progress=progress)
    out = study.comparison_dir(comparison)
    (out / "trajectory.csv").write_text(view.to_csv())
    return plot_trajectory(view, out / "plots")


def analyze_stage(study: Study, *, scheduler: str | None = None, scheduler_file: str | None = None,
                  workers: int | None = None, cluster: str | None = None, progress: bool = True,
                  say: Say = print) -> dict:
    """Analyze every comparison of the study on the Dask cluster it asks for; write the study table."""
    if not study.comparisons:
        say("no comparisons in the study: nothing to analyze")
        return {}
    with dask_scheduler(study.dask, scheduler=scheduler, scheduler_file=scheduler_file,
                        workers=workers, cluster=cluster, job=study.job_settings("analyze"),
                        log_directory=str(study.slurm_logs), say=say) as target:
        results = {name: analyze_comparison(study, comparison, progress=progress, say=say, **target)
                   for name, comparison in study.comparisons.items()}
    say(write_study_report(study, results).rstrip())
    say(f"results: {study.results}/ (summary.csv, summary.txt, one directory per comparison)")
    return results

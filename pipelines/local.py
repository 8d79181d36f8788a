"""Run a study's stages in this process, through the stage APIs.

Both stages are idempotent: ``extract_run`` skips a complete cached run and
resumes an interrupted one; an analysis whose results are up to date with its
inputs (``analyze.is_up_to_date``) is not redone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ckapipe import analyze, extract
from ckapipe.analyze.trajectory import plot_trajectory, trajectory_view
from ckapipe.analyze.views import VIEW_FILE, EnsembleView, TeacherView, check_view, plot_view, read_view, write_view
from ckapipe.errors import CkapipeError, PipelineError
from ckapipe.pipelines.dask_cluster import dask_scheduler
from ckapipe.pipelines.manifest import record_store, store_names
from ckapipe.pipelines.report import write_study_report
from ckapipe.pipelines.study import Comparison, Study
from ckapipe.store import open_run

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
    run = study.runs[task.run]
    share = (task.part, task.parts) if task.parts > 1 else None
    store = extract.extract_run(run.model, run.dataset, cache=study.cache, progress=progress, settings=run.settings,
                                share=share)
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


def analyze_comparison(study: Study, comparison: Comparison, stores: dict[str, str], *, scheduler=None,
                       scheduler_file=None, no_workers_timeout=None, progress: bool = True, say: Say = print):
    """Analyze one comparison unless its results are up to date; draw it. Returns the results.

    ``stores``: the store of each of its runs (``manifest.store_names``)."""
    out = study.comparison_dir(comparison)
    runs = [stores[name] for name in comparison.runs]
    options = analysis_options(study, comparison)
    view = comparison_view(comparison, stores)
    if analyze.is_up_to_date(out, study.cache, runs, **options):
        say(f"analyze {comparison.name}: up to date ({out})")
        results = analyze.load_results(out)
        if view is not None and read_view(out) != view:
            draw(results, view, out)
        return results
    say(f"analyze {comparison.name}: {', '.join(comparison.runs)}")
    results = analyze.analyze(study.cache, runs, out=out, overwrite=True, scheduler=scheduler,
                            scheduler_file=scheduler_file, no_workers_timeout=no_workers_timeout,
                            progress=progress, **options)
    if comparison.trajectory is not None:
        trajectory_figures(study, comparison, results, stores, progress)
    else:
        draw(results, view, out)
    return results


def trajectory_figures(study: Study, comparison: Comparison, results, stores: dict[str, str],
                       progress: bool = True) -> list[Path]:
    """trajectory.csv and the step plots of a trajectory comparison (analyze.trajectory), beside its results."""
    trajectory = comparison.trajectory
    series = {label: [(step, stores[run]) for step, run in points] for label, points in trajectory.series}
    reference = stores[trajectory.reference] if trajectory.reference else None
    view = trajectory_view(results, series, reference, rankme=trajectory.rankme, cache=study.cache, progress=progress)
    out = study.comparison_dir(comparison)
    (out / "trajectory.csv").write_text(view.to_csv())
    return plot_trajectory(view, out / "plots")


def comparison_view(comparison: Comparison, stores: dict[str, str]):
    """The view a comparison's kind asks for, its runs named by store; None for runs and pairs."""
    runs = {name: stores[name] for name in comparison.runs}
    if comparison.kind == "ensemble":
        return EnsembleView(members=comparison.runs, layers=comparison.layers, runs=runs)
    if comparison.kind == "teacher":
        return TeacherView(teacher=comparison.runs[0], students=comparison.runs[1:], layers=comparison.layers or (),
                           runs=runs)
    return None


def draw(results, view, out: Path) -> None:
    """The figures the comparison asks for: its view's, or every pair's heatmap for runs and pairs."""
    if view is None:
        (out / VIEW_FILE).unlink(missing_ok=True)
        analyze.plot_results(results, out_dir=out)
        return
    write_view(view, out)
    plot_view(results, view, out)


def check_layers(study: Study, comparison: Comparison, stores: dict[str, str]) -> None:
    """The layers a comparison names exist in its runs' stores: said before any analysis starts."""
    view = comparison_view(comparison, stores)
    if view is None:
        return
    try:
        check_view(view, lambda name: open_run(study.cache / stores[name]).layer_names)
    except CkapipeError as err:
        raise PipelineError(f"{study.path}: comparisons.{comparison.name}.layers: {err}") from None


def analyze_stage(study: Study, *, scheduler: str | None = None, scheduler_file: str | None = None,
                  workers: int | None = None, cluster: str | None = None, progress: bool = True,
                  say: Say = print) -> dict:
    """Analyze every comparison of the study on the Dask cluster it asks for; write the study table.

    Every run's store and every named layer is found before a cluster is started."""
    if not study.comparisons:
        say("no comparisons in the study: nothing to analyze")
        return {}
    stores = study_stores(study)
    for name, comparison in study.comparisons.items():
        check_layers(study, comparison, stores[name])
    with dask_scheduler(study.dask, scheduler=scheduler, scheduler_file=scheduler_file,
                        workers=workers, cluster=cluster, job=study.job_settings("analyze"),
                        log_directory=str(study.slurm_logs), say=say) as target:
        results = {name: analyze_comparison(study, comparison, stores[name], progress=progress, say=say, **target)
                   for name, comparison in study.comparisons.items()}
    say(write_study_report(study, results, stores).rstrip())
    say(f"results: {study.results}/ (summary.csv, summary.txt, one directory per comparison)")
    return results


def study_stores(study: Study, record: bool = True) -> dict[str, dict[str, str]]:
    """Comparison -> {run: store} for every comparison of the study (or the error naming what is missing)."""
    return {name: dict(zip(c.runs, store_names(study, list(c.runs), record))) for name, c in study.comparisons.items()}

"""A study as SLURM batch jobs: an extraction job array, then a dependent analysis job.

- The extraction array has one task per run, or ``slurm.tasks_per_run`` tasks
  per run that each take a disjoint range of its chunks. Task i runs
  ``ckapipe run PIPELINE --stage extract --task i``; a task that was already
  done (its run, or its chunk range, complete in the cache) is not submitted
  again, so submitting a study again resubmits only the failed tasks, which
  resume where they stopped.
- The analysis job waits for the array (``--dependency=afterok``; it is
  dropped if a task fails: ``--kill-on-invalid-dep``) and runs
  ``ckapipe run PIPELINE --stage analyze`` with Dask on its allocation (a
  LocalCluster of worker processes, dask-cuda GPU workers where installed), or
  on dask-jobqueue's SLURMCluster or an existing scheduler, as the pipeline's
  ``dask`` section or the command line says.

A study whose jobs are still in the queue (looked up with ``squeue`` by the
jobs' names, and kept when their script is this study's) is not submitted
again unless forced: a second array would extract into the same stores.

The jobs run this installation's ``ckapipe`` (its absolute path), in the
directory ``ckapipe run --slurm`` was started from, with the cache and results
at absolute paths: they must lie on a filesystem the compute nodes share.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ckapipe.pipelines.dask_cluster import queued
from ckapipe.pipelines.local import ExtractTask, extract_tasks, study_stores
from ckapipe.pipelines.manifest import recorded_store
from ckapipe.errors import PipelineError, StoreError
from ckapipe.pipelines.study import SLURM_JOB_KEYS, RunConfig, Study
from ckapipe.store import open_run, share_range

JOB_KEYS = tuple(key for key in SLURM_JOB_KEYS if key not in ("extra", "setup"))  # one #SBATCH line each


@dataclass(frozen=True)
class JobScript:
    """A batch script and where it goes; ``dependency`` names the job it waits for."""

    kind: str  # "extract" or "analyze"
    path: Path
    text: str
    array: str | None = None


@dataclass(frozen=True)
class Submitted:
    kind: str
    job_id: str
    script: Path


# --------------------------------------------------------------------------- scripts


SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")  # sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
SLURM_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)
SLURM_GRES = re.compile(r"^[A-Za-z_][\w.-]*(:[\w.-]+)*(,[A-Za-z_][\w.-]*(:[\w.-]+)*)*$")


def check_job_settings(settings: dict) -> dict:
    """SLURM directives checked before anything is written or submitted: a one-line error naming the option."""
    checks = {"time": (SLURM_TIME, "a SLURM time such as 30, 02:00:00 or 1-12:00:00"),
              "mem": (SLURM_MEM, "a size such as 16G or 4000M"),
              "gres": (SLURM_GRES, "generic resources such as gpu:1 or gpu:a100:2")}
    for key, (pattern, what) in checks.items():
        if key in settings and not pattern.match(str(settings[key])):
            raise PipelineError(f"--{key} {settings[key]!r} is not {what}")
    if "cpus_per_task" in settings and int(settings["cpus_per_task"]) < 1:
        raise PipelineError(f"--cpus-per-task {settings['cpus_per_task']} must be at least 1")
    for extra in settings.get("extra", []):
        if not str(extra).startswith("--"):
            raise PipelineError(f"--sbatch-extra {extra!r} is not an sbatch option (write it as --name=value)")
    return settings


def directives(settings: dict) -> list[str]:
    lines = [f"#SBATCH --{key.replace('_', '-')}={settings[key]}" for key in JOB_KEYS if key in settings]
    return lines + [f"#SBATCH {extra}" for extra in settings.get("extra", [])]


def ckapipe_command() -> str:
    """This installation's ckapipe, by absolute path (the venv need not be activated in the job)."""
    exe = Path(sys.executable).parent / "ckapipe"
    if exe.exists():
        return shlex.quote(str(exe))
    return f"{shlex.quote(sys.executable)} -m ckapipe"


def run_command(study: Study, stage: str, extra: list[str], shell_tail: str = "") -> str:
    """The job's ``ckapipe run`` line; ``shell_tail`` is appended unquoted (shell variables)."""
    args = [str(study.path), "--stage", stage, "--cache", str(study.cache), "--out", str(study.results.parent),
            *extra]
    return f"{ckapipe_command()} run {' '.join(shlex.quote(a) for a in args)}{shell_tail}"


def job_name(study: Study, kind: str) -> str:
    return f"ckapipe-{kind}-{study.name}"


def script_text(study: Study, name: str, settings: dict, header: list[str], command: str,
                notes: list[str] | None = None) -> str:
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name(study, name)}", *header, *directives(settings),
             "", "# written by `ckapipe run --slurm`; resubmitting the study resubmits what did not finish",
             *(notes or []),
             "set -euo pipefail",
             "export MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-1}  # also for Dask worker processes (ckapipe.cli.one_malloc_arena)",
             *settings.get("setup", []), f"cd {shlex.quote(str(Path.cwd()))}",
             f"exec {command}", ""]
    return "\n".join(lines)


def extract_script(study: Study, tasks: list[int], overrides: dict) -> JobScript:
    settings = study.job_settings("extract", overrides)
    logs = log_dir(study)
    array = array_spec(tasks)
    header = [f"#SBATCH --array={array}", f"#SBATCH --output={logs}/extract-%A_%a.out"]
    command = run_command(study, "extract", [], shell_tail=' --task "$SLURM_ARRAY_TASK_ID"')
    text = script_text(study, "extract", settings, header, command, extract_notes(study, tasks))
    return JobScript("extract", script_dir(study) / "extract.sh", text, array)


def extract_notes(study: Study, tasks: list[int]) -> list[str]:
    """Comment lines: each run the tasks extract, as the ``ckapipe extract`` command of its settings
    (what to run by hand to redo one)."""
    every = extract_tasks(study)
    runs = dict.fromkeys(every[i].run for i in tasks if 0 <= i < len(every))
    return ["# the runs of these tasks as single commands (a task of a split run extracts a share of it):",
            *(f"#   {extract_command(study, study.runs[run])}" for run in runs)]


def extract_command(study: Study, run: RunConfig) -> str:
    """``ckapipe extract`` with a study run's model, dataset, cache and settings."""
    args = ["-m", run.model, "-d", run.dataset, "--cache", str(study.cache), *run.settings.cli_args()]
    return "ckapipe extract " + " ".join(shlex.quote(arg) for arg in args)


def analyze_script(study: Study, overrides: dict, dask_args: list[str]) -> JobScript:
    settings = study.job_settings("analyze", overrides)
    header = [f"#SBATCH --output={log_dir(study)}/analyze-%j.out", "#SBATCH --kill-on-invalid-dep=yes"]
    command = run_command(study, "analyze", dask_args)
    return JobScript("analyze", script_dir(study) / "analyze.sh", script_text(study, "analyze", settings, header, command))


def analysis_dask_args(study: Study, scheduler: str | None, scheduler_file: str | None,
                       cluster: str | None, workers: int | None) -> list[str]:
    """How the analysis job runs Dask: a given scheduler, else the pipeline's cluster, else a
    LocalCluster on the job's allocation."""
    if scheduler:
        return ["--scheduler", scheduler]
    if scheduler_file:
        return ["--scheduler-file", scheduler_file]
    if study.dask.get("scheduler") or study.dask.get("scheduler_file"):
        return []
    args = ["--dask-cluster", cluster or study.dask.get("cluster", "local").replace("threads", "local")]
    return args + (["--dask-workers", str(workers)] if workers else [])


def array_spec(indices: list[int]) -> str:
    """``0-3`` for a contiguous range, ``1,4,5`` otherwise."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ",".join(map(str, indices))


def script_dir(study: Study) -> Path:
    return study.slurm_dir


def log_dir(study: Study) -> Path:
    return study.slurm_logs


# --------------------------------------------------------------------------- what is left to do


def pending_tasks(study: Study) -> list[int]:
    """Indices of the extraction tasks whose chunks are not all in the cache."""
    return [i for i, task in enumerate(extract_tasks(study)) if not task_done(study, task)]


def task_done(study: Study, task: ExtractTask) -> bool:
    run = study.runs[task.run]
    store = recorded_store(study, run)
    if store is None or not (study.cache / store).is_dir():
        return False
    try:
        cached = open_run(study.cache / store)
        chunks = share_range(task.part, task.parts, cached.n_chunks)
        missing = set(cached.missing_chunks())
    except StoreError:
        return False
    return not missing.intersection(chunks)


# --------------------------------------------------------------------------- submission


def plan_jobs(study: Study, stage: str, *, tasks: list[int] | None = None, overrides: dict | None = None,
              dask_args: list[str] | None = None) -> list[JobScript]:
    """The job scripts a submission of ``stage`` needs (extraction only for unfinished tasks)."""
    overrides = overrides or {}
    for kind in ("extract", "analyze"):
        check_job_settings(study.job_settings(kind, overrides))
    jobs = []
    if stage in ("extract", "all"):
        todo = pending_tasks(study) if tasks is None else tasks
        if todo:
            jobs.append(extract_script(study, todo, overrides))
    if stage in ("analyze", "all") and study.comparisons:
        if not jobs:
            study_stores(study, record=False)  # no extraction before it: a run the job would not find is said now
        jobs.append(analyze_script(study, overrides, dask_args or []))
    return jobs


def require_slurm() -> None:
    """A one-line error when this machine has no SLURM client to submit with (sbatch, then squeue)."""
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise PipelineError(f"{tool} not found: --slurm needs a SLURM cluster (or use --dry-run to see the scripts)")


def queued_jobs(study: Study) -> list[tuple[str, str, str]]:
    """(job id, name, state) of the study's jobs in the SLURM queue: ``squeue`` by the jobs' names,
    kept when their batch script is this study's (another results directory is another study)."""
    names = ",".join(job_name(study, kind) for kind in ("extract", "analyze"))
    proc = subprocess.run(["squeue", "-h", "--name", names, "-o", "%F|%j|%T|%o"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"squeue failed: {(proc.stderr or proc.stdout).strip() or proc.returncode}")
    jobs = {}
    for line in proc.stdout.splitlines():
        job_id, name, state, command = (line.split("|") + ["", "", ""])[:4]
        if Path(command).parent == script_dir(study):
            jobs.setdefault(job_id, (job_id, name, state))
    return sorted(jobs.values(), key=lambda job: (len(job[0]), job[0]))  # in submission order


def refuse_if_queued(study: Study) -> None:
    """A one-line error naming the study's queued jobs, if any."""
    jobs = queued_jobs(study)
    if jobs:
        ids = [job_id for job_id, _, _ in jobs]
        listed = ", ".join(f"{job_id} ({name}, {state})" for job_id, name, state in jobs)
        raise PipelineError(f"study {study.name} still has jobs in the SLURM queue: {listed}; wait for them "
                            f"(squeue -j {','.join(ids)}), cancel them (scancel {' '.join(ids)}), or submit "
                            f"again anyway with --force")


def submit_jobs(jobs: list[JobScript], say: Callable[[str], None] = print) -> list[Submitted]:
    """Write the scripts and sbatch them in order, each analysis job after the extraction array."""
    log_dirs = {job.path.parent / "logs" for job in jobs}
    for d in log_dirs:
        d.mkdir(parents=True, exist_ok=True)
    submitted: list[Submitted] = []
    for job in jobs:
        job.path.write_text(job.text)
        after = [s.job_id for s in submitted if s.kind == "extract"]
        args = [f"--dependency=afterok:{':'.join(after)}"] if job.kind == "analyze" and after else []
        job_id = sbatch(job.path, args)
        say(f"submitted {job.kind} job {job_id}" + (f" (array {job.array})" if job.array else "")
            + (f" after {', '.join(after)}" if args else "") + f": {job.path}")
        submitted.append(Submitted(job.kind, job_id, job.path))
    return submitted


def sbatch(script: Path, args: list[str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise PipelineError(f"sbatch {script.name} failed: {message[-1] if message else proc.returncode}")
    return proc.stdout.strip().split(";")[0]


def describe(jobs: list[JobScript]) -> str:
    """What --dry-run prints: each script and the sbatch line that would submit it."""
    parts = []
    for job in jobs:
        dep = " --dependency=afterok:<extract job id>" if job.kind == "analyze" and any(
            j.kind == "extract" for j in jobs) else ""
        parts.append(f"# ---- {job.path}\n# sbatch --parsable{dep} {job.path}\n{job.text}")
    return "\n".join(parts) if parts else "# nothing to submit: every extraction task is done\n"


# --------------------------------------------------------------------------- waiting


def wait_for_jobs(job_ids: list[str], poll: float = 2.0, timeout: float | None = None) -> dict[str, str]:
    """Block until the jobs have left the queue; return each job's final state(s)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while queued(job_ids):
        if deadline is not None and time.monotonic() > deadline:
            raise PipelineError(f"SLURM jobs {', '.join(job_ids)} still queued after {timeout:.0f} s")
        time.sleep(poll)
    return {job_id: job_state(job_id) for job_id in job_ids}


def job_state(job_id: str) -> str:
    """Final state of a job (an array's distinct task states, joined), from scontrol."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    states = sorted({word.split("=", 1)[1] for line in proc.stdout.splitlines() for word in line.split()
                     if word.startswith("JobState=")})
    return ",".join(states) or "UNKNOWN"

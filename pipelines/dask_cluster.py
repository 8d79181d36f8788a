"""Where the analysis runs: Dask's threads, a cluster started here, or one that exists.

``dask`` section of a pipeline file (command-line options win)::

    dask:
      cluster: threads | local | slurm   # default: threads (no cluster)
      workers: 4                          # local: worker processes; slurm: worker jobs
      threads_per_worker: 1
      scheduler: tcp://host:8786          # an existing scheduler (overrides cluster)
      scheduler_file: /shared/sched.json  # or its scheduler file
      dashboard: ":8787"                  # the started scheduler's dashboard (default: off)
      no_workers_timeout: 60              # stop after this long without a worker (s, or "10m")

``local`` starts a ``distributed.LocalCluster`` of worker processes on this
machine (inside a SLURM job: on the job's allocation), with dask-cuda's
``LocalCUDACluster`` instead, one worker per GPU, where dask-cuda is installed
and a GPU is visible. ``slurm`` starts dask-jobqueue's ``SLURMCluster`` with the
pipeline file's ``slurm.analyze`` directives, one worker per job, and waits for
the first worker job to start (and stops if every worker job leaves the queue).
A started scheduler serves no dashboard unless ``dashboard`` asks for one: on a
shared node, port 8787 is often taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ckapipe.devices import gpu_available
from ckapipe.errors import PipelineError


@contextmanager
def dask_scheduler(config: dict, *, scheduler: str | None = None, scheduler_file: str | None = None,
                   workers: int | None = None, cluster: str | None = None, say: Callable[[str], None] = print,
                   job: dict | None = None, log_directory: str | None = None) -> Iterator[dict]:
    """Yield the ``scheduler``/``scheduler_file`` (and ``no_workers_timeout``) keywords of ``analyze.analyze``.

    An address or scheduler file (argument first, then the config) is used as
    is; otherwise ``cluster`` (the command line's, then the config's) decides,
    with ``workers`` (the same order) workers.
    """
    scheduler = scheduler or config.get("scheduler")
    scheduler_file = scheduler_file or config.get("scheduler_file")
    watch = {"no_workers_timeout": config["no_workers_timeout"]} if "no_workers_timeout" in config else {}
    if scheduler or scheduler_file:
        say(f"dask: using the scheduler at {scheduler or scheduler_file}")
        yield {"scheduler": scheduler, "scheduler_file": scheduler_file, **watch}
        return
    kind = cluster or config.get("cluster", "threads")
    if kind not in ("threads", "local", "slurm"):
        raise PipelineError(f"unknown Dask cluster {kind!r}: choose threads, local or slurm")
    if kind == "threads":
        yield {}
        return
    n = workers or config.get("workers") or default_workers()
    start = start_local_cluster if kind == "local" else start_slurm_cluster
    options = {"log_directory": log_directory} if kind == "slurm" else {}
    http = scheduler_http(config.get("dashboard", False))
    with start(n, config.get("threads_per_worker", 1), job or {}, say, http, **options) as cluster:
        yield {"scheduler": cluster.scheduler_address, **watch}


def scheduler_http(dashboard: str | bool) -> dict:
    """Scheduler keywords for its HTTP server: the dashboard at the address asked for (``true``:
    :8787), else none and a free port (a fixed default port clashes on a shared node)."""
    if dashboard is True:
        dashboard = ":8787"
    return {"dashboard": True, "dashboard_address": dashboard} if dashboard else {"dashboard": False,
                                                                                   "dashboard_address": ":0"}


def default_workers() -> int:
    """One worker per CPU of the SLURM allocation or of this machine, at least two."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_CPUS_ON_NODE")
    return max(2, int(cpus) if cpus else len(os.sched_getaffinity(0)))


@contextmanager
def start_local_cluster(n: int, threads: int, job: dict, say, http: dict):
    distributed = require_distributed()
    cuda = local_cuda_cluster()
    if cuda is not None:
        with cuda(dashboard_address=http["dashboard_address"] if http["dashboard"] else None,
                  scheduler_kwargs=http) as cluster:
            say(f"dask: LocalCUDACluster, {len(cluster.workers)} GPU workers at {cluster.scheduler_address}"
                + dashboard_note(cluster, http))
            yield cluster
        return
    with distributed.LocalCluster(n_workers=n, threads_per_worker=threads, processes=True,
                                  dashboard_address=None, scheduler_kwargs=http) as cluster:
        say(f"dask: LocalCluster, {n} worker processes at {cluster.scheduler_address}" + dashboard_note(cluster, http))
        yield cluster


def dashboard_note(cluster, http: dict) -> str:
    return f", dashboard {cluster.dashboard_link}" if http["dashboard"] else ""


def local_cuda_cluster():
    """dask-cuda's LocalCUDACluster when it is installed and a GPU is visible, else None."""
    try:
        from dask_cuda import LocalCUDACluster  # optional: dask_cuda (the cluster extra)
    except Exception:  # noqa: BLE001 - no dask-cuda (or a broken one): CPU workers
        return None
    return LocalCUDACluster if gpu_available("cupy") else None


@contextmanager
def start_slurm_cluster(n: int, threads: int, job: dict, say, http: dict, log_directory: str | None = None):
    require_distributed()
    try:
        from dask_jobqueue import SLURMCluster  # optional: dask_jobqueue (the cluster extra)
    except ImportError:
        raise PipelineError("dask.cluster: slurm needs dask-jobqueue: pip install 'ckapipe[cluster]'") from None
    extra = list(job.get("extra", []))
    if "gres" in job:
        extra.append(f"--gres={job['gres']}")
    cluster = SLURMCluster(
        cores=job.get("cpus_per_task", threads), processes=1, memory=job.get("mem", "4GB"),
        queue=job.get("partition"), account=job.get("account"), walltime=job.get("time", "01:00:00"),
        job_extra_directives=extra, job_script_prologue=list(job.get("setup", [])),
        python=sys.executable, log_directory=log_directory, scheduler_options=http,
    )
    with cluster:
        cluster.scale(jobs=n)
        say(f"dask: SLURMCluster, {n} worker jobs at {cluster.scheduler_address}{dashboard_note(cluster, http)}; "
            f"waiting for the first to start")
        wait_for_a_worker_job(cluster, log_directory)
        yield cluster


def wait_for_a_worker_job(cluster, log_directory, poll: float = 2.0) -> None:
    """Block until a worker job has connected: as long as the SLURM queue holds one, however long,
    but not once every worker job has left the queue without a worker connecting."""
    while not cluster.scheduler_info.get("workers"):
        ids = [job.job_id for job in cluster.workers.values() if getattr(job, "job_id", None)]
        if ids and not queued(ids):
            raise PipelineError(f"the Dask worker jobs {', '.join(ids)} left the SLURM queue without a worker "
                                f"connecting: see their logs in {log_directory}")
        time.sleep(poll)


def queued(job_ids: list[str]) -> bool:
    """Whether any of the SLURM jobs is still in the queue (``squeue``): a worker job here, a study's jobs in slurm."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
    return bool(proc.stdout.strip())


def require_distributed():
    try:
        import distributed  # optional: distributed (the cluster extra)
    except ImportError:
        raise PipelineError("a Dask cluster needs distributed: pip install 'ckapipe[cluster]'") from None
    return distributed

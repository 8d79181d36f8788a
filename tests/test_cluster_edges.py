"""A Dask cluster's edges, as a cluster user meets them: each case ends in correct results or in
one line and exit status 2.

The scheduler and workers are separate processes (``dask scheduler``, ``dask worker``), as
separate jobs would be; the analysis runs as the ``ckapipe analyze`` command.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.pipelines import run_study
from ckapipe.pipelines.study import PipelineError, load_study
from ckapipe.store import find_runs
from tests.pipeline_helpers import DEFAULT

import distributed  # noqa: E402 - the test extra brings it

DASK = (sys.executable, "-m", "dask")  # this environment's dask (a copied venv's scripts may point elsewhere)
RUNS = ["cnn3-s0", "cnn3-s1"]


@pytest.fixture(scope="module")
def study(default_study):
    return default_study


@pytest.fixture(scope="module")
def threaded(study):
    """The two runs analysed in this process with Dask's threads: the reference."""
    return analyze.analyze(study["cache"], RUNS, progress=False)


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.1)
    return value


@contextmanager
def dask_cluster(tmp_path: Path, *, cwd: Path, nanny: bool = True, scheduler_env: dict | None = None,
                 wrap: tuple = ()):
    """A scheduler and one single-threaded worker, started in ``cwd``; yields (scheduler file, client).
    ``wrap`` prefixes the worker's command (another mount namespace)."""
    path = tmp_path / "scheduler.json"
    common = ["--scheduler-file", str(path), "--no-dashboard"]
    env = {**os.environ, **(scheduler_env or {})}
    logs = open(tmp_path / "dask.log", "w")
    procs = [subprocess.Popen([*DASK, "scheduler", "--port", "0", *common], cwd=cwd, env=env, stderr=logs)]
    try:
        wait_for(path.exists, "scheduler file")
        procs.append(subprocess.Popen([*wrap, *DASK, "worker", "--nthreads", "1", "--local-directory",
                                       str(tmp_path / "worker-space"), *([] if nanny else ["--no-nanny"]), *common],
                                      cwd=cwd, stderr=logs))
        with distributed.Client(scheduler_file=str(path)) as client:
            client.wait_for_workers(1, timeout=120)
            yield path, client
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logs.close()


def ckapipe(*args, cwd, env=None, timeout=300) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ckapipe", *map(str, args)], cwd=cwd, text=True,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_line_exit_2(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The command's single stderr line, after asserting that it exited with status 2."""
    _, stderr = proc.communicate(timeout=timeout)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, stderr)
    return lines[0]


def test_a_relative_cache_reaches_a_worker_in_another_directory(study, threaded, tmp_path):
    """``--cache cache`` from the client's directory; the worker runs elsewhere: the same numbers."""
    client_dir, worker_dir = tmp_path / "client", tmp_path / "workers"
    client_dir.mkdir()
    worker_dir.mkdir()
    (client_dir / "cache").symlink_to(study["cache"])
    with dask_cluster(tmp_path, cwd=worker_dir) as (scheduler_file, client):
        proc = ckapipe("analyze", "-q", "--cache", "cache", *RUNS, "--scheduler-file", scheduler_file,
                       "--out", "out", cwd=client_dir)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        worked = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert sum(worked.values()) > 0
    out = analyze.load_results(client_dir / "out")
    np.testing.assert_allclose(out.hsic, threaded.hsic, rtol=1e-12, atol=0)
    assert all(Path(entry.path).is_absolute() for entry in out.runs)


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not unshare_works(), reason="needs unshare --mount (root) to hide the cache from a worker")
def test_a_worker_that_cannot_see_the_cache_is_named(study, tmp_path):
    """The worker runs in a mount namespace where the cache's directory is an empty tmpfs, as on a
    node that does not mount the shared filesystem."""
    cache = tmp_path / "hidden" / "cache"
    shutil.copytree(study["cache"], cache, ignore=shutil.ignore_patterns("models"))
    hide = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs none "{cache.parent}" && exec "$0" "$@"')
    with dask_cluster(tmp_path, cwd=tmp_path, wrap=hide) as (scheduler_file, client):
        proc = ckapipe("analyze", "-q", "--cache", cache, *RUNS, "--scheduler-file", scheduler_file,
                       "--out", tmp_path / "out", cwd=tmp_path)
        line = one_line_exit_2(proc)
        (worker,) = client.scheduler_info()["workers"]
    assert line.startswith(f"ckapipe: error: Dask worker {worker} on host ") and "cannot see run store" in line, line
    assert str(cache) in line and not (tmp_path / "out").exists()


@contextmanager
def stuck_read(study, tmp_path):
    """A copy of the cache in which one chunk of cnn3-s1 is a FIFO nobody writes: the task that reads
    it never returns (a hung filesystem). Yields (cache, is_stuck): is_stuck() is true once a process
    has opened the FIFO; the write end is then held open so that the read blocks instead of ending."""
    cache = tmp_path / "cache"
    for run in find_runs(study["cache"], RUNS):
        shutil.copytree(run.path, cache / run.name, ignore=shutil.ignore_patterns("grams"))
    (store,) = [p for p in cache.iterdir() if p.name.startswith("cnn3-s1-")]
    chunk = store / "layers" / "block1" / "c" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    os.mkfifo(chunk)
    held = []

    def is_stuck() -> bool:
        if not held:
            try:
                held.append(os.open(chunk, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
        return bool(held)

    try:
        yield cache, is_stuck
    finally:
        for fd in held:
            os.close(fd)


def kill_worker(client) -> None:
    """SIGKILL the worker process (as the OOM killer or an administrator would)."""
    (pid,) = client.run(os.getpid).values()
    os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_with_no_allowed_failures_ends_in_one_line(study, tmp_path):
    with stuck_read(study, tmp_path) as (cache, is_stuck), dask_cluster(
            tmp_path, cwd=tmp_path, scheduler_env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}) as (
            scheduler_file, client):
        proc = ckapipe("analyze", "-q", "--no-gram-cache", "--cache", cache, *RUNS, "--scheduler-file",
                       scheduler_file, "--out", tmp_path / "out", cwd=tmp_path)
        wait_for(is_stuck, "worker reading the stuck chunk")
        kill_worker(client)
        line = one_line_exit_2(proc)
    task = r"(features-\d+-\d \(Grams of run cnn3-s[01]-\w+, |minibatch-hsic-\d+ \(HSIC of )minibatches \d+-\d+\)"
    assert re.fullmatch(rf"ckapipe: error: Dask task {task} failed: the worker running it \(tcp://[\d.:]+\) died, "
                        r"and distributed.scheduler.allowed-failures is 0; the workers' logs say why they died "
                        r"\(memory limit, killed\)", line), line
    assert not (tmp_path / "out").exists()


def test_the_last_worker_killed_stops_the_analysis_after_the_no_workers_timeout(study, tmp_path):
    with stuck_read(study, tmp_path) as (cache, is_stuck), dask_cluster(tmp_path, cwd=tmp_path, nanny=False) as (
            scheduler_file, client):
        proc = ckapipe("analyze", "-q", "--no-gram-cache", "--cache", cache, *RUNS, "--scheduler-file",
                       scheduler_file, "--out", tmp_path / "out", cwd=tmp_path,
                       env={"DASK_CKAPIPE__NO_WORKERS_TIMEOUT": "2s"})
        wait_for(is_stuck, "worker reading the stuck chunk")
        kill_worker(client)
        line = one_line_exit_2(proc)
    assert line.startswith(f"ckapipe: error: the Dask scheduler {scheduler_file} has had no worker for 2 s: "
                           f"analysis stopped with "), line
    assert "DASK_CKAPIPE__NO_WORKERS_TIMEOUT" in line and not (tmp_path / "out").exists()


@pytest.fixture
def port_8787_taken():
    """Port 8787 (Dask's dashboard) held by someone else, as on a shared node."""
    import socket

    taken = socket.socket()
    try:
        taken.bind(("", 8787))
        taken.listen()
    except OSError:
        pass  # someone else holds it already: the same situation
    yield
    taken.close()


@pytest.mark.parametrize("cluster, started", [
    ("local", "LocalCluster, 1 worker processes"),
    pytest.param("slurm", "SLURMCluster, 1 worker jobs", marks=pytest.mark.slurm),  # on a real SLURM
])
def test_a_started_scheduler_serves_no_dashboard_and_leaves_its_port_alone(study, tmp_path, port_8787_taken,
                                                                           cluster, started):
    """``--dask-cluster local|slurm`` with port 8787 taken: no port-clash warning, no dashboard, same numbers."""
    results = tmp_path / "results"
    shutil.copytree(study["results"] / "default" / "runs", results / "default" / "runs")
    lines = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*already in use")
        out = run_study(DEFAULT, "analyze", cache=study["cache"], results=results, dask_cluster=cluster,
                        dask_workers=1, progress=False, say=lines.append)
    assert any(started in line and "dashboard" not in line for line in lines), lines
    reference = analyze.load_results(study["results"] / "default" / "seeds")
    np.testing.assert_allclose(out["seeds"].hsic, reference.hsic, rtol=1e-12, atol=0)


def test_results_without_run_records_find_the_runs_in_the_cache(study, tmp_path):
    """``--out NEWDIR``: the runs are found in the cache by name and settings, recorded, analysed."""
    lines = []
    out = run_study(DEFAULT, "analyze", cache=study["cache"], results=tmp_path / "new", progress=False,
                    say=lines.append)
    records = sorted(p.name for p in (tmp_path / "new" / "default" / "runs").iterdir())
    assert records == ["cnn2-s0.json", "cnn3-s0.json", "cnn3-s1.json", "mlp3-s0.json"]
    reference = analyze.load_results(study["results"] / "default" / "architecture")
    np.testing.assert_allclose(out["architecture"].hsic, reference.hsic, rtol=1e-12, atol=0)


def test_results_without_run_records_and_no_fitting_store_say_so_before_a_cluster(study, tmp_path):
    """The file now asks for another minibatch size: the cached stores do not fit, and the error
    says what is missing before any Dask cluster is started."""
    pipeline = tmp_path / "study.yaml"
    pipeline.write_text(DEFAULT.read_text().replace("batch_size: 64", "batch_size: 32"))
    lines = []
    with pytest.raises(PipelineError) as err:
        run_study(pipeline, "analyze", cache=study["cache"], results=tmp_path / "new", dask_cluster="local",
                  progress=False, say=lines.append)
    message = str(err.value)
    assert f"run 'cnn3-s0' has no run record in {tmp_path / 'new' / 'default' / 'runs'}" in message, message
    assert "hold other settings: run the extract stage first" in message and "\n" not in message
    assert not any(line.startswith("dask:") for line in lines), lines


def test_an_analysis_job_without_run_records_is_refused_before_submission(study, tmp_path):
    """``--slurm --stage analyze`` into a results directory the runs are not in: refused at once
    (the job would fail later), naming what is missing."""
    with pytest.raises(PipelineError, match=r"run 'cnn3-s0' has not been extracted"):
        run_study(DEFAULT, "analyze", slurm=True, dry_run=True, cache=tmp_path / "empty", results=tmp_path / "r",
                  say=lambda line: None)
    assert not (tmp_path / "r").exists()
    loaded = load_study(DEFAULT, cache=study["cache"], results=tmp_path / "r2")
    lines = []
    run_study(DEFAULT, "analyze", slurm=True, dry_run=True, cache=loaded.cache, results=tmp_path / "r2",
              say=lines.append)
    assert "--stage analyze" in "\n".join(lines) and not (tmp_path / "r2").exists()  # found, nothing written

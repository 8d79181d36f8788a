"""The analysis engine: minibatch CKA of every pair of layers of a set of runs, with Dask.

For every analysis minibatch k (DESIGN.md, "The analysis algorithm"):

    T_k = [ triu U(X_k^l X_k^lᵀ) for every layer l of every run ]     (L × m(m-1)/2)
    H_k = 2 T_k T_kᵀ / (m (m - 3))                                    (L × L, HSIC_1)

and CKA = Σ_k H_k[a, b] / sqrt(Σ_k H_k[a, a] Σ_k H_k[b, b]) (Nguyen, Raghu &
Kornblith 2021). One Dask task handles a group of consecutive minibatches
aligned to the stored chunks of every run, so each chunk of each layer is read
once; it returns its small H_k matrices, and only those are gathered: memory
is bounded by a few tasks' activations, whatever N is.
"""

from __future__ import annotations

import math
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ckapipe.blas import single_threaded_blas
from ckapipe.analyze.grams import RunSource, create_gram_caches, plan_source, run_triangles
from ckapipe.kernels import PRODUCTS, hsic1_matrix, to_host
from ckapipe.analyze.pairing import Pairing, analysis_batch_size, plan_pairing
from ckapipe.analyze.results import Results, RunEntry, check_out, recorded_inputs, write_results
from ckapipe.devices import resolve_device
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.progress import Progress
from ckapipe.store import Run, find_runs, open_run

MINIBATCHES_PER_TASK = 4
TASK_TRIANGLE_BYTES = 512 * 2**20  # a task's stacked Gram triangles stay under this (fewer minibatches if needed)
TASK_ACTIVATION_BYTES = 512 * 2**20  # and one run's activations read by one task


@dataclass(frozen=True)
class Plan:
    """Everything an analysis will do, decided before any activation is read."""

    runs: tuple[Run, ...]
    pairing: Pairing
    sources: tuple[RunSource, ...]
    tasks: tuple[tuple[int, ...], ...]  # minibatch indices per task
    precision: str = "float64"  # of the Gram products computed from activations

    @property
    def inputs(self) -> dict:
        """What determines the numbers; recorded in the results to tell whether they are up to date."""
        return {
            "runs": [{"name": r.name, "key": r.key} for r in self.runs],
            "m": self.pairing.m,
            "pairing": self.pairing.mode,
            "minibatches": list(self.pairing.minibatches),
            "precision": self.precision,
        }


def plan_analysis(
    cache, runs: Sequence[str | Run], *, pair_by_position=False, batch_size=None,
    completed_only=False, use_gram_cache=True, precision="float64",
) -> Plan:
    """Resolve the runs, check that they pair, choose m and cut the work into tasks.

    Grams computed with float32 products are used but never cached, so the
    cache only ever holds float64 Grams.
    """
    if precision not in PRODUCTS:
        raise CkapipeError(f"precision {precision!r} is not one of {', '.join(PRODUCTS)}")
    resolved = resolve_runs(cache, runs)
    m = analysis_batch_size(resolved, batch_size)
    pairing = plan_pairing(resolved, m, pair_by_position, completed_only)
    sources = tuple(plan_source(run, m, use_gram_cache, fill_cache=precision == "float64") for run in resolved)
    tasks = task_groups(pairing.minibatches, m, [r.batch_size for r in resolved], per_task(m, resolved))
    return Plan(tuple(resolved), pairing, sources, tasks, precision)


def resolve_runs(cache, runs: Sequence[str | Run]) -> list[Run]:
    """The runs' stores at absolute paths: Dask workers need not share the client's directory."""
    if not runs:
        raise CkapipeError("name at least one run to analyse")
    if all(isinstance(r, Run) for r in runs):
        return [r if r.path.is_absolute() else open_run(r.path.absolute()) for r in runs]
    return find_runs(Path(cache).absolute(), [r.name if isinstance(r, Run) else r for r in runs])


def per_task(m: int, runs: Sequence[Run]) -> int:
    """Minibatches per task: MINIBATCHES_PER_TASK, fewer when their triangles
    (layers × m(m-1)/2 float64 each) would exceed TASK_TRIANGLE_BYTES or one run's
    activations (m × D float32-or-wider per layer) would exceed TASK_ACTIVATION_BYTES.

    The second bound also splits large-D studies into more tasks for the cores:
    one 224 px ResNet-34 minibatch is 1.4 GB of float32 activations.
    """
    one = sum(len(r.layer_names) for r in runs) * m * (m - 1) // 2 * 8
    activations = max((activation_bytes(r, m) for r in runs), default=0)
    return max(1, min(MINIBATCHES_PER_TASK, TASK_TRIANGLE_BYTES // max(one, 1),
                      TASK_ACTIVATION_BYTES // max(activations, 1)))


def activation_bytes(run: Run, m: int) -> int:
    """Bytes of one minibatch of m rows of every stored layer of a run (0 for a grams-only run)."""
    if run.grams_only:
        return 0
    return sum(m * int(np.prod(run.layer(layer).shape[1:])) * run.layer(layer).dtype.itemsize for layer in run.layer_names)


def task_groups(minibatches: Sequence[int], m: int, chunk_sizes: Sequence[int], per_task: int = MINIBATCHES_PER_TASK):
    """Consecutive minibatches grouped into tasks that never split a stored chunk.

    A unit of lcm(m, every chunk size) rows is read whole by one task; a task
    takes as many units as make about ``per_task`` minibatches.
    """
    unit = math.lcm(m, *chunk_sizes) // m  # minibatches per unit
    units_per_task = max(1, round(per_task / unit))
    groups: dict[int, list[int]] = {}
    for k in minibatches:
        groups.setdefault(k // (unit * units_per_task), []).append(k)
    return tuple(tuple(ks) for ks in groups.values())


def source_triangles(source: RunSource, ks: Sequence[int], m: int, device: str = "cpu",
                     precision: str = "float64") -> np.ndarray:
    """(len(ks), layers, m(m-1)/2) U-centred Gram triangles of one run, on the host: one Dask task.

    Triangles are independent of D (256 KB per layer and minibatch at m = 256), so
    moving them to the task that multiplies them costs little, and the runs of a
    minibatch group are read and reduced side by side instead of in one task.
    """
    return to_host(run_triangles(source, ks, m, array_namespace(device), precision))


def group_hsic(triangles: Sequence[np.ndarray]) -> np.ndarray:
    """(len(ks), L, L) HSIC_1 of every pair of layers of every run, per minibatch, from the
    triangles of every run of one minibatch group (``source_triangles``, in run order)."""
    sizes = [t.shape[1] for t in triangles]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    out = np.empty((triangles[0].shape[0], ends[-1], ends[-1]))
    for a, ta in enumerate(triangles):  # block by block: no concatenated copy of every run's triangles
        for b in range(a, len(triangles)):
            rows, cols = slice(starts[a], ends[a]), slice(starts[b], ends[b])
            for k in range(len(ta)):
                out[k, rows, cols] = hsic1_matrix(ta[k], None if b == a else triangles[b][k])
                out[k, cols, rows] = out[k, rows, cols].T
    return out


def compute(plan: Plan, device: str = "cpu", scheduler=None, scheduler_file=None, progress=True,
            no_workers_timeout=None) -> np.ndarray:
    """Run the plan's tasks on Dask; (n_minibatches, L, L) in minibatch order.

    One task per run and minibatch group computes that run's Gram triangles; one
    task per group multiplies the triangles of every run (the cross-run HSIC
    needs them together). Splitting by run lets the cores share a study with
    few minibatch groups (W2 of the bench at N = 512, 224 px: one group, so two
    tasks instead of one).
    """
    import dask

    m = plan.pairing.m
    sources = create_gram_caches(plan.sources, m)  # execution writes; the plan only read
    tasks = [
        dask.delayed(group_hsic, pure=True)(
            [dask.delayed(source_triangles, pure=True)(source, ks, m, device, plan.precision,
                                                       dask_key_name=f"triangles-{i}-{j}")
             for j, source in enumerate(sources)],
            dask_key_name=f"minibatch-hsic-{i}",
        )
        for i, ks in enumerate(plan.tasks)
    ]
    if scheduler is None and scheduler_file is None:
        with single_threaded_blas(device == "cpu"):
            parts = _compute_threaded(tasks, progress)
    else:
        parts = _compute_distributed(tasks, scheduler, scheduler_file, progress, plan, no_workers_timeout)
    return np.concatenate(parts, axis=0)


def _compute_threaded(tasks, progress):
    import dask
    from dask.callbacks import Callback

    bar = _bar(len(tasks), progress)

    class Tick(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, str) and key.startswith("minibatch-hsic-"):
                bar.update(1)

    try:
        with Tick():
            return list(dask.compute(*tasks, scheduler="threads"))
    finally:
        bar.close()


def _compute_distributed(tasks, scheduler, scheduler_file, progress, plan: Plan, no_workers_timeout=None):
    """The tasks on a Dask cluster. Every way a cluster can fail ends in one CkapipeError:
    a worker that cannot see a store (named), a task whose workers kept dying
    (``KilledWorker``: named, with the worker), no worker for ``no_workers_timeout``."""
    timeout = _no_workers_timeout(no_workers_timeout)
    client, own = _client(scheduler, scheduler_file)
    stores = [str(run.path) for run in plan.runs]
    bar = _bar(len(tasks), progress)
    futures = []
    try:
        _check_workers_see(client, stores)
        futures = client.compute(tasks)
        for future in _as_completed(client, futures, timeout, scheduler_file or scheduler):
            if future.status == "error":
                _raise_task_error(client, future, plan, stores)
            bar.update(1)
        return client.gather(futures)
    finally:
        bar.close()
        if own:
            client.close()
        else:
            client.cancel(futures)


def _client(scheduler, scheduler_file):
    """(client, whether we own it): a Client given by the caller, or one connected here."""
    try:
        from distributed import Client
    except ImportError:
        raise CkapipeError("a Dask cluster needs the distributed package: pip install 'ckapipe[cluster]'") from None
    if hasattr(scheduler, "compute"):
        return scheduler, False
    try:
        client = Client(scheduler_file=str(scheduler_file)) if scheduler_file else Client(scheduler, timeout="30s")
    except (OSError, TimeoutError, ValueError) as err:
        raise CkapipeError(f"cannot connect to the Dask scheduler {scheduler_file or scheduler}: {err}") from None
    return client, True


NO_WORKERS_TIMEOUT = "60s"  # default of the Dask config key ckapipe.no-workers-timeout
WATCH_SECONDS = 1.0  # how often a waiting analysis asks the scheduler for its workers


def _no_workers_timeout(value=None) -> float:
    """Seconds an analysis waits without any Dask worker: ``value``, else the Dask config key
    ``ckapipe.no-workers-timeout`` (env ``DASK_CKAPIPE__NO_WORKERS_TIMEOUT``), else 60 s."""
    import dask
    from dask.utils import parse_timedelta

    value = value if value is not None else dask.config.get("ckapipe.no-workers-timeout", NO_WORKERS_TIMEOUT)
    try:
        return float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError):
        raise CkapipeError(f"no-workers timeout {value!r} is not a duration such as 60, 90s or 10m") from None


def _as_completed(client, futures, timeout: float, where):
    """Yield the futures as they finish; stop with one line when the scheduler has had no worker
    for ``timeout`` seconds (its tasks would wait for ever)."""
    from distributed import wait

    pending, alone_since = set(futures), None
    while pending:
        try:
            done, pending = wait(pending, timeout=WATCH_SECONDS, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = ()
        yield from done
        if done or client.nthreads():
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since > timeout:
            raise CkapipeError(
                f"the Dask scheduler {where} has had no worker for {timeout:.0f} s: analysis stopped with "
                f"{len(pending)} of {len(futures)} tasks left; start workers and run it again, or wait longer "
                f"(Dask config ckapipe.no-workers-timeout, e.g. DASK_CKAPIPE__NO_WORKERS_TIMEOUT=10m)")


def _raise_task_error(client, future, plan: Plan, stores) -> None:
    """A failed task's error as one line where it is the cluster's doing; else the task's own error."""
    from distributed import KilledWorker

    err = future.exception()
    if isinstance(err, KilledWorker):
        n = err.allowed_failures
        died = (f"the worker running it ({err.last_worker.address}) died" if n == 0 else
                f"the {n + 1} workers that ran it died, the last one {err.last_worker.address}")
        raise CkapipeError(
            f"Dask task {err.task} ({task_label(plan, err.task)}) failed: {died}, and "
            f"distributed.scheduler.allowed-failures is {n}; the workers' logs say why they died "
            f"(memory limit, killed)") from None
    if isinstance(err, (OSError, CkapipeError)):
        _check_workers_see(client, stores)  # a worker that joined later and cannot see a store
    future.result()  # the task's own error, with its traceback


def task_label(plan: Plan, key) -> str:
    """What a task key of ``compute`` stands for: its run and minibatches."""
    parts = str(key).rsplit("-", 2) if str(key).startswith("triangles-") else str(key).rsplit("-", 1)
    try:
        ks = plan.tasks[int(parts[1])]
        span = f"minibatches {ks[0]}-{ks[-1]}"
        return f"Grams of run {plan.runs[int(parts[2])].name}, {span}" if len(parts) == 3 else f"HSIC of {span}"
    except (IndexError, ValueError):
        return "an analysis task"


def _check_workers_see(client, stores) -> None:
    """Every worker can open every run store, or a StoreError naming the first worker that cannot."""
    seen = client.run(_unseen_stores, stores, on_error="ignore")
    for worker, (host, unseen) in sorted(seen.items()):
        if unseen:
            more = f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else ""
            raise StoreError(
                f"Dask worker {worker} on host {host} cannot see run store {unseen[0]}{more}: run the workers "
                f"where the cache is at the same path (a filesystem shared by every node)")


def _unseen_stores(stores) -> tuple[str, list[str]]:
    """On a worker: its host name, and the stores it cannot see."""
    return socket.gethostname(), [s for s in stores if not (Path(s) / "zarr.json").is_file()]


def _bar(total, progress):
    return Progress(total, "analyze", "tasks", enabled=progress and total > 1)


def array_namespace(device: str):
    """numpy for "cpu", cupy for "cuda"."""
    if device.startswith("cuda"):
        import cupy

        return cupy
    return np


# --------------------------------------------------------------------------- the API


def analyze(
    cache, runs, *, out=None, pair_by_position=False, batch_size=None, device="auto", scheduler=None,
    scheduler_file=None, completed_only=False, overwrite=False, use_gram_cache=True, progress=True,
    precision="float64", no_workers_timeout=None,
) -> Results:
    """Minibatch CKA of every pair of layers of the named runs (each run with itself too).

    ``runs`` are names or globs resolved in ``cache`` (see ``extract.store.find_runs``).
    Writes the results store to ``out`` when given (refusing an existing one unless
    ``overwrite``) and returns the results. ``precision="float32"`` computes the
    Gram products of the (float64-centred) features in float32: up to ~2x faster
    products on CPUs, about 1e-9 off in CKA; such Grams are not cached. On a Dask
    cluster (``scheduler``: address or Client; ``scheduler_file``) the analysis stops
    after ``no_workers_timeout`` without workers (default: Dask config
    ``ckapipe.no-workers-timeout``, 60 s).
    """
    if out is not None:
        check_out(out, overwrite)
    plan = plan_analysis(
        cache, runs, pair_by_position=pair_by_position, batch_size=batch_size,
        completed_only=completed_only, use_gram_cache=use_gram_cache, precision=precision,
    )
    if progress:
        for note in plan.pairing.notes:
            print(f"ckapipe: note: {note}", file=sys.stderr)
    hsic = compute(plan, resolve_device(device, "cupy"), scheduler, scheduler_file, progress, no_workers_timeout)
    entries = [RunEntry(r.name, r.slug, r.key, tuple(r.layer_names), str(r.path)) for r in plan.runs]
    results = Results(entries, hsic, np.asarray(plan.pairing.minibatches), plan.inputs, list(plan.pairing.notes))
    results.cka_all  # warns once about constant layers (CKA undefined, NaN)
    if out is not None:
        write_results(results, out, overwrite=overwrite)
    return results


def is_up_to_date(out, cache, runs, **options) -> bool:
    """True when ``out`` holds results computed from exactly what ``analyze(cache, runs, **options)``
    would use now (same run keys, m, pairing and minibatches)."""
    if not Path(out).is_dir():
        return False
    recorded = recorded_inputs(out)
    if recorded is None:
        return False
    planning = {k: options[k] for k in ("pair_by_position", "batch_size", "completed_only", "precision") if k in options}
    try:
        plan = plan_analysis(cache, runs, **planning, use_gram_cache=False)
    except CkapipeError:
        return False
    return recorded == plan.inputs



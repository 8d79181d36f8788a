"""The analysis engine: minibatch CKA (and the other measures) of every pair of layers of a set
of runs, with Dask.

For every analysis minibatch k (docs/design.md, "The analysis algorithm"):

    C_k = [ X̃_k^l X̃_k^lᵀ for every layer l of every run ]           (the Gram cache's rows)
    H_k = HSIC_1 of every pair of layers, from C_k                    (L × L)

and CKA = Σ_k H_k[a, b] / sqrt(Σ_k H_k[a, a] Σ_k H_k[b, b]) (Nguyen, Raghu &
Kornblith 2021); the other measures (``analyze.measures``) come from the same
C_k. One Dask task per run and group of consecutive minibatches (aligned to the
stored chunks of every run, so each chunk of each layer is read once) turns the
run's Grams into per-layer features; one task per group multiplies the features
of every run; only the small per-minibatch L × L statistics are gathered: memory
is bounded by a few tasks' activations, whatever N is.
"""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import dask
import numpy as np
from dask.callbacks import Callback
from dask.utils import parse_timedelta

from ckapipe.blas import single_threaded_blas
from ckapipe.analyze.grams import RunSource, create_gram_caches, feature_sizes, plan_source, run_grams
from ckapipe.analyze.measures import DEFAULT, Measure, group_statistics, layer_features, layer_rankme, parse_measures
from ckapipe.kernels import PRODUCTS, to_host
from ckapipe.analyze.pairing import MINIBATCHES_PER_TASK, Pairing, analysis_batch_size, plan_pairing, task_groups
from ckapipe.analyze.stats import Resampling
from ckapipe.analyze.uncertainty import add_permutation_test
from ckapipe.analyze.results import Results, RunEntry, write_results
from ckapipe.devices import array_namespace, resolve_device
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.progress import Progress
from ckapipe.store import Run, find_runs, open_run
from ckapipe.store.results import check_out, recorded_inputs

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
    measures: tuple[Measure, ...] = (Measure(DEFAULT),)  # the first is the results' cka
    rankme: bool = False  # minibatch RankMe of every layer too

    @property
    def inputs(self) -> dict:
        """What determines the numbers; recorded in the results to tell whether they are up to date.
        (Measures and RankMe only when asked for, so results of plain linear CKA keep their inputs.)"""
        inputs = {
            "runs": [{"name": r.name, "key": r.key} for r in self.runs],
            "m": self.pairing.m,
            "pairing": self.pairing.mode,
            "minibatches": list(self.pairing.minibatches),
            "precision": self.precision,
        }
        if [mm.name for mm in self.measures] != [DEFAULT]:
            inputs["measures"] = [mm.name for mm in self.measures]
        if self.rankme:
            inputs["rankme"] = True
        return inputs


def plan_analysis(
    cache, runs: Sequence[str | Run], *, pair_by_position=False, batch_size=None,
    completed_only=False, use_gram_cache=True, precision="float64", measures=DEFAULT, rankme=False,
) -> Plan:
    """Resolve the runs and measures, check that they pair, choose m and cut the work into tasks.

    Grams computed with float32 products are used but never cached, so the
    cache only ever holds float64 Grams.
    """
    if precision not in PRODUCTS:
        raise CkapipeError(f"precision {precision!r} is not one of {', '.join(PRODUCTS)}")
    chosen = parse_measures(measures)
    resolved = resolve_runs(cache, runs)
    m = analysis_batch_size(resolved, batch_size)
    for measure in chosen:
        measure.check(m)
    pairing = plan_pairing(resolved, m, pair_by_position, completed_only)
    centered = rankme or any(measure.centered for measure in chosen)
    sources = tuple(plan_source(run, m, use_gram_cache, fill_cache=precision == "float64", centered=centered,
                                minibatches=pairing.minibatches) for run in resolved)
    tasks = task_groups(pairing.minibatches, m, [r.batch_size for r in resolved], per_task(m, resolved, chosen))
    return Plan(tuple(resolved), pairing, sources, tasks, precision, chosen, bool(rankme))


def resolve_runs(cache, runs: Sequence[str | Run]) -> list[Run]:
    """The runs' stores at absolute paths: Dask workers need not share the client's directory."""
    if not runs:
        raise CkapipeError("name at least one run to analyse")
    if all(isinstance(r, Run) for r in runs):
        return [r if r.path.is_absolute() else open_run(r.path.absolute()) for r in runs]
    return find_runs(Path(cache).absolute(), [r.name if isinstance(r, Run) else r for r in runs])


def per_task(m: int, runs: Sequence[Run], measures: Sequence[Measure] = (Measure(DEFAULT),)) -> int:
    """Minibatches per task: MINIBATCHES_PER_TASK, fewer when their Grams and the measures'
    features (layers × about m² float64 each) would exceed TASK_TRIANGLE_BYTES or one run's
    activations (m × D float32-or-wider per layer) would exceed TASK_ACTIVATION_BYTES.

    The second bound also splits large-D studies into more tasks for the cores:
    one 224 px ResNet-34 minibatch is 1.4 GB of float32 activations.
    """
    width = m * (m + 1) // 2 + sum(measure.width(m) for measure in measures)
    one = sum(len(r.layer_names) for r in runs) * width * 8
    activations = max((activation_bytes(r, m) for r in runs), default=0)
    return max(1, min(MINIBATCHES_PER_TASK, TASK_TRIANGLE_BYTES // max(one, 1),
                      TASK_ACTIVATION_BYTES // max(activations, 1)))


def activation_bytes(run: Run, m: int) -> int:
    """Bytes of one minibatch of m rows of every stored layer of a run (0 for a grams-only run)."""
    if run.grams_only:
        return 0
    return sum(m * int(np.prod(run.layer(layer).shape[1:])) * run.layer(layer).dtype.itemsize for layer in run.layer_names)


def source_features(source: RunSource, ks: Sequence[int], m: int, device: str = "cpu", precision: str = "float64",
                    measures: Sequence[Measure] = (Measure(DEFAULT),), rankme: bool = False) -> dict:
    """One Dask task: the run's Grams of minibatches ks (``run_grams``) turned into each measure's
    per-layer features, on the host, by measure name (and ``rankme``: (len(ks), layers)).

    Features are independent of D (about m² numbers per layer and minibatch), so moving them to
    the task that multiplies them costs little, and the runs of a minibatch group are read
    and reduced side by side instead of in one task.
    """
    rows = run_grams(source, ks, m, array_namespace(device), precision)
    out = {measure.name: {name: to_host(values) for name, values in layer_features(measure, rows).items()}
           for measure in measures}
    if rankme:
        out["rankme"] = to_host(layer_rankme(rows, feature_sizes(open_run(source.path), m)))
    return out


def group_measures(features: Sequence[dict], measures: Sequence[Measure], rankme: bool = False) -> dict:
    """One Dask task: {measure name: (len(ks), L, L)} statistics of every pair of layers of every run,
    per minibatch, from the features of every run of one minibatch group (in run order)."""
    out = {measure.name: group_statistics(measure, [f[measure.name] for f in features]) for measure in measures}
    if rankme:
        out["rankme"] = np.concatenate([f["rankme"] for f in features], axis=1)
    return out


def compute(plan: Plan, device: str = "cpu", scheduler=None, scheduler_file=None, progress=True,
            no_workers_timeout=None) -> dict:
    """Run the plan's tasks on Dask; {measure name: (n_minibatches, L, L)} in minibatch order
    (and "rankme": (n_minibatches, L) when the plan asks for it).

    One task per run and minibatch group computes that run's features; one task
    per group multiplies the features of every run (the cross-run statistics
    need them together). Splitting by run lets the cores share a study with
    few minibatch groups (a small study at 224 px is one group).
    """
    m = plan.pairing.m
    sources = create_gram_caches(plan.sources, m)  # execution writes; the plan only read
    tasks = [
        dask.delayed(group_measures, pure=True)(
            [dask.delayed(source_features, pure=True)(source, ks, m, device, plan.precision, plan.measures,
                                                      plan.rankme, dask_key_name=f"features-{i}-{j}")
             for j, source in enumerate(sources)],
            plan.measures, plan.rankme,
            dask_key_name=f"minibatch-hsic-{i}",
        )
        for i, ks in enumerate(plan.tasks)
    ]
    if scheduler is None and scheduler_file is None:
        with single_threaded_blas(device == "cpu"):
            parts = _compute_threaded(tasks, progress)
    else:
        parts = _compute_distributed(tasks, scheduler, scheduler_file, progress, plan, no_workers_timeout)
    return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}


def _compute_threaded(tasks, progress):
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
        from distributed import Client  # optional: distributed (the cluster extra)
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
    value = value if value is not None else dask.config.get("ckapipe.no-workers-timeout", NO_WORKERS_TIMEOUT)
    try:
        return float(parse_timedelta(value, default="s"))
    except (TypeError, ValueError, KeyError):
        raise CkapipeError(f"no-workers timeout {value!r} is not a duration such as 60, 90s or 10m") from None


def _as_completed(client, futures, timeout: float, where):
    """Yield the futures as they finish; stop with one line when the scheduler has had no worker
    for ``timeout`` seconds (its tasks would wait for ever)."""
    from distributed import wait  # optional: distributed (the cluster extra)

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
    from distributed import KilledWorker  # optional: distributed (the cluster extra)

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
    parts = str(key).rsplit("-", 2) if str(key).startswith("features-") else str(key).rsplit("-", 1)
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


# --------------------------------------------------------------------------- the API


def analyze(
    cache, runs, *, out=None, pair_by_position=False, batch_size=None, device="auto", scheduler=None,
    scheduler_file=None, completed_only=False, overwrite=False, use_gram_cache=True, progress=True,
    precision="float64", measures=DEFAULT, rankme=False, no_workers_timeout=None, ci=0.95, bootstrap=2000, seed=0,
    interval="bca", permutations=0,
) -> Results:
    """Minibatch CKA of every pair of layers of the named runs (each run with itself too).

    ``runs`` are names or globs resolved in ``cache`` (see ``extract.store.find_runs``).
    Writes the results store to ``out`` when given (refusing an existing one unless
    ``overwrite``) and returns the results. ``precision="float32"`` computes the
    Gram products of the (float64-centered) features in float32: up to ~2x faster
    products on CPUs, about 1e-9 off in CKA; such Grams are not cached.
    ``measures``: ``"linear,rbf:0.5,mutual_knn:10"`` or a list (``analyze.measures``); the
    first is ``results.cka``, every one is ``results.cka(a, b, measure=...)``. ``rankme``:
    the minibatch RankMe of every layer too (``results.rankme``). On a Dask cluster
    (``scheduler``: address or Client; ``scheduler_file``) the analysis stops after
    ``no_workers_timeout`` without workers (default: Dask config ``ckapipe.no-workers-timeout``, 60 s).

    Every CKA gets a bootstrap interval over minibatches (``ci`` level, None for none;
    ``bootstrap`` resamples, ``seed``, ``interval`` "bca" or "percentile"), and with
    ``permutations`` > 0 a permutation p-value of CKA > 0 between runs (see
    ckapipe.analyze.stats and docs/uncertainty.md).
    """
    resampling = Resampling(ci=ci, bootstrap=bootstrap, seed=seed, method=interval, permutations=permutations)
    if out is not None:
        check_out(out, overwrite)
    plan = plan_analysis(
        cache, runs, pair_by_position=pair_by_position, batch_size=batch_size,
        completed_only=completed_only, use_gram_cache=use_gram_cache, precision=precision,
        measures=measures, rankme=rankme,
    )
    if progress:
        for note in plan.pairing.notes:
            print(f"ckapipe: note: {note}", file=sys.stderr)
    computed = compute(plan, resolve_device(device, "cupy"), scheduler, scheduler_file, progress, no_workers_timeout)
    entries = [RunEntry(r.name, r.slug, r.key, tuple(r.layer_names), str(r.path), tuple(r.layer_modules)) for r in plan.runs]
    names = [measure.name for measure in plan.measures]
    results = Results(entries, computed[names[0]], np.asarray(plan.pairing.minibatches), plan.inputs,
                      list(plan.pairing.notes), measure_stats={name: computed[name] for name in names},
                      rankme=computed.get("rankme"), resampling=resampling)
    for name in names:
        results.cka(measure=name)  # warns once per measure about layers where it is undefined (NaN)
    results.interval()  # the bootstrap intervals; warns when too few minibatches enter
    if permutations:
        add_permutation_test(results, permutations, seed, progress)
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
    planning = {k: options[k] for k in ("pair_by_position", "batch_size", "completed_only", "precision", "measures",
                                        "rankme") if k in options}
    try:
        plan = plan_analysis(cache, runs, **planning, use_gram_cache=False)
    except CkapipeError:
        return False
    return recorded == plan.inputs



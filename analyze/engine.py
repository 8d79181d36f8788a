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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ckapipe.blas import single_threaded_blas
from ckapipe.analyze.grams import RunSource, create_gram_caches, plan_source, run_triangles
from ckapipe.kernels import PRODUCTS, hsic1_matrix, to_host
from ckapipe.analyze.pairing import Pairing, analysis_batch_size, plan_pairing
from ckapipe.analyze.stats import Resampling
from ckapipe.analyze.uncertainty import add_permutation_test
from ckapipe.analyze.results import Results, RunEntry, check_out, recorded_inputs, write_results
from ckapipe.devices import resolve_device
from ckapipe.errors import CkapipeError
from ckapipe.progress import Progress
from ckapipe.store import Run, find_runs

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
    if not runs:
        raise CkapipeError("name at least one run to analyse")
    if all(isinstance(r, Run) for r in runs):
        return list(runs)
    return find_runs(cache, [r.name if isinstance(r, Run) else r for r in runs])


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


def compute(plan: Plan, device: str = "cpu", scheduler=None, scheduler_file=None, progress=True) -> np.ndarray:
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
        parts = _compute_distributed(tasks, scheduler, scheduler_file, progress)
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


def _compute_distributed(tasks, scheduler, scheduler_file, progress):
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise CkapipeError("a Dask cluster needs the distributed package: pip install 'ckapipe[cluster]'") from None
    if hasattr(scheduler, "compute"):  # a Client given by the caller
        client, own = scheduler, False
    else:
        try:
            client = Client(scheduler_file=scheduler_file) if scheduler_file else Client(scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as err:
            where = scheduler_file or scheduler
            raise CkapipeError(f"cannot connect to the Dask scheduler {where}: {err}") from None
        own = True
    bar = _bar(len(tasks), progress)
    try:
        futures = client.compute(tasks)
        for _ in as_completed(futures):
            bar.update(1)
        return client.gather(futures)
    finally:
        bar.close()
        if own:
            client.close()


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
    precision="float64", ci=0.95, bootstrap=2000, seed=0, interval="bca", permutations=0,
) -> Results:
    """Minibatch CKA of every pair of layers of the named runs (each run with itself too).

    ``runs`` are names or globs resolved in ``cache`` (see ``extract.store.find_runs``).
    Writes the results store to ``out`` when given (refusing an existing one unless
    ``overwrite``) and returns the results. ``precision="float32"`` computes the
    Gram products of the (float64-centred) features in float32: up to ~2x faster
    products on CPUs, about 1e-9 off in CKA; such Grams are not cached.

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
    )
    if progress:
        for note in plan.pairing.notes:
            print(f"ckapipe: note: {note}", file=sys.stderr)
    hsic = compute(plan, resolve_device(device, "cupy"), scheduler, scheduler_file, progress)
    entries = [RunEntry(r.name, r.slug, r.key, tuple(r.layer_names), str(r.path)) for r in plan.runs]
    results = Results(entries, hsic, np.asarray(plan.pairing.minibatches), plan.inputs, list(plan.pairing.notes),
                      resampling=resampling)
    results.cka_all  # warns once about constant layers (CKA undefined, NaN)
    results.cka_bounds  # the bootstrap intervals; warns when too few minibatches enter
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
    planning = {k: options[k] for k in ("pair_by_position", "batch_size", "completed_only", "precision") if k in options}
    try:
        plan = plan_analysis(cache, runs, **planning, use_gram_cache=False)
    except CkapipeError:
        return False
    return recorded == plan.inputs



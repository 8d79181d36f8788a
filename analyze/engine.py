"""The analysis engine: minibatch CKA (and the other measures) of every pair of layers of a set
of runs, with Dask.

For every analysis minibatch k (DESIGN.md, "The analysis algorithm"):

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

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ckapipe.blas import single_threaded_blas
from ckapipe.analyze.grams import RunSource, create_gram_caches, plan_source, run_grams
from ckapipe.analyze.measures import DEFAULT, Measure, group_statistics, layer_features, layer_rankme, parse_measures
from ckapipe.kernels import PRODUCTS, to_host
from ckapipe.analyze.pairing import Pairing, analysis_batch_size, plan_pairing
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
    centred = rankme or any(measure.centred for measure in chosen)
    sources = tuple(plan_source(run, m, use_gram_cache, fill_cache=precision == "float64", centred=centred,
                                minibatches=pairing.minibatches) for run in resolved)
    tasks = task_groups(pairing.minibatches, m, [r.batch_size for r in resolved], per_task(m, resolved, chosen))
    return Plan(tuple(resolved), pairing, sources, tasks, precision, chosen, bool(rankme))


def resolve_runs(cache, runs: Sequence[str | Run]) -> list[Run]:
    if not runs:
        raise CkapipeError("name at least one run to analyse")
    if all(isinstance(r, Run) for r in runs):
        return list(runs)
    return find_runs(cache, [r.name if isinstance(r, Run) else r for r in runs])


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
        from ckapipe.analyze.rank import feature_sizes
        from ckapipe.store import open_run

        out["rankme"] = to_host(layer_rankme(rows, feature_sizes(open_run(source.path), m)))
    return out


def group_measures(features: Sequence[dict], measures: Sequence[Measure], rankme: bool = False) -> dict:
    """One Dask task: {measure name: (len(ks), L, L)} statistics of every pair of layers of every run,
    per minibatch, from the features of every run of one minibatch group (in run order)."""
    out = {measure.name: group_statistics(measure, [f[measure.name] for f in features]) for measure in measures}
    if rankme:
        out["rankme"] = np.concatenate([f["rankme"] for f in features], axis=1)
    return out


def compute(plan: Plan, device: str = "cpu", scheduler=None, scheduler_file=None, progress=True) -> dict:
    """Run the plan's tasks on Dask; {measure name: (n_minibatches, L, L)} in minibatch order
    (and "rankme": (n_minibatches, L) when the plan asks for it).

    One task per run and minibatch group computes that run's features; one task
    per group multiplies the features of every run (the cross-run statistics
    need them together). Splitting by run lets the cores share a study with
    few minibatch groups (a small study at 224 px is one group).
    """
    import dask

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
        parts = _compute_distributed(tasks, scheduler, scheduler_file, progress)
    return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}


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
    precision="float64", measures=DEFAULT, rankme=False,
) -> Results:
    """Minibatch CKA of every pair of layers of the named runs (each run with itself too).

    ``runs`` are names or globs resolved in ``cache`` (see ``extract.store.find_runs``).
    Writes the results store to ``out`` when given (refusing an existing one unless
    ``overwrite``) and returns the results. ``precision="float32"`` computes the
    Gram products of the (float64-centred) features in float32: up to ~2x faster
    products on CPUs, about 1e-9 off in CKA; such Grams are not cached.
    ``measures``: ``"linear,rbf:0.5,mutual_knn:10"`` or a list (``analyze.measures``); the
    first is ``results.cka``, every one is ``results.cka(a, b, measure=...)``. ``rankme``:
    the minibatch RankMe of every layer too (``results.rankme``).
    """
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
    computed = compute(plan, resolve_device(device, "cupy"), scheduler, scheduler_file, progress)
    entries = [RunEntry(r.name, r.slug, r.key, tuple(r.layer_names), str(r.path)) for r in plan.runs]
    names = [measure.name for measure in plan.measures]
    results = Results(entries, computed[names[0]], np.asarray(plan.pairing.minibatches), plan.inputs,
                      list(plan.pairing.notes), measure_stats={name: computed[name] for name in names},
                      rankme=computed.get("rankme"))
    for name in names:
        results.values(name)  # warns once per measure about layers where it is undefined (NaN)
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



"""Which store holds each run of a study: ``RESULTS/STUDY/runs/RUN.json``.

A run's store is named by a hash that includes the weights hash, which only
the extraction knows; the extract stage therefore records, per run, the store
it wrote and a fingerprint of the run's settings in the pipeline file. The
analyze stage (often a separate job, often on a machine without the models)
reads the record and refuses a run whose settings changed since.

One file per run: SLURM array tasks write their own and never collide.

A results directory without the record of a run (``--out NEWDIR``) finds
the run in the cache when exactly one store there carries the run's name and
its settings (model, dataset, order, minibatch size, dtype, limit, layers), and
records it; otherwise the error says what is missing and what to run.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

from ckapipe.atomic import atomic_path
from ckapipe.errors import PipelineError, StoreError
from ckapipe.pipelines.study import RunConfig, Study
from ckapipe.store import list_runs, read_aliases


def record_path(study: Study, run: RunConfig) -> Path:
    return study.results / "runs" / f"{run.name}.json"


def record_store(study: Study, run: RunConfig, store: Path) -> None:
    """Remember that ``run`` lives in ``store`` (atomic write)."""
    with atomic_path(record_path(study, run), replace=True) as tmp:
        tmp.write_text(json.dumps({"run": run.name, "store": Path(store).name, "fingerprint": run.fingerprint}))


def recorded_store(study: Study, run: RunConfig) -> str | None:
    """The store name recorded for the run's current settings, or None."""
    try:
        record = json.loads(record_path(study, run).read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != run.fingerprint:
        return None
    return record.get("store")


def store_names(study: Study, run_names: list[str], record: bool = True) -> list[str]:
    """Store names of the runs, or an error saying what is missing and what to run; a run found in
    the cache without its record is recorded unless ``record`` is false (a dry run writes nothing)."""
    return [store_name(study, study.runs[name], record) for name in run_names]


def store_name(study: Study, run: RunConfig, record: bool = True) -> str:
    store = recorded_store(study, run)
    if store is not None and (study.cache / store).is_dir():
        return store
    extract = f"ckapipe run {study.path} --stage extract"
    if store is not None:
        raise PipelineError(f"{study.path}: run {run.name!r} has no store {store} in the cache (cache {study.cache}): "
                            f"run the extract stage first ({extract})")
    if record_path(study, run).exists():
        raise PipelineError(f"{study.path}: run {run.name!r} changed since it was extracted (cache {study.cache}): "
                            f"run the extract stage first ({extract})")
    named = stores_named(study.cache, run.name)
    fits = [r for r in named if store_fits(r, run)]
    if len(fits) == 1:
        if record:
            record_store(study, run, fits[0].path)
        return fits[0].name
    if not named:
        raise PipelineError(f"{study.path}: run {run.name!r} has not been extracted (cache {study.cache}): "
                            f"run the extract stage first ({extract})")
    records = record_path(study, run).parent
    if not fits:
        raise PipelineError(f"{study.path}: run {run.name!r} has no run record in {records}, and the stores named "
                            f"{run.name!r} in cache {study.cache} ({', '.join(r.name for r in named)}) hold other "
                            f"settings: run the extract stage first ({extract} --out {study.results.parent})")
    raise PipelineError(f"{study.path}: run {run.name!r} has no run record in {records}, and {len(fits)} stores in "
                        f"cache {study.cache} fit it ({', '.join(r.name for r in fits)}): run the extract stage to "
                        f"record which is this run's; cached runs are not extracted again "
                        f"({extract} --out {study.results.parent})")


def stores_named(cache: Path, name: str) -> list:
    """The run stores in the cache whose readable name, or an alias, is ``name``."""
    try:
        runs = list_runs(cache)
    except StoreError:
        return []
    aliased = read_aliases(cache).get(name)
    return [r for r in runs if r.slug == name or r.name == aliased]


def store_fits(store, run: RunConfig) -> bool:
    """Whether a cached store holds what the run's settings ask for, as far as the store records
    them verbatim (the weights hash needs the model: only the extract stage knows it)."""
    spec = store.spec
    same = (spec.model, spec.dataset, spec.order_seed, spec.batch_size, spec.dtype, spec.grams_only) == (
        run.model, run.dataset, run.order_seed, run.batch_size, run.dtype, run.grams_only)
    whole = spec.limit is None and run.limit is not None and run.limit >= store.n_samples  # extract drops such a limit
    if not same or not (spec.limit == run.limit or whole):
        return False
    items = [item.partition(":") for item in run.layers or ()]
    reductions = {reduction or run.reduction for _, _, reduction in items} or {run.reduction}
    patterns = [head.partition("@")[0].split("#")[0].replace("**", "*") for head, _, _ in items]
    return all(layer.reduction in reductions for layer in spec.layers) and (not patterns or all(
        any(fnmatch.fnmatchcase(layer.name.split("#")[0], p) for p in patterns) for layer in spec.layers))

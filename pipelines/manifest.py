"""Which store holds each run of a study: ``RESULTS/STUDY/runs/RUN.json``.

A run's store is named by a hash that includes the weights hash, which only
the extraction knows; the extract stage therefore records, per run, the store
it wrote and a fingerprint of the run's settings in the pipeline file. The
analyze stage (often a separate job, often on a machine without the models)
reads the record and refuses a run whose settings changed since.

One file per run: SLURM array tasks write their own and never collide.
"""

from __future__ import annotations

import json
from pathlib import Path

from ckapipe.atomic import atomic_path
from ckapipe.errors import PipelineError
from ckapipe.pipelines.study import RunConfig, Study


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


def store_names(study: Study, run_names: list[str]) -> list[str]:
    """Store names of the runs, or an error saying to run the extract stage."""
    stores = []
    for name in run_names:
        run = study.runs[name]
        store = recorded_store(study, run)
        if store is None or not (study.cache / store).is_dir():
            if store is not None:
                why = f"has no store {store} in the cache"
            elif record_path(study, run).exists():
                why = "changed since it was extracted"
            else:
                why = "has not been extracted"
            raise PipelineError(f"{study.path}: run {name!r} {why} (cache {study.cache}): "
                                f"run the extract stage first (ckapipe run {study.path} --stage extract)")
        stores.append(store)
    return stores

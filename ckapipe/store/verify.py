"""Verify run stores and results stores: read every chunk, check checksums, tags, markers, stamps and metadata.

``verify(cache, runs)`` reads each completed chunk of every layer and each
completed Gram row of every run named (all of the cache by default) and
reports, per run, what is bad and the command that rebuilds it; with
``repair=True`` it deletes each bad chunk's file and completion marker, so
that rerunning that command (``ckapipe extract ... --chunks A:B``) rewrites
exactly those. Stores of version 2 have no checksums: their chunks are
decoded and checked to be finite, and the report says "no checksums".

``verify_results(path, attr)`` does the same for a results directory (a group sealed by
ckapipe.store.integrity, its record in ``attrs[attr]``): every chunk of every array decoded and
its tag checked, the record checked against its key. Results written before checksums are
decoded only, and reported as "no checksums".

Only the floor is needed (no torch): a notebook or a login node can run it.
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

from ckapipe.atomic import describe_os_error
from ckapipe.errors import StoreError
from ckapipe.progress import Progress
from ckapipe.store.grams import GramCache, spans
from ckapipe.store.integrity import (
    BadArrayChunk, chunk_coords, chunk_file, compression_name, decode_failure, decode_problem, seal_problems, sealed,
)
from ckapipe.store.locks import writer_lock
from ckapipe.store.lookup import find_runs, list_runs
from ckapipe.store.run import IN_PROGRESS, Run


@dataclass(frozen=True)
class BadChunk:
    """One chunk that is not what was written: a layer's chunk k, or the Gram row k at m (``layer`` None)."""

    k: int
    why: str
    layer: str | None = None
    m: int | None = None

    def describe(self) -> str:
        where = f"layer {self.layer!r}" if self.layer is not None else f"Gram row (m={self.m}, every layer)"
        return f"{where}, minibatch {self.k}: {self.why}"


@dataclass
class RunReport:
    """What ``verify`` found in one run, and what it did about it."""

    run: Run
    checked: int = 0  # chunks and Gram rows read
    bad: list[BadChunk] = field(default_factory=list)
    bad_caches: dict[int, str] = field(default_factory=dict)  # m -> why the whole Gram cache is refused
    metadata: list[str] = field(default_factory=list)  # problems that deleting chunks cannot repair
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not (self.bad or self.bad_caches or self.metadata)

    @property
    def checksums(self) -> bool:
        return self.run.checksummed

    def rebuild(self) -> list[str]:
        """What rewrites the bad chunks once they are deleted (``repair``): an extraction of their
        minibatches, or for Gram rows of a run that keeps its activations, the next analysis."""
        run = self.run
        if self.metadata:
            return [f"rm -r {shlex.quote(str(run.path))} && {extract_command(run)}"]
        ks, refill = set(), set()  # minibatches to extract again; Gram sizes an analysis refills
        for bad in self.bad:
            if bad.layer is not None or (run.grams_only and bad.m == run.batch_size):
                ks.add(bad.k)
            else:
                refill.add(bad.m)
        for m in self.bad_caches:
            if run.grams_only and m == run.batch_size:
                ks.update(range(run.n_chunks))
            else:
                refill.add(m)
        out = [extract_command(run, span) for span in spans(sorted(ks))]
        out += [f"ckapipe analyze --cache {shlex.quote(str(run.path.parent))} {run.name} --batch-size {m} ... "
                f"(fills the Gram rows at m={m} again)" for m in sorted(refill)]
        return out


def verify(cache, runs: Sequence[str] | None = None, *, repair: bool = False, progress: bool = True) -> list[RunReport]:
    """Verify the named runs (names, keys or globs; every run of the cache when None), repairing when asked."""
    chosen = find_runs(cache, runs, check=False) if runs else list_runs(cache)
    if not chosen:
        raise StoreError(f"no runs in cache {cache}")
    return [verify_run(run, repair=repair, progress=progress) for run in chosen]


def verify_run(run: Run, *, repair: bool = False, progress: bool = True) -> RunReport:
    """Read every completed chunk and Gram row of one run and check it (see the module docstring)."""
    report = RunReport(run)
    report.metadata = run.metadata_problems()
    if report.metadata:
        return report
    layers = [] if run.grams_only else run.layer_names
    try:
        done = run.done()
        for name in layers:
            run.layer(name)  # its shape against the run's metadata
    except StoreError as err:
        report.metadata.append(str(err))
        return report
    caches = _gram_caches(run, report)
    total = int(done.sum()) * len(layers) + sum(int(cache.done().sum()) for cache in caches)
    bar = Progress(total, f"verify {run.name}", "chunks", enabled=progress)
    try:
        for name in layers:
            for k in np.flatnonzero(done):
                why = chunk_problem(run, name, int(k))
                if why:
                    report.bad.append(BadChunk(int(k), why, layer=name))
                report.checked += 1
                bar.update(1)
        for cache in caches:
            report.bad += [BadChunk(k, why, m=cache.m) for k, why in gram_row_problems(cache)]
            report.checked += int(cache.done().sum())
            bar.update(int(cache.done().sum()))
    finally:
        bar.close()
    if repair and not report.ok:
        repair_run(report)
    return report


def chunk_problem(run: Run, layer: str, k: int) -> str | None:
    """Why completed chunk k of a layer is not what was written there (tag, checksum, decoding, values), or None."""
    try:
        if run.checksummed:
            why = run.tag_problem(layer, k)
            if why:
                return why
        x = run.layer(layer)[run.chunk_slice(k)]
    except StoreError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
        return decode_failure(err)
    if not np.isfinite(x).all():
        return "it holds NaN or inf (its file is missing, or its bytes were changed)"
    return None


def gram_row_problems(cache: GramCache) -> list[tuple[int, str]]:
    """(k, why) for every completed Gram row that is not what was written there."""
    ks = [int(k) for k in np.flatnonzero(cache.done())]
    problems = [why or cache.row_problem(k) for k, why in zip(ks, cache.tag_problems(ks))]
    return [(k, why) for k, why in zip(ks, problems) if why]


def repair_run(report: RunReport) -> None:
    """Delete every bad chunk's file and marker (and refused Gram caches), so that a rerun rewrites them.

    Holds the writer lock of the whole run meanwhile: a live extraction of it is refused.
    """
    run = report.run
    try:
        _delete_bad(report)
    except OSError as err:
        raise StoreError(f"cannot repair run {run.name}: {describe_os_error(err)}") from None
    report.repaired = True


def _delete_bad(report: RunReport) -> None:
    run = report.run
    with writer_lock(run.path, range(0, run.n_chunks)):
        markers = run.group["done"]
        for bad in report.bad:
            if bad.layer is not None:
                chunk_file(run.path, run.layer(bad.layer), bad.k).unlink(missing_ok=True)
                markers[bad.k] = 0
            else:
                run.grams(bad.m).delete_row(bad.k)
                if run.grams_only and bad.m == run.batch_size:
                    markers[bad.k] = 0
        for m in report.bad_caches:
            shutil.rmtree(run.path / "grams" / f"m{m}")
            if run.grams_only and m == run.batch_size:
                markers[:] = 0
        run.set_meta(status=IN_PROGRESS)


def extract_command(run: Run, chunks: tuple[int, int] | None = None, grams: bool = False) -> str:
    """The command line that extracts (chunks A:B of) this run again into the same store."""
    spec = run.spec
    where = f"--chunks {chunks[0]}:{chunks[1]}" if chunks else ""
    if spec.model.startswith("module:"):
        return (f"extract_run(<your {spec.model.removeprefix('module:')} module>, {spec.dataset!r}, ..., "
                f"cache={str(run.path.parent)!r}{f', chunks={chunks}' if chunks else ''}) with this run's settings")
    items = ",".join(f"{layer.name}{'@' + layer.select if layer.select else ''}:{layer.reduction}" for layer in spec.layers)
    args = ["ckapipe", "extract", "-m", spec.model, "-d", spec.dataset, "-l", items, "-b", str(spec.batch_size),
            "--order-seed", str(spec.order_seed), "--dtype", spec.dtype]
    if spec.limit is not None:
        args += ["--limit", str(spec.limit)]
    if spec.name:
        args += ["--name", spec.name]
    compression = None if run.grams_only else compression_name(run.group[f"layers/{spec.layers[0].name}"].compressors)
    if compression is not None:
        args += ["--compression", compression]
    if run.grams_only:
        args.append("--grams-only")
    elif grams:
        args.append("--grams")
    args += ["--cache", str(run.path.parent)]
    return shlex.join(args) + (f" {where}" if where else "")


def _gram_caches(run: Run, report: RunReport) -> list[GramCache]:
    """The run's Gram caches that pass their stamp; the others go into ``report.bad_caches``."""
    caches = []
    for m in run.gram_sizes():
        try:
            cache = run.grams(m)
        except StoreError as err:
            report.bad_caches[m] = str(err)
            continue
        if cache is not None:
            caches.append(cache)
    return caches


@dataclass
class ResultsReport:
    """What ``verify_results`` found in one results directory."""

    path: Path
    record: dict
    checked: int = 0  # chunks read
    bad: list[BadArrayChunk] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def checksums(self) -> bool:
        return sealed(self.record)

    def runs(self) -> list[str]:
        return [str(run.get("name", "?")) for run in self.record.get("runs", [])]


def verify_results(path, attr: str) -> ResultsReport:
    """Decode every chunk of every array of a results directory and check its tag and the record's key."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        record = dict(group.attrs[attr])
    except Exception:  # noqa: BLE001
        raise StoreError(f"{path} is not a results directory (written by ckapipe analyze --out)") from None
    report = ResultsReport(path, record)
    if report.checksums:
        report.checked, report.bad = seal_problems(path, group, record, decode=True)
        return report
    for name, array in sorted(group.arrays()):
        for coords in chunk_coords(array):
            why = decode_problem(array, coords)
            if why:
                report.bad.append(BadArrayChunk(name, coords, why))
            report.checked += 1
    return report

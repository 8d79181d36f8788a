"""Piece K of the bench: what the checksums of store version 3 cost (the crc32c that ends every chunk,
and the tag that ties it to its place, recorded at write and checked at read).

The bench ResNet of piece E on digits at 32 px (its three stage outputs, 57,344 floats per sample,
blosc-lz4) is extracted into a store with checksums and into one without (``checksums=False``, the
store version 2 layout), in interleaved rounds, a fresh cache each, best of each. Each store is then
analysed from its activations (every chunk read, decoded and, with checksums, checked), and again
from its Gram cache (every row read and checked), best of each; the CKA of the two must agree.
Last, ``ckapipe verify`` of the checksummed store is held against a bare decoded read of its chunks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.bench_extract import BENCH_DATA, BENCH_LAYERS, BENCH_MODEL
from bench.common import BATCH, TOLERANCE, Row, timed
from bench.workloads import analysis, decoded_read

LIMIT = 1536  # samples: 6 minibatches of 256, about 350 MB of activations


def extract(cache: Path, checksums: bool):
    from ckapipe import store
    from ckapipe.extract import extract_run

    return store.open_run(extract_run(BENCH_MODEL, BENCH_DATA, BENCH_LAYERS, cache=cache, batch_size=BATCH,
                                      limit=LIMIT, name="bench", progress=False, checksums=checksums))


def checksum_rows(workdir: Path, rounds: int = 3) -> list[Row]:
    caches = {True: workdir / "K-checksums", False: workdir / "K-none"}
    times = {True: [], False: []}
    for _ in range(rounds):
        for checksums, cache in caches.items():
            shutil.rmtree(cache, ignore_errors=True)
            took, run = timed(lambda: extract(cache, checksums))
            if isinstance(run, Exception):
                return [Row("K", "extraction with checksums", "extract", None, "", None,
                            note=f"ERROR: {type(run).__name__}: {run}", ckapipe_failure=True)]
            times[checksums].append(took)
    names = ["bench"]
    acts = {c: timed(lambda: analysis(cache, names, "cpu", use_gram_cache=False), repeat=2) for c, cache in caches.items()}
    for cache in caches.values():
        analysis(cache, names, "cpu")  # fills the Gram cache
    grams = {c: timed(lambda: analysis(cache, names, "cpu"), repeat=3) for c, cache in caches.items()}
    failed = [v for r in (acts, grams) for _, v in r.values() if isinstance(v, Exception)]
    if failed:
        return [Row("K", "analysis with checksums", "analyze", None, "", None,
                    note=f"ERROR: {type(failed[0]).__name__}: {failed[0]}", ckapipe_failure=True)]
    gap = max(float(np.nanmax(np.abs(r[True][1].cka_all_runs.values - r[False][1].cka_all_runs.values))) for r in (acts, grams))
    t_verify, reports = timed(lambda: _verify(caches[True]), repeat=2)
    t_read, _ = timed(lambda: decoded_read(caches[True], names), repeat=2)
    verified = not isinstance(reports, Exception) and all(r.ok for r in reports)
    mb = LIMIT * 57344 * 4 / 1e6
    return [
        Row("K", "extraction with checksums vs without", "with", min(times[True]), "without", min(times[False]),
            note=f"N = {LIMIT}, {mb:.0f} MB of activations, blosc-lz4; best of {rounds} interleaved rounds"),
        Row("K", "analysis from activations with checksums vs without", "with", acts[True][0], "without",
            acts[False][0], note=f"best of 2; |CKA difference| {gap:.1e}", ckapipe_failure=not gap <= TOLERANCE),
        Row("K", "re-analysis from the Gram cache with checksums vs without", "with", grams[True][0], "without",
            grams[False][0], note="best of 3"),
        Row("K", "ckapipe verify (every chunk and Gram row checked) vs a bare decoded read of the chunks", "verify",
            t_verify, "bare read", t_read, note="best of 2" + ("" if verified else "; ERROR: verify found problems"),
            ckapipe_failure=not verified),
    ]


def _verify(cache: Path):
    from ckapipe.store.verify import verify

    return verify(cache, progress=False)

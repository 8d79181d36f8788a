"""Piece G of the suite: what filling the Gram cache during extraction (``--grams``)
costs the extraction, and what it saves the analysis.

The same study is extracted without and with ``--grams`` (interleaved rounds,
a fresh cache each, best of each); then the analysis of the Grams-filled cache
(which reads no activations) is held against an analysis that computes the
Grams from the stored activations.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from bench.common import TOLERANCE, Row, timed
from bench.workloads import Study, analysis, extract_all


def gram_rows(study: Study, workdir: Path) -> list[Row]:
    plain, filled = workdir / "G-plain", workdir / "G-grams"
    t_plain, t_grams = [], []
    for _ in range(study.rounds):
        for cache, times, grams in ((plain, t_plain, False), (filled, t_grams, True)):
            shutil.rmtree(cache, ignore_errors=True)
            took, runs = timed(lambda: extract_all(study, cache, grams=grams))
            if isinstance(runs, Exception):
                return [Row(study.workload, "extraction with --grams", "extract", None, "", None,
                            note=f"ERROR: {type(runs).__name__}: {runs}", ckapipe_failure=True)]
            times.append(took)
    names = [name for name, _, _ in study.models]
    t_acts, from_acts = timed(lambda: analysis(plain, names, study.device, use_gram_cache=False), repeat=2)
    t_filled, from_grams = timed(lambda: analysis(filled, names, study.device), repeat=2)
    a, b = names[0], names[-1]
    gap = float(np.nanmax(np.abs(from_grams.cka(a, b).values - from_acts.cka(a, b).values)))
    return [
        Row(study.workload, "extraction with --grams vs without", "with Grams", min(t_grams), "without", min(t_plain),
            note=f"N = {study.n}, {len(names)} models; best of {study.rounds} interleaved rounds"),
        Row(study.workload, "analysis from Grams filled at extraction vs from activations", "from Grams", t_filled,
            "from activations", t_acts, note=f"|CKA difference| {gap:.1e}", ckapipe_failure=not gap <= TOLERANCE),
    ]

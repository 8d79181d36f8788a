"""Piece U of the suite: what the intervals and p-values cost against the analysis from cached Grams.

The study's runs are extracted with ``--grams`` (so the analysis reads no
activations); then, in one run: the analysis without intervals (``--ci 0``), the
bootstrap intervals of every entry alone (2000 resamples, BCa: the default), the
analysis with them (what ``ckapipe analyze`` does by default), and the permutation
test (opt-in; 1000 permutations at the full sizes, 200 at the reduced ones), which
reads the Gram cache again.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.common import Row, timed
from bench.workloads import Study, analysis, extract_all

ROUNDS = 5  # interleaved rounds of the analysis with and without intervals; best of each


def cpu_timed(fn):
    """Wall and CPU seconds of one call, and its value (or the exception it raised)."""
    cpu = time.process_time()
    wall, value = timed(fn)
    return wall, time.process_time() - cpu, value


def uncertainty_rows(study: Study, workdir: Path, permutations: int = 1000) -> list[Row]:
    from ckapipe.analyze import permutation_test
    from ckapipe.analyze.stats import Resampling, bootstrap_bounds

    cache = workdir / "U"
    _, runs = timed(lambda: extract_all(study, cache, grams=True))
    if isinstance(runs, Exception):
        return [_error(study, runs)]
    names = [r.name for r in runs]
    plain_t, default_t, boot_t = [], [], []
    for _ in range(ROUNDS):
        *took, plain = cpu_timed(lambda: analysis(cache, names, study.device, ci=None))
        plain_t.append(took)
        *took, with_ci = cpu_timed(lambda: analysis(cache, names, study.device))
        default_t.append(took)
        *took, bounds = cpu_timed(lambda: bootstrap_bounds(plain.hsic, Resampling()))
        boot_t.append(took)
        failed = next((x for x in (plain, with_ci, bounds) if isinstance(x, Exception)), None)
        if failed is not None:
            return [_error(study, failed)]
    (t_plain, c_plain), (t_default, c_default), (t_boot, c_boot) = (min(t) for t in (plain_t, default_t, boot_t))
    t_perm, c_perm, p = cpu_timed(lambda: permutation_test(plain, permutations, progress=False))
    if isinstance(p, Exception):
        return [_error(study, p)]
    n, L = plain.hsic.shape[:2]
    a, b = names
    low, high = with_ci.interval(a, b).values
    inside = float(np.mean((low <= plain.cka(a, b).values) & (plain.cka(a, b).values <= high)))
    tested = p[np.isfinite(p)]
    shape = f"L = {L} layers, {n} minibatches of {plain.m}"
    return [
        Row(study.workload, "bootstrap intervals of every CKA (2000 resamples, BCa) vs analysis from cached Grams",
            "intervals", t_boot, "analysis", t_plain, target="<= 0.10",
            note=f"{shape}; CPU {c_boot:.3f} s vs {c_plain:.3f} s; best of {ROUNDS} interleaved rounds; "
                 f"{inside:.0%} of the {a} x {b} intervals hold their estimate"),
        Row(study.workload, "analysis with intervals (the default) vs --ci 0", "default", t_default, "--ci 0", t_plain,
            target="<= 1.10", note=f"{shape}; CPU {c_default:.3f} s vs {c_plain:.3f} s"),
        Row(study.workload, f"permutation test ({permutations} permutations) vs analysis from cached Grams",
            "permutations", t_perm, "analysis", t_plain,
            note=(f"opt-in (--permutations); cost linear in the permutations; CPU {c_perm:.1f} s; "
                  f"{tested.size} tested pairs, largest p {tested.max():.3g}") if tested.size else "no pair tested",
            ckapipe_failure=not tested.size),
    ]


def _error(study: Study, err: Exception) -> Row:
    return Row(study.workload, "intervals and p-values", "ckapipe", None, "", None,
               note=f"ERROR: {type(err).__name__}: {err}", ckapipe_failure=True)

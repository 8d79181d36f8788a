"""Pairing rules: which minibatches of which runs are compared (docs/design.md, "Pairing rules").

- Same sample ids (over the rows used): minibatch k of every run holds the same
  samples; a model (or layer) comparison.
- Different sample ids: only with positional pairing (minibatch k with
  minibatch k, over the common number of minibatches): the "two datasets" use.
- Different stored minibatch sizes c: the analysis minibatch size m must divide
  every c or be a multiple of it, so that every analysis minibatch is read from
  whole stored chunks (each chunk read once) or from parts of one chunk.
- Only full minibatches are used; incomplete runs are refused unless the
  completed chunks only are asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ckapipe.errors import StoreError
from ckapipe.kernels import MIN_MINIBATCH, check_minibatch_size
from ckapipe.store import Run

SAMPLE_IDS, POSITION = "sample_ids", "position"
MINIBATCHES_PER_TASK = 4  # minibatches per Dask task of an analysis (fewer when they are large: engine.per_task)


@dataclass(frozen=True)
class Pairing:
    """The minibatches an analysis uses, and why."""

    mode: str  # SAMPLE_IDS or POSITION
    m: int  # analysis minibatch size
    minibatches: tuple[int, ...]  # indices k (rows k*m .. (k+1)*m of every run)
    notes: tuple[str, ...]  # what was dropped, said to the user


def analysis_batch_size(runs: Sequence[Run], batch_size: int | None = None) -> int:
    """The analysis minibatch size m: the given one, else the stored chunk size.

    Runs stored with different chunk sizes default to the smallest when it
    divides the others; otherwise the user must choose.
    """
    sizes = sorted({run.batch_size for run in runs})
    if batch_size is None:
        if all(c % sizes[0] == 0 for c in sizes):
            batch_size = sizes[0]
        else:
            raise StoreError(
                f"the runs store minibatches of {_sizes(runs)} samples: give --batch-size M that divides "
                f"every stored size or is a multiple of it (for example {_common_choices(sizes)})"
            )
    check_minibatch_size(batch_size)
    for run in runs:
        c = run.batch_size
        if c % batch_size and batch_size % c:
            raise StoreError(
                f"analysis minibatch size {batch_size} does not fit run {run.name}, stored in chunks of {c}: "
                f"it must divide every stored size or be a multiple of it (for example {_common_choices(sizes)})"
            )
    return batch_size


def plan_pairing(
    runs: Sequence[Run], m: int, pair_by_position: bool = False, completed_only: bool = False
) -> Pairing:
    """Check that the runs pair at minibatch size m and list the minibatches to use."""
    n_full = [run.n_samples // m for run in runs]
    n_common = min(n_full)
    if n_common == 0:
        small = runs[int(np.argmin(n_full))]
        raise StoreError(f"run {small.name} has {small.n_samples} samples: not one full minibatch of {m}")
    notes = [_tail_note(run, m, n_common) for run in runs]
    mode = pairing_mode(runs, n_common * m, pair_by_position)
    if mode == POSITION:
        notes.append(f"pairing by position: minibatch k of every run with minibatch k, {n_common} minibatches")
    minibatches = complete_minibatches(runs, m, n_common, completed_only)
    if len(minibatches) < n_common:
        notes.append(f"completed chunks only: {len(minibatches)} of {n_common} minibatches are complete in every run")
    if not minibatches:
        raise StoreError("no minibatch is complete in every run: nothing to analyse yet")
    return Pairing(mode, m, tuple(minibatches), tuple(n for n in notes if n))


def pairing_mode(runs: Sequence[Run], n_rows: int, pair_by_position: bool) -> str:
    """SAMPLE_IDS when every run holds the same samples in its first n_rows rows."""
    reference = runs[0].sample_ids()[:n_rows]
    for run in runs[1:]:
        if not np.array_equal(run.sample_ids()[:n_rows], reference):
            if pair_by_position:
                return POSITION
            raise StoreError(
                f"runs {runs[0].name} and {run.name} hold different samples (or in a different order): "
                f"pass --pair-by-position to pair minibatch k with minibatch k (comparing two datasets), "
                f"or extract both with the same dataset, order seed and limit"
            )
    return SAMPLE_IDS


def complete_minibatches(runs: Sequence[Run], m: int, n_common: int, completed_only: bool) -> list[int]:
    """Indices k < n_common whose stored chunks are complete in every run.

    Without ``completed_only`` a missing chunk is an error naming the run.
    """
    complete = np.ones(n_common, dtype=bool)
    for run in runs:
        mine = minibatch_done(run, m, n_common)
        if not mine.all() and not completed_only:
            missing = np.flatnonzero(~mine)
            raise StoreError(
                f"run {run.name} is incomplete (status {run.status}): {missing.size} of {n_common} minibatches "
                f"lack chunks (first: minibatch {missing[0]}): finish its extraction, or pass --completed-only "
                f"to analyse the completed chunks only"
            )
        complete &= mine
    return [int(k) for k in np.flatnonzero(complete)]


def minibatch_done(run: Run, m: int, n: int) -> np.ndarray:
    """(n,) bool: every stored chunk holding rows of minibatch k is complete."""
    done = run.done()
    first = np.arange(n) * m // run.batch_size
    last = ((np.arange(n) + 1) * m - 1) // run.batch_size
    cum = np.concatenate([[0], np.cumsum(~done)])
    return cum[last + 1] - cum[first] == 0


def _tail_note(run: Run, m: int, n_common: int) -> str:
    used = n_common * m
    if used == run.n_samples:
        return ""
    return (
        f"run {run.name}: last {run.n_samples - used} of {run.n_samples} samples not used "
        f"(only full minibatches of {m} common to every run are used)"
    )


def _sizes(runs: Sequence[Run]) -> str:
    return ", ".join(f"{run.batch_size} ({run.name})" for run in runs)


def _common_choices(sizes: Sequence[int]) -> str:
    gcd = math.gcd(*sizes)
    lcm = math.lcm(*sizes)
    choices = [str(v) for v in (gcd, lcm) if v >= MIN_MINIBATCH]
    return " or ".join(choices) if choices else "re-extract with a common --batch-size"


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

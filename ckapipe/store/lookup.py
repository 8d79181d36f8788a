"""Finding runs in a cache: every store listed, names, keys, slugs, aliases and globs resolved.

A pattern is a store's full name (``slug-key``), its key, its slug or an alias (ckapipe.store.cache),
or a glob over any of these, component by component (ckapipe.globs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ckapipe.errors import StoreError, suggest
from ckapipe.globs import RUN_SEPARATORS, glob_match, is_glob
from ckapipe.store.cache import read_aliases
from ckapipe.store.run import Run, open_run


def list_runs(cache: str | os.PathLike) -> list[Run]:
    """Every run store in the cache, unchecked (``find_runs`` checks those it returns)."""
    cache = Path(cache)
    if not cache.is_dir():
        raise StoreError(f"cache directory {cache} does not exist")
    runs = []
    for path in sorted(cache.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and (path / "zarr.json").exists():
            try:
                runs.append(open_run(path, check=False))
            except StoreError:
                continue
    return runs


def find_runs(cache: str | os.PathLike, patterns: Sequence[str], check: bool = True) -> list[Run]:
    """Resolve run names to stores, in the order given.

    A pattern is a store's full name (``slug-key``), its key, its slug or an
    alias, or a shell glob over any of these (``student-*``). A slug or alias
    that names several stores is ambiguous and refused with the candidates.
    ``check`` refuses a run whose metadata disagrees with itself (Run.check).
    """
    runs = list_runs(cache)
    aliases = read_aliases(cache)
    chosen: list[Run] = []
    for pattern in patterns:
        hits = _matches(pattern, runs, aliases)
        if not hits:
            names = sorted({r.slug for r in runs} | {r.name for r in runs} | set(aliases))
            raise StoreError(f"no run {pattern!r} in cache {cache}{suggest(pattern, names)}")
        chosen += [r for r in hits if r.name not in {c.name for c in chosen}]
    return [run.check() for run in chosen] if check else chosen


def _matches(pattern: str, runs: list[Run], aliases: dict[str, str]) -> list[Run]:
    exact = [r for r in runs if pattern in (r.name, r.key)]
    if exact:
        return exact
    named = [r for r in runs if r.slug == pattern or aliases.get(pattern) == r.name]
    if len(named) > 1:
        raise StoreError(f"run name {pattern!r} is ambiguous: name one of {_candidates(named)}")
    if named or not is_glob(pattern):
        return named
    hits, by_slug = _glob_hits(pattern, runs, aliases, whole_words=True)
    if not hits and not by_slug:
        hits, by_slug = _glob_hits(pattern, runs, aliases, whole_words=False)
    for run in by_slug:
        twins = [r for r in by_slug if r.slug == run.slug]
        if len(twins) > 1:
            raise StoreError(f"run name {run.slug!r} (matched by {pattern!r}) is ambiguous: name one of {_candidates(twins)}")
    return sorted(hits + by_slug, key=lambda r: r.name)


def _glob_hits(pattern: str, runs: list[Run], aliases: dict[str, str], whole_words: bool):
    """(runs whose store name matches, runs matched by slug or alias only): component globs (ckapipe.globs),
    where the pattern may stop before the name's last components; ``whole_words`` as there."""
    def match(name: str) -> bool:
        return glob_match(pattern, name, RUN_SEPARATORS, whole_words=whole_words, leading=True)

    hits = [r for r in runs if match(r.name)]
    by_slug = [r for r in runs if r not in hits and (match(r.slug) or any(
        match(a) for a, target in aliases.items() if target == r.name))]
    return hits, by_slug


def _candidates(runs: list[Run]) -> str:
    return "; ".join(f"{r.name} ({r.spec.model} on {r.spec.dataset})" for r in runs)


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under a run's directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

"""The cache directory: where it is, the store a key names, and the aliases that name stores.

    CACHE/
      <slug>-<key>/              one run store (ckapipe.store.run)
      .aliases/<name>            a file holding the store name that <name> stands for
      .locks/<slug>-<key>/       writer locks (ckapipe.store.locks)

Paths and small files only: opening the stores is ckapipe.store.run, finding them by name
ckapipe.store.lookup.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckapipe.atomic import atomic_path
from ckapipe.errors import StoreError
from ckapipe.store.specs import check_run_name

CACHE_ENV = "CKAPIPE_CACHE"  # the cache directory when none is given (else ./cache)


def default_cache() -> str:
    """The cache directory when none is given: ``$CKAPIPE_CACHE``, else ``cache``."""
    return os.environ.get(CACHE_ENV) or "cache"


def ensure_cache(cache: str | os.PathLike) -> Path:
    """The cache directory, created if needed; a clear error when it cannot be written."""
    cache = Path(cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create cache directory {cache}: {err.strerror}") from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise StoreError(f"cache directory {cache} is not writable: choose another --cache or fix its permissions")
    return cache


def store_with_key(cache: str | os.PathLike, key: str) -> Path | None:
    """The store in the cache whose name ends with ``-key``, if any."""
    hits = sorted(p for p in Path(cache).glob(f"*-{key}") if p.is_dir() and not p.name.startswith("."))
    return hits[0] if hits else None


def alias_dir(cache: str | os.PathLike) -> Path:
    """``CACHE/.aliases/NAME`` holds the store name that NAME stands for."""
    return Path(cache) / ".aliases"


def add_alias(cache: str | os.PathLike, alias: str, store_name: str) -> None:
    """Let ``alias`` name the store ``store_name`` (one small file, written atomically)."""
    check_run_name(alias)
    with atomic_path(alias_dir(cache) / alias, replace=True) as tmp:
        tmp.write_text(store_name + "\n")


def read_aliases(cache: str | os.PathLike) -> dict[str, str]:
    """alias -> store name, for every alias in the cache."""
    folder = alias_dir(cache)
    if not folder.is_dir():
        return {}
    out = {}
    for file in folder.iterdir():
        if not file.name.startswith("."):
            try:
                out[file.name] = file.read_text().strip()
            except OSError:
                continue
    return out

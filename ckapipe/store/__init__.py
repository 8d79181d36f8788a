"""The stores: every byte ckapipe keeps on disk, and the one integrity layer they share.

Both stages stand on this package (floor 1): it needs NumPy, zarr and xarray, never torch, and
imports neither stage. One file per job, each importing only those above it in this list::

    integrity.py   what a chunk is on disk: codecs, the crc32c that ends it, its tag; a sealed group;
                   the one-line words for a damaged chunk (run stores, Gram caches, results stores)
    specs.py       what determines a run: LayerSpec, RunSpec (its key and slug), run names; provenance
    cache.py       the cache directory: where it is, the store a key names, aliases
    grams.py       GramCache: a run's centered Grams at one minibatch size m, one row per minibatch
    run.py         Run, create_run, open_run: one extraction run's store
    lookup.py      list_runs, find_runs: runs by name, key, slug, alias or glob; disk_size
    results.py     the results store: written once and sealed, read back as NumPy and a record
    locks.py       writer locks per chunk range, with heartbeats, safe across nodes
    verify.py      read every chunk of a run or results store back and name what is bad

``from ckapipe import store; store.open_run(path)``: the names below are the ones callers use.
The layouts are in docs/store.md.
"""

from ckapipe.errors import StoreError
from ckapipe.store.cache import CACHE_ENV, add_alias, default_cache, ensure_cache, read_aliases, store_with_key
from ckapipe.store.grams import GramCache
from ckapipe.store.lookup import disk_size, find_runs, list_runs
from ckapipe.store.run import (
    ATTRS, COMPLETE, FAILED, IN_PROGRESS, STORE_VERSION, Run, create_run, open_run, share_range, verify_hint,
)
from ckapipe.store.specs import (
    DTYPES, RUN_NAME, SLUG_LENGTH, LayerInfo, LayerSpec, RunSpec, check_dtype, check_run_name, library_versions, now,
    short_name, spec_slug,
)

__all__ = [
    "ATTRS", "CACHE_ENV", "COMPLETE", "DTYPES", "FAILED", "IN_PROGRESS", "RUN_NAME", "SLUG_LENGTH", "STORE_VERSION",
    "GramCache", "LayerInfo", "LayerSpec", "Run", "RunSpec", "StoreError",
    "add_alias", "check_dtype", "check_run_name", "create_run", "default_cache", "disk_size", "ensure_cache",
    "find_runs", "library_versions", "list_runs", "now", "open_run", "read_aliases", "share_range", "short_name",
    "spec_slug", "store_with_key", "verify_hint",
]

"""A run store: one Zarr v3 group per extraction run, chunk k of every array = minibatch k.

The layout (readable with plain ``zarr``; docs/store.md)::

    CACHE/<slug>-<key>/             one run (ckapipe.store.specs: the key, the slug)
      zarr.json                     attrs["ckapipe"]: spec, status, versions, ...
      sample_ids                    int64 (N,), chunks (m,): dataset index per row
      layers/<layer>                (N, D), chunks (m, D): chunk k = minibatch k
      checksums                     int64 (n_chunks, layers), chunks (1, layers): the tag of
                                    chunk k of every layer (ckapipe.store.integrity.chunk_tag)
      done                          uint8 (n_chunks,), chunks (1,): 1 once every
                                    layer of chunk k is written
      grams/m<m>/...                the Gram cache at analysis minibatch size m (ckapipe.store.grams)

Every chunk ends with its crc32c and has its tag recorded beside it, written before its
marker: a flipped, truncated, missing or misplaced chunk file is refused by name. Stores of
version 2 have neither and are read as before.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from ckapipe.atomic import atomic_path
from ckapipe.errors import StoreError, suggest
from ckapipe.store.cache import add_alias, ensure_cache, read_aliases, store_with_key
from ckapipe.store.grams import GramCache, create_gram_arrays, foreign, gram_group, holds_grams
from ckapipe.store.integrity import (
    CHECKSUMS, DEFAULT_COMPRESSION, NO_TAG, checksummed, chunk_file, compressors as compression_chain, decode_failure,
    file_tag, tag_problem,
)
from ckapipe.store.specs import LayerInfo, RunSpec, library_versions, now

STORE_VERSION = 3  # 3: chunks end with their crc32c, tags recorded; Gram caches keep centered Grams with the diagonal
ATTRS = "ckapipe"
IN_PROGRESS, COMPLETE, FAILED = "in_progress", "complete", "failed"


@dataclass
class Run:
    """A handle on one run's store: its path and group; it keeps the layer arrays it opened, the
    completion markers it last read (markers only go from 0 to 1) and the chunk tags it read."""

    path: Path
    group: zarr.Group = field(repr=False)
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)  # layer arrays, opened once
    _done: np.ndarray | None = field(default=None, repr=False, compare=False)  # markers last read
    _tags: dict = field(default_factory=dict, repr=False, compare=False)  # k -> recorded tags of chunk k

    # ---- metadata
    @property
    def meta(self) -> dict:
        return self.group.attrs[ATTRS]

    @property
    def spec(self) -> RunSpec:
        try:
            return RunSpec.from_dict(self.meta["spec"])
        except StoreError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"run {self.name}: its recorded spec cannot be read ({type(err).__name__}: {err}); "
                             f"its zarr.json was edited or damaged") from None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def slug(self) -> str:
        """The readable part of the store's name (the name without ``-key``)."""
        name, _, key = self.name.rpartition("-")
        return name if key == self.meta.get("key") and name else self.spec.slug

    def aliases(self) -> list[str]:
        """Other names given to this run (``--name`` for a key already cached)."""
        return sorted(alias for alias, target in read_aliases(self.path.parent).items() if target == self.name)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def layer_names(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def layer_modules(self) -> list[str]:
        """Each layer's module type (``Linear``), in layer order; "" where a store older than the record has none."""
        modules = self.meta.get("modules", {})
        return [modules.get(name, "") for name in self.layer_names]

    @property
    def n_samples(self) -> int:
        return int(self.meta["n_samples"])

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.batch_size)

    @property
    def status(self) -> str:
        return self.meta["status"]

    @property
    def grams_only(self) -> bool:
        return bool(self.meta.get("grams_only", False))

    @property
    def store_version(self) -> int:
        return int(self.meta.get("store_version", 1))

    @property
    def checksummed(self) -> bool:
        """Whether its chunks end with a crc32c and have their tags recorded (store version 3 on)."""
        return self.store_version >= 3

    def metadata_problems(self) -> list[str]:
        """What disagrees among the metadata that determines numbers, the spec and the arrays.

        ``key`` must be the hash of the recorded spec and end the store's name,
        ``layers`` and ``batch_size`` must be the spec's, and ``n_samples`` the
        length of ``sample_ids``: an edited zarr.json would otherwise move labels
        over numbers or drop samples. (Layer arrays are checked when opened.)
        """
        meta = self.meta
        try:
            spec = self.spec
        except StoreError as err:
            return [str(err)]
        problems = []
        if meta.get("key") != spec.key:
            problems.append(f"key {meta.get('key')} is not {spec.key}, the hash of its spec")
        elif not self.name.endswith(f"-{spec.key}"):
            problems.append(f"the store's name does not end with its key {spec.key}")
        if meta.get("layers") != [layer.name for layer in spec.layers]:
            problems.append("its layers are not its spec's layers, in the spec's order")
        if meta.get("batch_size") != spec.batch_size:
            problems.append(f"batch_size {meta.get('batch_size')} is not its spec's {spec.batch_size}")
        try:
            n = self.group["sample_ids"].shape[0]
        except KeyError:
            return problems + ["it has no sample_ids"]
        if meta.get("n_samples") != n or spec.limit not in (None, n):
            problems.append(f"n_samples {meta.get('n_samples')} is not the {n} rows of its sample_ids")
        return problems

    def check(self) -> "Run":
        """This run, once ``metadata_problems`` finds nothing; else a one-line error naming the run."""
        problems = self.metadata_problems()
        if problems:
            raise StoreError(f"run {self.name} has inconsistent metadata: {'; '.join(problems)} "
                             f"(its zarr.json was edited or damaged): re-extract it into a fresh store")
        return self

    def sample_ids(self) -> np.ndarray:
        return self.group["sample_ids"][:]

    def chunk_slice(self, k: int) -> slice:
        m = self.batch_size
        return slice(k * m, min((k + 1) * m, self.n_samples))

    def layer(self, name: str) -> zarr.Array:
        """The array of one layer, refused when its rows or chunks disagree with the run's metadata."""
        if name not in self._arrays:
            if name not in self.layer_names:
                raise StoreError(f"run {self.name} has no layer {name!r}{suggest(name, self.layer_names)}")
            try:
                array = self.group[f"layers/{name}"]
            except KeyError:
                raise StoreError(f"run {self.name} lists layer {name!r} but holds no array for it: "
                                 f"its zarr.json was edited or the array deleted; re-extract it") from None
            if array.shape[0] != self.n_samples or array.chunks[0] != self.batch_size:
                raise StoreError(
                    f"layer {name!r} of run {self.name} has {array.shape[0]} rows in chunks of {array.chunks[0]}, "
                    f"but the run records n_samples {self.n_samples} and batch_size {self.batch_size}: "
                    f"its zarr.json was edited or damaged; re-extract it")
            self._arrays[name] = array
        return self._arrays[name]

    def set_meta(self, **changes) -> None:
        meta = dict(self.meta)
        meta.update(changes)
        self.group.attrs[ATTRS] = meta

    # ---- activations
    def done(self) -> np.ndarray:
        """Boolean completion marker per chunk."""
        markers = self.group["done"][:]
        if markers.shape != (self.n_chunks,):
            raise StoreError(f"run {self.name} has {markers.size} completion markers for its {self.n_chunks} "
                             f"minibatches: its zarr.json was edited or damaged; re-extract it")
        return markers.astype(bool)

    def missing_chunks(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done())]

    def write_chunk(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk k of every layer, then the tags of its files, then its completion marker (in that order)."""
        rows = self.chunk_slice(k)
        names = [] if self.grams_only else self.layer_names
        for name in names:
            self.layer(name)[rows] = arrays[name]
        if self.checksummed and names:
            key = self.key
            self._checksums[k] = [self._file_tag(key, name, k) for name in names]
        self._tags.pop(k, None)
        self.group["done"][k] = 1

    def chunk_done(self, k: int) -> bool:
        """Completion marker of chunk k. Markers only ever go from 0 to 1, so the
        markers read once are kept and read again only for a chunk not yet seen done
        (a Zarr call per chunk read was half of an analysis's Zarr calls)."""
        if self._done is None or not self._done[k]:
            self._done = self.done()
        return bool(self._done[k])

    def read_chunk(self, name: str, k: int) -> np.ndarray:
        """Rows of minibatch k of one layer; refuses a chunk that was never completed, and (store
        version 3) one whose file fails its checksum or tag, naming run, layer and minibatch."""
        if not self.chunk_done(k):
            raise StoreError(f"chunk {k} of layer {name!r} in run {self.name} is missing (extraction incomplete)")
        array = self.layer(name)
        if self.checksummed:
            why = self.tag_problem(name, k)
            if why:
                raise self.unreadable(name, k, why)
        try:
            return array[self.chunk_slice(k)]
        except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
            raise self.unreadable(name, k, decode_failure(err)) from None

    def tag_problem(self, name: str, k: int) -> str | None:
        """Why chunk k of a layer is not the file written there (missing, truncated, moved), or None."""
        recorded = self.recorded_tags(k)[self.layer_names.index(name)]
        return tag_problem(self.key, self.path, self.layer(name), f"layers/{name}", k, recorded)

    def recorded_tags(self, k: int) -> np.ndarray:
        """The tags recorded for chunk k of every layer (NO_TAG where none was)."""
        if k not in self._tags:
            self._tags[k] = self._checksums[k]
        return self._tags[k]

    def unreadable(self, name: str, k: int, why: str) -> StoreError:
        return StoreError(f"chunk {k} of layer {name!r} in run {self.name} cannot be read: {why}; "
                          f"{verify_hint(self)}")

    @functools.cached_property
    def _checksums(self) -> zarr.Array:
        try:
            return self.group[CHECKSUMS]
        except KeyError:
            raise StoreError(f"run {self.name} (store version {self.store_version}) has no {CHECKSUMS} array: "
                             f"it was deleted; re-extract the run") from None

    def _file_tag(self, key: str, name: str, k: int) -> int:
        return file_tag(key, f"layers/{name}", k, chunk_file(self.path, self.layer(name), k))

    def refresh_status(self) -> str:
        """Set status to complete once every chunk has its marker; return the status."""
        if self.status != FAILED and self.done().all():
            self.set_meta(status=COMPLETE, completed=now())
        return self.status

    # ---- the Gram cache
    def gram_sizes(self) -> list[int]:
        """Minibatch sizes m with a Gram cache in this run's store."""
        if "grams" not in self.group:
            return []
        return sorted(int(name[1:]) for name in self.group["grams"].group_keys() if name[1:].isdigit())

    def grams(self, m: int, create: bool = False) -> GramCache | None:
        """The Gram cache for analysis minibatch size m (None if absent; ckapipe.store.grams).

        Whoever creates it stamps it with this run's key and layer list, and a
        cache whose stamp disagrees (copied from another run, or left unstamped)
        is refused: its rows are positional, so another run's Grams would give
        numbers under the wrong labels. ``create`` makes whatever is missing, so
        processes filling one run's Grams side by side may all ask for it; in a
        cache of store version 2 it adds the centered Grams beside the old rows
        (which a reader may still be reading; they are never deleted here).
        """
        group = gram_group(self.group, m, create, self.key, self.layer_names)
        if group is None:
            return None
        why = foreign(group, self.key, self.layer_names)
        if why:
            raise self._refused_grams(m, why)
        n_minibatches = self.n_samples // m
        if create:
            create_gram_arrays(group, m, n_minibatches, len(self.layer_names), self.checksummed)
        elif not holds_grams(group):
            return None
        cache = GramCache(group, self.layer_names, m, self.name, self.key, self.path, self.checksummed)
        why = cache.misfit(n_minibatches)
        if why:
            raise self._refused_grams(m, why)
        return cache

    def _refused_grams(self, m: int, why: str) -> StoreError:
        return StoreError(f"the Gram cache of run {self.name} at m={m} {why}: "
                          f"delete {self.path / f'grams/m{m}'} and it is filled again")


def verify_hint(run: Run) -> str:
    """Where to turn for a damaged run: the command that names every bad chunk and how to rebuild it."""
    return f"`ckapipe verify --cache {run.path.parent} {run.name}` names every bad chunk and the command that rebuilds it"


def create_run(
    cache: str | os.PathLike,
    spec: RunSpec,
    sample_ids: np.ndarray,
    layers: dict[str, LayerInfo],
    compressors=None,
    grams_only: bool = False,
    checksums: bool = True,
) -> Run:
    """Create the store of a run (or open it when it exists: resume).

    Every layer array gets chunks (m, D), a NaN fill value and write_empty_chunks,
    so a chunk that was never written reads as NaN, never as zeros; ``compressors``
    (default ckapipe.store.integrity.DEFAULT_COMPRESSION) then the crc32c codec, unless
    ``checksums=False`` writes the store version 2 layout (no checksums, no tags),
    which only the bench uses, to measure what they cost.
    """
    grams_only = grams_only or spec.grams_only
    cache = ensure_cache(cache)
    existing = _existing(cache, spec)
    if existing is not None:
        return existing
    path = cache / spec.dirname
    chain = compression_chain(DEFAULT_COMPRESSION) if compressors is None else tuple(compressors)
    with atomic_path(path) as tmp:  # a half-created store is never visible; a second creator's is discarded
        group = zarr.open_group(tmp, mode="w")
        _create_arrays(group, spec, sample_ids, layers, chain, grams_only, checksums)
        group.attrs[ATTRS] = _record(spec, len(sample_ids), layers, grams_only, checksums)
    return open_run(path)


def _existing(cache: Path, spec: RunSpec) -> Run | None:
    """The store that holds this spec's run already: under its own name, or (the same key) under
    another name, which this slug then becomes an alias of; None when there is none."""
    path = cache / spec.dirname
    if path.exists():
        run = open_run(path)
        if run.key != spec.key:
            raise StoreError(f"store {path} holds run {run.key}, not {spec.key}: remove it or choose another cache")
        return run
    cached = store_with_key(cache, spec.key)
    if cached is None:
        return None
    run = open_run(cached)  # the same contents under another name: one store, this name an alias of it
    if spec.slug != run.slug:
        add_alias(cache, spec.slug, run.name)
    return run


def _create_arrays(group: zarr.Group, spec: RunSpec, sample_ids: np.ndarray, layers: dict[str, LayerInfo],
                   chain: tuple, grams_only: bool, checksums: bool) -> None:
    """sample_ids, a (N, D) array per layer in chunks (m, D) (none when ``grams_only``), the tags and the markers."""
    n, m = len(sample_ids), spec.batch_size
    seal = checksummed if checksums else tuple
    ids = group.create_array("sample_ids", shape=(n,), chunks=(m,), dtype="int64", fill_value=-1,
                             compressors=seal(()))
    ids[:] = np.asarray(sample_ids, dtype="int64")
    for layer in spec.layers if not grams_only else ():
        info = layers[layer.name]
        arr = group.create_array(
            f"layers/{layer.name}", shape=(n, info.dim), chunks=(m, info.dim), dtype=spec.dtype,
            fill_value=float("nan"), compressors=seal(chain), config={"write_empty_chunks": True},
        )
        arr.attrs.update(
            name=layer.name, output_shape=list(info.output_shape), reduction=layer.reduction,
            select=layer.select, dtype=spec.dtype,
        )
    if checksums and not grams_only:
        group.create_array(CHECKSUMS, shape=(-(-n // m), len(spec.layers)), chunks=(1, len(spec.layers)),
                           dtype="int64", fill_value=NO_TAG)
    group.create_array("done", shape=(-(-n // m),), chunks=(1,), dtype="uint8", fill_value=0)


def _record(spec: RunSpec, n: int, layers: dict[str, LayerInfo], grams_only: bool, checksums: bool) -> dict:
    """What ``attrs["ckapipe"]`` of a new run store holds: its spec, key, layout and provenance."""
    return {
        "store_version": STORE_VERSION if checksums else 2,
        "spec": spec.to_dict(),
        "key": spec.key,
        "layers": [layer.name for layer in spec.layers],
        "modules": {layer.name: layers[layer.name].module for layer in spec.layers},
        "n_samples": n,
        "batch_size": spec.batch_size,
        "grams_only": grams_only,
        "status": IN_PROGRESS,
        "created": now(),
        "versions": library_versions(),
    }


def open_run(path: str | os.PathLike, check: bool = True) -> Run:
    """The run stored at ``path``; ``check`` refuses it when its metadata disagrees with itself (Run.check)."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r+" if os.access(path, os.W_OK) else "r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types here
        raise StoreError(f"{path} is not a ckapipe run store ({type(err).__name__}: {err})") from None
    if ATTRS not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not a ckapipe run store (no '{ATTRS}' attributes)")
    run = Run(path, group)
    return run.check() if check else run


def share_range(part: int, parts: int, n_chunks: int) -> range:
    """The minibatches of part ``part`` of ``parts`` disjoint shares of a run (SLURM array tasks)."""
    return range(part * n_chunks // parts, (part + 1) * n_chunks // parts)

"""The activation store: the one module that owns the cache layout.

Both stages go through this module; nothing else in ckapipe knows where an
array lives inside a run. The layout (documented in the README, readable with
plain ``zarr``)::

    CACHE/
      <slug>-<key>/                 one Zarr v3 group per extraction run
        zarr.json                   attrs["ckapipe"]: spec, status, versions, ...
        sample_ids                  int64 (N,), chunks (m,): dataset index per row
        layers/<layer>              (N, D), chunks (m, D): chunk k = minibatch k
        checksums                   int64 (n_chunks, layers), chunks (1, layers): the tag of
                                    chunk k of every layer (ckapipe.codecs.chunk_tag)
        done                        uint8 (n_chunks,), chunks (1,): 1 once every
                                    layer of chunk k is written
        grams/m<m>/centred          float64 (N // m, layers, m(m+1)/2), chunks (1, layers, ·):
                                    upper triangle with the diagonal of the Gram of the
                                    mean-centred features of every layer of every full
                                    minibatch, one chunk per minibatch
        grams/m<m>/mean_products    float64 (N // m, layers, m + 1): c_i·μ and μ·μ (the raw Gram)
        grams/m<m>/checksums        int64 (N // m, 2), chunks (1, 2): the tags of row k's two files
        grams/m<m>/centred_done     uint8 (N // m,), chunks (1,)
        (store version 2 kept grams/m<m>/triangles, the U-centred strict triangles, and
        grams/m<m>/done, without checksums: still read for linear CKA)
      .locks/<slug>-<key>/A-B.lock  one file per live writer and chunk range [A, B)

``key`` is a hash of everything that determines the contents (weights hash,
code hash, dataset, transform, order seed, minibatch size, layers and reductions, dtype),
so a changed run gets a new store and a stale cache is never served.

Every chunk (activations and Gram rows) ends with its crc32c and has its tag
recorded beside it, written before its marker (ckapipe.codecs): a flipped,
truncated, missing or misplaced chunk file is refused by name. Stores of
version 2 have neither and are read as before.

This module is the floor both stages stand on: it depends on NumPy and zarr
only, and imports neither stage (the analysis imports it without torch).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl

import numpy as np
import zarr
import zarr.errors
from zarr.core.buffer import default_buffer_prototype

from ckapipe.atomic import atomic_path
from ckapipe.codecs import DEFAULT_COMPRESSION, NO_TAG, checksummed, chunk_tag, compressors as compression_chain, file_crc
from ckapipe.errors import StoreError, suggest
from ckapipe.globs import RUN_SEPARATORS, glob_match, is_glob
from ckapipe.kernels import check_minibatch_size, ucentered_from_centred
from ckapipe.options import CACHE_ENV  # the cache directory when none is given (else ./cache)

STORE_VERSION = 3  # 3: chunks end with their crc32c, tags recorded; Gram caches keep centred Grams with the diagonal
CHECKSUMS = "checksums"  # the array of chunk tags, in a run and in each Gram cache
ATTRS = "ckapipe"
DTYPES = ("float32", "float16", "float64")  # what a layer array may hold
GRAM_KEY, GRAM_LAYERS = "run_key", "layers"  # the stamp of a Gram cache: whose Grams, of which layers

IN_PROGRESS, COMPLETE, FAILED = "in_progress", "complete", "failed"


def default_cache() -> str:
    """The cache directory when none is given: ``$CKAPIPE_CACHE``, else ``cache``."""
    return os.environ.get(CACHE_ENV) or "cache"


def check_dtype(dtype: str) -> str:
    """The dtype, or a one-line error listing those a store can hold."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype {dtype!r} is not supported: use float32 (default), float16 or float64")
    return dtype


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class LayerSpec:
    """One recorded layer: the module name, its reduction and output selector.

    ``name`` is the module's qualified name, with ``#i`` appended for the i-th
    call of a module called several times per forward (``layer1.0.relu#1``).
    """

    name: str
    reduction: str = "flatten"
    select: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines the contents of one run's store."""

    model: str
    weights_hash: str
    dataset: str
    transform: str
    order_seed: int
    batch_size: int
    layers: tuple[LayerSpec, ...]
    dtype: str = "float32"
    limit: int | None = None
    grams_only: bool = False  # no activation arrays, only the Gram cache
    name: str | None = None  # readable slug chosen by the user; not part of the key
    code_hash: str = ""  # the model's module tree and forward code (extract.models.code_hash); "" in older stores

    def __post_init__(self):
        check_minibatch_size(self.batch_size)
        check_dtype(self.dtype)
        if self.name is not None:
            check_run_name(self.name)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [dataclasses.asdict(layer) for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["layers"] = tuple(LayerSpec(**layer) for layer in d["layers"])
        return cls(**d)

    @property
    def key(self) -> str:
        """Short hash of everything but the readable name."""
        d = self.to_dict()
        d.pop("name")
        if not d["code_hash"]:
            d.pop("code_hash")  # a store written before the code hash keeps the key it was written under
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    @property
    def slug(self) -> str:
        """Readable run name: ``MODEL-OPTIONS@DATASET-OPTIONS`` unless the user named the run."""
        if self.name:
            return self.name
        return f"{spec_slug(self.model)[:SLUG_LENGTH // 2]}@{spec_slug(self.dataset)[:SLUG_LENGTH // 2 - 1]}"

    @property
    def dirname(self) -> str:
        return f"{self.slug}-{self.key}"


RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+@=-]*$")
SLUG_LENGTH = 80


def check_run_name(name: str) -> str:
    """A run name that stays a plain, visible directory in the cache, or a one-line error."""
    if not RUN_NAME.match(name) or ".." in name or len(name) > SLUG_LENGTH:
        raise StoreError(
            f"run name {name!r} is not usable: use up to {SLUG_LENGTH} letters, digits and _ . + @ = -, "
            f"starting with a letter or digit (no '/', no '..')"
        )
    return name


def spec_slug(spec: str) -> str:
    """A readable name for a model or dataset spec that keeps what tells runs apart:
    ``zoo:cnn3?seed=1`` -> ``cnn3-seed1``, ``mymodels:tiny_resnet?depth=2`` -> ``tiny_resnet-depth2``,
    ``cifar10:/data?split=test`` -> ``cifar10-splittest``."""
    head, _, query = spec.partition("?")
    words = [short_name(head)]
    for key, value in parse_qsl(query, keep_blank_values=True):
        words.append(_safe(key) + _safe(short_name(value) if (":" in value or "/" in value) else value))
    return "-".join(w for w in words if w)


def short_name(spec: str) -> str:
    """``torchvision:resnet18`` -> ``resnet18``; ``cifar10:/data?split=test`` -> ``cifar10``;
    ``mypkg.nets:student`` -> ``student``."""
    head = spec.split("?")[0]
    if ":" in head:
        source, rest = head.split(":", 1)
        named_by_rest = source in ("torchvision", "timm", "hf", "zoo") or rest.isidentifier()
        head = rest if named_by_rest else source  # package.module:factory -> factory
    head = head.rstrip("/").split("/")[-1] or head
    return _safe(head) or "run"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_.+" else "-" for c in str(text)).strip("-.")


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of one layer, known after a probe forward pass."""

    dim: int  # D: features per sample after the reduction
    output_shape: tuple[int, ...]  # per-sample shape of the raw output
    module: str = ""  # the module's type (class name, ``Linear``): Sequential layers are named 0, 1, ...


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

    def grams(self, m: int, create: bool = False) -> "GramCache | None":
        """The Gram cache for analysis minibatch size m (None if absent).

        Whoever creates it stamps it with this run's key and layer list, and a
        cache whose stamp disagrees (copied from another run, or left unstamped)
        is refused: its rows are positional, so another run's Grams would give
        numbers under the wrong labels. ``create`` makes whatever is missing, so
        processes filling one run's Grams side by side may all ask for it; in a
        cache of store version 2 it adds the centred Grams beside the old rows
        (which a reader may still be reading; they are never deleted here).
        """
        path = f"grams/m{m}"
        if path not in self.group:
            if not create:
                return None
            check_minibatch_size(m)
            group = self._create_gram_group(path)
        else:
            group = self.group[path]
        if "done" in group and GramCache.LEGACY not in group and GramCache.CENTRED not in group:
            raise StoreError(
                f"the Gram cache of run {self.name} at m={m} has the per-layer layout of ckapipe store version 1: "
                f"delete {self.path / path} and it is filled again"
            )
        stamp = group.attrs.get(GRAM_KEY), group.attrs.get(GRAM_LAYERS)
        if stamp != (self.key, self.layer_names):
            whose = f"run key {stamp[0]}" if stamp[0] != self.key else "another layer list"
            raise StoreError(
                f"the Gram cache of run {self.name} at m={m} is not this run's ({whose if stamp[0] else 'no stamp'}): "
                f"delete {self.path / path} and it is filled again"
            )
        n_mb, n_layers = self.n_samples // m, len(self.layer_names)
        if create:  # the markers last: a cache with markers has all its arrays
            if self.checksummed:
                _create_missing(group, CHECKSUMS, shape=(n_mb, 2), chunks=(1, 2), dtype="int64", fill_value=NO_TAG)
            for name, width in ((GramCache.CENTRED, m * (m + 1) // 2), (GramCache.MEANS, m + 1)):
                _create_missing(group, name, shape=(n_mb, n_layers, width), chunks=(1, n_layers, width),
                                dtype="float64", fill_value=float("nan"),
                                compressors=checksummed(()) if self.checksummed else GRAM_COMPRESSORS,
                                config={"write_empty_chunks": True})
            _create_missing(group, GramCache.MARKERS, shape=(n_mb,), chunks=(1,), dtype="uint8", fill_value=0)
        elif GramCache.CENTRED not in group and GramCache.LEGACY not in group:
            return None
        cache = GramCache(group, self.layer_names, m, self.name, self.key, self.path, self.checksummed)
        width = m * (m + 1) // 2 if cache.layout == 3 else m * (m - 1) // 2
        shape = cache._rows.shape
        if shape != (n_mb, n_layers, width) or (cache.tagged and CHECKSUMS not in group):
            raise StoreError(
                f"the Gram cache of run {self.name} at m={m} does not fit the run "
                f"({'no checksums' if shape == (n_mb, n_layers, width) else f'shape {shape}'}): "
                f"delete {self.path / path} and it is filled again"
            )
        return cache

    def _create_gram_group(self, path: str) -> zarr.Group:
        """The Gram cache's group, created with its stamp in the same write (or the one another process made)."""
        try:
            return self.group.create_group(path, attributes={GRAM_KEY: self.key, GRAM_LAYERS: self.layer_names})
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
            return self.group[path]


GRAM_COMPRESSORS = None  # Grams are dense float64: compression buys little and costs every re-analysis


@dataclass
class GramCache:
    """The Grams of one run at one minibatch size m, every layer of a minibatch in one chunk.

    Row k holds, for every layer in the run's order, the upper triangle with the
    diagonal of C = X̃ X̃ᵀ, X̃ the mean-centred features of minibatch k (m(m+1)/2
    float64 numbers), and the mean products [c_i·μ for each row i, μ·μ] (m + 1),
    so that every kernel measure has what it needs: U(C) = U(X Xᵀ) for the unbiased
    HSIC (derived on read), C itself, distances, and X Xᵀ = C + a1ᵀ + 1aᵀ + s. The
    marker of k is set once the whole row is written. One chunk per minibatch means
    one file and one read for all layers. In a checksummed store each of the row's
    two files ends with its crc32c and their tags are recorded before the marker.

    A cache of store version 2 (``layout == 2``) holds the U-centred strict triangles
    only, without checksums: it serves ``read`` (linear CKA) and nothing else.
    """

    CENTRED, MEANS, MARKERS = "centred", "mean_products", "centred_done"
    LEGACY, LEGACY_MARKERS = "triangles", "done"  # store version 2

    group: zarr.Group = field(repr=False)
    layers: list[str]
    m: int
    run_name: str
    run_key: str = ""
    run_path: Path | None = None
    checksummed: bool = False

    @property
    def attrs(self):
        return self.group.attrs

    @property
    def label(self) -> str:
        return f"grams/m{self.m}"

    @functools.cached_property
    def layout(self) -> int:
        """3: centred Grams with their diagonal and mean products; 2: U-centred strict triangles only."""
        return 3 if self.CENTRED in self.group else 2

    @functools.cached_property
    def _rows(self) -> zarr.Array:
        return self.group[self.CENTRED if self.layout == 3 else self.LEGACY]

    @functools.cached_property
    def _means(self) -> zarr.Array:
        return self.group[self.MEANS]

    @functools.cached_property
    def _markers(self) -> zarr.Array:
        return self.group[self.MARKERS if self.layout == 3 else self.LEGACY_MARKERS]

    @functools.cached_property
    def _checksums(self) -> zarr.Array:
        return self.group[CHECKSUMS]

    @property
    def n_minibatches(self) -> int:
        return self._rows.shape[0]

    def done(self, ks: Sequence[int] | None = None) -> np.ndarray:
        """Boolean marker per minibatch (all of them, or those of ks)."""
        if ks is None:
            return self._markers[:].astype(bool)
        if not len(ks):
            return np.zeros(0, dtype=bool)
        return np.concatenate([self._markers[a:b] for a, b in spans(ks)]).astype(bool)

    def read(self, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """(len(ks), layers, m(m-1)/2) strict upper triangles of U(X Xᵀ) of minibatches ks (sorted):
        what linear CKA reads, from either layout, into ``out`` when given (see ``read_centred``)."""
        if self.layout == 2:
            return self._read(self._rows, ks, out)
        triangles = ucentered_from_centred(self.read_centred(ks))
        if out is None:
            return triangles
        out[...] = triangles
        return out

    def read_centred(self, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """(len(ks), layers, m(m+1)/2) upper triangles with the diagonal of the centred Grams; an error
        naming the run and the minibatch when a row is unreadable, or (checksummed) not the one written there.

        Zarr decodes straight into ``out`` (C-contiguous float64 of that shape) when given:
        no second task-sized buffer, which the allocator would keep around.
        """
        self._require_layout_3()
        return self._read(self._rows, ks, out)

    def read_means(self, ks: Sequence[int]) -> np.ndarray:
        """(len(ks), layers, m + 1) mean products [c_i·μ, μ·μ] of minibatches ks (sorted)."""
        self._require_layout_3()
        return self._read(self._means, ks, None)

    def write(self, ks: Sequence[int], centred: np.ndarray, means: np.ndarray) -> None:
        """Rows ks (sorted; (len(ks), layers, m(m+1)/2) and (len(ks), layers, m + 1) on the host), then
        their tags, then their markers."""
        self._require_layout_3()
        for array, values in ((self._rows, centred), (self._means, means)):
            i = 0
            for a, b in spans(ks):
                array[a:b] = values[i:i + b - a]
                i += b - a
        if self.tagged:
            for a, b in spans(ks):
                self._checksums[a:b] = [[self._file_tag(array, k) for array in self.arrays] for k in range(a, b)]
        for a, b in spans(ks):
            self._markers[a:b] = 1

    def _read(self, array: zarr.Array, ks: Sequence[int], out: np.ndarray | None) -> np.ndarray:
        if self.tagged:  # rows marked done must be the files written there; others read as NaN
            written = [k for k, done in zip(ks, self.done(ks)) if done]
            for k, why in zip(written, self.tag_problems(written, [array])):
                if why:
                    raise self.unreadable(k, why)
        if out is None:
            out = np.empty((len(ks), *array.shape[1:]), dtype=np.float64)
        nd_buffer = default_buffer_prototype().nd_buffer
        i = 0
        for a, b in spans(ks):
            try:
                array.get_basic_selection(slice(a, b), out=nd_buffer.from_numpy_array(out[i:i + b - a]))
            except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
                raise self.unreadable(self._first_unreadable(array, range(a, b)), decode_failure(err)) from None
            i += b - a
        return out

    @property
    def arrays(self) -> list[zarr.Array]:
        """The arrays a row is made of (one file each per minibatch), in the order of their tags."""
        return [self._rows, self._means] if self.layout == 3 else [self._rows]

    @property
    def tagged(self) -> bool:
        """Whether rows carry tags (a checksummed store's cache of this layout)."""
        return self.checksummed and self.layout == 3

    def tag_problems(self, ks: Sequence[int], arrays: Sequence[zarr.Array] | None = None) -> list[str | None]:
        """For each row k of ks (sorted): why one of its files (of ``arrays``, default all) is not the
        one written there, or None."""
        if not self.tagged:
            return [None] * len(ks)
        recorded = np.concatenate([self._checksums[a:b] for a, b in spans(ks)]) if len(ks) else []
        columns = [(i, a) for i, a in enumerate(self.arrays) if arrays is None or any(a is b for b in arrays)]
        return [next((why for i, array in columns
                      if (why := tag_problem(self.run_key, self.run_path, array, self._label(array), k, tags[i]))), None)
                for k, tags in zip(ks, recorded)]

    def row_problem(self, k: int) -> str | None:
        """Why row k does not decode to finite numbers, or None (after its tags are checked)."""
        for array in self.arrays:
            try:
                if not np.isfinite(array[k]).all():
                    return "it holds NaN or inf (its file is missing, or its bytes were changed)"
            except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
                return decode_failure(err)
        return None

    def delete_row(self, k: int) -> None:
        """Remove row k's files and its marker, so that it is filled again."""
        for array in self.arrays:
            chunk_file(self.run_path, array, k).unlink(missing_ok=True)
        self._markers[k] = 0

    def unreadable(self, k: int, why: str) -> StoreError:
        return StoreError(
            f"the Gram row of minibatch {k} (m={self.m}, every layer) in run {self.run_name} cannot be read: {why}; "
            f"`ckapipe verify {self.run_name} --repair` deletes it (analyse with --no-gram-cache meanwhile)"
        )

    def _first_unreadable(self, array: zarr.Array, ks) -> int:
        for k in ks:
            try:
                array[k]
            except Exception:  # noqa: BLE001 - the row that fails to decode
                return k
        return ks[0]

    def _require_layout_3(self) -> None:
        if self.layout != 3:
            raise StoreError(
                f"the Gram cache of run {self.run_name} (m={self.m}) has the layout of store version 2 "
                f"(U-centred Grams only): it serves linear CKA; other measures rebuild it from the activations"
            )

    def _label(self, array: zarr.Array) -> str:
        return f"{self.label}/{array.basename}"

    def _file_tag(self, array: zarr.Array, k: int) -> int:
        return file_tag(self.run_key, self._label(array), k, chunk_file(self.run_path, array, k))



def chunk_file(root: Path, array: zarr.Array, k: int) -> Path:
    """The file of chunk k (along the first axis, the only axis chunked in two) of an array in a run's store."""
    return Path(root) / array.path / array.metadata.encode_chunk_key((k,) + (0,) * (array.ndim - 1))


def tag_problem(run_key: str, root: Path, array: zarr.Array, label: str, k: int, recorded: int) -> str | None:
    """Why the file of chunk k of ``array`` is not the one whose tag was recorded there, or None."""
    return file_problem(run_key, label, k, chunk_file(root, array, k), recorded)


def file_tag(key: str, label: str, k: int, path: Path) -> int:
    """The tag of the chunk file at ``path`` as chunk k of ``label`` (NO_TAG when it has no file)."""
    crc = file_crc(path)
    return NO_TAG if crc is None else chunk_tag(key, label, k, crc)


def file_problem(key: str, label: str, k: int, path: Path, recorded: int) -> str | None:
    """Why the chunk file at ``path`` is not the one tagged ``recorded`` as chunk k of ``label``, or None
    (run stores and sealed results stores alike, ckapipe.integrity)."""
    crc = file_crc(path)
    if crc is None:
        return "its file is missing or truncated"
    if recorded == NO_TAG:
        return "no checksum was recorded for it"
    if chunk_tag(key, label, k, crc) != recorded:
        return "its file is not the one written there (changed, or moved from another minibatch, layer or run)"
    return None


def decode_failure(err: Exception) -> str:
    """A few words for a chunk that fails to decode: a checksum that does not match, or the codec's error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if "checksum" in text.lower():
        return "its bytes do not match their checksum (flipped, overwritten or truncated)"
    return f"it does not decode ({type(err).__name__}{': ' + text[:120] if text else ''})"


def verify_hint(run: Run) -> str:
    """Where to turn for a damaged run: the command that names every bad chunk and how to rebuild it."""
    return f"`ckapipe verify --cache {run.path.parent} {run.name}` names every bad chunk and the command that rebuilds it"


def spans(ks: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, stop) runs of consecutive values (a Zarr slice per run of
    consecutive chunks is much faster than an orthogonal selection)."""
    out: list[list[int]] = []
    for k in ks:
        if out and out[-1][1] == k:
            out[-1][1] = k + 1
        else:
            out.append([k, k + 1])
    return [(a, b) for a, b in out]


def _create_missing(group: zarr.Group, name: str, **array) -> None:
    """Create an array unless it exists (or another process creates it first)."""
    if name in group:
        return
    try:
        group.create_array(name, **array)
    except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError):
        pass


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
    (default ckapipe.codecs.DEFAULT_COMPRESSION) then the crc32c codec, unless
    ``checksums=False`` writes the store version 2 layout (no checksums, no tags),
    which only the bench uses, to measure what they cost.
    """
    grams_only = grams_only or spec.grams_only
    cache = ensure_cache(cache)
    path = cache / spec.dirname
    if path.exists():
        run = open_run(path)
        if run.key != spec.key:
            raise StoreError(f"store {path} holds run {run.key}, not {spec.key}: remove it or choose another cache")
        return run
    cached = store_with_key(cache, spec.key)
    if cached is not None:  # the same contents under another name: one store, this name an alias of it
        run = open_run(cached)
        if spec.slug != run.slug:
            add_alias(cache, spec.slug, run.name)
        return run
    n, m = len(sample_ids), spec.batch_size
    chain = compression_chain(DEFAULT_COMPRESSION) if compressors is None else tuple(compressors)
    seal = checksummed if checksums else tuple
    with atomic_path(path) as tmp:  # a half-created store is never visible; a second creator's is discarded
        group = zarr.open_group(tmp, mode="w")
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
        group.attrs[ATTRS] = {
            "store_version": STORE_VERSION if checksums else 2,
            "spec": spec.to_dict(),
            "key": spec.key,
            "layers": [layer.name for layer in spec.layers],
            "modules": {layer.name: layers[layer.name].module for layer in spec.layers},
            "n_samples": n,
            "batch_size": m,
            "grams_only": grams_only,
            "status": IN_PROGRESS,
            "created": now(),
            "versions": library_versions(),
        }
    return open_run(path)


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


def share_range(part: int, parts: int, n_chunks: int) -> range:
    """The minibatches of part ``part`` of ``parts`` disjoint shares of a run (SLURM array tasks)."""
    return range(part * n_chunks // parts, (part + 1) * n_chunks // parts)


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


# --------------------------------------------------------------------------- helpers


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under a run's directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


EXTRACTION_LIBRARIES = ("ckapipe", "numpy", "zarr", "numcodecs", "torch", "torchvision", "timm", "transformers")


def library_versions(dists: Sequence[str] = EXTRACTION_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``dists`` (those installed), recorded as provenance."""
    md = importlib.metadata
    versions = {}
    for dist in dists:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def now() -> str:
    """The time in UTC, to the second, as recorded in stores and results."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

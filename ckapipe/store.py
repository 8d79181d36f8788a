"""The activation store: the one module that owns the cache layout.

Both stages go through this module; nothing else in ckapipe knows where an
array lives inside a run. The layout (documented in the README, readable with
plain ``zarr``)::

    CACHE/
      <slug>-<key>/                 one Zarr v3 group per extraction run
        zarr.json                   attrs["ckapipe"]: spec, status, versions, ...
        sample_ids                  int64 (N,), chunks (m,): dataset index per row
        layers/<layer>              (N, D), chunks (m, D): chunk k = minibatch k
        done                        uint8 (n_chunks,), chunks (1,): 1 once every
                                    layer of chunk k is written
        grams/m<m>/centred          float64 (N // m, layers, m(m+1)/2), chunks (1, layers, ·):
                                    upper triangle with the diagonal of the Gram of the
                                    mean-centred features of every layer of every full
                                    minibatch, one chunk per minibatch
        grams/m<m>/mean_products    float64 (N // m, layers, m + 1): c_i·μ and μ·μ (the raw Gram)
        grams/m<m>/centred_done     uint8 (N // m,), chunks (1,)
        (store version 2 kept grams/m<m>/triangles, the U-centred strict triangles, and
        grams/m<m>/done: still read for linear CKA)
      .locks/<slug>-<key>/A-B.lock  one file per live writer and chunk range [A, B)

``key`` is a hash of everything that determines the contents (weights hash,
dataset, transform, order seed, minibatch size, layers and reductions, dtype),
so a changed run gets a new store and a stale cache is never served.

This module is the floor both stages stand on: it depends on NumPy and zarr
only, and imports neither stage (the analysis imports it without torch).
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import functools
import hashlib
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

from ckapipe.atomic import atomic_path
from ckapipe.errors import StoreError, suggest
from ckapipe.kernels import check_minibatch_size, ucentered_from_centred

STORE_VERSION = 3  # 2: the Gram cache holds every layer of a minibatch in one chunk; 3: centred Grams with their diagonal
ATTRS = "ckapipe"
DTYPES = ("float32", "float16", "float64")  # what a layer array may hold
GRAM_KEY, GRAM_LAYERS = "run_key", "layers"  # the stamp of a Gram cache: whose Grams, of which layers

IN_PROGRESS, COMPLETE, FAILED = "in_progress", "complete", "failed"
CACHE_ENV = "CKAPIPE_CACHE"  # the cache directory when none is given (else ./cache)


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


@dataclass
class Run:
    """A handle on one run's store: its path and group; it keeps the layer arrays it opened and the
    completion markers it last read (markers only go from 0 to 1)."""

    path: Path
    group: zarr.Group = field(repr=False)
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)  # layer arrays, opened once
    _done: np.ndarray | None = field(default=None, repr=False, compare=False)  # markers last read

    # ---- metadata
    @property
    def meta(self) -> dict:
        return self.group.attrs[ATTRS]

    @property
    def spec(self) -> RunSpec:
        return RunSpec.from_dict(self.meta["spec"])

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

    def sample_ids(self) -> np.ndarray:
        return self.group["sample_ids"][:]

    def chunk_slice(self, k: int) -> slice:
        m = self.batch_size
        return slice(k * m, min((k + 1) * m, self.n_samples))

    def layer(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if name not in self.layer_names:
                raise StoreError(f"run {self.name} has no layer {name!r}{suggest(name, self.layer_names)}")
            self._arrays[name] = self.group[f"layers/{name}"]
        return self._arrays[name]

    def set_meta(self, **changes) -> None:
        meta = dict(self.meta)
        meta.update(changes)
        self.group.attrs[ATTRS] = meta

    # ---- activations
    def done(self) -> np.ndarray:
        """Boolean completion marker per chunk."""
        return self.group["done"][:].astype(bool)

    def missing_chunks(self) -> list[int]:
        return [int(k) for k in np.flatnonzero(~self.done())]

    def write_chunk(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk k of every layer, then its completion marker (in that order)."""
        rows = self.chunk_slice(k)
        for name in self.layer_names if not self.grams_only else ():
            self.layer(name)[rows] = arrays[name]
        self.group["done"][k] = 1

    def chunk_done(self, k: int) -> bool:
        """Completion marker of chunk k. Markers only ever go from 0 to 1, so the
        markers read once are kept and read again only for a chunk not yet seen done
        (a Zarr call per chunk read was half of an analysis's Zarr calls)."""
        if self._done is None or not self._done[k]:
            self._done = self.done()
        return bool(self._done[k])

    def read_chunk(self, name: str, k: int) -> np.ndarray:
        """Rows of minibatch k of one layer; refuses a chunk that was never completed."""
        if not self.chunk_done(k):
            raise StoreError(f"chunk {k} of layer {name!r} in run {self.name} is missing (extraction incomplete)")
        return self.layer(name)[self.chunk_slice(k)]

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
        if create:
            n_mb, n_layers = self.n_samples // m, len(self.layer_names)
            for name, width in ((GramCache.CENTRED, m * (m + 1) // 2), (GramCache.MEANS, m + 1)):
                _create_missing(group, name, shape=(n_mb, n_layers, width), chunks=(1, n_layers, width),
                                dtype="float64", fill_value=float("nan"), compressors=GRAM_COMPRESSORS,
                                config={"write_empty_chunks": True})
            _create_missing(group, GramCache.MARKERS, shape=(n_mb,), chunks=(1,), dtype="uint8", fill_value=0)
        elif GramCache.CENTRED not in group and GramCache.LEGACY not in group:
            return None
        return GramCache(group, self.layer_names, m, self.name)

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
    one file and one read for all layers.

    A cache of store version 2 (``layout == 2``) holds the U-centred strict triangles
    only: it serves ``read`` (linear CKA) and nothing else.
    """

    CENTRED, MEANS, MARKERS = "centred", "mean_products", "centred_done"
    LEGACY, LEGACY_MARKERS = "triangles", "done"  # store version 2

    group: zarr.Group = field(repr=False)
    layers: list[str]
    m: int
    run_name: str

    @property
    def attrs(self):
        return self.group.attrs

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
        """(len(ks), layers, m(m+1)/2) upper triangles with the diagonal of the centred Grams.

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
        their markers."""
        self._require_layout_3()
        for array, values in ((self._rows, centred), (self._means, means)):
            i = 0
            for a, b in spans(ks):
                array[a:b] = values[i:i + b - a]
                i += b - a
        for a, b in spans(ks):
            self._markers[a:b] = 1

    def _read(self, array: zarr.Array, ks: Sequence[int], out: np.ndarray | None) -> np.ndarray:
        from zarr.core.buffer import default_buffer_prototype

        if out is None:
            out = np.empty((len(ks), *array.shape[1:]), dtype=np.float64)
        nd_buffer = default_buffer_prototype().nd_buffer
        try:
            i = 0
            for a, b in spans(ks):
                array.get_basic_selection(slice(a, b), out=nd_buffer.from_numpy_array(out[i:i + b - a]))
                i += b - a
        except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
            raise StoreError(
                f"the Gram cache of run {self.run_name} (m={self.m}) cannot be read ({type(err).__name__}): "
                f"analyse with --no-gram-cache or delete its grams/m{self.m} folder"
            ) from None
        return out

    def _require_layout_3(self) -> None:
        if self.layout != 3:
            raise StoreError(
                f"the Gram cache of run {self.run_name} (m={self.m}) has the layout of store version 2 "
                f"(U-centred Grams only): it serves linear CKA; other measures rebuild it from the activations"
            )


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
) -> Run:
    """Create the store of a run (or open it when it exists: resume).

    Every layer array gets chunks (m, D), a NaN fill value and write_empty_chunks,
    so a chunk that was never written reads as NaN, never as zeros.
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
    with atomic_path(path) as tmp:  # a half-created store is never visible; a second creator's is discarded
        group = zarr.open_group(tmp, mode="w")
        ids = group.create_array("sample_ids", shape=(n,), chunks=(m,), dtype="int64", fill_value=-1)
        ids[:] = np.asarray(sample_ids, dtype="int64")
        for layer in spec.layers if not grams_only else ():
            info = layers[layer.name]
            arr = group.create_array(
                f"layers/{layer.name}", shape=(n, info.dim), chunks=(m, info.dim), dtype=spec.dtype,
                fill_value=float("nan"), compressors=compressors, config={"write_empty_chunks": True},
            )
            arr.attrs.update(
                name=layer.name, output_shape=list(info.output_shape), reduction=layer.reduction,
                select=layer.select, dtype=spec.dtype,
            )
        group.create_array("done", shape=(-(-n // m),), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs[ATTRS] = {
            "store_version": STORE_VERSION,
            "spec": spec.to_dict(),
            "key": spec.key,
            "layers": [layer.name for layer in spec.layers],
            "n_samples": n,
            "batch_size": m,
            "grams_only": grams_only,
            "status": IN_PROGRESS,
            "created": now(),
            "versions": library_versions(),
        }
    return open_run(path)


def open_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r+" if os.access(path, os.W_OK) else "r")
    except Exception as err:  # noqa: BLE001 - zarr raises several types here
        raise StoreError(f"{path} is not a ckapipe run store ({type(err).__name__}: {err})") from None
    if ATTRS not in group.attrs:
        raise StoreError(f"{path} is a Zarr group but not a ckapipe run store (no '{ATTRS}' attributes)")
    return Run(path, group)


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
    cache = Path(cache)
    if not cache.is_dir():
        raise StoreError(f"cache directory {cache} does not exist")
    runs = []
    for path in sorted(cache.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and (path / "zarr.json").exists():
            try:
                runs.append(open_run(path))
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


def find_runs(cache: str | os.PathLike, patterns: Sequence[str]) -> list[Run]:
    """Resolve run names to stores, in the order given.

    A pattern is a store's full name (``slug-key``), its key, its slug or an
    alias, or a shell glob over any of these (``student-*``). A slug or alias
    that names several stores is ambiguous and refused with the candidates.
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
    return chosen


def _matches(pattern: str, runs: list[Run], aliases: dict[str, str]) -> list[Run]:
    exact = [r for r in runs if pattern in (r.name, r.key)]
    if exact:
        return exact
    named = [r for r in runs if r.slug == pattern or aliases.get(pattern) == r.name]
    if len(named) > 1:
        raise StoreError(f"run name {pattern!r} is ambiguous: name one of {_candidates(named)}")
    if named or not any(c in pattern for c in "*?["):
        return named
    hits = [r for r in runs if fnmatch.fnmatchcase(r.name, pattern)]
    by_slug = [r for r in runs if r not in hits and (fnmatch.fnmatchcase(r.slug, pattern) or any(
        fnmatch.fnmatchcase(a, pattern) for a, target in aliases.items() if target == r.name))]
    for run in by_slug:
        twins = [r for r in by_slug if r.slug == run.slug]
        if len(twins) > 1:
            raise StoreError(f"run name {run.slug!r} (matched by {pattern!r}) is ambiguous: name one of {_candidates(twins)}")
    return sorted(hits + by_slug, key=lambda r: r.name)


def _candidates(runs: list[Run]) -> str:
    return "; ".join(f"{r.name} ({r.spec.model} on {r.spec.dataset})" for r in runs)


# --------------------------------------------------------------------------- helpers


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under a run's directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


EXTRACTION_LIBRARIES = ("ckapipe", "numpy", "zarr", "numcodecs", "torch", "torchvision", "timm", "transformers")


def library_versions(dists: Sequence[str] = EXTRACTION_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``dists`` (those installed), recorded as provenance."""
    import importlib.metadata as md

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

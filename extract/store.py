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
        grams/m<m>/triangles        float64 (N // m, layers, m(m-1)/2), chunks (1, layers, ·):
                                    upper triangle of the U-centred Gram of every layer
                                    of every full minibatch, one chunk per minibatch
        grams/m<m>/done             uint8 (N // m,), chunks (1,)
      .locks/<slug>-<key>/A-B.lock  one file per live writer and chunk range [A, B)

``key`` is a hash of everything that determines the contents (weights hash,
dataset, transform, order seed, minibatch size, layers and reductions, dtype),
so a changed run gets a new store and a stale cache is never served.

The module depends on NumPy and zarr only: the analysis imports it without torch.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import fnmatch
import functools
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import zarr
import zarr.errors

from extract.errors import CkapipeError

STORE_VERSION = 2  # 2: the Gram cache holds every layer of a minibatch in one chunk
ATTRS = "ckapipe"
MIN_BATCH = 4  # the unbiased HSIC estimator divides by m(m-3)

IN_PROGRESS, COMPLETE, FAILED = "in_progress", "complete", "failed"


class StoreError(CkapipeError):
    """A cache, run or chunk that cannot be used as asked; the message says why."""


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
        if self.batch_size < MIN_BATCH:
            raise StoreError(
                f"batch size {self.batch_size} is too small: the unbiased HSIC needs "
                f"minibatches of at least {MIN_BATCH} samples (use --batch-size >= {MIN_BATCH})"
            )
        if self.dtype not in ("float32", "float16", "float64"):
            raise StoreError(f"dtype {self.dtype!r} is not supported: use float32, float16 or float64")

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
        """Readable run name: ``model@dataset`` unless the user named the run."""
        return self.name or f"{short_name(self.model)}@{short_name(self.dataset)}"

    @property
    def dirname(self) -> str:
        return f"{self.slug}-{self.key}"


def short_name(spec: str) -> str:
    """``torchvision:resnet18`` -> ``resnet18``; ``cifar10:/data?split=test`` -> ``cifar10``;
    ``mypkg.nets:student`` -> ``student``."""
    head = spec.split("?")[0]
    if ":" in head:
        source, rest = head.split(":", 1)
        named_by_rest = source in ("torchvision", "timm", "hf", "zoo") or ("." in source and rest.isidentifier())
        head = rest if named_by_rest else source  # package.module:factory -> factory
    head = head.rstrip("/").split("/")[-1] or head
    safe = "".join(c if c.isalnum() or c in "-_.+" else "-" for c in head)
    return safe.strip("-") or "run"


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
        return self.spec.slug

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
            self.set_meta(status=COMPLETE, completed=_now())
        return self.status

    # ---- the Gram cache
    def grams(self, m: int, create: bool = False) -> "GramCache | None":
        """The Gram cache for analysis minibatch size m (None if absent).

        ``create`` makes whatever is missing of it, so processes filling one
        run's Grams side by side (disjoint chunk ranges) may all ask for it.
        """
        path = f"grams/m{m}"
        if not create:
            if path not in self.group:
                return None
            group = self.group[path]
            return GramCache(group, self.layer_names, m, self.name) if GramCache.TRIANGLES in group else None
        if m < MIN_BATCH:
            raise StoreError(f"minibatch size {m} is under {MIN_BATCH}")
        group = self.group.require_group(path)
        if "done" in group and GramCache.TRIANGLES not in group:
            raise StoreError(
                f"the Gram cache of run {self.name} at m={m} has the per-layer layout of ckapipe store version 1: "
                f"delete {self.path / path} and it is filled again"
            )
        n_mb, width = self.n_samples // m, m * (m - 1) // 2
        _create_missing(group, GramCache.TRIANGLES, shape=(n_mb, len(self.layer_names), width),
                        chunks=(1, len(self.layer_names), width), dtype="float64", fill_value=float("nan"),
                        compressors=None, config={"write_empty_chunks": True})
        _create_missing(group, "done", shape=(n_mb,), chunks=(1,), dtype="uint8", fill_value=0)
        return GramCache(group, self.layer_names, m, self.name)


@dataclass
class GramCache:
    """The U-centred Grams of one run at one minibatch size m, every layer of a minibatch in one chunk.

    Row k holds, for every layer in the run's order, the strict upper triangle of
    U(X_k X_kᵀ) (m(m-1)/2 float64 numbers); the ``done`` marker of k is set once
    the whole row is written. One chunk per minibatch means one file and one
    read for all layers (per-layer arrays cost a Zarr call per layer and
    minibatch, most of a re-analysis's time).
    """

    TRIANGLES = "triangles"

    group: zarr.Group = field(repr=False)
    layers: list[str]
    m: int
    run_name: str

    @property
    def attrs(self):
        return self.group.attrs

    @functools.cached_property
    def _triangles(self) -> zarr.Array:
        return self.group[self.TRIANGLES]

    @functools.cached_property
    def _markers(self) -> zarr.Array:
        return self.group["done"]

    @property
    def n_minibatches(self) -> int:
        return self._triangles.shape[0]

    def done(self, ks: Sequence[int] | None = None) -> np.ndarray:
        """Boolean marker per minibatch (all of them, or those of ks)."""
        if ks is None:
            return self._markers[:].astype(bool)
        if not len(ks):
            return np.zeros(0, dtype=bool)
        return np.concatenate([self._markers[a:b] for a, b in spans(ks)]).astype(bool)

    def read(self, ks: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """(len(ks), layers, m(m-1)/2) triangles of minibatches ks (sorted); a clear error if unreadable.

        Zarr decodes straight into ``out`` (C-contiguous float64 of that shape) when given:
        no second task-sized buffer, which the allocator would keep around.
        """
        from zarr.core.buffer import default_buffer_prototype

        if out is None:
            out = np.empty((len(ks), *self._triangles.shape[1:]), dtype=np.float64)
        nd_buffer = default_buffer_prototype().nd_buffer
        try:
            i = 0
            for a, b in spans(ks):
                self._triangles.get_basic_selection(slice(a, b), out=nd_buffer.from_numpy_array(out[i:i + b - a]))
                i += b - a
        except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
            raise StoreError(
                f"the Gram cache of run {self.run_name} (m={self.m}) cannot be read ({type(err).__name__}): "
                f"analyse with --no-gram-cache or delete its grams/m{self.m} folder"
            ) from None
        return out

    def write(self, ks: Sequence[int], triangles: np.ndarray) -> None:
        """Rows ks (sorted; (len(ks), layers, width) on the host), then their markers."""
        i = 0
        for a, b in spans(ks):
            self._triangles[a:b] = triangles[i:i + b - a]
            i += b - a
        for a, b in spans(ks):
            self._markers[a:b] = 1


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
    tmp = cache / f".{spec.dirname}.creating-{os.getpid()}"
    group = zarr.open_group(tmp, mode="w")
    n, m = len(sample_ids), spec.batch_size
    ids = group.create_array("sample_ids", shape=(n,), chunks=(m,), dtype="int64", fill_value=-1)
    ids[:] = np.asarray(sample_ids, dtype="int64")
    for layer in spec.layers:
        info = layers[layer.name]
        if grams_only:
            continue
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
        "created": _now(),
        "versions": library_versions(),
    }
    try:
        os.rename(tmp, path)  # atomic: a half-created store is never visible
    except OSError:  # another process created it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
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


def find_runs(cache: str | os.PathLike, patterns: Sequence[str]) -> list[Run]:
    """Resolve run names to stores, in the order given.

    A pattern matches a store's full name (``slug-key``), its key, or its slug,
    with shell globs (``student-*@digits``). A slug shared by several stores is
    ambiguous and refused with the full names to choose from.
    """
    runs = list_runs(cache)
    chosen: list[Run] = []
    for pattern in patterns:
        exact = [r for r in runs if pattern in (r.name, r.key)]
        if exact:
            hits = exact
        else:
            hits = [r for r in runs if fnmatch.fnmatchcase(r.slug, pattern) or fnmatch.fnmatchcase(r.name, pattern)]
        if not hits:
            names = sorted({r.slug for r in runs} | {r.name for r in runs})
            raise StoreError(f"no run {pattern!r} in cache {cache}{suggest(pattern, names)}")
        by_slug: dict[str, list[Run]] = {}
        for r in hits:
            by_slug.setdefault(r.slug, []).append(r)
        for slug, group in by_slug.items():
            if len(group) > 1:
                full = ", ".join(r.name for r in group)
                raise StoreError(f"run name {slug!r} is ambiguous in {cache}: name one of {full}")
        chosen += [r for r in hits if r.name not in {c.name for c in chosen}]
    return chosen


# --------------------------------------------------------------------------- compression

# Chosen by measurement on real activations (README, "Store"; tests/bench/bench_extract.py):
# ReLU activations are 40-70 % zeros, which plain zstd at level 1 halves (ratio 2.2)
# at the write speed of no compression; byte shuffling hurts (it splits the zero runs).
DEFAULT_COMPRESSION = "blosc-lz4"
COMPRESSION_CHOICES = ("none", "zstd1", "zstd3", "blosc-lz4", "blosc-lz4-shuffle", "blosc-zstd-shuffle")


def compressors(name: str) -> tuple:
    """The Zarr v3 codec chain for a compression name (``--compression``)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    chains = {
        "none": (),
        "zstd1": (ZstdCodec(level=1),),
        "zstd3": (ZstdCodec(level=3),),
        "blosc-lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),),
        "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),),
        "blosc-zstd-shuffle": (BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"),),
    }
    if name not in chains:
        raise StoreError(f"unknown compression {name!r}{suggest(name, list(chains))} (choose {', '.join(chains)})")
    return chains[name]


# --------------------------------------------------------------------------- writers


@contextmanager
def writer_lock(run_path: str | os.PathLike, chunks: range) -> Iterator[None]:
    """Claim chunks [start, stop) of a run for this process.

    Refuses when a live writer holds an overlapping range, so two extractions
    of one run never interleave writes to one chunk; disjoint ranges (a SLURM
    array over chunk ranges) proceed side by side. A lock left by a dead
    process on this host is taken over.
    """
    locks = lock_dir(run_path)
    locks.mkdir(parents=True, exist_ok=True)
    mine = locks / f"{chunks.start}-{chunks.stop}.lock"
    for other in locks.glob("*.lock"):
        start, stop = (int(x) for x in other.stem.split("-"))
        if start < chunks.stop and chunks.start < stop and _lock_alive(other):
            raise StoreError(
                f"run {Path(run_path).name} is being extracted by another process ({other.read_text().strip()}) "
                f"for chunks {start}-{stop}: wait for it, or give a disjoint --chunks range"
            )
        if not _lock_alive(other):
            other.unlink(missing_ok=True)
    try:
        fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise StoreError(f"chunks {chunks.start}-{chunks.stop} of {Path(run_path).name} are locked by another process") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)


def lock_dir(run_path: str | os.PathLike) -> Path:
    """Where the writers of a run leave their claims: ``CACHE/.locks/<run>/``.

    Outside the run's Zarr hierarchy, so readers listing a store never meet
    files that are not Zarr nodes.
    """
    run_path = Path(run_path)
    return run_path.parent / ".locks" / run_path.name


def _lock_alive(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # cannot tell for another host: assume alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- helpers


def disk_size(path: str | os.PathLike) -> int:
    """Bytes on disk under a run's directory."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def suggest(name: str, choices: Sequence[str], n: int = 3) -> str:
    """``"; did you mean: a, b?"`` for the nearest choices, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for dist in ("ckapipe", "numpy", "zarr", "numcodecs", "torch", "torchvision", "timm", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

"""What determines a run's contents, and what a store records beside it: specs, keys, names, provenance.

``RunSpec.key`` hashes everything that determines the activations (weights and code hash, dataset,
transform, order seed, minibatch size m, layers and reductions, dtype, limit; docs/guarantees.md,
"The cache key"), so a changed run gets a new store and a stale cache is never served; ``slug`` is
the readable half of the store's name ``<slug>-<key>``. No store is opened here.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata as md
import json
import re
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import parse_qsl

from ckapipe.errors import StoreError
from ckapipe.kernels import check_minibatch_size
from ckapipe.settings import DTYPES


def check_dtype(dtype: str) -> str:
    """The dtype, or a one-line error listing those a store can hold."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype {dtype!r} is not supported: use float32 (default), float16 or float64")
    return dtype


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


@dataclass(frozen=True)
class LayerInfo:
    """Shape facts of one layer, known after a probe forward pass."""

    dim: int  # D: features per sample after the reduction
    output_shape: tuple[int, ...]  # per-sample shape of the raw output
    module: str = ""  # the module's type (class name, ``Linear``): Sequential layers are named 0, 1, ...


# --------------------------------------------------------------------------- provenance


EXTRACTION_LIBRARIES = ("ckapipe", "numpy", "zarr", "numcodecs", "torch", "torchvision", "timm", "transformers")


def library_versions(dists: Sequence[str] = EXTRACTION_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``dists`` (those installed), recorded as provenance."""
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

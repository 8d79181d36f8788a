"""One run's extraction settings, defined once (issue 22).

``RunSettings`` is what an extraction run is set by besides its model, its data
and its cache: the minibatch size m, the order seed, the layers, the dtype, ...
The same object is made from ``extract_run``'s keywords, from a study's YAML
keys (``from_mapping``) and from ``ckapipe extract``'s flags (made from each
field's metadata in ckapipe.options), and turned back into those flags
(``cli_args``) for the lines a SLURM job script shows. A new run setting is one
field here: its default, its flag and its YAML key (see docs/design.md).

Checked here: what a setting's own rule says (integers, m >= 4, a non-negative
order seed, a positive limit). What the store holds (dtype, run name,
compression) is the store's rule, checked by ``ckapipe.store`` when a run is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

from ckapipe.errors import CkapipeError, suggest
from ckapipe.kernels import check_minibatch_size

DEFAULT_BATCH = 256  # minibatch size of data that does not come in batches (not a DataLoader)
DTYPES = ("float32", "float16", "float64")  # what a layer array may hold (ckapipe.store checks it)
REDUCTIONS = ("flatten", "mean", "cls")
DEFAULT_COMPRESSION = "blosc-lz4"
COMPRESSION_CHOICES = ("none", "zstd1", "zstd3", "blosc-lz4", "blosc-lz4-shuffle", "blosc-zstd-shuffle")


def setting(default: Any, flags: tuple[str, ...] = (), *, yaml: Any = None, help: str = "", **click: Any):
    """A settings field: its default, its command-line spelling ``flags`` (none: Python only), its YAML
    type(s) (None: not a study key) and further click keywords (type, choices, is_flag, multiple, ...)."""
    return field(default=default, metadata={"flags": flags, "yaml": yaml, "help": help, "click": click})


@dataclass(frozen=True)
class RunSettings:
    """How one run is extracted: everything ``extract_run`` takes besides model, data and cache.

    ``batch_size`` is the minibatch size m of the minibatch CKA (Nguyen et al. 2021), one stored chunk
    each; ``order_seed`` permutes the samples once (NumPy ``default_rng``), so every run of one data
    and seed meets the same minibatches."""

    layers: tuple[str, ...] | None = setting(
        None, ("-l", "--layers"), yaml=list, multiple=True,
        help="PATTERN[@SELECT][:REDUCTION], repeatable or comma-separated; default: every leaf module (*).")
    batch_size: int | None = setting(None, ("-b", "--batch-size"), yaml=int, type=int,
                                     help=f"Minibatch size m = chunk rows (>= 4; default {DEFAULT_BATCH}).")
    order_seed: int | None = setting(0, ("--order-seed",), yaml=int, type=int, help="Seed of the sample permutation.")
    dtype: str = setting("float32", ("--dtype",), yaml=str, choices=DTYPES)
    device: str = setting("auto", ("--device",), yaml=str, help="auto (CUDA when there is one), cpu, cuda or cuda:i.")
    reduction: str = setting("flatten", ("--reduction",), yaml=str, choices=REDUCTIONS,
                             help="Default reduction of every layer.")
    limit: int | None = setting(None, ("--limit",), yaml=(int, type(None)), type=int,
                                help="Keep the first N samples of the permutation.")
    grams: bool = setting(False, ("--grams",), yaml=bool, is_flag=True,
                          help="Also fill the Gram cache for m = batch size.")
    grams_only: bool = setting(False, ("--grams-only",), yaml=bool, is_flag=True,
                               help="Keep only the Gram cache, no activations (linear CKA at m = batch size only).")
    name: str | None = setting(None, ("--name",), help="Readable run name (default MODEL-OPTIONS@DATASET).")
    chunks: tuple[int, int] | None = setting(None, ("--chunks",),
                                             help="Extract minibatches A:B only (disjoint ranges run side by side).")
    share: tuple[int, int] | None = setting(None)  # (i, n): the i-th of n disjoint shares (a SLURM array task)
    random_init: bool = setting(False, ("--random-init",), is_flag=True,
                                help="Random weights (torchvision/timm/hf/zoo), reproducible from init_seed=0.")
    compression: str = setting(DEFAULT_COMPRESSION, ("--compression",), choices=COMPRESSION_CHOICES)
    workers: int = setting(0, ("--workers",), type=int, help="DataLoader worker processes for map-style datasets.")
    writer_threads: int = setting(2)
    checksums: bool = setting(True)  # False: a store without checksums (version 2), for the bench to time them
    data_name: str | None = setting(None)  # names data given as an object (else: the sha256 of its inputs)

    def __post_init__(self):
        if self.layers is not None:  # one item, or items: a tuple (hashable, frozen); none: every leaf module
            items = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
            object.__setattr__(self, "layers", items or None)
        check_integers(batch_size=self.batch_size, limit=self.limit, workers=self.workers)
        if self.batch_size is not None:
            check_minibatch_size(self.batch_size)
        check_order_seed(self.order_seed)
        check_limit(self.limit)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> RunSettings:
        """The settings of a study's ``extract`` keys (``dataset`` aside), or a one-line error for an unknown key."""
        allowed = yaml_keys()
        for key in mapping:
            if key not in allowed:
                raise CkapipeError(f"{key}: unknown key{suggest(key, list(allowed))} (allowed: {', '.join(allowed)})")
        return cls(**mapping)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults, by field name."""
        return {name: getattr(self, name) for name, f in SETTING_FIELDS.items() if getattr(self, name) != f.default}

    def cli_args(self) -> list[str]:
        """``ckapipe extract``'s flags for these settings (defaults left out); a Python-only setting
        that differs from its default cannot be written as flags: a one-line error."""
        args: list[str] = []
        for key, value in self.changed().items():
            args += flag_args(SETTING_FIELDS[key], value)
        return args


SETTING_FIELDS = {f.name: f for f in fields(RunSettings)}


def yaml_keys() -> dict[str, Any]:
    """A study's extraction keys (besides ``dataset``) and their YAML types, in the fields' order."""
    return {f.name: f.metadata["yaml"] for f in fields(RunSettings) if f.metadata["yaml"] is not None}


def choices_of(name: str) -> tuple[str, ...] | None:
    """The values setting ``name`` may take (None: any of its type, or no such setting)."""
    setting = SETTING_FIELDS.get(name)
    return setting.metadata["click"].get("choices") if setting else None


def flag_args(setting_field, value) -> list[str]:
    """The command-line words that give one setting ``value``."""
    flags = setting_field.metadata["flags"]
    if not flags or value is None:  # None: a value no flag spells (order_seed=None: the data's own order)
        raise CkapipeError(f"{setting_field.name}={value!r} has no command-line flag")
    flag, click = flags[-1], setting_field.metadata["click"]
    if click.get("is_flag"):
        return [flag] if value else []
    if click.get("multiple"):
        return [word for item in value for word in (flag, item)]
    if setting_field.name == "chunks":
        return [flag, f"{value[0]}:{value[1]}"]
    return [flag, str(value)]


def check_integers(**options) -> None:
    """A one-line error for an option given through the Python API that is not an integer (the
    command line's types see to it there), or a negative number of workers."""
    for option, value in options.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise CkapipeError(f"{option}={value!r} is not an integer")
    if options.get("workers", 0) < 0:
        raise CkapipeError(f"workers={options['workers']} is negative: give 0 (load in this process) or more")


def check_order_seed(order_seed: int | None) -> int | None:
    """The order seed (None: the data's own order), or a one-line error: NumPy seeds are non-negative integers."""
    if order_seed is None:
        return None
    if isinstance(order_seed, bool) or not isinstance(order_seed, (int, np.integer)) or order_seed < 0:
        raise CkapipeError(f"--order-seed {order_seed} is not a non-negative integer")
    return int(order_seed)


def check_limit(limit: int | None) -> int | None:
    """The number of samples kept (None: all), or a one-line error for none or fewer."""
    if limit is not None and limit < 1:
        raise CkapipeError(f"--limit {limit} must be positive")
    return limit

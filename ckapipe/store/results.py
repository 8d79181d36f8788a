"""The results store: one analysis's arrays and record, written once and sealed, read back refusing damage.

Layout (a Zarr v3 group written by xarray: ``xarray.open_zarr(OUT)`` opens it, plain ``zarr`` reads
it; the arrays themselves are listed in ckapipe.analyze.results)::

    OUT/
      zarr.json        attrs["ckapipe_results"]: the record the analysis hands over (runs, inputs,
                       notes, resampling, versions), then the seal (ckapipe.store.integrity):
                       arrays (dtype, shape, chunks), key (sha256 of the record), checksums (every
                       chunk's tag); consolidated metadata of the arrays
      <array>/         one Zarr array per variable, every chunk ending with its crc32c
      cka.json, cka.csv, summary.txt   the exports, as text, beside the arrays

This module knows the directory, not what the numbers mean: the analysis (ckapipe.analyze.results)
hands it a Dataset, a record and the exports' text to write, and builds its ``Results`` from the
record and the NumPy arrays that ``ResultsStore.read`` returns.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from ckapipe.atomic import atomic_path
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.store.integrity import (
    RESULTS_ATTRS, BadArrayChunk, checksummed, compressors, first_undecodable, seal, seal_problems, sealed,
)

RESULTS_VERSION = 3  # 2: written by xarray, (run, layer) coordinates, "minibatch" instead of "minibatches"; 3: sealed
RESULTS_CODECS = checksummed(compressors("zstd1"))  # every chunk ends with its crc32c (ckapipe.store.integrity)


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` that exists (without overwrite), is a file, or cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CkapipeError(f"output directory {out} exists: choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CkapipeError(f"output path {out} is a file, not a results directory")
    parent = next(p for p in out.absolute().parents if p.exists())  # where out (or its first missing folder) goes
    if not parent.is_dir():
        raise CkapipeError(f"cannot write results to {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "the file system is read-only" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
        raise CkapipeError(f"cannot write results to {out}: {parent} is not writable ({why}); "
                           f"choose another --out or fix its permissions")


def write_results_store(out: str | os.PathLike, dataset: xr.Dataset, record: dict, exports: dict[str, str], *,
                        chunks: dict[str, tuple], overwrite: bool = False) -> Path:
    """Write ``dataset`` (its arrays; ``record``, stamped with RESULTS_VERSION, becomes attrs["ckapipe_results"])
    and the ``exports`` (file name -> text) into a staging directory, seal it, then swap it into place: a
    half-written store is never visible. Every array gets RESULTS_CODECS; those named in ``chunks`` those chunks."""
    out = Path(out)
    check_out(out, overwrite)
    dataset = dataset.copy()
    dataset.attrs = {RESULTS_ATTRS: {"results_version": RESULTS_VERSION, **record}}
    encoding = {name: {"compressors": RESULTS_CODECS, **({"chunks": chunks[name]} if name in chunks else {})}
                for name in dataset.variables}
    with atomic_path(out, replace=True) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not (yet) in the Zarr v3 specification
        dataset.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
        seal(tmp, RESULTS_ATTRS)
        for name, text in exports.items():
            (tmp / name).write_text(text)
    return out


@dataclass
class ResultsStore:
    """An open results store: its record (attrs["ckapipe_results"]) and its arrays, read whole as NumPy."""

    path: Path
    group: zarr.Group
    record: dict

    def __contains__(self, name: str) -> bool:
        return name in self.group

    def read(self, name: str) -> np.ndarray:
        """One whole array; a chunk that fails to decode (its checksum, its codec) is one line naming it."""
        try:
            return self.group[name][:]
        except Exception:  # noqa: BLE001 - codecs and stores raise many types
            coords, why = first_undecodable(self.group[name])
            raise StoreError(damaged(self.path, BadArrayChunk(name, coords, why).describe())) from None

    def read_finite(self, name: str) -> np.ndarray:
        """``read``, refusing NaN or inf by the chunk that holds it: an unsealed store (results version 2)
        reads a deleted chunk as its fill value, NaN."""
        values = self.read(name)
        if not np.isfinite(values).all():
            first = np.unravel_index(int(np.flatnonzero(~np.isfinite(values))[0]), values.shape)
            coords = tuple(int(i) // n for i, n in zip(first, self.group[name].chunks))
            raise StoreError(damaged(self.path, BadArrayChunk(name, coords, "it holds NaN or inf (its file is missing, "
                                                                             "or its bytes were changed)").describe()))
        return values

    def check_seal(self) -> None:
        """The first problem of a sealed store (its tags: four bytes a chunk), as one line; nothing for an older store."""
        if sealed(self.record):
            _, bad = seal_problems(self.path, self.group, self.record)
            if bad:
                raise StoreError(damaged(self.path, bad[0].describe()))


def open_results_store(path: str | os.PathLike, check: bool = True) -> ResultsStore:
    """The results store at ``path``; ``check`` refuses one whose seal does not match (an edited
    attribute, a missing array or chunk, a chunk changed or copied from elsewhere), in one line naming it."""
    path = Path(path)
    try:
        group = zarr.open_group(path, mode="r")
        store = ResultsStore(path, group, group.attrs[RESULTS_ATTRS])
    except Exception:  # noqa: BLE001
        raise CkapipeError(f"{path} is not a ckapipe results directory (written by ckapipe analyze --out)") from None
    if check:
        store.check_seal()
    return store


def recorded_inputs(path: str | os.PathLike) -> dict | None:
    """The inputs an existing results store was computed from; None if unreadable or damaged (so that a
    study analyses it again)."""
    try:
        return open_results_store(path).record["inputs"]
    except Exception:  # noqa: BLE001
        return None


def damaged(path: Path, what: str) -> str:
    """The one line for a damaged results store: where, what, and what to do."""
    return (f"results directory {path} is damaged: {what}; `ckapipe verify {path}` names every bad chunk, "
            f"and analysing again with --out {path} --overwrite rewrites it")

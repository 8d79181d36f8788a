"""A sealed Zarr group: every chunk of every array checksummed and tagged, its attributes keyed.

The run stores tag one chunk per minibatch (ckapipe.store); a results store
(ckapipe.analyze.results) holds arrays of any chunking and is written once, so
it is sealed once, after writing, with the same two pieces:

- each chunk file ends with its crc32c (``checksummed`` codecs), so a flipped,
  truncated or overwritten byte fails to decode;
- the group's record ``attrs[ATTR]`` gets ``arrays``, the dtype, shape and chunks of
  every array, then ``key``, a digest of the record itself (an edited attribute or
  array metadata no longer matches it), and ``checksums``, the tag of every
  chunk of every array, ``chunk_tag(key, array, k, crc)`` with k the chunk's
  position in C order (a chunk copied from another array, place or store, or
  deleted, no longer matches).

Checking costs four bytes per chunk; decoding (``decode=True``, for verify) reads them all.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import zarr

from ckapipe.codecs import NO_TAG
from ckapipe.store import decode_failure, file_problem, file_tag


@dataclass(frozen=True)
class BadArrayChunk:
    """Chunk ``coords`` of ``array`` is not what was written there (coords () for the whole array,
    array "" for the group's attributes)."""

    array: str
    coords: tuple[int, ...]
    why: str

    def describe(self) -> str:
        if not self.array:
            return self.why
        if not self.coords:
            return f"array {self.array!r}: {self.why}"
        return f"array {self.array!r}, chunk {'.'.join(map(str, self.coords))}: {self.why}"


RESULTS_ATTRS = "ckapipe_results"  # the attribute of a results directory's record (ckapipe analyze --out)


def is_results_store(path: Path) -> bool:
    """Whether a directory is a results store: its root's zarr.json holds the results record."""
    meta = Path(path) / "zarr.json"
    return meta.is_file() and RESULTS_ATTRS in meta.read_text()


def record_key(record: dict) -> str:
    """sha256 (16 hex digits) of a group's record without its key and checksums: what the tags are tied to."""
    body = {k: v for k, v in record.items() if k not in ("key", "checksums")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def layout(array: zarr.Array) -> str:
    """What decides how an array's bytes read back: its dtype, shape and chunks (recorded in the key)."""
    return f"{array.dtype} {list(array.shape)} in chunks {list(array.chunks)}"


def chunk_coords(array: zarr.Array) -> list[tuple[int, ...]]:
    """The grid position of every chunk of an array, in C order (the k-th is chunk k)."""
    return list(itertools.product(*(range(n) for n in array.cdata_shape)))


def chunk_path(root: Path, array: zarr.Array, coords: tuple[int, ...]) -> Path:
    return Path(root) / array.path / array.metadata.encode_chunk_key(coords)


def array_tags(key: str, root: Path, array: zarr.Array) -> list[int]:
    """The tag of every chunk of an array, in C order (NO_TAG for a chunk without a file)."""
    return [file_tag(key, array.path, k, chunk_path(root, array, c)) for k, c in enumerate(chunk_coords(array))]


def seal(root: Path, attr: str) -> None:
    """Record in ``attrs[attr]`` the layout of every array, the record's key and the tag of every chunk."""
    group = zarr.open_group(root, mode="r+")
    record = dict(group.attrs[attr])
    record["arrays"] = {name: layout(array) for name, array in sorted(group.arrays())}
    record["key"] = key = record_key(record)
    record["checksums"] = {name: array_tags(key, root, array) for name, array in sorted(group.arrays())}
    group.attrs[attr] = record  # rewrites zarr.json, its consolidated metadata kept


def sealed(record: dict) -> bool:
    return "checksums" in record


def seal_problems(root: Path, group: zarr.Group, record: dict, decode: bool = False) -> tuple[int, list[BadArrayChunk]]:
    """(chunks checked, what is bad) in a sealed group: an edited record, a missing array, a chunk
    missing, moved or changed (and with ``decode``, one that fails its checksum)."""
    if record.get("key") != record_key(record):
        return 0, [BadArrayChunk("", (), f"the attributes in {Path(root) / 'zarr.json'} were edited after writing "
                                         f"(they no longer match their key {record.get('key')})")]
    checked, bad = 0, []
    for name, tags in record["checksums"].items():
        if not (Path(root) / name / "zarr.json").is_file() or name not in group:
            bad.append(BadArrayChunk(name, (), f"it is missing (its folder {Path(root) / name} was deleted)"))
            continue
        array = group[name]
        written = record.get("arrays", {}).get(name, layout(array))  # the key covers "arrays": only the writer leaves one out
        if layout(array) != written:
            bad.append(BadArrayChunk(name, (), f"its metadata was edited ({layout(array)}, written {written})"))
            continue
        found = array_problems(record["key"], root, array, tags, decode)
        checked += len(tags)
        bad += [BadArrayChunk(name, coords, why) for coords, why in found]
    return checked, bad


def array_problems(key: str, root: Path, array: zarr.Array, tags: list[int], decode: bool) -> list[tuple]:
    """(coords, why) for every chunk of an array whose file is not the one tagged (or, decoding, fails)."""
    coords = chunk_coords(array)
    if len(coords) != len(tags):
        return [((), f"it has {len(coords)} chunks where {len(tags)} were written (its metadata was edited)")]
    out = []
    for k, (c, tag) in enumerate(zip(coords, tags)):
        path = chunk_path(root, array, c)
        if tag == NO_TAG and not path.exists():
            continue  # a chunk of fill values only (NaN p-values, say): zarr writes no file for it
        why = file_problem(key, array.path, k, path, tag) or (decode and decode_problem(array, c))
        if why:
            out.append((c, why))
    return out


def decode_problem(array: zarr.Array, coords: tuple[int, ...]) -> str | None:
    """Why one chunk of an array fails to decode, or None."""
    try:
        array[chunk_selection(array, coords)]
    except Exception as err:  # noqa: BLE001 - codecs raise many types
        return decode_failure(err)
    return None


def first_undecodable(array: zarr.Array) -> tuple[tuple[int, ...], str]:
    """The first chunk of an array that fails to decode, and why (((), why) when each decodes alone)."""
    for c in chunk_coords(array):
        why = decode_problem(array, c)
        if why:
            return c, why
    return (), "it cannot be read"


def chunk_selection(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(c * n, min((c + 1) * n, s)) for c, n, s in zip(coords, array.chunks, array.shape))

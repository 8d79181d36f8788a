"""The one integrity layer of every store: what a chunk is on disk, the checksum that ends it, the tag
that ties it to its place, the seal of a results store, and the one-line words for damage.

The default compression was chosen by measuring every codec on real
activations (docs/benchmarks.md): ReLU outputs are 40–70 % exact zeros, which
blosc-lz4 halves at almost the write speed of no compression; byte shuffling
splits the zero runs and compresses worse. The codec is invisible to the
values and not part of the run key.

Every chunk of a store of version 3 ends with the crc32c of its bytes (Zarr
v3's ``crc32c`` codec, after the compressor), so a flipped, truncated or
overwritten byte fails to decode, in ckapipe and in plain ``zarr`` alike. A
crc32c says the file is whole, not where it belongs, so beside the chunk
the store records its tag, ``crc32c("<run key>/<array>/<k>" + the file's four
crc32c bytes)``: a chunk file moved to another minibatch, layer or run no
longer matches the tag of the place it lands in. The tag needs only the last
four bytes of the file, never a second pass over the data.

The run stores and their Gram caches tag one chunk per minibatch, in an array beside the chunks
(``CHECKSUMS``; ckapipe.store.run, ckapipe.store.grams). A results store (ckapipe.store.results) holds
arrays of any chunking and is written once, so it is sealed once, after writing, with the same two pieces:

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
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c  # zarr's own dependency (its crc32c codec)
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ckapipe.errors import StoreError, suggest
from ckapipe.settings import COMPRESSION_CHOICES, DEFAULT_COMPRESSION  # noqa: F401 - DEFAULT_COMPRESSION: the store's API

CRC_BYTES = 4  # the crc32c codec appends 4 bytes to every chunk
NO_TAG = -1  # the fill value of a store's tag arrays: nothing recorded
CHECKSUMS = "checksums"  # the array of chunk tags, in a run and in each Gram cache


def compressors(name: str) -> tuple:
    """The Zarr v3 codec chain for a compression name (``--compression``)."""
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


def checksummed(chain) -> tuple:
    """The codec chain with Zarr v3's crc32c codec last: every chunk file ends with the crc32c of its bytes."""
    return (*tuple(chain or ()), Crc32cCodec())


def chunk_tag(run_key: str, array: str, k: int, crc: bytes) -> int:
    """crc32c of ``"<run key>/<array>/<k>"`` followed by the chunk file's own crc32c (its last 4 bytes).

    Recorded beside chunk k when it is written; a chunk file read at (array, k)
    whose crc gives another tag was written somewhere else (or was replaced).
    """
    return google_crc32c.value(f"{run_key}/{array}/{k}".encode() + bytes(crc))


def file_crc(path: str | os.PathLike) -> bytes | None:
    """The last 4 bytes of a chunk file (its crc32c), or None when the file is missing or shorter."""
    try:
        with open(path, "rb") as f:
            f.seek(-CRC_BYTES, os.SEEK_END)
            return f.read(CRC_BYTES)
    except OSError:  # missing, or fewer than 4 bytes (seek before the start)
        return None


def compression_name(chain) -> str | None:
    """The ``--compression`` name of a stored array's codecs (its checksum aside); None when none matches."""

    def form(codec) -> tuple:
        d = codec.to_dict()
        config = {k: v for k, v in (d.get("configuration") or {}).items() if k not in ("typesize", "blocksize")}
        return d["name"], tuple(sorted(config.items()))

    stored = [form(c) for c in chain if form(c)[0] != "crc32c"]
    return next((name for name in COMPRESSION_CHOICES if [form(c) for c in compressors(name)] == stored), None)


# --------------------------------------------------------------------------- chunk files and their tags


def chunk_file(root: Path, array: zarr.Array, k: int) -> Path:
    """The file of chunk k (along the first axis, the only axis chunked in two) of an array in a run's store."""
    return chunk_path(root, array, (k,) + (0,) * (array.ndim - 1))


def tag_problem(run_key: str, root: Path, array: zarr.Array, label: str, k: int, recorded: int) -> str | None:
    """Why the file of chunk k of ``array`` is not the one whose tag was recorded there, or None."""
    return file_problem(run_key, label, k, chunk_file(root, array, k), recorded)


def file_tag(key: str, label: str, k: int, path: Path) -> int:
    """The tag of the chunk file at ``path`` as chunk k of ``label`` (NO_TAG when it has no file)."""
    crc = file_crc(path)
    return NO_TAG if crc is None else chunk_tag(key, label, k, crc)


def file_problem(key: str, label: str, k: int, path: Path, recorded: int) -> str | None:
    """Why the chunk file at ``path`` is not the one tagged ``recorded`` as chunk k of ``label``, or None
    (run stores and sealed results stores alike)."""
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


# --------------------------------------------------------------------------- sealed groups (results stores)


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

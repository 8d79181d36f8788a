"""What a chunk is on disk: its compression, the checksum that ends it, and the tag that ties it to its place.

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
"""

from __future__ import annotations

import os

import google_crc32c  # zarr's own dependency
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from ckapipe.errors import StoreError, suggest

DEFAULT_COMPRESSION = "blosc-lz4"
COMPRESSION_CHOICES = ("none", "zstd1", "zstd3", "blosc-lz4", "blosc-lz4-shuffle", "blosc-zstd-shuffle")
CRC_BYTES = 4  # the crc32c codec appends 4 bytes to every chunk
NO_TAG = -1  # the fill value of a store's tag arrays: nothing recorded


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

"""Compression of the activation chunks: a name on the command line, a Zarr v3 codec chain in the store.

The default was chosen by measuring every codec on real activations
(docs/benchmarks.md): ReLU outputs are 40–70 % exact zeros, which blosc-lz4
halves at almost the write speed of no compression; byte shuffling splits the
zero runs and compresses worse. The codec is invisible to the values and not
part of the run key.
"""

from __future__ import annotations

from ckapipe.errors import StoreError, suggest

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

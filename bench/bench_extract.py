"""Pieces C and E of the bench (``python -m bench --only C,E``).

C. Compression of real activations (the trained zoo CNN ``cnn3`` and MLP
   ``mlp3`` on digits, every hidden stage, flattened, float32): bytes on disk
   against raw bytes, and write/read MB/s, for each codec ckapipe offers. This
   table chose the default (``ckapipe.store.integrity.DEFAULT_COMPRESSION``).
E. The same model over the same data, in one process: forward pass only, and a
   full extraction (hooks, clones, value checks, compression, writes) into a
   fresh cache with several codecs, interleaved for 3 rounds, the best time of
   each compared. Target: extraction <= 1.3x the forward-only wall time.

The model of E is a small ResNet (a 3 × 3 stem and one BasicBlock per stage at
32, 64 and 128 channels) on digits upscaled to 32 × 32, enough compute for the
forward pass to mean something on a CPU; its three stage outputs (57,344
floats per sample) are recorded, flattened. The workloads W1-W3 measure the
same ratio on torchvision's ResNets.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import BATCH, Row

REPEATS = 3  # best of: the machine may be shared
E_COMPRESSIONS = ("none", "blosc-lz4", "zstd1")


# --------------------------------------------------------------------------- the bench model


def bench_net():
    """The bench's ResNet (factory for the model spec ``bench.bench_extract:bench_net``)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            out += self.down(x)
            return self.relu(out)

    return nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)),
        Block(32, 32, 1), Block(32, 64, 2), Block(64, 128, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)),
    )


BENCH_MODEL = "bench.bench_extract:bench_net"
BENCH_DATA = "digits?size=32"
BENCH_LAYERS = ["1", "2", "3"]


# --------------------------------------------------------------------------- compression


def zoo_activations(cache: Path) -> dict[str, np.ndarray]:
    """Every hidden stage of the trained zoo cnn3 and mlp3 on digits, float32 (N, D), whole chunks only."""
    from ckapipe import store
    from ckapipe.extract import extract_run

    arrays = {}
    for model in ("zoo:cnn3?seed=0", "zoo:mlp3?seed=0"):
        run = store.open_run(extract_run(model, "digits", cache=cache, batch_size=BATCH, progress=False, compression="none"))
        for layer in run.layer_names:
            if layer != "head":
                arrays[f"{model.split(':')[1].split('?')[0]}.{layer}"] = run.layer(layer)[: run.n_samples // BATCH * BATCH]
    return arrays


def measure_codec(name: str, arrays: dict[str, np.ndarray], dtype: str, workdir: Path) -> dict:
    """Write then read every array with one codec, chunks (256, D); ratio and MB/s of raw bytes (best of REPEATS)."""
    import zarr

    from ckapipe import store
    from ckapipe.store.integrity import compressors

    data = {k: v.astype(dtype) for k, v in arrays.items()}
    raw = sum(a.nbytes for a in data.values())
    write_s = read_s = float("inf")
    for repeat in range(REPEATS):
        path = workdir / f"{name}-{dtype}-{repeat}.zarr"
        group = zarr.open_group(path, mode="w")
        start = time.perf_counter()
        for key, a in data.items():
            arr = group.create_array(key, shape=a.shape, chunks=(BATCH, a.shape[1]), dtype=dtype, compressors=compressors(name))
            arr[:] = a
        write_s = min(write_s, time.perf_counter() - start)
        disk = sum(store.disk_size(path / key) - (path / key / "zarr.json").stat().st_size for key in data)
        start = time.perf_counter()
        for key in data:
            group[key][:]
        read_s = min(read_s, time.perf_counter() - start)
        shutil.rmtree(path)
    return {"codec": name, "dtype": dtype, "ratio": raw / disk, "write_MBps": raw / write_s / 1e6, "read_MBps": raw / read_s / 1e6, "raw_MB": raw / 1e6}


def compression_rows(workdir: Path, dtype: str = "float32") -> list[Row]:
    """One row per codec: bytes on disk against raw bytes, with its write and read rates."""
    from ckapipe.store.integrity import COMPRESSION_CHOICES, DEFAULT_COMPRESSION

    workdir.mkdir(parents=True, exist_ok=True)
    arrays = zoo_activations(workdir / "zoo-cache")
    rows = []
    for name in COMPRESSION_CHOICES:
        r = measure_codec(name, arrays, dtype, workdir)
        default = " (default)" if name == DEFAULT_COMPRESSION else ""
        rows.append(Row("C", f"{name}{default} {dtype}: size on disk vs raw", "disk", r["raw_MB"] / r["ratio"], "raw",
                        r["raw_MB"], unit="MB", note=f"write {r['write_MBps']:.0f} MB/s, read {r['read_MBps']:.0f} MB/s"))
    return rows


# --------------------------------------------------------------------------- E. forward vs extraction


def digits_forward(n_copies: int) -> tuple[float, int]:
    """Wall time of the bare forward over the bench inputs in extraction order (data access included)."""
    import torch

    from ckapipe.extract.datasets import load_dataset
    from ckapipe.extract.models import load_model
    from ckapipe.extract.runner import sample_order

    model = load_model(BENCH_MODEL).module
    data = load_dataset(BENCH_DATA)
    order = np.tile(sample_order(len(data), 0, None), n_copies)
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    start = time.perf_counter()
    with torch.inference_mode():
        for x in data.batches(batches):
            model(x)
    return time.perf_counter() - start, len(order)


def extraction(cache: Path, n_copies: int, compression: str) -> tuple[float, int, int]:
    """Wall time of full extractions of the same inputs (one run per copy), the bytes they hold and store."""
    from ckapipe import store
    from ckapipe.extract import extract_run

    start = time.perf_counter()
    paths = [
        extract_run(BENCH_MODEL, BENCH_DATA, BENCH_LAYERS, cache=cache, batch_size=BATCH, order_seed=0, name=f"bench{i}",
                    progress=False, compression=compression)
        for i in range(n_copies)
    ]
    elapsed = time.perf_counter() - start
    runs = [store.open_run(p) for p in paths]
    raw = sum(run.layer(layer).nbytes for run in runs for layer in run.layer_names)
    return elapsed, raw, sum(store.disk_size(p) for p in paths)


def extraction_rows(workdir: Path, rounds: int = 3, compressions=E_COMPRESSIONS, n_copies: int = 1) -> list[Row]:
    """Forward-only and extraction rounds, interleaved; the best time of each (load comes and goes)."""
    from ckapipe.store.integrity import DEFAULT_COMPRESSION

    digits_forward(1)  # warm-up: threads, allocator
    forwards, extractions = [], {c: [] for c in compressions}
    for round_ in range(rounds):
        forwards.append(digits_forward(n_copies)[0])
        for compression in compressions:
            cache = workdir / f"cache-{compression}-{round_}"
            t, raw, disk = extraction(cache, n_copies, compression)
            extractions[compression].append(t)
            shutil.rmtree(cache)
    t_forward = min(forwards)
    return [Row("E", f"extraction ({c}{' default' if c == DEFAULT_COMPRESSION else ''}) vs forward only, small ResNet "
                     f"on digits", "extract", min(times), "forward", t_forward,
                target="<= 1.3" if c == DEFAULT_COMPRESSION else "",
                note=f"best of {rounds} interleaved rounds; {raw / min(times) / 1e6:.0f} MB/s of activations")
            for c, times in extractions.items()]

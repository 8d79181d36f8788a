"""Piece C of the bench: compression of real activations (the trained zoo CNN
``cnn3`` and MLP ``mlp3`` on digits, every hidden stage, flattened, float32):
bytes on disk against raw bytes, and write/read MB/s, for each codec ckapipe
offers. This table chose the default (``extract.store.DEFAULT_COMPRESSION``).
Extraction speed against the forward pass is measured by the workloads (W1-W3).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from tests.bench.common import BATCH, Row

REPEATS = 3  # best of: the machine may be shared


# --------------------------------------------------------------------------- compression


def zoo_activations(cache: Path) -> dict[str, np.ndarray]:
    """Every hidden stage of the trained zoo cnn3 and mlp3 on digits, float32 (N, D), whole chunks only."""
    from extract import extract_run, store

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

    from extract import store

    data = {k: v.astype(dtype) for k, v in arrays.items()}
    raw = sum(a.nbytes for a in data.values())
    write_s = read_s = float("inf")
    for repeat in range(REPEATS):
        path = workdir / f"{name}-{dtype}-{repeat}.zarr"
        group = zarr.open_group(path, mode="w")
        start = time.perf_counter()
        for key, a in data.items():
            arr = group.create_array(key, shape=a.shape, chunks=(BATCH, a.shape[1]), dtype=dtype, compressors=store.compressors(name))
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
    from extract.store import COMPRESSION_CHOICES, DEFAULT_COMPRESSION

    workdir.mkdir(parents=True, exist_ok=True)
    arrays = zoo_activations(workdir / "zoo-cache")
    rows = []
    for name in COMPRESSION_CHOICES:
        r = measure_codec(name, arrays, dtype, workdir)
        default = " (default)" if name == DEFAULT_COMPRESSION else ""
        rows.append(Row("C", f"{name}{default} {dtype}: size on disk vs raw", "disk", r["raw_MB"] / r["ratio"], "raw",
                        r["raw_MB"], unit="MB", note=f"write {r['write_MBps']:.0f} MB/s, read {r['read_MBps']:.0f} MB/s"))
    return rows

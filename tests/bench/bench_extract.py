"""Extraction benchmark, every number measured in one run.

1. Compression of real activations (the trained zoo CNN ``cnn3`` and MLP
   ``mlp3`` on digits, every hidden stage, flattened): ratio, write and read
   MB/s of each codec ckapipe offers, float32 and float16. This table chose
   the default (``extract.store.DEFAULT_COMPRESSION``).
2. The same model over the same data, in one process: forward pass only, and
   a full extraction (hooks, clones, value checks, compression, writes) into a
   fresh cache, interleaved for 3 rounds, the best time of each compared.
   Target: extraction <= 1.3x the forward-only wall time.

    python -m tests.bench.bench_extract [--n-copies 1] [--rounds 3] [--compressions none,zstd1] [--out bench-results/extract]

The model is a small ResNet (a 3 × 3 stem and one BasicBlock per stage at
32, 64 and 128 channels) on digits upscaled to 32 × 32, enough compute for
the forward pass to mean something on a CPU; its three stage outputs
(57,344 floats per sample) are recorded, flattened.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BATCH = 256
REPEATS = 3  # best of: the machine may be shared


# --------------------------------------------------------------------------- the bench model


def bench_net():
    """The bench's ResNet (factory for the model spec ``tests.bench.bench_extract:bench_net``)."""
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


BENCH_MODEL = "tests.bench.bench_extract:bench_net"
BENCH_DATA = "digits?size=32"
BENCH_LAYERS = ["1", "2", "3"]


# --------------------------------------------------------------------------- 1. compression


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


def compression_table(workdir: Path) -> list[dict]:
    from extract.store import COMPRESSION_CHOICES

    arrays = zoo_activations(workdir / "zoo-cache")
    return [measure_codec(name, arrays, dtype, workdir) for dtype in ("float32", "float16") for name in COMPRESSION_CHOICES]


# --------------------------------------------------------------------------- 2. forward vs extraction


def forward_only(n_copies: int) -> tuple[float, int]:
    """Wall time of the bare forward over the bench inputs in extraction order (data access included)."""
    import torch

    from extract.datasets import load_dataset
    from extract.models import load_model
    from extract.runner import sample_order

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
    from extract import extract_run, store

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


def speed(workdir: Path, n_copies: int, rounds: int, compressions: list[str]) -> dict:
    """Forward-only and extraction rounds, interleaved; the best time of each (a shared machine's load comes and goes)."""
    forward_only(1)  # warm-up: threads, allocator
    forwards, extractions = [], {c: [] for c in compressions}
    for round_ in range(rounds):
        t, n = forward_only(n_copies)
        forwards.append(t)
        for compression in compressions:
            cache = workdir / f"cache-{compression}-{round_}"
            t, raw, disk = extraction(cache, n_copies, compression)
            extractions[compression].append(t)
            shutil.rmtree(cache)
    t_forward = min(forwards)
    print(f"\nmodel {BENCH_MODEL} on {BENCH_DATA}, {n} samples, minibatch {BATCH}, layers {', '.join(BENCH_LAYERS)} (flatten, float32)")
    print(f"forward only:            {t_forward:6.2f} s  ({n / t_forward:.0f} samples/s; best of {', '.join(f'{t:.2f}' for t in forwards)})")
    rows = {}
    for compression, times in extractions.items():
        t = min(times)
        rows[compression] = {"extract_s": t, "rounds_s": times, "ratio": t / t_forward, "MBps": raw / t / 1e6}
        print(f"extraction, {compression:<11} {t:6.2f} s  (best of {', '.join(f'{x:.2f}' for x in times)}; {n / t:.0f} samples/s, "
              f"{raw / t / 1e6:.0f} MB/s of activations)  ratio {t / t_forward:.2f}x (target <= 1.3x)")
    print(f"activations: {raw / 1e6:.0f} MB per extraction; {disk / 1e6:.0f} MB on disk with {compressions[-1]}")
    return {"n_samples": n, "forward_s": t_forward, "forward_rounds_s": forwards, "raw_MB": raw / 1e6, "extraction": rows}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def main(argv=None):
    import torch

    from extract import store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-copies", type=int, default=int(os.environ.get("CKAPIPE_BENCH_COPIES", 1)), help="passes over the 1797 digits per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved forward/extraction rounds; the best of each is compared")
    parser.add_argument("--out", default="bench-results/extract")
    parser.add_argument("--skip-compression", action="store_true", help="skip the codec table")
    parser.add_argument("--compressions", default=store.DEFAULT_COMPRESSION, help="codecs to time the extraction with, comma-separated")
    args = parser.parse_args(argv)

    print(f"# ckapipe extraction bench, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}; device: cpu; torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}")
    numbers: dict = {"machine": machine(), "date": f"{datetime.date.today()}", "default_compression": store.DEFAULT_COMPRESSION}
    workdir = Path(tempfile.mkdtemp(prefix="ckapipe-bench-extract-"))
    try:
        if not args.skip_compression:
            rows = compression_table(workdir)
            numbers["compression"] = rows
            print(f"\ncompression of zoo cnn3 + mlp3 activations on digits ({rows[0]['raw_MB']:.0f} MB float32), chunks ({BATCH}, D):")
            print(f"  {'codec':<19} {'dtype':<8} {'ratio':>6} {'write MB/s':>11} {'read MB/s':>10}")
            for r in rows:
                print(f"  {r['codec']:<19} {r['dtype']:<8} {r['ratio']:>6.2f} {r['write_MBps']:>11.0f} {r['read_MBps']:>10.0f}")

        numbers["speed"] = speed(workdir, args.n_copies, args.rounds, args.compressions.split(","))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_extract.json").write_text(json.dumps(numbers, indent=1))
    print(f"numbers: {out / 'bench_extract.json'}")
    return numbers


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

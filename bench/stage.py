"""One stage of W4 in a fresh interpreter, so that its peak memory is its own:

    python -m bench.stage '{"stage": "extract|analyze|fill|reanalyze|compare", "models": [...], "n": N,
                                  "size": S, "device": "cpu", "cache": DIR}'

sets up malloc as the ``ckapipe`` command does (ckapipe.cli.one_malloc_arena) and
prints one JSON line: wall_s, peak_host_MB (the largest anonymous resident size sampled every 5 ms during
the stage), stage_peak_MB (that minus the size before the stage, after the imports), with
``"live": true`` live_peak_MB (the most memory allocated at once during the stage, through
tracemalloc, which NumPy reports its arrays to: what the stage holds, without what the
allocator keeps after a free; tracing slows the stage, so its wall time is not used) and, on
CUDA, peak_device_MB. Not ru_maxrss: Linux carries it across exec from the parent's fork,
so a child of a large bench process reports the parent's peak.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path

def resident_MB() -> float:
    """Anonymous resident memory (resident minus file-backed and shared pages, /proc/self/statm):
    what the process allocated. Pages of a memory-mapped dataset or store file are page cache that
    the kernel can drop, and they would count the dataset's size, not ckapipe's."""
    fields = open("/proc/self/statm").read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE") / 2**20


class ResidentPeak:
    """Samples this process's anonymous resident size every 5 ms while the block runs."""

    def __enter__(self):
        self.base = self.peak = resident_MB()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, resident_MB())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_MB())

    @property
    def increase_MB(self) -> float:
        return self.peak - self.base


def inputs_on_disk(study, cache) -> str:
    """The study's inputs saved as a .npy file that extraction memory-maps, as it would a dataset on disk:
    a tensor of N inputs held in memory would be what grows with N (252 MB at N = 20,480), not ckapipe."""
    import numpy as np

    from bench.common import bench_inputs

    path = Path(cache).parent / f"{Path(cache).name}-inputs.npy"
    if not path.exists():
        np.save(path, bench_inputs(study.n, study.size).numpy())
    return str(path)


def run_stage(args: dict) -> ResidentPeak:
    from bench.workloads import LAYERS, Study, analysis, extract_all

    study = Study("W4", tuple(tuple(m) for m in args["models"]), args["n"], args["size"], args["device"])
    names = [name for name, _, _ in study.models]
    on_disk = args["stage"] in ("extract", "compare")
    dataset = inputs_on_disk(study, args["cache"]) if on_disk else None  # before the peak
    stages = {
        "extract": lambda: extract_all(study, args["cache"], dataset=dataset),
        "analyze": lambda: analysis(args["cache"], names, study.device, use_gram_cache=False),
        "fill": lambda: analysis(args["cache"], names, study.device),
        "reanalyze": lambda: analysis(args["cache"], names, study.device),
        "compare": lambda: compare_models(study, dataset, LAYERS),
    }
    import ckapipe.analyze  # noqa: F401 - the imports are not the stage's memory
    import ckapipe.extract.runner  # noqa: F401
    import ckapipe.pipelines.compare  # noqa: F401

    if args.get("live"):
        tracemalloc.start()
    with ResidentPeak() as peak:
        stages[args["stage"]]()
    if args.get("live"):
        peak.live_MB = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return peak


def compare_models(study, dataset: str, layers):
    """compare of the study's models (specs) over the memory-mapped inputs, nothing cached."""
    from bench.common import BATCH, model_spec
    from ckapipe import compare

    return compare({name: model_spec(arch, seed) for name, arch, seed in study.models}, dataset, layers=layers,
                   batch_size=BATCH, device=study.device, progress=False)


def peak_device_MB(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    peak = torch.cuda.max_memory_allocated() / 2**20
    try:
        import cupy

        peak = max(peak, cupy.get_default_memory_pool().total_bytes() / 2**20)
    except ImportError:
        pass
    return peak


def main(argv: list[str]) -> int:
    from ckapipe.cli import one_malloc_arena

    one_malloc_arena()  # as the ckapipe command does, before any thread starts
    args = json.loads(argv[0])
    start = time.perf_counter()
    peak = run_stage(args)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "peak_host_MB": peak.peak, "stage_peak_MB": peak.increase_MB,
                      "live_peak_MB": getattr(peak, "live_MB", None), "peak_device_MB": peak_device_MB(args["device"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

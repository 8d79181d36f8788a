"""Issue 21's breakdown: where compare's time goes beyond the forward passes, as interleaved A/B rounds.

    .venv-extras/bin/python -m bench.overlap [N] [ROUNDS]

On the same model objects and DataLoader, for two ResNet-18s and ResNet-18 vs -34 at 32 px: the forward passes
alone, compare with the Grams after each forward (``spare_cores() == 0``, the default where torch's threads take
every core), compare with the Grams queued on one worker beside the forward (``spare_cores() == 1``), and
pytorch-cka 1.1.3. Wall and process CPU time, best of the rounds; the load average is printed: on a shared
machine the rounds disagree by more than the differences, so read the CPU times beside the wall times.
"""

from __future__ import annotations

import os
import sys
import time

from bench.front import bench_loader, built_models, ckapipe_compare, forward_only, pytorch_cka_all_pairs
from bench.workloads import Study

WORKLOADS = {"two ResNet-18s": (("a", "resnet18", 0), ("b", "resnet18", 1)),
             "ResNet-18 vs -34": (("a", "resnet18", 0), ("b", "resnet34", 0))}


def variants(models, loader) -> dict:
    """What is timed in each round: name -> a call."""
    import ckapipe.pipelines.compare as pass_

    def compare_with(spare: int):
        def run():
            pass_.spare_cores = lambda: spare
            try:
                ckapipe_compare(models, loader, "cpu")
            finally:
                pass_.spare_cores = spare_cores
        return run

    spare_cores = pass_.spare_cores
    return {"forward passes alone": lambda: forward_only(models, loader, "cpu"),
            "compare, Grams after each forward": compare_with(0),
            "compare, Grams queued beside it": compare_with(1),
            "pytorch-cka 1.1.3": lambda: pytorch_cka_all_pairs(models, loader, "cpu")}


def breakdown(name: str, models_: tuple, n: int, rounds: int) -> None:
    study = Study("W", models_, n, 32)
    models, loader = built_models(study), bench_loader(study)
    calls = variants(models, loader)
    wall = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    for _ in range(rounds):
        for k, call in calls.items():
            w, c = time.perf_counter(), time.process_time()
            call()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    w0, c0 = min(wall["forward passes alone"]), min(cpu["forward passes alone"])
    print(f"== {name}, N={n}, best of {rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f}")
    for k in calls:
        print(f"  {k:36s} wall {min(wall[k]):7.2f} s {min(wall[k]) / w0:5.2f}x | cpu {min(cpu[k]):7.2f} s "
              f"{min(cpu[k]) / c0:5.2f}x | walls {[round(t, 2) for t in wall[k]]}", flush=True)


if __name__ == "__main__":
    n, rounds = (int(a) for a in (sys.argv[1:] + ["1024", "3"][len(sys.argv) - 1:])[:2])
    for name, models_ in WORKLOADS.items():
        breakdown(name, models_, n, rounds)

"""Where compare's time goes beyond the forward passes (issue 21), in the same run as F1 and F5.

Per minibatch of the workload, in process CPU time (every thread of the process counted), on the same
models and DataLoader that F1/F5 time, with compare's own pieces (``ckapipe.extract.features``'s feature
source, ``ckapipe.kernels``):

    forward           the forward passes alone, hooks off (torch's intra-op threads)
    hooks' copies     the same forwards with compare's hooks recording, less the forward alone
    centering         ``center_features_and_mean`` of every recorded layer (float64), block by block
    products          ``gram_linear`` of each centered block (float64 syrk, one BLAS thread), as ``gram_parts``
    triangles, HSIC   ``u_centered_triangle`` of each Gram, then ``hsic1_matrix`` of the stack

On a machine whose cores torch's threads already fill, work beside the forward cannot hide: compare's
wall time is at least the forward's times (forward + hooks + Grams) / forward in CPU time, the floor
row. When that floor is above a target, the target cannot be met in float64 on this machine, whatever
the scheduling; the floor with the products alone says how much of it float64 arithmetic is.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import defaultdict

import numpy as np

from bench.common import Row
from bench.workloads import LAYERS


def breakdown_rows(workload: str, models: dict, loader, device: str, target: str = "<= 1.08",
                   batches: int = 4, rounds: int = 3) -> list[Row]:
    """The per-minibatch CPU time of each step of compare against the forward passes', best of ``rounds``."""
    if device != "cpu":
        return []
    sources = feature_sources(models, loader)
    inputs = [x for x, _ in itertools.islice(loader, batches)]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for step, took in step_times(models, sources, inputs).items():
            best[step] = min(best.get(step, float("inf")), 1e3 * took / len(inputs))  # ms per minibatch
    return step_rows(workload, best, target, len(inputs), rounds)


def feature_sources(models: dict, loader) -> list:
    """compare's feature source of each model (its hooks on ``LAYERS``), probed on the loader's first inputs."""
    import torch  # optional: torch (the bench's extras)

    from ckapipe.extract.features import feature_source, probe_inputs
    from ckapipe.extract.minibatches import minibatches
    from ckapipe.extract.runner import resolve_model

    cpu = torch.device("cpu")
    probe = probe_inputs(minibatches(loader), cpu)
    return [feature_source(resolve_model(net, None, hash_weights=False, label=name), LAYERS, "flatten", probe, cpu,
                           name, "the bench inputs", "") for name, net in models.items()]


def step_times(models: dict, sources: list, inputs: list) -> dict[str, float]:
    """Process CPU time of each step over ``inputs``, summed."""
    import torch  # optional: torch (the bench's extras)

    from ckapipe import kernels
    from ckapipe.blas import single_threaded_blas
    from ckapipe.extract.features import feature_arrays

    spent: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def step(name):
        start = time.process_time()
        yield
        spent[name] += time.process_time() - start

    for x in inputs:
        with torch.inference_mode():
            with step("forward"):
                for net in models.values():
                    net(x)
            with contextlib.ExitStack() as hooks:
                for source in sources:
                    hooks.enter_context(source.hooked())
                with step("forward with hooks"):
                    features = [source.features(x) for source in sources]
        arrays = [a for f in features for a in feature_arrays(f).values()]
        with single_threaded_blas(True):
            grams = [blocked_gram(a, step) for a in arrays]
            with step("triangles, HSIC"):
                kernels.hsic1_matrix(np.stack([kernels.u_centered_triangle(g) for g in grams]))
    return dict(spent)


def blocked_gram(x: np.ndarray, step) -> np.ndarray:
    """The Gram of the centered features as ``kernels.gram_parts`` makes it (``FEATURE_BLOCK`` columns at a time,
    so that the float64 copy stays in the cache), its centering and its products timed apart."""
    from ckapipe import kernels

    gram = np.zeros((len(x), len(x)))
    for start in range(0, x.shape[1], kernels.FEATURE_BLOCK):
        with step("centering"):
            centered, _ = kernels.center_features_and_mean(x[:, start:start + kernels.FEATURE_BLOCK])
        with step("products"):
            gram += kernels.gram_linear(centered)
    return gram


def step_rows(W: str, cpu: dict[str, float], target: str, batches: int, rounds: int) -> list[Row]:
    """One row per step against the forward passes (ms of CPU per minibatch), then the floors that they set."""
    forward = cpu["forward"]
    hooks = max(0.0, cpu["forward with hooks"] - forward)
    grams = cpu["centering"] + cpu["products"] + cpu["triangles, HSIC"]
    note = f"process CPU time per minibatch, best of {rounds} rounds of {batches} minibatches"
    rows = [Row(W, f"breakdown: {what} vs the forward passes (CPU)", label, took, "forward", forward, unit="ms CPU",
                note=note)
            for what, label, took in (("hooks' copies of the recorded features", "hooks", hooks),
                                      ("centering in float64", "centering", cpu["centering"]),
                                      ("float64 Gram products", "products", cpu["products"]),
                                      ("U-centered triangles and HSIC", "triangles", cpu["triangles, HSIC"]))]
    for what, floor in (("float64 products alone", forward + cpu["products"]),
                        ("hooks + every Gram step", forward + hooks + grams)):
        row = Row(W, f"floor: forward + {what} (CPU)", "floor", floor, "forward", forward, unit="ms CPU", target=target)
        row.note = ("above the target: not reachable in float64 where torch's threads fill every core"
                    if row.status == "MISSED" else "compare's least possible ratio where torch's threads fill every core")
        rows.append(row)
    return rows

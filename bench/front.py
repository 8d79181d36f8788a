"""Pieces F1-F4 of the suite (issue 10): ``compare``, the front door, end to end.

F1, F3, F5. On the same model objects and the same DataLoader, in one process, interleaved rounds (best
    of each): ``compare`` end to end against the forward passes alone (every batch loaded once and
    given to every model, as compare does) and against pytorch-cka 1.1.3's ``compute_cka`` and torch-cka
    0.21's ``compare`` for every pair of models (W1: ResNet-18 vs -34, one call; W3: six, all pairs in one
    pass against 15 calls; W5: two ResNet-18s, pytorch-cka's own example, issue 21).
F1, F2. Accuracy: compare's CKA against the independent float64 reference (Song et al.'s HSIC_1
    with explicit traces, on the float32 features compare saw, kept by ``keep_activations``), at
    32 px (W1, W5) and 224 px (W2), beside pytorch-cka's and torch-cka's deviations.
F4. Peak host memory of compare in a fresh process as N grows (W4 sizes; inputs memory-mapped).
"""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from bench.breakdown import breakdown_rows
from bench.common import BATCH, Row, bench_inputs, max_deviation, reference_cka, timed
from bench.workloads import LAYERS, Study, deviation_rows, load_module, stage_in_subprocess


def front_rows(study: Study, torch_cka_rounds: int | None = None, with_torch_cka: bool = True,
               target: str = "<= 1.08") -> list[Row]:
    """F1/F3/F5: compare vs the forward passes alone vs pytorch-cka and torch-cka, on the same models and loader
    (the other tools in the first ``torch_cka_rounds`` rounds only: 15 calls of them are long)."""
    W = study.workload
    models = built_models(study)
    loader = bench_loader(study)
    forwards, compares, theirs_times, peer_times = [], [], [], []
    result = None
    for round_ in range(study.rounds):
        forwards.append(timed(lambda: forward_only(models, loader, study.device))[0])
        took, result = timed(lambda: ckapipe_compare(models, loader, study.device))
        compares.append(took)
        if isinstance(result, Exception):
            return [Row(W, "ckapipe compare", "compare", None, "forward", min(forwards), note=f"ERROR: {result}",
                        ckapipe_failure=True)]
        if round_ < (torch_cka_rounds or study.rounds):
            took, peer = timed(lambda: pytorch_cka_all_pairs(models, loader, study.device))
            peer_times.append(None if isinstance(peer, Exception) else took)
            if with_torch_cka:
                took, theirs = timed(lambda: torch_cka_all_pairs(models, loader, study.device))
                theirs_times.append(None if isinstance(theirs, Exception) else took)
    t_forward, t_compare = min(forwards), min(compares)
    pairs = list(itertools.combinations(models, 2))
    calls = f"{len(pairs)} compare call{'s' * (len(pairs) > 1)}"
    rounds = f"best of {study.rounds} interleaved rounds, N={study.n}, {study.size} px, m={BATCH}, models built once"
    rows = [Row(W, "compare end to end vs the forward passes alone", "compare", t_compare, "forward", t_forward,
                target=target, note=f"{len(models)} models, every batch loaded once; {rounds}; "
                                     f"load average {os.getloadavg()[0]:.1f}")]
    rows += peer_rows(W, calls, peer_times, peer, t_compare)
    rows += breakdown_rows(W, models, loader, study.device, target)
    times = [t for t in theirs_times if t is not None]
    if not with_torch_cka:
        return rows
    if times:
        rows.append(Row(W, f"torch-cka 0.21 ({calls}) vs compare (one pass)", "torch-cka", min(times), "compare",
                        t_compare, target=study.end_to_end_target,
                        note=f"same model objects and loader; torch-cka best of {len(times)}"))
    else:
        rows.append(Row(W, f"torch-cka 0.21 ({calls})", "torch-cka", None, "compare", t_compare,
                        note=f"ERROR: {type(theirs).__name__}: {str(theirs).splitlines()[0][:90]}"))
    return rows


def peer_rows(W: str, calls: str, times: list, last, t_compare: float) -> list[Row]:
    """pytorch-cka 1.1.3's time against compare's (faster than it on every workload, issue 21), or its error."""
    times = [t for t in times if t is not None]
    if not times:
        return [Row(W, f"pytorch-cka 1.1.3 ({calls})", "pytorch-cka", None, "compare", t_compare,
                    note=f"ERROR: {type(last).__name__}: {str(last).splitlines()[0][:90]}")]
    return [Row(W, f"pytorch-cka 1.1.3 ({calls}) vs compare (one pass)", "pytorch-cka", min(times), "compare",
                t_compare, target=">= 1", note=f"same model objects and loader; pytorch-cka best of {len(times)}")]


def accuracy_rows(study: Study, workdir: Path) -> list[Row]:
    """compare's (and torch-cka's) largest deviation from the float64 reference on the features compare saw."""
    from ckapipe import compare, store

    W = study.workload
    models = built_models(study)
    loader = bench_loader(study)
    cache = workdir / f"{W}-compare"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = compare(models, loader, layers=LAYERS, cache=cache, keep_activations=True, data_name=f"bench-{study.n}",
                       device=study.device, progress=False)
    runs = [store.open_run(entry.path) for entry in ours.runs]
    names = list(models)
    pairs = list(itertools.combinations(names, 2))
    exact = reference_cka(runs, [(a.name, b.name) for a, b in itertools.combinations(runs, 2)])
    exact = {(a, b): exact[(runs[names.index(a)].name, runs[names.index(b)].name)] for a, b in pairs}
    rows = deviation_rows(W, "ckapipe compare (float64)", [max_deviation(ours.cka(a, b).values, exact[(a, b)]) for a, b in pairs],
                          ckapipe=True)
    for tool, run_all_pairs in (("pytorch-cka 1.1.3 (as shipped)", pytorch_cka_all_pairs),
                                ("torch-cka 0.21 (float32, as shipped)", torch_cka_all_pairs)):
        rows += peer_deviation_rows(W, tool, timed(lambda: run_all_pairs(models, loader, study.device))[1], exact, pairs)
    shutil.rmtree(cache, ignore_errors=True)
    return rows


def peer_deviation_rows(W: str, tool: str, theirs, exact: dict, pairs: list) -> list[Row]:
    """Another tool's largest deviation from the float64 reference over the pairs, or its error as the row's note."""
    if isinstance(theirs, Exception):
        return [Row(W, f"max |CKA - float64 reference|, {tool}", "deviation", None, "tolerance", 1e-6, unit="cka",
                    note=f"NaN: {type(theirs).__name__}: {str(theirs)[:80]}")]
    return deviation_rows(W, tool, [max_deviation(theirs[p], exact[p]) for p in pairs])


def memory_rows(study: Study, sizes: list[int], workdir: Path) -> list[Row]:
    """F4: compare at each N in a fresh process: peak host memory and wall time, largest N against the smallest."""
    results = {}
    for n in sizes:
        sized = Study(study.workload, study.models, n, study.size, study.device)
        results[n] = stage_in_subprocess("compare", sized, workdir / f"F4-{n}")
        print(f"  [F4] N={n}: compare {results[n].get('wall_s', float('nan')):.2f} s "
              f"+{results[n].get('stage_peak_MB', 0):.0f} MB", flush=True)
    lo, hi = sizes[0], sizes[-1]
    small, large = results[lo], results[hi]
    if "error" in small or "error" in large:
        return [Row("W4", f"compare at N={hi}", "compare", None, "", None,
                    note=f"ERROR: {small.get('error') or large.get('error')}", ckapipe_failure=True)]
    rows = [
        Row("W4", f"compare: wall time at N={hi} vs N={lo}", f"N={hi}", large["wall_s"], f"N={lo}", small["wall_s"],
            note=f"N ratio {hi / lo:g}"),
        Row("W4", f"compare: peak host memory at N={hi} vs N={lo}", f"N={hi}", large["stage_peak_MB"], f"N={lo}",
            small["stage_peak_MB"], unit="MB", target="<= 1.2",
            note=f"fresh process, anonymous resident size above its level after the imports (whole process "
                 f"{small['peak_host_MB']:.0f} / {large['peak_host_MB']:.0f} MB); inputs memory-mapped from .npy"),
    ]
    if large.get("peak_device_MB"):
        rows.append(Row("W4", f"compare: peak device memory at N={hi} vs N={lo}", f"N={hi}", large["peak_device_MB"],
                        f"N={lo}", small["peak_device_MB"], unit="MB", target="<= 1.2"))
    return rows


# --------------------------------------------------------------------------- the three contenders


def built_models(study: Study) -> dict:
    """The study's models, built once, on the device, in eval mode (every contender gets these objects)."""
    return {name: load_module(arch, seed).to(study.device) for name, arch, seed in study.models}


def bench_loader(study: Study):
    """One DataLoader of (input, label) batches of m, in order: what a torch-cka user hands over."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    inputs = bench_inputs(study.n, study.size)
    return DataLoader(TensorDataset(inputs, torch.zeros(len(inputs))), batch_size=BATCH, shuffle=False)


def forward_only(models: dict, loader, device: str) -> None:
    """Every batch loaded once and given to every model: the forward passes compare cannot avoid."""
    import torch

    with torch.inference_mode():
        for x, _ in loader:
            x = x.to(device)
            for net in models.values():
                net(x)
    if device == "cuda":
        torch.cuda.synchronize()


def ckapipe_compare(models: dict, loader, device: str):
    from ckapipe import compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compare(models, loader, layers=LAYERS, device=device, progress=False)


def block_names(net) -> list[str]:
    """Module names of the residual blocks (``layer*.?``), as torch-cka takes them."""
    from ckapipe.extract.layers import glob_match

    return [name for name, _ in net.named_modules() if glob_match(LAYERS[0], name)]


def pytorch_cka_all_pairs(models: dict, loader, device: str) -> dict:
    """pytorch-cka 1.1.3 as shipped: one ``compute_cka`` call per pair of models (its own example's call),
    each rerunning both models; its hooks are removed when the call ends."""
    from cka import compute_cka

    out = {}
    for a, b in itertools.combinations(models, 2):
        net_a, net_b = models[a], models[b]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compute_cka(net_a, net_b, loader, layers=block_names(net_a), model2_layers=block_names(net_b),
                                 device=device, progress=False)
        out[(a, b)] = result[0].detach().cpu().numpy().astype(np.float64)
    return out


def torch_cka_all_pairs(models: dict, loader, device: str) -> dict:
    """torch-cka 0.21 as shipped: one ``compare`` call per pair of models, each rerunning both models.

    torch-cka registers forward hooks it never removes; they are removed after each call so that
    later calls (and the other contenders) run the models bare.
    """
    import torch
    from torch_cka import CKA

    out = {}
    for a, b in itertools.combinations(models, 2):
        net_a, net_b = models[a], models[b]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tool = CKA(net_a, net_b, a, b, model1_layers=block_names(net_a), model2_layers=block_names(net_b),
                           device=device)
                with torch.no_grad():
                    tool.compare(loader)
            out[(a, b)] = tool.export()["CKA"].cpu().numpy().astype(np.float64)
        finally:
            for net in (net_a, net_b):
                for module in net.modules():
                    module._forward_hooks.clear()
    return out

"""The workloads of issue 5: one study of random-init torchvision ResNets, measured
for ckapipe (extract, analyze, re-analyze), torch-cka 0.21 and ckatorch 1.0.3 on the
same inputs in the same minibatches, against bare I/O and an independent float64 CKA."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    BATCH, TOLERANCE, Row, bare_read_files, bare_write, bench_inputs, inputs_spec, max_deviation, model_spec,
    reference_cka, timed,
)

LAYERS = ["layer*.?"]  # every residual-block output
CKATORCH_PAIRS = 4  # layer pairs timed for ckatorch's core (it recomputes both Grams per pair); extrapolated


@dataclass(frozen=True)
class Study:
    workload: str
    models: tuple[tuple[str, str, int], ...]  # (run name, torchvision architecture, init seed)
    n: int
    size: int
    device: str = "cpu"
    end_to_end_target: str = ">= 3"
    rounds: int = 2  # interleaved forward-only / extraction rounds, best of each


# --------------------------------------------------------------------------- ckapipe


def load_module(arch: str, seed: int):
    from ckapipe.extract.models import load_model

    return load_model(model_spec(arch, seed)).module.eval()


def forward_only(study: Study) -> float:
    """Seconds to build every model and run its bare forward over the inputs (what extraction cannot beat)."""
    import torch

    start = time.perf_counter()
    inputs = bench_inputs(study.n, study.size)
    for _, arch, seed in study.models:
        net = load_module(arch, seed).to(study.device)
        with torch.inference_mode():
            for i in range(0, study.n, BATCH):
                net(inputs[i:i + BATCH].to(study.device))
    if study.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def forward_and_extract(study: Study, cache: Path):
    """Forward-only and extraction, interleaved for ``study.rounds`` rounds (a fresh cache each but the
    last): the best time of each, and the runs of the last round (or the exception extraction raised)."""
    forwards, extractions, runs = [], [], None
    for round_ in range(study.rounds):
        forwards.append(forward_only(study))
        shutil.rmtree(cache, ignore_errors=True)
        took, runs = timed(lambda: extract_all(study, cache))
        extractions.append(took)
        if isinstance(runs, Exception):
            break
    return min(forwards), min(extractions), runs


def extract_all(study: Study, cache: Path, grams: bool = False, dataset: str | None = None) -> list:
    """Extract every model of the study over its inputs (``dataset``: another spec of the same inputs)."""
    from ckapipe import store
    from ckapipe.extract import extract_run

    dataset = dataset or inputs_spec(study.n, study.size)
    return [store.open_run(extract_run(model_spec(arch, seed), dataset, LAYERS, cache=cache,
                                       batch_size=BATCH, name=name, device=study.device, progress=False, grams=grams))
            for name, arch, seed in study.models]


def decoded_read(cache: Path, names: list[str]) -> int:
    """Read and decode every chunk the analysis reads, in its Dask task groups and threads, each
    array opened once per task, and nothing else (no checks, no arithmetic): the analysis's floor."""
    import dask

    from ckapipe.analyze.engine import plan_analysis
    from ckapipe import store

    plan = plan_analysis(cache, names, use_gram_cache=False)

    def read(source, ks):
        run = store.open_run(source.path)
        return sum(run.layer(layer)[run.chunk_slice(k)].nbytes for layer in source.layers for k in ks)

    return sum(dask.compute(*[dask.delayed(read)(s, ks) for ks in plan.tasks for s in plan.sources], scheduler="threads"))


def analysis(cache: Path, names: list[str], device: str, **options):
    import ckapipe.analyze as analyze

    return analyze.analyze(cache, names, progress=False, device=device, **options)


# --------------------------------------------------------------------------- the other tools


def ordered_loader(run, study: Study, labels: bool = True):
    """The inputs in the run's stored order, in its minibatches (the same minibatches ckapipe used);
    (input, label) pairs for torch-cka, inputs alone for ckatorch (it maps tuple items to forward's arguments)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    inputs = bench_inputs(study.n, study.size)[torch.from_numpy(np.asarray(run.sample_ids()))]
    items = (inputs, torch.zeros(len(inputs))) if labels else (inputs,)
    return DataLoader(TensorDataset(*items), batch_size=BATCH, shuffle=False)


def torch_cka_compare(study: Study, run_a, run_b, arch_a, arch_b) -> np.ndarray:
    """torch-cka 0.21 as shipped (float32): one compare call, rerunning both models."""
    import torch
    from torch_cka import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tool = CKA(load_module(*arch_a), load_module(*arch_b), run_a.name, run_b.name,
                   model1_layers=list(run_a.layer_names), model2_layers=list(run_b.layer_names), device=study.device)
        with torch.no_grad():
            tool.compare(ordered_loader(run_a, study))
    return tool.export()["CKA"].cpu().numpy().astype(np.float64)


def ckatorch_as_shipped(study: Study, run_a, run_b, arch_a, arch_b):
    """ckatorch 1.0.3's CKA class, as shipped (one epoch): its result or the error it raises."""
    from ckatorch import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tool = CKA(load_module(*arch_a), load_module(*arch_b), layers=list(run_a.layer_names),
                   second_layers=list(run_b.layer_names), device=study.device)
        return tool(ordered_loader(run_a, study, labels=False), epochs=1).cpu().numpy().astype(np.float64)


def ckatorch_core(run_a, run_b, pairs) -> dict:
    """ckatorch's cka_batch (float64 bmm + hsic1) on the stored, flattened features of some layer pairs."""
    import torch
    from ckatorch import cka_batch

    def batched(run, layer):
        x = run.layer(layer)[: run.n_chunks * BATCH]
        return torch.from_numpy(x).reshape(run.n_chunks, BATCH, -1)

    return {(la, lb): float(cka_batch(batched(run_a, la), batched(run_b, lb))) for la, lb in pairs}


# --------------------------------------------------------------------------- one study


@dataclass
class Ours:
    """What ckapipe's side of a study measured, which the other tools are held against."""

    runs: list
    archs: dict  # run name -> (architecture, init seed)
    pairs: list  # (run a, run b) names, every pair of runs
    exact: dict  # pair -> (La, Lb) float64 reference CKA
    t_extract: float
    t_analysis: float
    t_reanalysis: float

    def run(self, name):
        return next(r for r in self.runs if r.name == name)


def run_study(study: Study, workdir: Path) -> list[Row]:
    """Every row of one workload: ckapipe's extraction and analysis, then torch-cka and ckatorch."""
    rows, ours = ckapipe_rows(study, workdir)
    if ours is not None:
        rows += torch_cka_rows(study, ours) + ckatorch_rows(study, ours)
    return rows


def ckapipe_rows(study: Study, workdir: Path) -> tuple[list[Row], Ours | None]:
    """Extraction against forward and bare write, analysis against bare reads, deviations from float64."""
    cache = workdir / study.workload
    t_forward, t_extract, runs = forward_and_extract(study, cache)
    if isinstance(runs, Exception):
        return [Row(study.workload, "ckapipe extract", "extract", None, "forward", t_forward, note=f"ERROR: {runs}",
                    ckapipe_failure=True)], None
    rows = extraction_rows(study, workdir, runs, t_forward, t_extract)
    analysed, ours = analysis_rows(study, cache, runs, t_extract)
    return rows + analysed, ours


def extraction_rows(study: Study, workdir: Path, runs, t_forward: float, t_extract: float) -> list[Row]:
    W = study.workload
    raw = sum(r.layer(layer).nbytes for r in runs for layer in r.layer_names)
    disk = sum(sum(f.stat().st_size for f in Path(r.path).rglob("*") if f.is_file()) for r in runs)
    t_write = bare_write(workdir / "bare-write.bin", disk)
    (workdir / "bare-write.bin").unlink()
    return [
        Row(W, "extraction vs max(forward only, bare write)", "extract", t_extract,
            "forward" if t_forward >= t_write else "bare write", max(t_forward, t_write), target="<= 1.3",
            note=f"models built in both; best of {study.rounds} interleaved rounds; forward {t_forward:.2f} s, "
                 f"bare write {t_write:.2f} s of {disk / 1e6:.0f} MB"),
        Row(W, "extraction write rate vs bare sequential write", "extract", disk / t_extract / 1e6, "bare write",
            disk / t_write / 1e6, unit="MB/s", note=f"{raw / 1e9:.2f} GB of activations, {disk / 1e9:.2f} GB on disk"),
    ]


def analysis_rows(study: Study, cache: Path, runs, t_extract: float) -> tuple[list[Row], Ours | None]:
    W = study.workload
    names = [r.name for r in runs]
    raw = sum(r.layer(layer).nbytes for r in runs for layer in r.layer_names)
    t_files, nread = bare_read_files([r.path for r in runs])
    t_decode, _ = timed(lambda: decoded_read(cache, names), repeat=2)
    t_plain, plain = timed(lambda: analysis(cache, names, study.device, use_gram_cache=False), repeat=2)
    if isinstance(plain, Exception):
        return [Row(W, "ckapipe analyze", "analyze", None, "read", t_decode, note=f"ERROR: {plain}",
                    ckapipe_failure=True)], None
    t_f32, fast = timed(lambda: analysis(cache, names, study.device, use_gram_cache=False, precision="float32"))
    t_fill, _ = timed(lambda: analysis(cache, names, study.device))
    t_again, again = timed(lambda: analysis(cache, names, study.device), repeat=3)
    rows = [
        Row(W, "analysis vs bare read+decode of the same chunks", "analyze", t_plain, "read+decode", t_decode,
            target="<= 1.3", note=f"same Dask tasks and threads; {raw / 1e9:.2f} GB decoded"),
        Row(W, "analysis read rate vs bare sequential file read", "analyze", nread / t_plain / 1e6, "bare read",
            nread / t_files / 1e6, unit="MB/s", note=f"{nread / 1e6:.0f} MB of store files"),
        Row(W, "analysis, float32 products vs float64", "float32", t_f32, "float64", t_plain),
        Row(W, "first analysis filling the Gram cache vs analysis", "fill", t_fill, "analyze", t_plain),
        Row(W, "re-analysis from cached Grams vs first analysis", "first", t_fill, "re-analyze", t_again, target=">= 10"),
    ]
    pairs = list(itertools.combinations(names, 2))
    exact = reference_cka(runs, pairs)
    rows += deviation_rows(W, "ckapipe (float64)", [max_deviation(plain.cka(*p).values, exact[p]) for p in pairs], ckapipe=True)
    rows += deviation_rows(W, "ckapipe --precision float32", [max_deviation(fast.cka(*p).values, exact[p]) for p in pairs])
    if any(max_deviation(again.cka(*p).values, exact[p])[0] > TOLERANCE for p in pairs):
        rows.append(Row(W, "re-analysis from cached Grams agrees with float64", "", None, "", None,
                        note="ERROR: differs by more than 1e-6", ckapipe_failure=True))
    archs = {run.name: (arch, seed) for run, (_, arch, seed) in zip(runs, study.models)}
    return rows, Ours(runs, archs, pairs, exact, t_extract, t_plain, t_again)


def torch_cka_rows(study: Study, ours: Ours) -> list[Row]:
    """torch-cka's compare for every pair of runs, against ckapipe's analysis, re-analysis and end to end."""
    W = study.workload
    t_torch, theirs = timed(lambda: {(a, b): torch_cka_compare(study, ours.run(a), ours.run(b), ours.archs[a],
                                                               ours.archs[b]) for a, b in ours.pairs})
    calls = f"{len(ours.pairs)} compare call{'s' * (len(ours.pairs) > 1)}"
    if isinstance(theirs, Exception):
        return [Row(W, f"torch-cka 0.21 ({calls})", "torch-cka", None, "analyze", ours.t_analysis,
                    note=f"ERROR: {theirs}")]
    return [
        Row(W, f"torch-cka ({calls}) vs analysis from cached activations", "torch-cka", t_torch, "analyze",
            ours.t_analysis, target=">= 10"),
        Row(W, f"torch-cka ({calls}) vs re-analysis from cached Grams", "torch-cka", t_torch, "re-analyze",
            ours.t_reanalysis, target=">= 100"),
        Row(W, f"torch-cka ({calls}) vs ckapipe end to end (extract + analyze)", "torch-cka", t_torch,
            "extract+analyze", ours.t_extract + ours.t_analysis, target=study.end_to_end_target),
    ] + deviation_rows(W, "torch-cka 0.21 (float32, as shipped)", [max_deviation(theirs[p], ours.exact[p])
                                                                    for p in ours.pairs])


def ckatorch_rows(study: Study, ours: Ours) -> list[Row]:
    """ckatorch's CKA class as shipped on the first pair of runs, and its cka_batch core on sampled layer pairs."""
    W = study.workload
    a, b = ours.pairs[0]
    run_a, run_b = ours.run(a), ours.run(b)
    rows = []
    t_class, shipped = timed(lambda: ckatorch_as_shipped(study, run_a, run_b, ours.archs[a], ours.archs[b]))
    if isinstance(shipped, Exception):
        rows.append(Row(W, "ckatorch 1.0.3 CKA class as shipped", "ckatorch", None, "analyze", ours.t_analysis,
                        note=f"ERROR: {type(shipped).__name__}: {str(shipped).splitlines()[0][:90]}"))
    else:
        rows.append(Row(W, "ckatorch CKA class (as shipped, 1 epoch) vs analysis", "ckatorch", t_class, "analyze",
                        ours.t_analysis, note="keeps only the last minibatch's CKA"))
        rows += deviation_rows(W, "ckatorch CKA class (as shipped)", [max_deviation(shipped, ours.exact[(a, b)])])
    la, lb = run_a.layer_names, run_b.layer_names
    sample = list(itertools.product(la, lb))[:: max(1, len(la))][:CKATORCH_PAIRS]
    t_core, core = timed(lambda: ckatorch_core(run_a, run_b, sample))
    if isinstance(core, Exception):
        return rows + [Row(W, "ckatorch cka_batch core", "ckatorch", None, "analyze", ours.t_analysis,
                           note=f"ERROR: {core}")]
    total = sum(len(ours.run(x).layer_names) * len(ours.run(y).layer_names) for x, y in ours.pairs)
    rows.append(Row(W, "ckatorch cka_batch core on cached features vs analysis", "ckatorch",
                    t_core / len(sample) * total, "analyze", ours.t_analysis,
                    note=f"timed on {len(sample)} of {total} layer pairs, scaled"))
    exact = ours.exact[(a, b)]
    return rows + deviation_rows(W, "ckatorch cka_batch core (float64)",
                                 [max_deviation(np.array([v]), np.array([exact[la.index(x), lb.index(y)]]))
                                  for (x, y), v in core.items()])


def deviation_rows(workload: str, tool: str, deviations, ckapipe: bool = False) -> list[Row]:
    """Max |CKA - float64 reference| of one tool over every pair, NaN entries counted."""
    worst = max((d for d, _ in deviations), default=float("nan"), key=lambda d: -1 if np.isnan(d) else d)
    nans = sum(n for _, n in deviations)
    note = f"NaN: {nans} entries NaN or inf" if nans else ""
    failed = ckapipe and (nans > 0 or not worst <= TOLERANCE)
    return [Row(workload, f"max |CKA - float64 reference|, {tool}", "deviation", worst, "tolerance", TOLERANCE,
                unit="cka", target="<= 1", note=note, ckapipe_failure=failed)]


# --------------------------------------------------------------------------- W4: memory as N grows


def stage_in_subprocess(stage: str, study: Study, cache: Path, live: bool = False) -> dict:
    """Run one stage in a fresh interpreter: its wall time and peak memory (``live``: traced instead)."""
    args = {"stage": stage, "models": study.models, "n": study.n, "size": study.size, "device": study.device,
            "cache": str(cache), "live": live}
    done = subprocess.run([sys.executable, "-m", "bench.stage", json.dumps(args)], capture_output=True, text=True)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


LIVE_STAGES = ("analyze", "reanalyze")


def scaling(study: Study, sizes: list[int], workdir: Path) -> list[Row]:
    """W4: each stage at every N in its own process; the largest N against the smallest."""
    results = {}
    for n in sizes:
        cache = workdir / f"W4-{n}"
        sized = Study(study.workload, study.models, n, study.size, study.device)
        results[n] = {s: stage_in_subprocess(s, sized, cache) for s in ("extract", "analyze", "fill", "reanalyze")}
        for s in LIVE_STAGES:  # traced again (the first analysis filled the Gram cache: it cannot run twice)
            results[n][s]["live_peak_MB"] = stage_in_subprocess(s, sized, cache, live=True).get("live_peak_MB")
        shutil.rmtree(cache, ignore_errors=True)
        print(f"  [W4] N={n}: " + "; ".join(f"{s} {r.get('wall_s', float('nan')):.2f} s +{r.get('stage_peak_MB', 0):.0f} MB"
                                            for s, r in results[n].items()), flush=True)
    lo, hi = sizes[0], sizes[-1]
    rows = []
    for stage in ("extract", "analyze", "fill", "reanalyze"):
        small, large = results[lo][stage], results[hi][stage]
        if "error" in small or "error" in large:
            rows.append(Row("W4", f"{stage} at N={hi}", stage, None, "", None,
                            note=f"ERROR: {small.get('error') or large.get('error')}", ckapipe_failure=True))
            continue
        rows.append(Row("W4", f"{stage}: wall time at N={hi} vs N={lo}", f"N={hi}", large["wall_s"], f"N={lo}",
                        small["wall_s"], note=f"N ratio {hi / lo:g}"))
        rows.append(Row("W4", f"{stage}: peak host memory at N={hi} vs N={lo}", f"N={hi}", large["stage_peak_MB"],
                        f"N={lo}", small["stage_peak_MB"], unit="MB", target="<= 1.2",
                        note=f"fresh process per stage (one malloc arena, as the ckapipe command), anonymous resident "
                             f"size sampled every 5 ms, above its level after the imports (whole process: "
                             f"{small['peak_host_MB']:.0f} / {large['peak_host_MB']:.0f} MB); inputs memory-mapped from .npy"))
        if large.get("live_peak_MB") and small.get("live_peak_MB"):
            rows.append(Row("W4", f"{stage}: live peak (tracemalloc) at N={hi} vs N={lo}", f"N={hi}",
                            large["live_peak_MB"], f"N={lo}", small["live_peak_MB"], unit="MB",
                            note="the most memory the stage held at once, without what the allocator keeps after a free"))
        if large.get("peak_device_MB"):
            rows.append(Row("W4", f"{stage}: peak device memory at N={hi} vs N={lo}", f"N={hi}", large["peak_device_MB"],
                            f"N={lo}", small["peak_device_MB"], unit="MB", target="<= 1.2"))
    return rows

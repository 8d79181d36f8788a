"""One table of every CUDA path against its CPU twin: max |difference| and time of each (issue 21).

    python -m tests.gpu_report            # on a GPU machine (scripts/gpu_check.sh runs it)
    CKAPIPE_GPU_STANDIN=1 python -m tests.gpu_report   # every row through tests/fake_cupy.py, on the CPU

Rows: the kernels (U-centered Grams and HSIC_1), the analysis (``--device cuda``), the extraction's
Grams computed on the device (through DLPack), the fused ``compare``, every measure with RankMe, and
the bootstrap intervals. Exit status 1 when a row differs from its twin by more than its tolerance
or fails. With the stand-in, torch stays on the CPU and the features enter the stand-in through its
from_dlpack (the ``compare`` row swaps compare's one seam, ``device_arrays``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

MEASURES = "linear,linear_biased,rbf:0.5,rbf_biased:0.5,mutual_knn:5,cknna:5"
M = 32


def install_standin() -> None:
    """tests/fake_cupy.py as ``cupy`` for this process (CKAPIPE_GPU_STANDIN=1)."""
    from tests import fake_cupy

    sys.modules["cupy"] = fake_cupy


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def max_difference(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.nanmax(np.abs(a - b))) if a.size else 0.0


def row(name: str, cuda, cpu, tolerance: float) -> dict:
    """Run both twins twice, timing the second call (the first pays CuPy's kernel compilation and
    the imports), and compare:
    ok when max |CUDA - CPU| <= tolerance × max(1, max |CPU|)."""
    try:
        cpu()
        expected, cpu_s = timed(cpu)
        cuda()
        got, cuda_s = timed(cuda)
        diff = max_difference(got, expected)
        scale = max(1.0, float(np.nanmax(np.abs(np.asarray(expected, dtype=np.float64)))))
        status = "ok" if diff <= tolerance * scale else f"FAIL (> {tolerance:g} x {scale:.3g})"
    except Exception as err:  # noqa: BLE001 - a failed row is a result, printed in the table
        diff, cpu_s, cuda_s, status = float("nan"), float("nan"), float("nan"), f"ERROR {type(err).__name__}: {err}"
    return {"path": name, "max_diff": diff, "cpu_s": cpu_s, "cuda_s": cuda_s, "status": status}


def features(n: int = 4 * M, widths=(300, 64, 10), seed: int = 0) -> dict:
    """{layer: (n, d) float32} with shared signal and a 1e3 offset in one layer."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 16))
    out = {f"l{i}": (base @ rng.standard_normal((16, d)) + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
           for i, d in enumerate(widths)}
    out["l0"] += 1e3
    return out


def kernel_rows() -> list[dict]:
    import cupy

    from ckapipe.kernels import hsic1_matrix, u_centered_triangle_from_features

    xs = [x[:M] for x in features().values()]
    return [row("kernels: u_centered_triangle_from_features + hsic1_matrix",
                lambda: cupy.asnumpy(hsic1_matrix(cupy.stack([u_centered_triangle_from_features(cupy.asarray(x)) for x in xs]))),
                lambda: hsic1_matrix(np.stack([u_centered_triangle_from_features(x) for x in xs])), 1e-9)]


def extraction_rows() -> list[dict]:
    """The Gram cache row of a minibatch computed where the activations are (extract.writer)."""
    import cupy
    import torch

    from ckapipe.extract.writer import compute_grams, device_grams

    tensors = {name: torch.from_numpy(x[:M]) for name, x in features().items()}

    def on_device():
        if torch.cuda.is_available():
            grams = device_grams({name: t.cuda() for name, t in tensors.items()})
        else:  # the stand-in: CPU tensors enter it through from_dlpack, as device_grams hands CUDA ones
            grams = compute_grams({name: cupy.from_dlpack(t) for name, t in tensors.items()})
        return np.concatenate([np.concatenate(parts) for parts in grams.values()])

    def on_host():
        grams = compute_grams({name: t.numpy() for name, t in tensors.items()})
        return np.concatenate([np.concatenate(parts) for parts in grams.values()])

    return [row("extraction: Grams on the device", on_device, on_host, 1e-6)]


def analysis_rows(workdir: Path) -> list[dict]:
    """analyze --device cuda against --device cpu: CKA, every measure with RankMe, the bootstrap."""
    from ckapipe import analyze
    from tests.numpy_runs import make_run

    cache = workdir / "cache"
    make_run(cache, "net-a", features(seed=1), M)
    make_run(cache, "net-b", features(seed=2, widths=(40, 12, 7)), M)
    runs = {}

    def run(device, **options):
        key = (device, tuple(sorted(options)))
        runs[key] = analyze.analyze(cache, ["net-a", "net-b"], device=device, progress=False,
                                    use_gram_cache=False, bootstrap=500, **options)
        return runs[key]

    def all_measures(result):
        return np.concatenate([np.ravel(result.values(m)) for m in result.measures] + [np.ravel(result.rankme)])

    return [
        row("analysis: analyze --device cuda (HSIC)", lambda: run("cuda").hsic, lambda: run("cpu").hsic, 1e-9),
        row("measures: every measure and RankMe", lambda: all_measures(run("cuda", measures=MEASURES, rankme=True)),
            lambda: all_measures(run("cpu", measures=MEASURES, rankme=True)), 1e-9),
        row("bootstrap: CKA intervals (timed in analysis)", lambda: np.asarray(runs[("cuda", ())].interval().values),
            lambda: np.asarray(runs[("cpu", ())].interval().values), 1e-9),
    ]


def compare_rows() -> list[dict]:
    """The fused compare (models and data in, Grams on the device, no store)."""
    import cupy
    import torch
    from torch import nn

    import ckapipe.pipelines.compare as fused
    from ckapipe import compare

    torch.manual_seed(0)
    a, b = (nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval() for _ in range(2))
    x = torch.randn(8 * M, 64, generator=torch.Generator().manual_seed(1))

    def fused_cka(device):
        return compare({"a": a, "b": b}, x, layers=["0", "1", "2"], batch_size=M, order_seed=None,
                       device=device, progress=False).hsic

    def on_device():
        if torch.cuda.is_available():
            return fused_cka("cuda")
        with mock.patch.object(fused, "device_arrays", lambda device: cupy):  # torch on the CPU, kernels on the stand-in
            return fused_cka("cpu")

    return [row("compare: fused, Grams on the device", on_device, lambda: fused_cka("cpu"), 1e-6)]


def table(rows: list[dict], standin: bool) -> str:
    head = "stand-in CuPy (tests/fake_cupy.py) on the CPU" if standin else "CUDA"
    lines = [f"every CUDA path against its CPU twin ({head})",
             f"| {'path':<42} | {'max |diff|':>10} | {'CPU s':>8} | {'CUDA s':>8} | status",
             f"|{'-' * 44}|{'-' * 12}|{'-' * 10}|{'-' * 10}|-------"]
    lines += [f"| {r['path']:<42} | {r['max_diff']:>10.2e} | {r['cpu_s']:>8.3f} | {r['cuda_s']:>8.3f} | {r['status']}"
              for r in rows]
    return "\n".join(lines)


def main() -> int:
    standin = os.environ.get("CKAPIPE_GPU_STANDIN") == "1"
    if standin:
        install_standin()
    with tempfile.TemporaryDirectory(prefix="ckapipe-gpu-report-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the few-minibatch bootstrap warning, once per analysis
        rows = kernel_rows() + analysis_rows(Path(tmp)) + extraction_rows() + compare_rows()
    print(table(rows, standin))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The CUDA paths on every CI run: the analysis engine, the Gram cache, the measures, the bootstrap and
the fused ``compare`` through the CuPy stand-in (tests/fake_cupy.py, the ``fake_cupy`` fixture), whose
arrays refuse implicit conversion to NumPy and count each host↔device copy.

Per minibatch and layer the features cross to the device once (m × D numbers) and one Gram row
comes back (the analysis: m(m+1)/2 + 2m numbers) or one HSIC block (``compare``: L × L); nothing
else crosses, no scalar either (a ``float()`` in a kernel is a GPU sync per layer and minibatch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ckapipe.analyze as analyze
import ckapipe.kernels as kernels
from ckapipe import compare
from ckapipe.kernels import diagonal_positions
from tests.reference import minibatch_cka_matrix_reference

M, N = 16, 100  # two_runs: 6 full minibatches of 16 (a ragged tail of 4 left out)
WIDTHS = {"net-a": [24, 40, 6], "net-b": [12, 12, 12]}
ANALYSIS = dict(progress=False, ci=0.9, bootstrap=200)


def sizes(transfers, way):
    return sorted(size for w, size in transfers.log if w == way)


def test_analysis_on_the_standin_is_the_reference_cka_with_one_copy_each_way(fake_cupy, cache, two_runs):
    diagonal_positions.cache_clear()  # its index array (m numbers) crosses once per process
    gpu = analyze.analyze(cache, ["net-a", "net-b"], device="cuda", use_gram_cache=False, **ANALYSIS)
    n_mb, layers = N // M, sum(len(w) for w in WIDTHS.values())
    features_in = [M * d for w in WIDTHS.values() for d in w for _ in range(n_mb)]
    assert sizes(fake_cupy.transfers, "to_device") == sorted(features_in + [M])
    assert fake_cupy.transfers.elements_to_host == n_mb * layers * (M * (M + 1) // 2 + 2 * M)
    assert 1 not in sizes(fake_cupy.transfers, "to_host")  # no float(), bool() or item() of a device array
    a, b = ([np.asarray(v, np.float32).astype(np.float64) for v in x.values()] for x in two_runs)  # as stored
    np.testing.assert_allclose(gpu.cka("net-a", "net-b"), minibatch_cka_matrix_reference(a, b, M), rtol=0, atol=1e-7)
    # (the reference's un-centered Grams of net-b's 1e3 offset lose about 1e-8: ckapipe centers first)


def test_analysis_measures_and_bootstrap_on_the_standin_equal_the_cpu_twin(fake_cupy, cache, two_runs):
    measures = "linear,linear_biased,rbf:0.5,rbf_biased:0.5,mutual_knn:5,cknna:5"
    cpu = analyze.analyze(cache, ["net-a", "net-b"], device="cpu", use_gram_cache=False, measures=measures,
                          rankme=True, **ANALYSIS)
    gpu = analyze.analyze(cache, ["net-a", "net-b"], device="cuda", use_gram_cache=False, measures=measures,
                          rankme=True, **ANALYSIS)
    for measure in cpu.measures:
        np.testing.assert_allclose(gpu.values(measure), cpu.values(measure), rtol=1e-12, atol=1e-12, err_msg=measure)
    np.testing.assert_allclose(gpu.rankme, cpu.rankme, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(gpu.interval().values), np.asarray(cpu.interval().values), rtol=1e-12, atol=1e-12)


def test_gram_cache_on_the_standin_writes_one_row_and_rereads_no_features(fake_cupy, cache, two_runs):
    diagonal_positions.cache_clear()
    first = analyze.analyze(cache, ["net-a", "net-b"], device="cuda", **ANALYSIS)
    n_mb, layers, row = N // M, sum(len(w) for w in WIDTHS.values()), M * (M + 1) // 2
    features = n_mb * layers * (row + 2 * M)
    assert fake_cupy.transfers.elements_to_host == features + n_mb * layers * (row + M + 1)  # + the cache's rows
    fake_cupy.transfers.reset()
    again = analyze.analyze(cache, ["net-a", "net-b"], device="cuda", **ANALYSIS)
    assert fake_cupy.transfers.elements_to_device == n_mb * layers * (row + M + 1)  # the cached rows, no features
    assert fake_cupy.transfers.elements_to_host == features
    np.testing.assert_allclose(again.hsic, first.hsic, rtol=1e-12, atol=1e-12)


def test_a_host_conversion_in_a_kernel_fails_on_the_standin(fake_cupy, cache, two_runs, monkeypatch):
    """What the stand-in is for: a kernel that calls np.asarray on a device array passes on NumPy and
    would pass a CPU-only CI, but fails here as on a GPU."""
    real = kernels.gram_linear
    monkeypatch.setattr(kernels, "gram_linear", lambda x, product="float64": real(np.asarray(x), product))
    analyze.analyze(cache, ["net-a", "net-b"], device="cpu", use_gram_cache=False, **ANALYSIS)  # NumPy: fine
    with pytest.raises(TypeError, match="^Implicit conversion to a NumPy array is not allowed"):
        analyze.analyze(cache, ["net-a", "net-b"], device="cuda", use_gram_cache=False, **ANALYSIS)


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 5)).eval()


def test_fused_compare_on_the_standin_moves_features_in_and_one_hsic_block_out(fake_cupy, monkeypatch):
    """torch stays on the CPU; the kernels' array module (``device_arrays``, compare's one seam) is the
    stand-in, so each layer's CPU tensor enters through its from_dlpack."""
    import ckapipe.pipelines.compare as fused

    x = torch.randn(96, 10, generator=torch.Generator().manual_seed(3))
    a, b = mlp(0), mlp(1)
    on_cpu = compare({"a": a, "b": b}, x, layers=["0", "1", "2"], batch_size=M, order_seed=None, progress=False)
    monkeypatch.setattr(fused, "device_arrays", lambda device: fake_cupy)
    fake_cupy.transfers.reset()
    on_standin = compare({"a": a, "b": b}, x, layers=["0", "1", "2"], batch_size=M, order_seed=None, progress=False)
    n_mb = len(x) // M
    assert sizes(fake_cupy.transfers, "to_device") == sorted([M * d for d in (20, 20, 5) * 2 for _ in range(n_mb)])
    assert sizes(fake_cupy.transfers, "to_host") == [36] * n_mb  # one (6 × 6) HSIC block per minibatch
    np.testing.assert_allclose(on_standin.hsic, on_cpu.hsic, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        feats = [[f(x).numpy().astype(np.float64) for f in (net[:1], net[:2], net)] for net in (a, b)]
    np.testing.assert_allclose(on_standin.cka("a", "b"), minibatch_cka_matrix_reference(*feats, M), rtol=1e-5, atol=1e-6)


def test_gpu_report_prints_one_row_per_cuda_path_through_the_standin():
    """scripts/gpu_check.sh's table, run here with CKAPIPE_GPU_STANDIN=1: every path, each ok."""
    import os
    import subprocess
    import sys

    env = os.environ | {"CKAPIPE_GPU_STANDIN": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.gpu_report"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and "max |diff|" not in line]
    assert [r[1].strip() for r in rows] == [
        "kernels: u_centered_triangle_from_features + hsic1_matrix", "analysis: analyze --device cuda (HSIC)",
        "measures: every measure and RankMe", "bootstrap: CKA intervals (timed in analysis)", "extraction: Grams on the device",
        "compare: fused, Grams on the device"]
    assert [r[-1].strip() for r in rows] == ["ok"] * 6


def test_gpu_report_marks_a_row_that_differs_or_fails():
    from tests.gpu_report import row

    assert row("x", lambda: np.array([3.0]), lambda: np.array([2.0]), 0.1)["status"] == "FAIL (> 0.1 x 2)"
    assert row("x", lambda: 1 / 0, lambda: np.zeros(1), 0.1)["status"] == "ERROR ZeroDivisionError: division by zero"


def test_compare_filling_a_run_cache_on_the_standin_moves_one_gram_row_per_layer_out(fake_cupy, monkeypatch, tmp_path):
    """With ``cache``, compare also writes each model's run with its Gram cache: per minibatch and
    layer one Gram row (m(m+1)/2 numbers) and its mean products (m + 1) come back, besides the HSIC block."""
    import ckapipe.pipelines.compare as fused

    kernels.strict_in_diagonal_triangle.cache_clear()  # its index array (m(m-1)/2 numbers) crosses once per process
    x = torch.randn(96, 10, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(fused, "device_arrays", lambda device: fake_cupy)
    on_standin = compare({"a": mlp(0)}, x, layers=["0", "1", "2"], batch_size=M, order_seed=None, progress=False,
                         cache=tmp_path / "cache")
    n_mb = len(x) // M
    assert sizes(fake_cupy.transfers, "to_device") == sorted([M * d for d in (20, 20, 5) for _ in range(n_mb)]
                                                             + [M * (M - 1) // 2])
    assert sizes(fake_cupy.transfers, "to_host") == sorted([M * (M + 1) // 2, M + 1] * 3 * n_mb + [9] * n_mb)
    monkeypatch.undo()
    on_cpu = compare({"a": mlp(0)}, x, layers=["0", "1", "2"], batch_size=M, order_seed=None, progress=False)
    np.testing.assert_allclose(on_standin.hsic, on_cpu.hsic, rtol=1e-12, atol=1e-12)

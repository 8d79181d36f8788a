"""Piece A of the suite: float32 accuracy against a constant offset added to the features.

ResNet-18 ``layer4.1`` and ResNet-34 ``layer4.2`` outputs (random init, extracted
by ckapipe from 2,048 inputs of 3 × 32 × 32), plus a constant c, stored as
float32. Each tool's minibatch CKA is held against the exact CKA of those same
float32 values: Song et al.'s HSIC_1 in float64 after subtracting c (exact in
float64, so the reference itself has no cancellation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import TOLERANCE, Row, inputs_spec, model_spec

OFFSETS = (0.0, 1e2, 1e3, 1e4)
N, BATCH = 2048, 256


def last_blocks(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The flattened last residual-block outputs of ResNet-18 and ResNet-34 on the same inputs."""
    from ckapipe import store
    from ckapipe.extract import extract_run

    features = []
    for arch, layer in (("resnet18", "layer4.1"), ("resnet34", "layer4.2")):
        run = store.open_run(extract_run(model_spec(arch), inputs_spec(N, 32), [layer], cache=cache,
                                         batch_size=BATCH, progress=False))
        features.append(run.layer(layer)[:].astype(np.float64))
    return features[0], features[1]


def ckapipe_cka(a: np.ndarray, b: np.ndarray) -> float:
    from ckapipe.kernels import cka, hsic1_matrix, u_centered_triangle_from_features

    s = sum(hsic1_matrix(np.stack([u_centered_triangle_from_features(a[k:k + BATCH]), u_centered_triangle_from_features(b[k:k + BATCH])]))
            for k in range(0, len(a), BATCH))
    return float(cka(s[:1, 1:], s[:1, 0], s[1:, 1])[0, 0])


def torch_cka_cka(a: np.ndarray, b: np.ndarray) -> float:
    """torch-cka 0.21's ``_HSIC`` as shipped (float32 Grams and ones vector), summed as its ``compare`` does."""
    import torch
    from torch_cka.cka import CKA

    class Device:
        device = "cpu"

    s = np.zeros(3)
    for k in range(0, len(a), BATCH):
        ta, tb = torch.from_numpy(a[k:k + BATCH]), torch.from_numpy(b[k:k + BATCH])
        K, L = ta @ ta.T, tb @ tb.T
        K.fill_diagonal_(0)
        L.fill_diagonal_(0)
        s += [CKA._HSIC(Device, K, L), CKA._HSIC(Device, K, K), CKA._HSIC(Device, L, L)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(s[0] / np.sqrt(s[1] * s[2]))


def ckatorch_cka(a: np.ndarray, b: np.ndarray) -> float:
    """ckatorch 1.0.3's ``cka_batch`` (casts to float64, does not center the features)."""
    import torch
    from ckatorch import cka_batch

    batched = [torch.from_numpy(v).reshape(-1, BATCH, v.shape[1]) for v in (a, b)]
    return float(cka_batch(*batched).item())


def offset_rows(workdir: Path) -> list[Row]:
    from tests.reference import minibatch_cka_reference

    x, y = last_blocks(workdir / "cache")
    tools = {"torch-cka 0.21 (float32, as shipped)": torch_cka_cka, "ckatorch 1.0.3 cka_batch": ckatorch_cka,
             "ckapipe": ckapipe_cka}
    rows = []
    for c in OFFSETS:
        a, b = (x + c).astype(np.float32), (y + c).astype(np.float32)
        exact = minibatch_cka_reference(a.astype(np.float64) - c, b.astype(np.float64) - c, BATCH)
        for tool, fn in tools.items():
            got = fn(a, b)
            deviation = abs(got - exact)
            bad = not np.isfinite(deviation)
            rows.append(Row("A", f"|CKA - exact| with offset {c:g}, {tool}", "deviation",
                            None if bad else deviation, "tolerance", TOLERANCE, unit="cka", target="<= 1",
                            note=f"NaN: CKA {got}" if bad else f"exact CKA {exact:.6f}",
                            ckapipe_failure=tool == "ckapipe" and (bad or deviation > TOLERANCE)))
    return rows

"""docs/examples/coming_from_torch_cka.py, the torch-cka README's example and pytorch-cka's README plots
with ckapipe: it runs as a script, returns its figures, writes them only where it is told to, and the
heatmap it draws is the minibatch CKA of the two networks' leaf modules, computed here from forward hooks
and Song et al.'s formula (tests/reference.py)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from tests.reference import minibatch_cka_matrix_reference

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "examples" / "coming_from_torch_cka.py"
M = 64


def leaf_features(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Each leaf module's output on the inputs, flattened, float64."""
    out, handles = {}, []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda mod, args, result, name=name: out.__setitem__(name, result.detach().flatten(1).double().numpy())))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return out


def test_the_torch_cka_example_and_the_pytorch_cka_plots_run_and_draw_the_exact_cka(default_study, tmp_path,
                                                                                  monkeypatch):
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    (work / "cache" / "models").symlink_to(default_study["cache"] / "models")  # the digits CNNs, trained once
    figures = tmp_path / "figures"
    figures.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(figures)])
    ns = runpy.run_path(str(SCRIPT), run_name="__main__")

    assert sorted(p.name for p in figures.iterdir()) == sorted(f"{name}.png" for name in ns["FIGURES"])
    assert sorted(p.name for p in work.iterdir()) == ["cache"]  # nothing else written where it ran
    assert all(isinstance(fig, Figure) for fig in ns["FIGURES"].values())

    res, inputs = ns["res"], ns["inputs"][: len(ns["inputs"]) // M * M]
    a, b = leaf_features(ns["model1"], inputs), leaf_features(ns["model2"], inputs)
    names_a, names_b = res.layer_names("cnn3"), res.layer_names("cnn2")
    exact = minibatch_cka_matrix_reference([a[n] for n in names_a], [b[n] for n in names_b], M)
    np.testing.assert_allclose(ns["heatmap"].axes[0].images[0].get_array(), exact, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.cka.values, exact, rtol=0, atol=1e-9)

    table = ns["results"]
    across = table[(table.run_a == "cnn3") & (table.run_b == "cnn2")]
    assert {"cka", "cka_low", "cka_high"} <= set(table.columns) and len(across) == len(names_a) * len(names_b)
    np.testing.assert_allclose(across.cka.to_numpy(), exact.ravel(), rtol=0, atol=1e-9)
    assert (across.cka_low <= across.cka).all() and (across.cka <= across.cka_high).all()
    cross = ns["cross"].axes[0].images[0]
    np.testing.assert_allclose(cross.get_clim(), (np.nanmin(exact), np.nanmax(exact)), rtol=0, atol=1e-9)
    assert cross.get_cmap().name == "viridis"
    assert len(ns["grid"].axes[0].images) == 1 and len(ns["three"].run_names) == 3

"""Figures a researcher keeps: per-minibatch CKA against minibatch index on a fitted scale, the grid
with each unordered pair of runs once, cell values on small matrices, file names that keep dotted
layer names, the formats asked for. No torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ckapipe.analyze as analyze
from ckapipe.analyze.plots import grid_figure, heatmap_figure, minibatch_figure
from ckapipe.errors import CkapipeError
from tests.numpy_runs import make_run, random_layers

SIX = ["resnet18-seed0@cifar10-splittest", "resnet18-seed1@cifar10-splittest", "resnet34-seed0@cifar10-splittest",
       "resnet50-seed0@cifar10-splittest", "wide_resnet50_2-seed0@cifar10-splittest", "vit_tiny_patch16_224@cifar10"]


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    cache = tmp_path_factory.mktemp("six")
    rng = np.random.default_rng(1)
    base = random_layers(rng, 128, [12] * 8)
    for i, name in enumerate(SIX):
        noise = np.random.default_rng(i)
        layers = {f"layer{j // 2 + 1}.0.conv{j % 2 + 1}": x + 0.3 * noise.standard_normal(x.shape).astype(np.float32)
                  for j, x in enumerate(base.values())}
        make_run(cache, name, layers, 16)
    return analyze.analyze(cache, SIX, progress=False)


@pytest.fixture(scope="module")
def two(six):
    return analyze.analyze(Path(six.runs[0].path).parent, SIX[:2], progress=False)


def test_minibatch_view_plots_cka_against_minibatch_index_on_a_fitted_scale(six):
    a, b = SIX[0], SIX[1]
    values = six.minibatch_cka(a, b, "layer4.0.conv1", "layer4.0.conv2")
    fig = minibatch_figure(six, a, b, "layer4.0.conv1", "layer4.0.conv2")
    left = fig.axes[0]
    line = left.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), np.arange(8))  # in minibatch order, not sorted
    np.testing.assert_array_equal(line.get_ydata(), values)
    low, high = left.get_ylim()
    assert low <= values.min() and values.max() <= high
    assert high - low < 1.5 * (values.max() - values.min()) + 1e-3  # the spread fills the axis, not a fixed 0-1 scale
    assert fig.axes[1].patches  # the histogram beside it


def test_the_grid_shows_each_unordered_pair_of_runs_once(six):
    fig = grid_figure(six)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 21  # 15 pairs of different runs and 6 runs with themselves
    assert sum(not ax.axison for ax in fig.axes) == 15  # the lower triangle is empty
    titled = [ax.get_title() for ax in panels if ax.get_title()]
    assert [t.replace("\n", "") for t in titled] == [name.replace(" ", "") for name in SIX]
    labelled = [ax for ax in panels if any(t.get_text() for t in ax.get_yticklabels())]
    assert len(labelled) == 6  # layer names on the diagonal panels only


def test_small_matrices_carry_their_values_large_ones_do_not(six, tmp_path):
    ax = heatmap_figure(six, SIX[0], SIX[1]).axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 64
    assert texts[1] == f"{six.cka(SIX[0], SIX[1]).values[0, 1]:.2f}"
    rng = np.random.default_rng(2)
    make_run(tmp_path, "deep", random_layers(rng, 64, [4] * 13), 16)
    deep = analyze.analyze(tmp_path, ["deep"], progress=False)
    assert not heatmap_figure(deep, "deep", "deep").axes[0].texts


def test_figure_names_keep_dotted_layer_names(two, tmp_path):
    a, b = SIX[0], SIX[1]
    first = analyze.plot_results(two, tmp_path, pair=(a, b), layers=("layer2.0.conv1", "layer2.0.conv1"), formats="png")
    second = analyze.plot_results(two, tmp_path, pair=(a, b), layers=("layer2.0.conv1", "layer2.0.conv2"), formats="png")
    assert first[-1].name == f"minibatch_cka_{a}_layer2.0.conv1__{b}_layer2.0.conv1.png"
    assert second[-1].name == f"minibatch_cka_{a}_layer2.0.conv1__{b}_layer2.0.conv2.png"  # once both ".../layer2.0.png"
    assert first[-1].exists() and second[-1].exists()


def test_formats_are_chosen_and_checked(two, tmp_path):
    paths = analyze.plot_results(two, tmp_path, formats="svg,png")
    assert {p.suffix for p in paths} == {".svg", ".png"} and all(p.exists() for p in paths)
    with pytest.raises(CkapipeError, match="unknown figure format docx"):
        analyze.plot_results(two, tmp_path / "none", formats="png,docx")
    assert not (tmp_path / "none").exists()


def test_cli_plot_takes_formats(two, tmp_path):
    from ckapipe.cli import main

    out = tmp_path / "results"
    analyze.analyze(Path(two.runs[0].path).parent, SIX[:2], out=out, progress=False)
    main(["plot", str(out), "--format", "pdf", "--layers", "layer1.0.conv1", "layer1.0.conv2"])
    names = {p.name for p in (out / "plots").iterdir()}
    assert f"minibatch_cka_{SIX[0]}_layer1.0.conv1__{SIX[1]}_layer1.0.conv2.pdf" in names
    assert all(name.endswith(".pdf") for name in names)

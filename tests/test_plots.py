"""Figures a researcher puts in a paper: the data behind each artist (the matrix in the image, the tick
labels, the colour scale, the marks and their legend), the Figure returned, ``ax=`` honoured, no file
unless asked, and a single model's self-similarity drawn. No pixels; Agg (matplotlib's Figure, no pyplot)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import ckapipe.analyze as analyze
from ckapipe.analyze import plots
from ckapipe.analyze.plots import grid_figure, heatmap, heatmap_figure, layer_ticks, minibatch_figure
from ckapipe.errors import CkapipeError
from tests.cli_calls import ckapipe_cli
from tests.numpy_runs import make_run, random_layers
from tests.reference import minibatch_cka_matrix_reference

M = 16
SIX = ["resnet18-seed0@cifar10-splittest", "resnet18-seed1@cifar10-splittest", "resnet34-seed0@cifar10-splittest",
       "resnet50-seed0@cifar10-splittest", "wide_resnet50_2-seed0@cifar10-splittest", "vit_tiny_patch16_224@cifar10"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Runs a (3 layers) and b (4 layers) of 160 samples (10 minibatches of 16), their features, their results."""
    cache = tmp_path_factory.mktemp("small")
    features = {"a": random_layers(np.random.default_rng(0), 160, [6, 5, 4]),
                "b": random_layers(np.random.default_rng(1), 160, [7, 5, 4, 3])}
    for name, layers in features.items():
        make_run(cache, name, layers, M)
    out = cache.parent / f"{cache.name}-results"
    return cache, features, analyze.analyze(cache, ["a", "b"], out=out, progress=False)


def reference(features, a, b) -> np.ndarray:
    return minibatch_cka_matrix_reference(list(features[a].values()), list(features[b].values()), M)


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


# --------------------------------------------------------------------------- the heatmap


def test_the_heatmap_shows_the_cka_matrix_on_a_0_1_scale_in_the_axes_given(small):
    _, features, results = small
    fig = Figure()
    ax = fig.add_subplot()
    assert heatmap_figure(results, "a", "b", ax=ax) is fig
    (image,) = ax.get_images()
    np.testing.assert_allclose(image.get_array(), reference(features, "a", "b"), rtol=1e-9, atol=0)
    assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name == "magma"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l0", "l1", "l2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["l0", "l1", "l2", "l3"]
    assert ax.get_ylim()[0] < ax.get_ylim()[1]  # the first layer at the bottom
    assert fig.get_suptitle() == ""  # the caller's figure keeps its own title
    with pytest.raises(CkapipeError, match="widths=True draws a second panel beside the heatmap: pass no ax"):
        heatmap_figure(results, "a", "b", ax=ax, widths=True)


def test_the_colour_scale_can_follow_the_data_and_take_a_colour_map(small):
    _, features, results = small
    expected = reference(features, "a", "b")
    image = heatmap_figure(results, "a", "b", vmin="data", vmax="data", cmap="viridis").axes[0].get_images()[0]
    np.testing.assert_allclose(image.get_clim(), (expected.min(), expected.max()), rtol=1e-9)
    assert image.get_cmap().name == "viridis"
    image = heatmap(np.array([[0.2, 0.4]]), ["r"], ["c0", "c1"], vmin=0.1, vmax="data").axes[0].get_images()[0]
    assert image.get_clim() == (0.1, 0.4)


def test_values_are_written_in_cells_up_to_20_layers_and_at_a_size_the_cell_allows(small):
    _, features, results = small
    ax = heatmap_figure(results, "a", "b").axes[0]
    values = [t for t in ax.texts if t.get_gid() == "value"]
    assert [t.get_text() for t in values] == [f"{v:.2f}" for v in reference(features, "a", "b").ravel()]
    assert all(4 <= t.get_fontsize() <= 10 for t in values)
    assert not heatmap_figure(results, "a", "b", annotate=False).axes[0].texts
    big = heatmap(np.full((21, 21), 0.5), [str(i) for i in range(21)], [str(i) for i in range(21)]).axes[0]
    assert not big.texts
    assert len(heatmap(np.full((21, 21), 0.5), list("abcdefghijklmnopqrstu"), list("abcdefghijklmnopqrstu"),
                       annotate=True).axes[0].texts) == 441


def test_the_best_match_of_each_row_is_outlined_at_the_cell_edge_with_a_legend_outside_the_axes(small):
    _, features, results = small
    best = np.argmax(reference(features, "a", "b"), axis=1)
    ax = heatmap_figure(results, "a", "b").axes[0]
    outlines = [p for p in ax.patches if p.get_gid() == "best"]
    assert [(p.get_x(), p.get_y(), p.get_width(), p.get_height(), p.get_fill()) for p in outlines] == \
        [(j - 0.5, i - 0.5, 1, 1, False) for i, j in enumerate(best)]
    legend = ax.get_legend()
    assert legend.get_texts()[0].get_text() == "best of the row"
    anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.y0 >= 1.0  # above the axes: it covers no cell


def test_a_run_with_itself_outlines_the_best_other_layer(small):
    _, features, results = small
    expected = reference(features, "b", "b")
    np.fill_diagonal(expected, -np.inf)
    ax = heatmap_figure(results, "b", intervals=False).axes[0]
    assert [p.get_x() + 0.5 for p in ax.patches if p.get_gid() == "best"] == list(np.argmax(expected, axis=1))


def test_intervals_tied_with_the_best_and_wide_ones_are_marked_in_cell_corners(small):
    _, features, results = small
    low, high = results.interval("a", "b").values
    best = np.argmax(reference(features, "a", "b"), axis=1)
    tied = [(i, j) for i in range(3) for j in range(4) if j != best[i] and high[i, j] >= low[i, best[i]]]
    wide = [(i, j) for i in range(3) for j in range(4) if high[i, j] - low[i, j] > 0.02]
    ax = heatmap_figure(results, "a", "b", wide=0.02).axes[0]
    marks = {c.get_label(): [tuple(p) for p in c.get_offsets().tolist()] for c in ax.collections}
    assert marks.get("interval overlaps the best's", []) == [(j - 0.32, i - 0.32) for i, j in tied]  # lower left
    assert marks["interval wider than 0.02"] == [(j + 0.32, i + 0.32) for i, j in wide] and wide  # upper right
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "interval wider than 0.02"


def test_a_second_panel_shows_the_interval_widths(small):
    _, _, results = small
    low, high = results.interval("a", "b").values
    fig = heatmap_figure(results, "a", "b", widths=True)
    images = {im.get_gid(): im for ax in fig.axes for im in ax.get_images()}
    np.testing.assert_array_equal(images["widths"].get_array(), high - low)
    assert images["widths"].get_clim() == (0.0, float(np.max(high - low)))


# --------------------------------------------------------------------------- tick labels


def test_ticks_stay_readable_from_5_to_200_layers():
    for n in (5, 40, 41, 200):
        names = [f"layer{i}" for i in range(n)]
        idx, labels = layer_ticks(names)
        assert len(idx) <= 40 and idx[0] == 0 and labels == [names[i] for i in idx]
        assert len(idx) == n if n <= 40 else np.all(np.diff(idx) == -(-n // 40))
    deep = heatmap(np.full((200, 200), 0.5), [str(i) for i in range(200)], [str(i) for i in range(200)])
    ax = deep.axes[0]
    assert len(ax.get_xticks()) == 40 and all(t.get_fontsize() >= 6 for t in ax.get_xticklabels())


def test_long_dotted_names_keep_their_last_parts_and_module_types_join_bare_indices(small):
    idx, labels = layer_ticks(["encoder.layers.11.mlp.fc1", "layer4.1.conv2", "0", "1"], types={"1": "Linear"})
    assert labels == ["…layers.11.mlp.fc1", "layer4.1.conv2", "0", "1 Linear"]
    ax = small[2].plot("a", types={"l1": "Linear"}).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l0", "l1 Linear", "l2"]


# --------------------------------------------------------------------------- nothing written unless asked


def test_results_plot_returns_a_figure_and_writes_nothing_unless_asked(small, tmp_path, monkeypatch):
    _, features, results = small
    monkeypatch.chdir(tmp_path)
    fig = results.plot()
    assert isinstance(fig, Figure) and os.listdir(tmp_path) == []
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(), reference(features, "a", "b"), rtol=1e-9)
    assert results.plot("b", "a", save="out/ba.svg") is not None
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["ba.svg"]
    mine = Figure()
    ax = mine.add_subplot()
    assert results.plot("a", "a", ax=ax) is mine and ax.get_images()[0].get_array().shape == (3, 3)


def test_plot_results_never_writes_into_the_working_directory_unasked(six, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CkapipeError, match="these results have no directory: pass out_dir"):
        analyze.plot_results(six)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- a single model


def test_a_self_comparison_draws_its_layer_by_layer_matrix(small, tmp_path):
    cache, features, _ = small
    one = analyze.analyze(cache, ["b"], out=tmp_path / "one", progress=False)
    np.testing.assert_allclose(one.plot().axes[0].get_images()[0].get_array(), reference(features, "b", "b"), rtol=1e-9)
    fig = minibatch_figure(one, "b", "b", "l3", "l3")  # CKA 1 in every minibatch: one bin, not an error
    assert [bar.get_width() for bars in fig.axes[1].containers for bar in bars] == [10]


def test_cli_plot_of_a_one_run_results_directory(small, tmp_path, capsys):
    cache, _, _ = small
    analyze.analyze(cache, ["a"], out=tmp_path / "one", progress=False)
    code, out, err = ckapipe_cli(capsys, "plot", tmp_path / "one", "--out", tmp_path / "figures", "--format", "png")
    assert (code, err) == (0, "")
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["cka_a__a.png", "minibatch_cka_a_l1__a_l2.png"]


def test_cli_compare_of_one_model(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "results"
    code, printed, err = ckapipe_cli(capsys, "compare", "net=tests.spec_factories:block_net", "--layers",
                                     "block.conv1,block.conv2,head", "--batch-size", "32", "--limit", "128",
                                     "--out", out, "--format", "png", "--cache", tmp_path / "cache", "-q")
    assert code == 0, err
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["cka_net__net.png",
                                                                 "minibatch_cka_net_block.conv2__net_head.png"]


# --------------------------------------------------------------------------- grids and trends


def test_the_grid_shows_each_unordered_pair_of_runs_once(six):
    fig = grid_figure(six)
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 21  # 15 pairs of different runs and 6 runs with themselves
    assert sum(not ax.axison for ax in fig.axes) == 15  # the lower triangle is empty
    titled = [ax.get_title() for ax in panels if ax.get_title()]
    assert [t.replace("\n", "") for t in titled] == [name.replace(" ", "") for name in SIX]
    labelled = [ax for ax in panels if any(t.get_text() for t in ax.get_yticklabels())]
    assert len(labelled) == 6  # layer names on the diagonal panels only
    assert len([ax for ax in six.plot().axes if ax.get_images()]) == 21  # Results.plot() of more than two runs


def test_a_grid_of_chosen_pairs_shares_one_colour_scale_and_one_colour_bar(small):
    _, features, results = small
    fig = grid_figure(results, [("a", "b"), ("b", "b")], vmin="data")
    images = {im.get_gid(): im for ax in fig.axes for im in ax.get_images()}
    expected = {"a__b": reference(features, "a", "b"), "b__b": reference(features, "b", "b")}
    for gid, matrix in expected.items():
        np.testing.assert_allclose(images[gid].get_array(), matrix, rtol=1e-9)
    low = min(m.min() for m in expected.values())
    for image in images.values():
        assert image.get_clim() == (pytest.approx(low, rel=1e-9), 1.0)
    assert len(fig.axes) == 3  # two panels and one colour bar


def test_a_trend_over_layers_draws_the_best_match_with_its_interval_band(small):
    _, features, results = small
    expected = reference(features, "a", "b")
    best = np.argmax(expected, axis=1)
    low, high = results.interval("a", "b").values
    ax = plots.layer_trend_figure(results, "a", "b").axes[0]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), expected[np.arange(3), best], rtol=1e-9)
    (band,) = [c for c in ax.collections if str(c.get_gid()).startswith("band")]
    ys = band.get_paths()[0].vertices[:, 1]
    for edge in (low, high):  # both edges of the band
        assert all(np.isclose(ys, value, rtol=1e-12).any() for value in edge[np.arange(3), best])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["l0", "l1", "l2"]


def test_the_minibatch_view_plots_cka_against_minibatch_index_on_a_fitted_scale(six):
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


# --------------------------------------------------------------------------- files the CLI and the runner write


def test_figure_names_keep_dotted_layer_names(six, tmp_path):
    a, b = SIX[0], SIX[1]
    first = analyze.plot_results(six, tmp_path, pair=(a, b), layers=("layer2.0.conv1", "layer2.0.conv1"), formats="png")
    second = analyze.plot_results(six, tmp_path, pair=(a, b), layers=("layer2.0.conv1", "layer2.0.conv2"), formats="png")
    assert first[-1].name == f"minibatch_cka_{a}_layer2.0.conv1__{b}_layer2.0.conv1.png"
    assert second[-1].name == f"minibatch_cka_{a}_layer2.0.conv1__{b}_layer2.0.conv2.png"  # once both ".../layer2.0.png"
    assert first[-1].exists() and second[-1].exists()


def test_formats_and_colour_maps_are_chosen_and_checked(small, tmp_path):
    _, _, results = small
    paths = analyze.plot_results(results, tmp_path, formats="svg,png")
    assert {p.suffix for p in paths} == {".svg", ".png"} and all(p.exists() for p in paths)
    with pytest.raises(CkapipeError, match="unknown figure format docx"):
        analyze.plot_results(results, tmp_path / "none", formats="png,docx")
    with pytest.raises(CkapipeError, match="unknown colour map 'magmaa'"):
        analyze.plot_results(results, tmp_path / "none", cmap="magmaa")
    assert not (tmp_path / "none").exists()


def test_cli_plot_takes_formats_and_a_colour_scale(small, tmp_path, capsys):
    _, features, results = small
    code, out, err = ckapipe_cli(capsys, "plot", results.path, "--out", tmp_path / "f", "--format", "pdf",
                                 "--layers", "l0", "l1", "--vmin", "data", "-q")
    assert (code, out, err) == (0, "", "")
    names = {p.name for p in (tmp_path / "f").iterdir()}
    assert "minibatch_cka_a_l0__b_l1.pdf" in names and all(name.endswith(".pdf") for name in names)
    code, out, err = ckapipe_cli(capsys, "plot", results.path, "--out", tmp_path / "g", "--cmap", "nope")
    assert code == 2 and err.strip().splitlines() == [
        "ckapipe: error: unknown colour map 'nope': choose a matplotlib colour map (magma, viridis, RdBu_r, ...)"]
    assert not (tmp_path / "g").exists()
    code, out, err = ckapipe_cli(capsys, "plot", results.path, "--out", tmp_path / "g", "--vmin", "low")
    assert code == 2 and err.strip().splitlines() == [
        "ckapipe: error: Invalid value for '--vmin': 'low' is neither a number nor 'data' (see ckapipe plot --help)"]
    assert not (tmp_path / "g").exists()


def test_an_nn_sequentials_bare_indices_show_their_recorded_module_types():
    """compare of two nn.Sequentials: the ticks say ``1 Linear``, ``2 ReLU`` (recorded at extraction), and
    the heatmap's matrix is still the a x b CKA."""
    import torch

    from ckapipe import compare

    torch.manual_seed(0)
    net_a = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    net_b = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.Tanh())
    res = compare({"a": net_a, "b": net_b}, torch.randn(64, 8), batch_size=16, layers="*", progress=False)
    ax = res.plot("a", "b").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 Linear", "1 ReLU", "2 Linear"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0 Linear", "1 Tanh"]
    np.testing.assert_array_equal(ax.images[0].get_array(), np.asarray(res.cka("a", "b").values))

"""Every figure of ckapipe, drawn with matplotlib's object API (no pyplot state, no file unless asked).

Each drawing function takes ``ax=`` (or ``fig=`` for a grid of panels) and returns the Figure, so a
notebook shows it; ``save=PATH`` writes it too (the format from PATH's suffix). Only
``plot_results`` writes files by default: it is what ``ckapipe plot`` and the study runner call.

- ``heatmap``: any matrix with named rows (y, bottom to top) and columns (x); colour scale
  ``vmin``/``vmax`` (0 to 1 for CKA, or ``"data"``: the matrix's range), values in the cells when
  legible, best match per row outlined at the cell edge, interval marks in the cell corners, the
  legend outside the axes;
- ``heatmap_figure``: the CKA of two runs (a run with itself: its layer x layer self-similarity),
  with its bootstrap intervals (Kornblith et al. 2019's layer-by-layer heatmap);
- ``grid_figure``: several pairs of runs on one colour scale, one colour bar;
- ``trend`` / ``trend_figure``: a value against layers or checkpoints with its interval as a band;
- ``minibatch_figure``: the per-minibatch CKA of one layer pair beside its histogram;
- ``member_panels`` / ``diversity_figure``: the ensemble views' figures (analyze.views computes them).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from ckapipe.analyze.measures import parse_measure
from ckapipe.analyze.stats import ties_with_best
from ckapipe.errors import CkapipeError

if TYPE_CHECKING:  # Results draws itself with this module (Results.plot): its name here is for the reader
    from ckapipe.analyze.results import Results

MAX_TICKS = 40  # tick labels per axis: every k-th layer past this
MAX_ANNOTATED = 20  # values written in the cells of matrices up to 20 x 20 (annotate=None)
NAME_WIDTH = 18  # a dotted layer name longer than this keeps its last parts: "…layer4.1.conv2"
WIDE = 0.1  # an interval wider than this is marked (heatmap_figure's ``wide``)
FORMATS = ("png", "pdf")
CORNER_TIED, CORNER_WIDE = (-0.32, -0.32), (0.32, 0.32)  # the interval marks' places in a cell
MARK = "#00e5ff"  # the marks' colour: cyan reads on every part of magma and viridis


# --------------------------------------------------------------------------- files


def plot_results(results: Results, out_dir=None, pair=None, layers=None, formats: Sequence[str] | str = FORMATS,
                 **style) -> list[Path]:
    """Write every figure of the results into ``out_dir`` (default: RESULTS/plots) in each of ``formats``;
    return the paths. ``style``: heatmap options (vmin, vmax, cmap, annotate). From a results directory:
    ``ckapipe.analyze.plot_results(PATH)``."""
    formats = check_formats(formats)
    check_style(**style)
    out = plots_dir(results, out_dir)
    a, b = pair if pair else default_pair(results)
    la, lb = layers if layers else default_layers(results, a, b)
    results.layer_index(a, la), results.layer_index(b, lb)  # a typo fails before any figure is drawn
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x, y in results.pairs():
        for measure in results.measures:  # the other measures of --measure, one heatmap each
            stem = f"{'cka' if measure == results.measures[0] else safe(measure)}_{safe(x)}__{safe(y)}"
            written += save(heatmap_figure(results, x, y, None if measure == results.measures[0] else measure,
                                           **style), out / stem, formats)
    if len(results.runs) > 1:
        written += save(grid_figure(results, **style), out / "cka_grid", formats)
    fig = minibatch_figure(results, a, b, la, lb)
    written += save(fig, out / f"minibatch_cka_{safe(a)}_{safe(la)}__{safe(b)}_{safe(lb)}", formats)
    return written


def plots_dir(results: Results, out_dir=None) -> Path:
    """Where ``plot_results`` writes: ``out_dir``, else RESULTS/plots; never the working directory unasked."""
    if out_dir is not None:
        return Path(out_dir)
    if not results.path:
        raise CkapipeError("these results have no directory: pass out_dir, or draw one figure with Results.plot()")
    return Path(results.path) / "plots"


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """``"png,pdf"`` or ``["png", "svg"]`` -> the formats, or a one-line error naming those matplotlib writes."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(f.strip().lower().lstrip(".") for f in items if f.strip())
    known = sorted(FigureCanvasBase.get_supported_filetypes())
    unknown = [f for f in chosen if f not in known]
    if unknown or not chosen:
        raise CkapipeError(f"unknown figure format {', '.join(unknown) or repr(formats)}: choose from {', '.join(known)}")
    return chosen


def check_style(vmin=0.0, vmax=1.0, cmap="magma", annotate=None) -> None:
    """A colour map matplotlib knows and scale ends that are numbers or ``"data"``, else a one-line error."""
    if cmap not in colormaps:
        raise CkapipeError(f"unknown colour map {cmap!r}: choose a matplotlib colour map (magma, viridis, RdBu_r, ...)")
    for name, end in (("vmin", vmin), ("vmax", vmax)):
        if end != "data" and not isinstance(end, (int, float)):
            raise CkapipeError(f"{name} {end!r} is neither a number nor 'data'")


def save(fig, stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """``stem.FORMAT`` for each format: the name is the stem as given, dots and all (a layer
    ``layer2.0.conv1`` in the name is not a file suffix to replace)."""
    paths = [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def finish(fig, save=None):
    """The figure, written to ``save`` (format from its suffix) when given: every drawing function ends here."""
    if save is not None:
        path = Path(save)
        check_formats(path.suffix or "?")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150)
    return fig


def default_pair(results: Results) -> tuple[str, str]:
    names = results.run_names
    return (names[0], names[1]) if len(names) > 1 else (names[0], names[0])


def default_layers(results: Results, a, b) -> tuple[str, str]:
    """The last layers of a and b; for a run with itself, its last two (a layer with itself is CKA 1 throughout)."""
    names_a, names_b = results.layer_names(a), results.layer_names(b)
    if results.run_index(a) == results.run_index(b) and len(names_a) > 1:
        return names_a[-2], names_b[-1]
    return names_a[-1], names_b[-1]


# --------------------------------------------------------------------------- heatmaps


def heatmap(matrix, rows: Sequence[str], cols: Sequence[str], *, ax=None, vmin=0.0, vmax=1.0, cmap="magma",
            annotate=None, best=None, colorbar=True, label="minibatch CKA", row_label="", col_label="",
            types=None, gid=None, save=None):
    """(R, C) matrix as an image, row 0 at the bottom; returns the Figure.

    ``vmin``/``vmax``: the colour scale (default 0 to 1, CKA's range; ``"data"``: the finite values'
    range); ``annotate``: values in the cells (default: up to 20 x 20), font sized to the cell;
    ``best``: (R,) column of each row's best match (-1: none), outlined; ``types``: layer -> module type,
    or a pair (rows' types, columns' types)."""
    matrix = np.asarray(matrix, dtype=float)
    ax = ax if ax is not None else new_figure(*heatmap_size(matrix.shape)).add_subplot()
    lo, hi = color_limits(matrix, vmin, vmax)
    image = ax.imshow(matrix, origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    image.set_gid(gid)
    row_types, col_types = types if isinstance(types, tuple) else (types, types)
    ticks(ax, "y", rows, row_types)
    ticks(ax, "x", cols, col_types)
    ax.set_ylabel(row_label)
    ax.set_xlabel(col_label)
    if annotate if annotate is not None else max(matrix.shape) <= MAX_ANNOTATED:
        cell_values(ax, image)
    if best is not None:
        outline_best(ax, best)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=label, fraction=0.046, pad=0.04)
    return finish(ax.figure, save)


def color_limits(matrix: np.ndarray, vmin=0.0, vmax=1.0) -> tuple[float, float]:
    """The colour scale: the numbers given, or ``"data"`` for the finite values' min or max."""
    finite = matrix[np.isfinite(matrix)]
    lo = (float(finite.min()) if finite.size else 0.0) if vmin == "data" else float(vmin)
    hi = (float(finite.max()) if finite.size else 1.0) if vmax == "data" else float(vmax)
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)  # a constant matrix still gets a scale


def heatmap_size(shape) -> tuple[float, float]:
    """Inches: 0.3 per layer, 4 to 20 wide and 3.5 to 20 high (200 layers fit at 40 ticks)."""
    rows, cols = shape
    return min(4 + 0.3 * cols, 20), min(3.5 + 0.3 * rows, 20)


def cell_values(ax, image) -> None:
    """Each cell's value, black on light cells and white on dark ones, at a size that fits the cell."""
    matrix = np.asarray(image.get_array(), dtype=float)
    size = value_fontsize(ax, matrix.shape)
    for (i, j), value in np.ndenumerate(matrix):
        light = np.isfinite(value) and luminance(image.cmap(image.norm(value))) > 0.5
        ax.text(j, i, f"{value:.2f}" if np.isfinite(value) else "-", ha="center", va="center", fontsize=size,
                color="black" if light else "white", gid="value")


def value_fontsize(ax, shape) -> float:
    """Points: a cell's width (the axes' share of the figure over the columns) fits four characters."""
    width, height = ax.figure.get_size_inches()
    box = ax.get_position()
    cell = 72 * min(width * box.width / shape[1], height * box.height / shape[0])
    return float(np.clip(cell / 2.6, 4, 10))


def luminance(rgba) -> float:
    """Relative luminance of an RGB colour (Rec. 709 weights)."""
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


def outline_best(ax, best) -> None:
    """An outline on the edge of each row's best cell (the value inside stays readable)."""
    for i, j in enumerate(best):
        if j >= 0:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=MARK, lw=1.5, gid="best"))


def corner_marks(ax, cells: np.ndarray, corner: tuple[float, float], marker: str, label: str):
    """A small marker in one corner of each (row, column) cell, ``corner`` its offset from the cell's
    center in cells (e.g. (-0.35, -0.35): lower left), clear of the value written at the center."""
    dx, dy = corner
    return ax.scatter(cells[:, 1] + dx, cells[:, 0] + dy, marker=marker, s=14, color=MARK, edgecolors="black",
                      linewidths=0.3, label=label)


def marks_legend(ax, handles) -> None:
    """The marks' legend above the axes, outside them: it covers no cell."""
    if handles:
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0, 1.01), ncols=len(handles), fontsize=7,
                  frameon=False, borderaxespad=0, handletextpad=0.3, columnspacing=1.0)


def heatmap_figure(results: Results, a, b=None, measure=None, *, ax=None, intervals=True, wide=WIDE, widths=False,
                   save=None, **style):
    """The CKA (or ``measure``) of runs a (y, bottom to top) and b (x, default a: a run's self-similarity).

    ``intervals``: mark each row's best match (outline), the entries whose bootstrap interval overlaps
    the best's (dot, lower left) and those whose interval is wider than ``wide`` (triangle, upper right);
    ``widths``: a second panel of the interval widths. ``style``: ``heatmap``'s options."""
    b = a if b is None else b
    matrix = results.cka(a, b, measure).values
    if ax is not None and widths:
        raise CkapipeError("widths=True draws a second panel beside the heatmap: pass no ax")
    own = ax is None  # a figure of its own gets a title; axes given belong to the caller's figure
    if own:
        width, height = heatmap_size(matrix.shape)
        fig = new_figure(width * (2 if widths else 1), height)
        ax, *rest = fig.subplots(1, 2 if widths else 1, squeeze=False)[0]
    marks = bool(intervals and measure is None and results.resampling.ci)  # the intervals are the first measure's
    style.setdefault("types", (index_types(results, a), index_types(results, b)))
    heatmap(matrix, results.layer_names(a), results.layer_names(b), ax=ax, row_label=f"{run_label(results, a)} layers",
            col_label=f"{run_label(results, b)} layers", label=measure_label(measure or results.measures[0]),
            best=best_columns(results, a, b, measure) if not marks else None, **style)
    if marks:
        mark_intervals(ax, results, a, b, wide)
    if widths:
        width_panel(rest[0], results, a, b, style.get("cmap", "magma"), style["types"])
    if own:
        ax.figure.suptitle(f"{run_label(results, a)} vs {run_label(results, b)}: "
                           f"{measure_label(measure or results.measures[0])}, m={results.m}, "
                           f"{len(results.minibatches)} minibatches", fontsize=9)
    return finish(ax.figure, save)


def best_columns(results: Results, a, b, measure=None) -> np.ndarray:
    """(La,) column of the best match of each row of a against b (-1: none; a run with itself: another layer)."""
    matrix = np.array(results.cka(a, b, measure).values)
    if results.run_index(a) == results.run_index(b):
        np.fill_diagonal(matrix, np.nan)
    return np.array([int(np.nanargmax(row)) if np.isfinite(row).any() else -1 for row in matrix])


def mark_intervals(ax, results: Results, a, b, wide: float = WIDE) -> None:
    """Outline each row's best; dot the entries whose interval overlaps the best's; mark wide intervals."""
    low, high = results.interval(a, b).values
    best, tied = ties_with_best(results.cka(a, b).values, low, high,
                                exclude_diagonal=results.run_index(a) == results.run_index(b))
    outline_best(ax, best)
    handles = [Line2D([], [], marker="s", ls="", markerfacecolor="none", markeredgecolor=MARK, label="best of the row")]
    ties = np.argwhere(tied)
    if len(ties):
        handles.append(corner_marks(ax, ties, CORNER_TIED, "o", "interval overlaps the best's"))
    with np.errstate(invalid="ignore"):
        spread = np.argwhere(np.asarray(high) - np.asarray(low) > wide)
    if len(spread):
        handles.append(corner_marks(ax, spread, CORNER_WIDE, "v", f"interval wider than {wide:g}"))
    marks_legend(ax, handles)


def width_panel(ax, results: Results, a, b, cmap="magma", types=None):
    """The width high - low of each entry's bootstrap interval, on its own scale (0 to the widest)."""
    low, high = results.interval(a, b).values
    return heatmap(np.asarray(high) - np.asarray(low), results.layer_names(a), results.layer_names(b), ax=ax,
                   vmin=0.0, vmax="data", cmap=cmap, label=f"width of the {results.resampling.ci * 100:g} % interval",
                   col_label=f"{run_label(results, b)} layers", types=types, gid="widths")


def measure_label(measure=None) -> str:
    """What a colour bar says: "minibatch CKA", or the measure's own label."""
    return "minibatch CKA" if measure is None else parse_measure(measure).label


# --------------------------------------------------------------------------- tick labels


def layer_ticks(names: Sequence[str], types=None, max_ticks: int = MAX_TICKS) -> tuple[list[int], list[str]]:
    """Positions and labels of at most ``max_ticks`` ticks (every k-th layer, the last one kept): long
    dotted names shortened to their last parts, and a module type when ``types`` (name -> type) has one."""
    step = max(1, math.ceil(len(names) / max_ticks))
    idx = list(range(0, len(names), step))
    return idx, [layer_label(names[i], (types or {}).get(names[i])) for i in idx]


def index_types(results: Results, run) -> dict[str, str]:
    """The recorded module type of each layer of a run whose name is a bare index (``1`` of an
    nn.Sequential -> ``Linear``): a reader cannot tell a Linear from a ReLU by its index alone."""
    entry = results.runs[results.run_index(run)]
    return {name: kind for name, kind in zip(entry.layers, entry.modules) if kind and name.split(".")[-1].isdigit()}


def layer_label(name: str, kind: str | None = None) -> str:
    """``encoder.layers.11.mlp.fc1`` -> ``…11.mlp.fc1``; ``1`` of an nn.Sequential with its type -> ``1 Linear``."""
    name = str(name)
    if len(name) > NAME_WIDTH and "." in name:
        parts = name.split(".")
        kept = parts[-1]
        for part in reversed(parts[:-1]):
            if len(part) + len(kept) + 2 > NAME_WIDTH:
                break
            kept = f"{part}.{kept}"
        name = f"…{kept}"
    return f"{name} {kind}" if kind else name


def ticks(ax, axis: str, names: Sequence[str], types=None, show: bool = True) -> None:
    """Layer names on one axis, thinned to MAX_TICKS, at a size the axis length allows (6 to 9 points)."""
    idx, labels = layer_ticks(names, types)
    width, height = ax.figure.get_size_inches()
    box = ax.get_position()
    length = 72 * (width * box.width if axis == "x" else height * box.height)
    size = float(np.clip(length / max(len(idx), 1) * 0.7, 6, 9))
    if axis == "x":
        ax.set_xticks(idx, labels if show else [], rotation=90, fontsize=size)
    else:
        ax.set_yticks(idx, labels if show else [], fontsize=size)


# --------------------------------------------------------------------------- grids of panels


def grid_figure(results: Results, pairs=None, *, fig=None, vmin=0.0, vmax=1.0, cmap="magma", save=None, **style):
    """Several pairs of runs on one colour scale with one colour bar; returns the Figure.

    ``pairs`` None: each unordered pair once, row i (top to bottom) with run i on y, column j >= i with
    run j on x, the diagonal panel alone carrying its run's layer names; else one row of the pairs given.
    ``vmin``/``vmax`` ``"data"``: the range of every panel together."""
    names = results.run_names
    pairs = list(pairs) if pairs is not None else None
    cells = ([(i, j, a, b) for i, a in enumerate(names) for j, b in enumerate(names) if j >= i] if pairs is None
             else [(0, k, a, b) for k, (a, b) in enumerate(pairs)])
    shape = (len(names), len(names)) if pairs is None else (1, len(pairs))
    matrices = [results.cka(a, b).values for _, _, a, b in cells]
    lo, hi = color_limits(np.concatenate([m.ravel() for m in matrices]), vmin, vmax)
    fig = fig if fig is not None else new_figure(2.6 * shape[1] + 1.2, 2.6 * shape[0] + 0.6)
    axes = fig.subplots(*shape, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for (i, j, a, b), matrix in zip(cells, matrices):
        ax = axes[i, j]
        ax.set_axis_on()
        labelled = pairs is not None or i == j
        image = grid_panel(ax, results, a, b, matrix, labelled, vmin=lo, vmax=hi, cmap=cmap, **style)
        if i == 0:
            ax.set_title(wrap(b) if pairs is None else f"{wrap(a)}\nvs {wrap(b)}", fontsize=8)
    fig.colorbar(image, ax=axes, label="minibatch CKA", fraction=0.02)
    fig.suptitle(f"minibatch CKA, m={results.m}, {len(results.minibatches)} minibatches"
                 + (" (rows: run on y, columns: run on x)" if pairs is None else ""), fontsize=10)
    return finish(fig, save)


def grid_panel(ax, results: Results, a, b, matrix, labelled: bool, **style):
    """One panel of a grid: no colour bar, no values, layer names only where ``labelled``; the image."""
    heatmap(matrix, results.layer_names(a), results.layer_names(b), ax=ax, colorbar=False,
            annotate=style.pop("annotate", False), best=best_columns(results, a, b), gid=f"{a}__{b}", **style)
    if not labelled:
        ax.set_xticklabels([])
        ax.set_yticklabels([])
    ax.set_ylabel(wrap(a) if labelled else "", fontsize=8)
    return ax.get_images()[-1]


def matrix_panels(matrices, rows, cols, titles, *, fig=None, gids=None, vmin="data", vmax=1.0, cmap="magma",
                  label="minibatch CKA", max_cols: int = 4, save=None):
    """Panels of matrices (rows[k] x cols[k] names each) on one colour scale, up to ``max_cols`` a row,
    one colour bar; ``vmin`` ``"data"``: the smallest value of any panel, rounded down to a tenth."""
    values = np.concatenate([np.asarray(m, dtype=float).ravel() for m in matrices])
    lo, hi = color_limits(values, vmin, vmax)
    if vmin == "data":
        lo = min(0.9, math.floor(lo * 10) / 10)
    n = len(matrices)
    ncols = min(max_cols, n)
    size = max(max(np.shape(m)) for m in matrices)
    fig = fig if fig is not None else new_figure((2.0 + 0.45 * size) * ncols + 1, (1.6 + 0.45 * size) * -(-n // ncols) + 0.6)
    axes = fig.subplots(-(-n // ncols), ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_axis_off()
            continue
        heatmap(matrices[k], rows[k], cols[k], ax=ax, vmin=lo, vmax=hi, cmap=cmap, colorbar=False,
                annotate=max(np.shape(matrices[k])) <= 8, gid=gids[k] if gids else None)
        ax.set_title(titles[k], fontsize=8)
    fig.colorbar(axes.flat[0].get_images()[0], ax=axes, label=label, fraction=0.03)
    return finish(fig, save)


# --------------------------------------------------------------------------- trends


def trend(ax, x, values, low=None, high=None, label=None, **line):
    """``values`` against ``x`` as a line with markers, and [low, high] as a band of its colour; the Line2D."""
    drawn, = ax.plot(x, values, marker="o", ms=3, label=label, **line)
    if low is not None and high is not None and np.isfinite(np.asarray(low, dtype=float)).any():
        ax.fill_between(x, low, high, color=drawn.get_color(), alpha=0.2, lw=0, gid=f"band {label}")
    return drawn


def trend_figure(panels: dict, *, fig=None, xlabel="step", ylabel="", ylim=None, log=False, xticks=None, title="",
                 save=None):
    """A panel per entry of ``panels`` (title -> {series: (x, values, low or None, high or None)}), a line per
    series with its interval band, up to four panels a row; returns the Figure."""
    n = len(panels)
    cols = min(4, n)
    rows = -(-n // cols)
    fig = fig if fig is not None else new_figure(3.2 * cols + 0.5, 2.6 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, series) in zip(axes, panels.items()):
        for label, (x, values, low, high) in series.items():
            trend(ax, x, values, low, high, label=label)
        trend_axes(ax, name, xlabel, ylim, log, xticks)
    for ax in axes[n:]:
        ax.set_visible(False)
    axes[0].set_ylabel(ylabel, fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return finish(fig, save)


def trend_axes(ax, title: str, xlabel: str, ylim=None, log: bool = False, xticks=None) -> None:
    """One trend panel's title, x label and scale (log for steps spanning a decade), ticks and y limits."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    if log:
        ax.set_xscale("log")
        ax.minorticks_off()
    if xticks is not None:
        ax.set_xticks(list(xticks), [str(t) for t in xticks])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.tick_params(labelsize=7)


def layer_trend_figure(results: Results, a, b=None, *, ax=None, save=None):
    """Over the layers of a: the CKA of its best match in b (another layer when b is a) with the bootstrap
    interval as a band; the layer names on x, thinned like a heatmap's."""
    b = a if b is None else b
    best = best_columns(results, a, b)
    rows = np.flatnonzero(best >= 0)
    pick = (rows, best[rows])
    ax = ax if ax is not None else new_figure(max(4.5, 0.25 * len(best) + 2.5), 3.6).add_subplot()
    low, high = results.interval(a, b).values if results.resampling.ci else (None, None)
    trend(ax, rows, results.cka(a, b).values[pick], None if low is None else np.asarray(low)[pick],
          None if high is None else np.asarray(high)[pick], label=f"best match in {run_label(results, b)}")
    ticks(ax, "x", results.layer_names(a))
    ax.set_xlabel(f"{run_label(results, a)} layers")
    ax.set_ylabel("minibatch CKA")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    return finish(ax.figure, save)


def diversity_figure(labels, stats: dict, *, ax=None, xlabel="depth", title="", save=None):
    """Mean ± sd (error bars) of a statistic against depth, its range as a band and dotted lines;
    ``stats``: "mean", "sd", "min", "max" -> (D,) arrays; returns the Figure."""
    x = np.arange(1, len(labels) + 1)
    ax = ax if ax is not None else new_figure(max(4.5, 0.6 * len(labels) + 2.5), 3.6).add_subplot()
    ax.fill_between(x, stats["min"], stats["max"], color="tab:purple", alpha=0.15, label="range over pairs")
    for key in ("min", "max"):
        ax.plot(x, stats[key], color="tab:purple", lw=0.8, ls=":", gid=key)
    bars = ax.errorbar(x, stats["mean"], yerr=stats["sd"], color="tab:purple", marker="o", capsize=3,
                       label="mean ± sd over pairs")
    bars.lines[0].set_gid("mean")
    bars.lines[2][0].set_gid("sd")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 6 else 0, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("CKA between different members")
    finite = np.isfinite(stats["min"])
    ax.set_ylim(min(0.0, float(np.min(stats["min"][finite]))) if finite.any() else 0.0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    return finish(ax.figure, save)


# --------------------------------------------------------------------------- one layer pair, per minibatch


def minibatch_figure(results: Results, a, b, layer_a, layer_b, *, fig=None, save=None):
    """Per-minibatch CKA of one layer pair against minibatch index, on a scale fitted to the values,
    beside their histogram on the same scale; the minibatch CKA (ratio of sums) dashed on both."""
    values = results.minibatch_cka(a, b, layer_a, layer_b).values
    overall = results.cka(a, b).values[results.layer_index(a, layer_a), results.layer_index(b, layer_b)]
    fig = fig if fig is not None else new_figure(10, 4.2)
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    left.plot(np.asarray(results.minibatches), values, marker="o", ms=3, lw=0.8, color="tab:purple")
    left.axhline(overall, color="k", ls="--", lw=1, label=f"minibatch CKA (ratio of sums) {overall:.4f}")
    left.set_xlabel("minibatch k")
    left.set_ylabel("CKA of one minibatch")
    finite = values[np.isfinite(values)]
    right.set_title(histogram(left, right, finite, overall), fontsize=8)
    right.axhline(overall, color="k", ls="--", lw=1)
    for ax in (left, right):
        shade_interval(ax, results, a, b, layer_a, layer_b)
    left.legend(fontsize=8, loc="best")
    right.set_xlabel("minibatches")
    fig.suptitle(f"{run_label(results, a)}:{layer_a} vs {run_label(results, b)}:{layer_b}, "
                 f"m={results.m}, {len(values)} minibatches", fontsize=10)
    return finish(fig, save)


def histogram(left, right, finite: np.ndarray, overall: float) -> str:
    """The values' histogram on ``right`` over the y range fitted on ``left``; what the spread is.

    Values equal to rounding (a layer with itself: CKA 1 in every minibatch) get one bin, not an error."""
    if not finite.size:
        return "no finite value"
    shown = np.append(finite, overall) if np.isfinite(overall) else finite
    low, high = float(shown.min()), float(shown.max())
    pad = max((high - low) * 0.08, 1e-6 * max(1.0, abs(high)))
    left.set_ylim(low - pad, high + pad)
    spread = float(finite.max() - finite.min())
    bins = max(5, min(50, len(finite) // 2)) if spread > 1e-9 * max(1.0, abs(high)) else 1
    right.hist(finite, bins=bins, range=(low - pad, high + pad) if bins == 1 else None, orientation="horizontal",
               color="tab:purple")
    return f"spread {finite.min():.4g} - {finite.max():.4g}, sd {finite.std():.2g}"


def shade_interval(ax, results: Results, a, b, layer_a, layer_b) -> None:
    """The bootstrap interval of the minibatch CKA of one layer pair, as a horizontal band across ``ax``."""
    if not results.resampling.ci:
        return
    i, j = results.layer_index(a, layer_a), results.layer_index(b, layer_b)
    low, high = (x[i, j] for x in results.interval(a, b).values)
    if np.isfinite(low) and np.isfinite(high):
        ax.axhspan(low, high, color="0.5", alpha=0.3, zorder=0, label=f"{results.resampling.ci * 100:g} % bootstrap interval")


# --------------------------------------------------------------------------- small helpers


def safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", str(name))


def run_label(results: Results, run) -> str:
    return results.run_names[results.run_index(run)]


def wrap(text: str, width: int = 22) -> str:
    """A long run name over several lines (cut after hyphens, or anywhere)."""
    return "\n".join(textwrap.wrap(text, width)) or text


def new_figure(width: float, height: float):
    """A Figure of its own (no pyplot state: nothing shows or leaks), laid out by constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


__all__ = ["plot_results", "heatmap", "heatmap_figure", "grid_figure", "matrix_panels", "trend", "trend_figure",
           "layer_trend_figure", "diversity_figure", "minibatch_figure", "check_formats", "layer_ticks"]

"""Figures of a results store (PNG and PDF by default), drawn with matplotlib's object API (no pyplot state).

- one heatmap per pair of runs: layers of the first run on the y axis, bottom to
  top, layers of the second on the x axis, both labelled with run and layer names;
  the values written in the cells of small matrices, the best match of each row framed,
  and the entries whose bootstrap interval overlaps the best's dotted (indistinguishable
  from it at this resolution);
- for a multi-run study, a grid with each unordered pair of runs once (the upper triangle);
- the per-minibatch CKA of one layer pair: CKA against minibatch index on a scale fitted to
  the values, beside their histogram, with the minibatch CKA (ratio of sums) and its
  bootstrap interval marked on both.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from ckapipe.analyze.results import Results, load_results
from ckapipe.analyze.stats import ties_with_best
from ckapipe.errors import CkapipeError

MAX_TICKS = 40
MAX_LABELLED_CELLS = 144  # value labels in the cells of matrices up to 12 × 12
FORMATS = ("png", "pdf")


def plot_results(results_or_path, out_dir=None, pair=None, layers=None, formats: Sequence[str] | str = FORMATS) -> list[Path]:
    """Write every figure of the results in each of ``formats``; return the paths written."""
    formats = check_formats(formats)
    results = results_or_path if isinstance(results_or_path, Results) else load_results(results_or_path)
    out = Path(out_dir) if out_dir is not None else (Path(results.path) / "plots" if results.path else Path("plots"))
    a, b = pair if pair else default_pair(results)
    la, lb = layers if layers else (results.layer_names(a)[-1], results.layer_names(b)[-1])
    results.layer_index(a, la), results.layer_index(b, lb)  # a typo fails before any figure is drawn
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x, y in results.pairs():
        written += save(heatmap_figure(results, x, y), out / f"cka_{safe(x)}__{safe(y)}", formats)
        for measure in results.measures[1:]:  # the other measures of --measure, one heatmap each
            written += save(heatmap_figure(results, x, y, measure), out / f"{safe(measure)}_{safe(x)}__{safe(y)}", formats)
    if len(results.runs) > 1:
        written += save(grid_figure(results), out / "cka_grid", formats)
    fig = minibatch_figure(results, a, b, la, lb)
    written += save(fig, out / f"minibatch_cka_{safe(a)}_{safe(la)}__{safe(b)}_{safe(lb)}", formats)
    return written


def check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    """``"png,pdf"`` or ``["png", "svg"]`` -> the formats, or a one-line error naming those matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase

    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(f.strip().lower().lstrip(".") for f in items if f.strip())
    known = sorted(FigureCanvasBase.get_supported_filetypes())
    unknown = [f for f in chosen if f not in known]
    if unknown or not chosen:
        raise CkapipeError(f"unknown figure format {', '.join(unknown) or repr(formats)}: choose from {', '.join(known)}")
    return chosen


def default_pair(results: Results) -> tuple[str, str]:
    names = results.run_names
    return (names[0], names[1]) if len(names) > 1 else (names[0], names[0])


def heatmap(ax, results: Results, a, b, colorbar=True, values=None, tick_labels=(True, True), fontsize=None,
            measure=None):
    """CKA (or another ``measure``) of runs a (y, bottom to top) and b (x) with real layer names;
    ``values`` writes each cell's value (default: for matrices up to MAX_LABELLED_CELLS cells)."""
    matrix = results.cka(a, b, measure).values
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    names_a, names_b = results.layer_names(a), results.layer_names(b)
    _ticks(ax.set_yticks, ax.set_yticklabels, names_a, 0, tick_labels[0], fontsize)
    _ticks(ax.set_xticks, ax.set_xticklabels, names_b, 90, tick_labels[1], fontsize)
    if values if values is not None else matrix.size <= MAX_LABELLED_CELLS:
        cell_values(ax, matrix)
    ax.set_ylabel(f"{run_label(results, a)} layers")
    ax.set_xlabel(f"{run_label(results, b)} layers")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=measure_label(measure or results.measures[0]), fraction=0.046, pad=0.04)
    if measure is None:  # the intervals are the first measure's
        mark_ties_with_best(ax, results, a, b)
    return image


def mark_ties_with_best(ax, results: Results, a, b):
    """Frame each row's best match; dot the entries whose bootstrap interval overlaps the best's."""
    low, high = results.interval(a, b).values
    best, tied = ties_with_best(results.cka(a, b).values, low, high,
                                exclude_diagonal=results.run_index(a) == results.run_index(b))
    rows = [i for i in range(len(best)) if best[i] >= 0]
    if rows:
        ax.scatter(best[rows], rows, marker="s", s=60, facecolors="none", edgecolors="cyan", linewidths=1.2,
                   label="best match of the row")
    ties = np.argwhere(tied)
    if len(ties):
        ax.scatter(ties[:, 1], ties[:, 0], marker=".", s=30, color="cyan", label="interval overlaps the best's")


def measure_label(measure=None) -> str:
    """What a colour bar says: "minibatch CKA", or the measure's own label."""
    from ckapipe.analyze.measures import parse_measure

    return "minibatch CKA" if measure is None else parse_measure(measure).label


def cell_values(ax, matrix: np.ndarray) -> None:
    """Each cell's value, dark on light cells and light on dark ones (magma is dark at 0)."""
    size = max(5, min(9, 90 / max(matrix.shape)))
    for (i, j), value in np.ndenumerate(matrix):
        text = "-" if not np.isfinite(value) else f"{value:.2f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=size, color="black" if value > 0.6 else "white")


def heatmap_figure(results: Results, a, b, measure=None):
    la, lb = len(results.layer_names(a)), len(results.layer_names(b))
    fig = _figure(figsize=(min(4 + 0.3 * lb, 20), min(3.5 + 0.3 * la, 20)))
    ax = fig.add_subplot()
    heatmap(ax, results, a, b, measure=measure)
    ax.set_title(f"{run_label(results, a)} vs {run_label(results, b)}\n"
                 f"{measure_label(measure or results.measures[0])}, m={results.m}, {len(results.minibatches)} minibatches",
                 fontsize=9)
    return fig


def grid_figure(results: Results, panel: float = 2.6):
    """Each unordered pair of runs once: row i (top to bottom) has run i on y, column j >= i run j on x.

    The diagonal panel of a run is the first of its row and the last of its column, so it alone
    carries that run's layer names; run names head the rows and columns, wrapped.
    """
    names = results.run_names
    n = len(names)
    fig = _figure(figsize=(panel * n + 1.2, panel * n + 0.6))
    axes = fig.subplots(n, n, squeeze=False)
    image = None
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ax = axes[i, j]
            if j < i:
                ax.set_axis_off()
                continue
            diagonal = i == j
            image = heatmap(ax, results, a, b, colorbar=False, values=False, tick_labels=(diagonal, diagonal), fontsize=5)
            ax.set_xlabel("")
            ax.set_ylabel(wrap(a) if diagonal else "", fontsize=8)
            if i == 0:
                ax.set_title(wrap(b), fontsize=8)
    fig.colorbar(image, ax=axes, label="minibatch CKA", fraction=0.02)
    fig.suptitle(f"minibatch CKA, m={results.m}, {len(results.minibatches)} minibatches "
                 f"(rows: run on y, columns: run on x)", fontsize=10)
    return fig


def minibatch_figure(results: Results, a, b, layer_a, layer_b):
    """Per-minibatch CKA of one layer pair against minibatch index, on a scale fitted to the values,
    beside their histogram on the same scale; the minibatch CKA (ratio of sums) dashed on both."""
    values = results.minibatch_cka(a, b, layer_a, layer_b).values
    overall = results.cka(a, b).values[results.layer_index(a, layer_a), results.layer_index(b, layer_b)]
    fig = _figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    index = np.asarray(results.minibatches)
    left.plot(index, values, marker="o", ms=3, lw=0.8, color="tab:purple")
    left.axhline(overall, color="k", ls="--", lw=1, label=f"minibatch CKA (ratio of sums) {overall:.4f}")
    left.set_xlabel("minibatch k")
    left.set_ylabel("CKA of one minibatch")
    left.legend(fontsize=8, loc="best")
    finite = values[np.isfinite(values)]
    if finite.size:
        shown = np.append(finite, overall) if np.isfinite(overall) else finite
        low, high = float(shown.min()), float(shown.max())
        pad = max((high - low) * 0.08, 1e-6 * max(1.0, abs(high)))
        left.set_ylim(low - pad, high + pad)
        right.hist(finite, bins=max(5, min(50, len(finite) // 2)), orientation="horizontal", color="tab:purple")
        spread = f"spread {finite.min():.4g} - {finite.max():.4g}, sd {finite.std():.2g}"
    else:
        spread = "no finite value"
    right.axhline(overall, color="k", ls="--", lw=1)
    for ax in (left, right):
        shade_interval(ax, results, a, b, layer_a, layer_b, vertical=False)
    right.set_xlabel("minibatches")
    right.set_title(spread, fontsize=8)
    fig.suptitle(f"{run_label(results, a)}:{layer_a} vs {run_label(results, b)}:{layer_b}, "
                 f"m={results.m}, {len(values)} minibatches", fontsize=10)
    return fig


def shade_interval(ax, results: Results, a, b, layer_a, layer_b, vertical: bool = True):
    """The bootstrap interval of the minibatch CKA of one layer pair, as a band across ``ax``."""
    low, high = (x[results.layer_index(a, layer_a), results.layer_index(b, layer_b)] for x in results.interval(a, b).values)
    if np.isfinite(low) and np.isfinite(high):
        band = ax.axvspan if vertical else ax.axhspan
        band(low, high, color="0.5", alpha=0.3, zorder=0, label=f"{results.resampling.ci * 100:g} % bootstrap interval")
        ax.legend(fontsize=8)


def save(fig, stem: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """``stem.FORMAT`` for each format: the name is the stem as given, dots and all (a layer
    ``layer2.0.conv1`` in the name is not a file suffix to replace)."""
    paths = [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", str(name))


def run_label(results: Results, run) -> str:
    return results.run_names[results.run_index(run)]


def wrap(text: str, width: int = 22) -> str:
    """A long run name over several lines (cut after hyphens, or anywhere)."""
    return "\n".join(textwrap.wrap(text, width)) or text


def _ticks(set_ticks, set_labels, names, rotation, show=True, fontsize=None):
    step = max(1, math.ceil(len(names) / MAX_TICKS))
    idx = list(range(0, len(names), step))
    set_ticks(idx)
    if not show:
        set_labels([])
        return
    set_labels([names[i] for i in idx], rotation=rotation, fontsize=fontsize or (6 if len(idx) > 16 else 8))


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


__all__ = ["plot_results", "heatmap", "heatmap_figure", "grid_figure", "minibatch_figure", "check_formats"]

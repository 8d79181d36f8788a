"""Figures of a results store (PNG and PDF), drawn with matplotlib's object API (no pyplot state).

- one heatmap per pair of runs: layers of the first run on the y axis, bottom to
  top, layers of the second on the x axis, both labelled with run and layer names;
  the best match of each row framed, and the entries whose bootstrap interval
  overlaps the best's dotted (indistinguishable from it at this resolution);
- a grid of every pair for a multi-run study;
- the per-minibatch CKA of one layer pair: sorted values as a grid, and their histogram
  with the minibatch CKA and its bootstrap interval.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from ckapipe.analyze.results import Results, load_results
from ckapipe.analyze.stats import ties_with_best

MAX_TICKS = 40


def plot_results(results_or_path, out_dir=None, pair=None, layers=None) -> list[Path]:
    """Write every figure of the results; return the paths written."""
    results = results_or_path if isinstance(results_or_path, Results) else load_results(results_or_path)
    out = Path(out_dir) if out_dir is not None else (Path(results.path) / "plots" if results.path else Path("plots"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for a, b in results.pairs():
        fig = heatmap_figure(results, a, b)
        written += save(fig, out / f"cka_{safe(a)}__{safe(b)}")
    if len(results.runs) > 1:
        written += save(grid_figure(results), out / "cka_grid")
    a, b = pair if pair else default_pair(results)
    la, lb = layers if layers else (results.layer_names(a)[-1], results.layer_names(b)[-1])
    fig = minibatch_figure(results, a, b, la, lb)
    written += save(fig, out / f"minibatch_cka_{safe(a)}_{safe(la)}__{safe(b)}_{safe(lb)}")
    return written


def default_pair(results: Results) -> tuple[str, str]:
    names = results.run_names
    return (names[0], names[1]) if len(names) > 1 else (names[0], names[0])


def heatmap(ax, results: Results, a, b, colorbar=True):
    """CKA of runs a (y, bottom to top) and b (x) with real layer names."""
    matrix = results.cka(a, b)
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    _ticks(ax.set_yticks, ax.set_yticklabels, results.layer_names(a), rotation=0)
    _ticks(ax.set_xticks, ax.set_xticklabels, results.layer_names(b), rotation=90)
    ax.set_ylabel(f"{results.run_names[results.run_index(a)]} layers")
    ax.set_xlabel(f"{results.run_names[results.run_index(b)]} layers")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="minibatch CKA", fraction=0.046, pad=0.04)
    mark_ties_with_best(ax, results, a, b)
    return image


def mark_ties_with_best(ax, results: Results, a, b):
    """Frame each row's best match; dot the entries whose bootstrap interval overlaps the best's."""
    low, high = results.cka_interval(a, b)
    best, tied = ties_with_best(results.cka(a, b), low, high,
                                exclude_diagonal=results.run_index(a) == results.run_index(b))
    rows = [i for i in range(len(best)) if best[i] >= 0]
    if rows:
        ax.scatter(best[rows], rows, marker="s", s=60, facecolors="none", edgecolors="cyan", linewidths=1.2,
                   label="best match of the row")
    ties = np.argwhere(tied)
    if len(ties):
        ax.scatter(ties[:, 1], ties[:, 0], marker=".", s=30, color="cyan", label="interval overlaps the best's")


def heatmap_figure(results: Results, a, b):
    la, lb = len(results.layer_names(a)), len(results.layer_names(b))
    fig = _figure(figsize=(min(4 + 0.25 * lb, 20), min(3.5 + 0.25 * la, 20)))
    ax = fig.add_subplot()
    heatmap(ax, results, a, b)
    ax.set_title(f"{results.run_names[results.run_index(a)]} vs {results.run_names[results.run_index(b)]}\n"
                 f"minibatch CKA, m={results.m}, {len(results.minibatches)} minibatches", fontsize=9)
    return fig


def grid_figure(results: Results):
    """Every pair of runs: panel (i, j) has run i on y and run j on x."""
    names = results.run_names
    n = len(names)
    fig = _figure(figsize=(3.2 * n + 1, 3.2 * n))
    axes = fig.subplots(n, n, squeeze=False)
    image = None
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            image = heatmap(axes[n - 1 - i, j], results, a, b, colorbar=False)
    fig.colorbar(image, ax=axes, label="minibatch CKA", fraction=0.02)
    fig.suptitle(f"minibatch CKA, m={results.m}, {len(results.minibatches)} minibatches")
    return fig


def minibatch_figure(results: Results, a, b, layer_a, layer_b):
    """Per-minibatch CKA of one layer pair: the values sorted into a grid, and their histogram."""
    values = results.minibatch_cka(a, b, layer_a, layer_b)
    fig = _figure(figsize=(10, 4.2))
    left, right = fig.subplots(1, 2)
    side = math.ceil(math.sqrt(len(values)))
    grid = np.full(side * side, np.nan)
    grid[: len(values)] = np.sort(values)
    image = left.imshow(grid.reshape(side, side), cmap="magma", vmin=0, vmax=1, origin="upper")
    left.set_title(f"{len(values)} minibatches, sorted (row by row)", fontsize=9)
    left.set_xticks([])
    left.set_yticks([])
    fig.colorbar(image, ax=left, label="CKA of one minibatch")
    finite = values[np.isfinite(values)]
    right.hist(finite, bins=max(5, min(50, len(finite) // 2)), color="tab:purple")
    right.axvline(results.cka(a, b)[results.layer_index(a, layer_a), results.layer_index(b, layer_b)],
                  color="k", ls="--", label="minibatch CKA (ratio of sums)")
    shade_interval(right, results, a, b, layer_a, layer_b)
    right.set_xlabel("CKA of one minibatch")
    right.set_ylabel("minibatches")
    right.legend(fontsize=8)
    fig.suptitle(f"{results.run_names[results.run_index(a)]}:{layer_a} vs "
                 f"{results.run_names[results.run_index(b)]}:{layer_b}, m={results.m}")
    return fig


def shade_interval(ax, results: Results, a, b, layer_a, layer_b, vertical: bool = True):
    """The bootstrap interval of the minibatch CKA of one layer pair, as a band across ``ax``."""
    low, high = (x[results.layer_index(a, layer_a), results.layer_index(b, layer_b)] for x in results.cka_interval(a, b))
    if np.isfinite(low) and np.isfinite(high):
        band = ax.axvspan if vertical else ax.axhspan
        band(low, high, color="0.5", alpha=0.3, zorder=0, label=f"{results.resampling.ci * 100:g} % bootstrap interval")
        ax.legend(fontsize=8)


def save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.@+-]", "_", str(name))


def _ticks(set_ticks, set_labels, names, rotation):
    step = max(1, math.ceil(len(names) / MAX_TICKS))
    idx = list(range(0, len(names), step))
    set_ticks(idx)
    set_labels([names[i] for i in idx], rotation=rotation, fontsize=6 if len(idx) > 16 else 8)


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


__all__ = ["plot_results", "heatmap", "heatmap_figure", "grid_figure", "minibatch_figure"]

"""Training trajectories: every checkpoint against a reference, layer by layer, against the step.

From one analysis of the reference and every checkpoint (``analyze``), for each
series (one training: distillation, plain cross-entropy, ...), each measure and
each layer l of the checkpoints' architecture:

- the measure between layer l of the checkpoint at each step and the reference's
  layer of the same name (or, when the reference has no such layer, the
  reference layer most similar to it, named in the table);
- RankMe of layer l at each step (Garrido et al. 2023): the minibatch RankMe of
  the analysis (``rankme=True``), or the full-data RankMe (``analyze.rank``).

Intervals: for the measures averaged over minibatches (neighbours) and the
minibatch RankMe, mean ± 1.96 standard errors over the minibatches (they are
independent random samples); for the ratio-of-sums measures, the results'
``interval(a, b, measure)`` when the results provide one (the bootstrap of
``analyze.stats``), else none.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ckapipe.analyze.measures import MEAN, parse_measure
from ckapipe.analyze.plots import measure_label, safe, save, trend_figure
from ckapipe.analyze.rank import full_rankme
from ckapipe.analyze.results import Results
from ckapipe.errors import CkapipeError
from ckapipe.store import open_run

Z = 1.96  # two-sided 95 % normal quantile
RANKME_KINDS = ("minibatch", "full", "none")


@dataclass
class TrajectoryView:
    """One figure's worth per measure: (steps × layers) per series, with intervals where available."""

    layers: list[str]
    measures: list[str]
    steps: dict[str, list[int]]  # series -> steps, increasing
    reference: dict[str, str]  # series -> the reference run's label
    values: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (measure, series) -> (steps, L)
    reference_layers: dict[tuple[str, str], list[list[str]]] = field(default_factory=dict)
    intervals: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    rankme_kind: str = "none"
    rankme: dict[str, np.ndarray] = field(default_factory=dict)  # series -> (steps, L)
    rankme_intervals: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def to_csv(self) -> str:
        """Long form: series, step, layer, measure, reference_layer, value, low, high (RankMe as a measure)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["series", "step", "layer", "measure", "reference", "reference_layer", "value", "low", "high"])
        for series, steps in self.steps.items():
            for (name, values, refs, interval) in self._tables(series):
                for i, step in enumerate(steps):
                    for j, layer in enumerate(self.layers):
                        low, high = (interval[0][i, j], interval[1][i, j]) if interval else (math.nan, math.nan)
                        writer.writerow([series, step, layer, name, self.reference[series] if refs else "",
                                         refs[i][j] if refs else "", repr(float(values[i, j])), _num(low), _num(high)])
        return buf.getvalue()

    def _tables(self, series: str):
        for measure in self.measures:
            key = (measure, series)
            yield measure, self.values[key], self.reference_layers[key], self.intervals.get(key)
        if series in self.rankme:
            yield f"rankme_{self.rankme_kind}", self.rankme[series], None, self.rankme_intervals.get(series)


def trajectory_view(results: Results, series: dict[str, list[tuple[int, str]]], reference: str | None = None,
                    rankme: str = "minibatch", cache=None, progress: bool = False) -> TrajectoryView:
    """The view of ``results`` (an analysis of every run named here) for series {name: [(step, run), ...]}
    against ``reference`` (a run; None: each series' last checkpoint)."""
    if rankme not in RANKME_KINDS:
        raise CkapipeError(f"rankme {rankme!r} is not one of {', '.join(RANKME_KINDS)}")
    points = {name: sorted(runs) for name, runs in series.items()}
    first = next(iter(points.values()))[0][1]
    layers = results.layer_names(first)
    for name, runs in points.items():
        for _, run in runs:
            if results.layer_names(run) != layers:
                raise CkapipeError(f"checkpoint {run} of series {name} has layers {results.layer_names(run)}, "
                                   f"not {layers}: a trajectory follows one architecture")
    refs = {name: reference or runs[-1][1] for name, runs in points.items()}
    view = TrajectoryView(layers, results.measures, {name: [s for s, _ in runs] for name, runs in points.items()},
                          {name: results.run_names[results.run_index(ref)] for name, ref in refs.items()}, rankme_kind=rankme)
    for measure in results.measures:
        for name, runs in points.items():
            rows = [_against_reference(results, refs[name], run, layers, measure) for _, run in runs]
            view.values[(measure, name)] = np.array([values for values, _, _ in rows])
            view.reference_layers[(measure, name)] = [names for _, names, _ in rows]
            bounds = [interval for _, _, interval in rows]
            if all(b is not None for b in bounds):
                view.intervals[(measure, name)] = (np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds]))
    for name, runs in points.items():
        if rankme == "minibatch":
            per_run = [results.minibatch_rankme(run).values for _, run in runs]
            view.rankme[name] = np.array([v.mean(axis=0) for v in per_run])
            view.rankme_intervals[name] = _mean_interval(per_run)
        elif rankme == "full":
            view.rankme[name] = np.array([_full_rankme(results, run, progress) for _, run in runs])
    return view


def _against_reference(results: Results, reference: str, run: str, layers: list[str], measure: str):
    """(L,) values of each layer of ``run`` against the reference's layer of the same name (else its most
    similar layer), the reference layers' names, and (low, high) when available."""
    matrix = results.cka(reference, run, measure).values  # (L_ref, L)
    ref_layers = results.layer_names(reference)
    rows = [ref_layers.index(layer) if layer in ref_layers else int(np.nanargmax(matrix[:, j]))
            for j, layer in enumerate(layers)]
    values = matrix[rows, np.arange(len(layers))]
    interval = None
    if parse_measure(measure).aggregate == MEAN:
        per_minibatch = [results.minibatch_cka(reference, run, ref_layers[i], layer, measure).values
                         for i, layer in zip(rows, layers)]
        interval = _mean_interval([np.array(per_minibatch).T])
        interval = (interval[0][0], interval[1][0])
    else:
        low, high = results.interval(reference, run, measure).values
        interval = (np.asarray(low)[rows, np.arange(len(layers))], np.asarray(high)[rows, np.arange(len(layers))])
    return values, [ref_layers[i] for i in rows], interval


def _mean_interval(per_run: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean ± 1.96 standard errors over minibatches, per run: [(n_minibatches, L)] -> (runs, L) twice."""
    means = np.array([v.mean(axis=0) for v in per_run])
    errors = np.array([v.std(axis=0, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else np.full(v.shape[1], np.nan)
                       for v in per_run])
    return means - Z * errors, means + Z * errors


def _full_rankme(results: Results, run: str, progress: bool) -> np.ndarray:
    entry = results.runs[results.run_index(run)]
    stored = open_run(entry.path)
    return np.array([full_rankme(stored, layer, progress=progress)[0] for layer in entry.layers])


# --------------------------------------------------------------------------- figures


def plot_trajectory(view: TrajectoryView, out_dir) -> list[Path]:
    """Write ``trajectory_figures`` into ``out_dir`` as PNG and PDF; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [path for stem, fig in trajectory_figures(view).items() for path in save(fig, out / stem)]


def trajectory_figures(view: TrajectoryView) -> dict:
    """File stem -> Figure: per measure (and RankMe) a panel per layer, the value against the step,
    a line per series with its interval as a band (``plots.trend_figure``)."""
    figures = {}
    against = ", ".join(sorted(set(view.reference.values())))
    for measure in view.measures:
        label = measure_label(measure)
        tables = {s: (view.values[(measure, s)], view.intervals.get((measure, s))) for s in view.steps}
        figures[f"trajectory_{safe(measure)}"] = step_figure(view, tables, label,
                                                             f"{label} of each checkpoint against {against}", (0, 1.02))
    if view.rankme:
        label = f"RankMe ({view.rankme_kind})"
        tables = {s: (view.rankme[s], view.rankme_intervals.get(s)) for s in view.rankme}
        figures["trajectory_rankme"] = step_figure(view, tables, label, f"{label} of each checkpoint's layers", None)
    return figures


def step_figure(view: TrajectoryView, tables: dict, what: str, title: str, ylim):
    """``tables`` (series -> ((steps, L) values, (low, high) or None)) as a panel per layer against the step."""
    panels = {layer: {series: (view.steps[series], values[:, j], *_band(interval, j))
                      for series, (values, interval) in tables.items()}
              for j, layer in enumerate(view.layers)}
    steps = sorted({s for series in view.steps.values() for s in series})
    log = steps[0] > 0 and steps[-1] >= 10 * steps[0]
    return trend_figure(panels, xlabel="step", ylabel=what, ylim=ylim, log=log, xticks=steps, title=title)


def _band(interval, j: int) -> tuple:
    """Column j of an interval (low, high) of (steps, L) arrays, or (None, None) without one."""
    return (None, None) if interval is None else (interval[0][:, j], interval[1][:, j])


def _num(value: float) -> str:
    return "" if not np.isfinite(value) else repr(float(value))


__all__ = ["TrajectoryView", "trajectory_view", "trajectory_figures", "plot_trajectory"]

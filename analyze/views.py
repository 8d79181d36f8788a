"""The views of two study kinds, drawn from a results store only (nothing recomputed).

- **Ensemble**: how alike are the members, layer by layer? At each depth, the
  member x member CKA of the matched layers, and the mean and spread of its
  off-diagonal entries (every pair of different members) against depth.
- **Teacher and students** (distillation): which student is closest to the
  teacher, and where? One panel per student (teacher layers x student layers,
  one colour scale for all), the best-matching layer of each student for every
  teacher layer in one table, and the per-minibatch CKA of the layer pairs the
  study names, for every student.

A view is plain data: which run plays which part, under which label. ``ckapipe
run`` keeps it beside the results as ``view.json``, so that ``ckapipe plot``
draws the same figures again::

    from ckapipe.analyze.views import EnsembleView, plot_view
    plot_view("results/ensemble/members", EnsembleView(members=("m0", "m1", "m2")))
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ckapipe.analyze import plots
from ckapipe.analyze.results import Results, load_results
from ckapipe.atomic import atomic_path
from ckapipe.errors import CkapipeError, suggest

VIEW_FILE = "view.json"


class _Labels:
    """Views name runs by label (the study's run names); ``runs`` maps a label to its run in the
    results (a store name, key or slug), the label itself when absent."""

    runs: dict

    def run(self, label: str) -> str:
        return self.runs.get(label, label)


@dataclass(frozen=True)
class EnsembleView(_Labels):
    """An ensemble: its members, and optionally their matched layers (label -> layers, shallow to deep)."""

    members: tuple[str, ...]
    layers: dict[str, tuple[str, ...]] | None = None
    runs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherView(_Labels):
    """A teacher, its students, and the (teacher layer, student layer) pairs of the per-minibatch views."""

    teacher: str
    students: tuple[str, ...]
    layers: tuple[tuple[str, str], ...] = ()
    runs: dict[str, str] = field(default_factory=dict)


VIEWS = {"ensemble": EnsembleView, "teacher": TeacherView}


# --------------------------------------------------------------------------- the view file


def write_view(view, directory: str | os.PathLike) -> Path:
    """Keep the view beside the results it reads (atomic write); return the file."""
    kind = next(k for k, cls in VIEWS.items() if isinstance(view, cls))
    path = Path(directory) / VIEW_FILE
    with atomic_path(path, replace=True) as tmp:
        tmp.write_text(json.dumps({"view": kind, **asdict(view)}, indent=1) + "\n")
    return path


def read_view(directory: str | os.PathLike):
    """The view kept in a results directory, or None when it has none."""
    path = Path(directory) / VIEW_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        cls = VIEWS[data.pop("view")]
        if cls is EnsembleView:
            layers = data.get("layers")
            data.update(members=tuple(data["members"]),
                        layers={k: tuple(v) for k, v in layers.items()} if layers else None)
        else:
            data.update(students=tuple(data["students"]), layers=tuple(tuple(p) for p in data.get("layers", ())))
        return cls(**data)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CkapipeError(f"{path} is not a ckapipe view file (written by ckapipe run): remove it or run the study again") from None


def check_view(view, layer_names: Callable[[str], list[str]]) -> None:
    """Every layer the view names exists (``layer_names(label)``), or a one-line error with the nearest."""
    if isinstance(view, EnsembleView):
        named = [(m, layer) for m, layers in (view.layers or {}).items() for layer in layers]
    else:
        named = [(view.teacher, lt) for lt, _ in view.layers]
        named += [(s, ls) for s in view.students for _, ls in view.layers]
    for label, layer in named:
        layers = layer_names(label)
        if layer not in layers:
            raise CkapipeError(f"run {label} has no layer {layer!r}{suggest(layer, layers)} (its layers: {', '.join(layers)})")


# --------------------------------------------------------------------------- ensembles


def ensemble_depths(results: Results, view: EnsembleView) -> list[dict[str, str]]:
    """The members' matched layers, shallow to deep: one {member: layer} per depth.

    The view's layers when it names them; the shared layer names when every member
    has the same; else by relative depth: with D the fewest layers of any member,
    depth i (0-based) takes from a member of L layers the layer j whose relative
    depth (j + 1) / L is nearest (i + 1) / D, j = floor((i + 1) L / D + 1/2) - 1.
    """
    if view.layers:
        return [dict(zip(view.members, row)) for row in zip(*(view.layers[m] for m in view.members))]
    names = {m: results.layer_names(view.run(m)) for m in view.members}
    depth = min(len(layers) for layers in names.values())
    return [{m: layers[math.floor((i + 1) * len(layers) / depth + 0.5) - 1] for m, layers in names.items()}
            for i in range(depth)]


def member_matrix(results: Results, view: EnsembleView, depth: dict[str, str]) -> np.ndarray:
    """(n, n) CKA of every pair of members at one depth: entry (i, j) = CKA(member i's layer, member j's)."""
    n = len(view.members)
    out = np.empty((n, n))
    for i, a in enumerate(view.members):
        for j, b in enumerate(view.members):
            ra, rb = view.run(a), view.run(b)
            out[i, j] = results.cka(ra, rb).values[results.layer_index(ra, depth[a]), results.layer_index(rb, depth[b])]
    return out


def diversity(matrix: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (over pairs, ddof 0), min and max of the CKA of every pair of different members."""
    pairs = matrix[np.triu_indices(len(matrix), 1)]
    pairs = pairs[np.isfinite(pairs)]
    if not len(pairs):
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(pairs.mean()), "sd": float(pairs.std()), "min": float(pairs.min()), "max": float(pairs.max())}


def ensemble_rows(results: Results, view: EnsembleView) -> list[dict]:
    """One row per depth: its matched layers, and the diversity of the members there."""
    depths = ensemble_depths(results, view)
    rows = []
    for i, depth in enumerate(depths):
        row = {"depth": i + 1, "relative_depth": (i + 1) / len(depths)}
        row.update({f"layer {m}": depth[m] for m in view.members})
        row.update(diversity(member_matrix(results, view, depth)))
        row["pairs"] = len(view.members) * (len(view.members) - 1) // 2
        rows.append(row)
    return rows


def depth_label(depth: dict[str, str]) -> str:
    layers = list(dict.fromkeys(depth.values()))
    return layers[0] if len(layers) == 1 else "/".join(layers)


def ensemble_layers_figure(results: Results, view: EnsembleView, fig=None):
    """A panel per depth: the member x member CKA matrix, one colour scale for every panel."""
    depths = ensemble_depths(results, view)
    members = list(view.members)
    fig = plots.matrix_panels([member_matrix(results, view, depth) for depth in depths], [members] * len(depths),
                              [members] * len(depths), [f"{i + 1}: {depth_label(d)}" for i, d in enumerate(depths)],
                              fig=fig, gids=[f"depth-{i + 1}" for i in range(len(depths))])
    fig.suptitle(f"ensemble of {len(members)}: CKA of every pair of members at each depth, m={results.m}, "
                 f"{len(results.minibatches)} minibatches", fontsize=9)
    return fig


def ensemble_diversity_figure(results: Results, view: EnsembleView, ax=None):
    """Mean CKA between different members against depth, with its standard deviation and range."""
    rows = ensemble_rows(results, view)
    stats = {key: np.array([row[key] for row in rows]) for key in ("mean", "sd", "min", "max")}
    return plots.diversity_figure(
        [depth_label(d) for d in ensemble_depths(results, view)], stats, ax=ax,
        xlabel="depth (matched layers)" if view.layers else "depth (layers matched by relative depth)",
        title=f"ensemble of {len(view.members)} members ({rows[0]['pairs']} pairs): how alike, layer by layer")


def ensemble_figures(results: Results, view: EnsembleView) -> dict:
    """File stem -> figure."""
    return {"ensemble_layers": ensemble_layers_figure(results, view),
            "ensemble_diversity": ensemble_diversity_figure(results, view)}


# --------------------------------------------------------------------------- teacher and students


def teacher_figure(results: Results, view: TeacherView, fig=None):
    """One panel per student: teacher layers (y) x student layers (x), one colour scale (0 to 1), one colour bar."""
    teacher = view.run(view.teacher)
    students = [view.run(s) for s in view.students]
    fig = plots.grid_figure(results, [(teacher, s) for s in students], fig=fig)
    for ax, student in zip(fig.axes, view.students):
        ax.get_images()[0].set_gid(f"student-{student}")
        ax.set_ylabel(f"{teacher_name(view)} layers", fontsize=8)
        ax.set_xlabel(f"{student} layers", fontsize=8)
        ax.set_title(student, fontsize=9)
    fig.suptitle(f"{teacher_name(view)} against each student, m={results.m}, {len(results.minibatches)} minibatches",
                 fontsize=9)
    return fig


def teacher_name(view: TeacherView) -> str:
    return "teacher" if view.teacher == "teacher" else f"teacher {view.teacher}"


def best_match_rows(results: Results, view: TeacherView) -> list[dict]:
    """Per teacher layer: each student's best-matching layer and its CKA."""
    teacher = view.run(view.teacher)
    rows = [{"teacher_layer": layer} for layer in results.layer_names(teacher)]
    for student in view.students:
        for row, (_, best, value) in zip(rows, results.best_matches(teacher, view.run(student)).itertuples(index=False)):
            row[f"{student} layer"] = best
            row[f"{student} cka"] = value
    return rows


def best_match_text(rows: list[dict], view: TeacherView) -> str:
    """The table as text: a teacher layer per line, a column per student (best layer and CKA)."""
    cells = [[row["teacher_layer"]] + [f"{row[f'{s} layer']} {row[f'{s} cka']:.4f}" for s in view.students]
             for row in rows]
    header = [f"{teacher_name(view)} layer", *view.students]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *cells)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *cells]]
    return "best-matching student layer and its CKA, per teacher layer\n\n" + "\n".join(lines) + "\n"


def teacher_figures(results: Results, view: TeacherView) -> dict:
    """File stem -> figure: the students' panels, and a per-minibatch view per student and named layer pair."""
    figures = {"teacher_students": teacher_figure(results, view)}
    teacher = view.run(view.teacher)
    for student in view.students:
        for lt, ls in view.layers:
            stem = f"minibatch_{plots.safe(view.teacher)}_{plots.safe(lt)}__{plots.safe(student)}_{plots.safe(ls)}"
            fig = plots.minibatch_figure(results, teacher, view.run(student), lt, ls)
            fig.suptitle(f"{teacher_name(view)}: {lt} vs {student}: {ls}, per minibatch, m={results.m}")
            figures[stem] = fig
    return figures


# --------------------------------------------------------------------------- drawing


def plot_view(results_or_path, view=None, out_dir=None) -> list[Path]:
    """Write the view's figures (PNG and PDF) and tables; return the paths written.

    ``view`` defaults to the one kept in the results directory; ``out_dir`` to RESULTS/plots.
    """
    results = results_or_path if isinstance(results_or_path, Results) else load_results(results_or_path)
    if view is None:
        view = read_view(results.path) if results.path else None
        if view is None:
            raise CkapipeError(f"{results.path} has no {VIEW_FILE}: pass the view to draw")
    check_view(view, lambda label: results.layer_names(view.run(label)))
    out = plots.plots_dir(results, out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(view, EnsembleView):
        figures = ensemble_figures(results, view)
        tables = {"ensemble.csv": rows_to_csv(ensemble_rows(results, view))}
    else:
        figures = teacher_figures(results, view)
        rows = best_match_rows(results, view)
        tables = {"best_matches.csv": rows_to_csv(rows), "best_matches.txt": best_match_text(rows, view)}
    written = []
    for stem, fig in figures.items():
        written += plots.save(fig, out / stem)
    for name, text in tables.items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


__all__ = ["EnsembleView", "TeacherView", "plot_view", "read_view", "write_view", "check_view",
           "ensemble_depths", "member_matrix", "diversity", "ensemble_rows", "best_match_rows",
           "ensemble_figures", "teacher_figures"]

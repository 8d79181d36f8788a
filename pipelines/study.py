"""Pipeline files: a study described once in YAML, loaded safely and validated.

A pipeline file names its runs (model × dataset × extraction settings) and its
comparisons (which runs to analyze together), and where the cache and the
results go. Every mistake is reported as one line naming the file, the line
and the key, e.g.::

    pipelines/x.yaml:14: comparisons.seeds.runs[1]: no run 'cnn3-s2' in this study; did you mean: cnn3-s1?

The schema (every section but ``runs`` is optional)::

    study: NAME                      # results go to RESULTS/NAME/
    cache: DIR                       # default: cache
    results: DIR                     # default: results
    extract:   {dataset, layers, batch_size, order_seed, dtype, device,
                reduction, limit, grams, grams_only}      # defaults of every run (settings.RunSettings)
    runs:      {RUN: MODEL-SPEC | {model: SPEC, <any extract key>}}
    comparisons:
      NAME: {runs: [RUN, ...] | all}                      # all pairs among them
      NAME: {teacher: RUN, students: [RUN, ...],
             layers: [LAYER | [TEACHER-LAYER, STUDENT-LAYER], ...]}  # per-minibatch views of these
      NAME: {ensemble: [RUN, ...],                        # every member vs every other
             layers: [LAYER, ...] | {RUN: [LAYER, ...]}}  # matched layers (default: relative depth)
      NAME: {pairs: [[RUN, RUN], ...]}
      NAME: {trajectory: {checkpoints: [SPEC] | {SERIES: SPEC, ...},   # SPEC holds {step}
                          steps: [1, 5, ...], reference: RUN, arch: SPEC, rankme: minibatch|full|none}}
            # + optional: pair_by_position, batch_size, measures: [linear, rbf:0.5, ...]
    analyze:   {batch_size, device, completed_only, use_gram_cache, measures}
    dask:      {scheduler, scheduler_file, cluster: threads|local|slurm, workers,
                threads_per_worker, dashboard: ADDRESS, no_workers_timeout: SECONDS}
    slurm:     {partition, account, time, mem, gres, cpus_per_task, extra: [...],
                setup: [...], tasks_per_run, analyze: {same keys}}

A trajectory comparison adds a run per checkpoint (``COMPARISON-SERIES-stepS``,
extracted with the extract section's settings, like any run of the job array) and
compares each with the reference run (default: the last checkpoint of its series),
layer by layer, against the step (``analyze.trajectory``).

Relative paths (cache, results, checkpoint files) are relative to the current
directory, where ``make`` and ``ckapipe run`` are started.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from dask.utils import parse_timedelta

from ckapipe.analyze.measures import parse_measures
from ckapipe.errors import CkapipeError, PipelineError, StoreError, suggest
from ckapipe.kernels import MIN_MINIBATCH
from ckapipe.settings import DEFAULT_BATCH, SETTING_FIELDS, RunSettings, choices_of, yaml_keys
from ckapipe.store import RUN_NAME, check_run_name, default_cache


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, kw_only=True)
class RunConfig(RunSettings):
    """One extraction run of the study: ``model`` over ``dataset`` with its settings (its name the run's)."""

    model: str
    dataset: str
    batch_size: int = DEFAULT_BATCH  # a study's data are specs: m is never a DataLoader's

    @property
    def settings(self) -> RunSettings:
        """What ``extract_run`` is given besides model, dataset and cache."""
        return RunSettings(**{name: getattr(self, name) for name in SETTING_FIELDS})

    @property
    def fingerprint(self) -> str:
        """Hash of what determines the run's store (device excluded): a changed run is noticed."""
        keys = ("name", "model", "dataset", *(key for key in yaml_keys() if key not in ("device", "grams")))
        blob = json.dumps({key: getattr(self, key) for key in keys}, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Trajectory:
    """A series of checkpoints per training (``series``: name -> ((step, run), ...), steps increasing),
    each compared with ``reference`` (None: the series' last checkpoint)."""

    series: tuple[tuple[str, tuple[tuple[int, str], ...]], ...]
    reference: str | None = None
    rankme: str = "minibatch"  # minibatch (from the Gram cache), full (reads the activations) or none

    def reference_of(self, series: str) -> str:
        return self.reference or dict(self.series)[series][-1][1]


@dataclass(frozen=True)
class Comparison:
    """One analysis: the runs it reads, the pairs it is about, and the question its kind asks.

    ``layers``: for an ensemble, the matched layers of each member ({run: (layer, ...)},
    shallow to deep; None: matched by relative depth); for a teacher (``runs[0]``) and
    its students, the (teacher layer, student layer) pairs of the per-minibatch views.
    """

    name: str
    runs: tuple[str, ...]
    pairs: tuple[tuple[str, str], ...]
    pair_by_position: bool = False
    batch_size: int | None = None
    measures: tuple[str, ...] | None = None
    trajectory: Trajectory | None = None
    new_runs: tuple[RunConfig, ...] = ()  # the trajectory's checkpoint runs
    kind: str = "runs"  # runs, teacher, ensemble, pairs or trajectory
    layers: Any = None


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    cache: Path
    results: Path  # RESULTS/NAME: this study's results directory
    runs: dict[str, RunConfig]
    comparisons: dict[str, Comparison]
    analyze: dict = field(default_factory=dict)
    dask: dict = field(default_factory=dict)
    slurm: dict = field(default_factory=dict)

    def comparison_dir(self, comparison: Comparison) -> Path:
        return self.results / comparison.name

    @property
    def slurm_dir(self) -> Path:
        """Where the job scripts go; their logs (and Dask worker jobs' logs) go in ``logs/`` below."""
        return self.results / "slurm"

    @property
    def slurm_logs(self) -> Path:
        return self.slurm_dir / "logs"

    def job_settings(self, kind: str, overrides: dict | None = None) -> dict:
        """SLURM directives of the ``extract`` or ``analyze`` jobs: the slurm section (its
        ``analyze`` part for analysis jobs and Dask worker jobs), then ``overrides``."""
        settings = {k: v for k, v in self.slurm.items() if k not in ("analyze", "tasks_per_run")}
        if kind == "analyze":
            settings.update(self.slurm.get("analyze", {}))
        settings.update({k: v for k, v in (overrides or {}).items() if v not in (None, (), [])})
        return settings


# --------------------------------------------------------------------------- schema

EXTRACT_KEYS: dict[str, type | tuple] = {"dataset": str, **yaml_keys()}  # the run settings a study sets
KINDS = ("runs", "teacher", "ensemble", "pairs", "trajectory")
ANALYZE_KEYS = {"batch_size": (int, type(None)), "device": str, "completed_only": bool, "use_gram_cache": bool,
                "measures": list}
TRAJECTORY_KEYS = {"checkpoints": (list, dict), "steps": list, "reference": str, "arch": str, "rankme": str}
RANKME_CHOICES = ("minibatch", "full", "none")
DASK_KEYS = {
    "scheduler": (str, type(None)), "scheduler_file": (str, type(None)), "cluster": str,
    "workers": int, "threads_per_worker": int, "dashboard": (str, bool), "no_workers_timeout": (int, float, str),
}
DASK_CLUSTERS = ("threads", "local", "slurm")
SLURM_JOB_KEYS = {
    "partition": str, "account": str, "time": str, "mem": str, "gres": str, "cpus_per_task": int,
    "extra": list, "setup": list,
}
SLURM_KEYS = {**SLURM_JOB_KEYS, "tasks_per_run": int, "analyze": dict}
TOP_KEYS = {
    "study": str, "cache": str, "results": str, "extract": dict, "runs": dict, "comparisons": dict,
    "analyze": dict, "dask": dict, "slurm": dict,
}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a mapping",
              type(None): "null", float: "a number"}


class Source:
    """The pipeline file being read: turns YAML nodes into values or located errors."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, node: yaml.Node | None, where: str, message: str) -> PipelineError:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        place = f" {where}:" if where else ""
        return PipelineError(f"{self.path}{line}:{place} {message}")

    def value(self, node: yaml.Node) -> Any:
        try:
            return yaml.SafeLoader("").construct_document(node)
        except yaml.MarkedYAMLError as err:
            raise self.error(node, "", f"invalid YAML: {err.problem}") from None

    def typed(self, node: yaml.Node, where: str, expected) -> Any:
        """The node's value, refused unless of the expected type(s) (bool is not an int)."""
        expected = expected if isinstance(expected, tuple) else (expected,)
        value = self.value(node)
        if not any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in expected):
            wanted = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in expected)
            shown = {dict: "a mapping", list: "a list"}.get(type(value), repr(value))
            raise self.error(node, where, f"expected {wanted}, got {shown}")
        return value

    def mapping(self, node: yaml.Node, where: str, allowed: dict | None = None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """Key -> (key node, value node); refuses non-mappings, duplicate and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.typed(node, where, dict)
        items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node)
            here = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str):
                raise self.error(key_node, where or "top level", f"key {key!r} is not a string")
            if key in items:
                raise self.error(key_node, here, "duplicate key")
            if allowed is not None and key not in allowed:
                raise self.error(key_node, here, f"unknown key{suggest(key, list(allowed))} "
                                                 f"(allowed: {', '.join(allowed)})")
            items[key] = (key_node, value_node)
        return items

    def section(self, items: dict, where: str, schema: dict) -> dict[str, Any]:
        """Typed values of a flat mapping whose keys were checked against ``schema``."""
        prefix = f"{where}." if where else ""
        return {key: self.typed(v, prefix + key, schema[key]) for key, (_, v) in items.items()}

    def strings(self, node: yaml.Node, where: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            self.typed(node, where, list)
        return [self.typed(item, f"{where}[{i}]", str) for i, item in enumerate(node.value)]


# --------------------------------------------------------------------------- loading


PACKAGED = Path(__file__).parent  # default.yaml and examples/*.yaml: package data, installed with ckapipe


def packaged_studies() -> dict[str, Path]:
    """The studies shipped with ckapipe, by name: ``default`` and the stem of each examples/*.yaml."""
    examples = sorted((PACKAGED / "examples").glob("*.yaml"), key=lambda path: path.stem)
    return {path.stem: path for path in [PACKAGED / "default.yaml", *examples]}


def study_summary(path: Path) -> str:
    """The first sentence of a pipeline file's opening comment: what the study is about."""
    lines = []
    for line in path.read_text().splitlines():
        text = line.lstrip("#").strip()
        if not line.startswith("#") or (not text and lines):
            break
        lines.append(text)
    sentence = " ".join(lines).strip()
    return re.split(r"(?<=[.?!])\s+", sentence)[0]


def study_file(pipeline: str | os.PathLike) -> Path:
    """A pipeline file's path, or a packaged study's (``ckapipe run default`` works from a pip install):
    a name with no folder and no .yaml that is not a file here names a packaged study."""
    path = Path(pipeline)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) != 1:
        return path
    return packaged_study(path.name)


def packaged_study(name: str) -> Path:
    """The pipeline file of the packaged study ``name``, or a one-line error with the nearest names."""
    studies = packaged_studies()
    if name not in studies:
        raise PipelineError(f"{name}: no such pipeline file, nor a packaged study{suggest(name, list(studies))} "
                            f"(ckapipe examples lists them)")
    return studies[name]


def load_study(path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
               results: str | os.PathLike | None = None) -> Study:
    """Read and validate a pipeline file, or a packaged study by name (``default``); ``cache``/``results``
    override the file's."""
    path = study_file(path)
    source = Source(path)
    root = compose(path)
    top = source.mapping(root, "", TOP_KEYS)
    if "runs" not in top:
        raise source.error(root, "runs", "missing: a study needs at least one run")
    values = {key: source.typed(v, key, TOP_KEYS[key]) for key, (_, v) in top.items()
              if TOP_KEYS[key] is str}
    name = values.get("study", path.stem)
    if not RUN_NAME.match(name):
        raise source.error(top["study"][1], "study", f"{name!r} is not a usable directory name")
    defaults = load_extract_defaults(source, top.get("extract"))
    runs = load_runs(source, top["runs"][1], defaults)
    comparisons = load_comparisons(source, top.get("comparisons"), runs, defaults)
    runs = {**runs, **{run.name: run for c in comparisons.values() for run in c.new_runs}}
    return Study(
        name=name, path=path.resolve(),
        cache=Path(cache or values.get("cache") or default_cache()).resolve(),
        results=(Path(results or values.get("results", "results")) / name).resolve(),
        runs=runs, comparisons=comparisons,
        analyze=load_analyze(source, top.get("analyze")),
        dask=load_dask(source, top.get("dask")),
        slurm=load_slurm(source, top.get("slurm")),
    )


def compose(path: Path) -> yaml.Node:
    """The YAML node tree of the file (safe loader), or a one-line error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such pipeline file") from None
    except OSError as err:
        raise PipelineError(f"{path}: cannot read pipeline file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise PipelineError(f"{path}: not UTF-8 text (byte {err.start}): save the pipeline file as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PipelineError(f"{path}{line}: invalid YAML: {err.problem or err.context}") from None
    if root is None:
        raise PipelineError(f"{path}: the pipeline file is empty")
    return root


def load_flat(source: Source, entry, where: str, schema: dict) -> dict:
    if entry is None:
        return {}
    return source.section(source.mapping(entry[1], where, schema), where, schema)


def load_extract_defaults(source: Source, entry) -> dict[str, tuple[yaml.Node, Any]]:
    """The ``extract`` section, with nodes kept so later errors can point at them."""
    if entry is None:
        return {}
    items = source.mapping(entry[1], "extract", EXTRACT_KEYS)
    return {key: (v, load_extract_value(source, v, f"extract.{key}", key)) for key, (_, v) in items.items()}


def load_extract_value(source: Source, node: yaml.Node, where: str, key: str) -> Any:
    if key == "layers":
        layers = source.strings(node, where)
        if not layers:
            raise source.error(node, where, "empty: name at least one layer or glob")
        return tuple(layers)
    value = source.typed(node, where, EXTRACT_KEYS[key])
    choices = choices_of(key)
    if choices and value not in choices:
        raise source.error(node, where, f"{value!r} is not one of {', '.join(choices)}")
    if key == "batch_size" and value < MIN_MINIBATCH:
        raise source.error(node, where, f"{value} is under {MIN_MINIBATCH}: the unbiased HSIC needs minibatches of "
                                        f"at least {MIN_MINIBATCH}")
    if key == "limit" and value is not None and value < 1:
        raise source.error(node, where, f"{value} is not a positive number of samples")
    return value


def load_runs(source: Source, node: yaml.Node, defaults: dict) -> dict[str, RunConfig]:
    items = source.mapping(node, "runs")
    if not items:
        raise source.error(node, "runs", "empty: a study needs at least one run")
    return {name: load_run(source, name, key_node, value_node, defaults)
            for name, (key_node, value_node) in items.items()}


def load_run(source: Source, name: str, key_node, node: yaml.Node, defaults: dict) -> RunConfig:
    where = f"runs.{name}"
    try:
        check_run_name(name)  # it names the run's store: the same rule as --name
    except StoreError as err:
        raise source.error(key_node, where, str(err)) from None
    if isinstance(node, yaml.ScalarNode):
        settings = {"model": (node, source.typed(node, where, str))}
    else:
        items = source.mapping(node, where, {"model": str, **EXTRACT_KEYS})
        settings = {key: (v, source.typed(v, f"{where}.{key}", str) if key == "model"
                          else load_extract_value(source, v, f"{where}.{key}", key))
                    for key, (_, v) in items.items()}
    merged = {**defaults, **settings}
    for required in ("model", "dataset"):
        if required not in merged:
            raise source.error(node, where, f"no {required}: give it here or in the extract section")
    check_checkpoint(source, *merged["model"], f"{where}.model")
    return run_config(source, node, where, name, merged)


def run_config(source: Source, node: yaml.Node, where: str, name: str, merged: dict) -> RunConfig:
    """The run of these settings (key -> (node, value)), or the settings' one-line error at its place."""
    try:
        return RunConfig(name=name, **{key: value for key, (_, value) in merged.items()})
    except CkapipeError as err:
        raise source.error(node, where, str(err)) from None


def check_checkpoint(source: Source, node: yaml.Node, model: str, where: str) -> None:
    """A model given as a file path must exist (the other specs are checked by extract)."""
    head = model.split("?")[0]
    looks_like_file = ":" not in head and ("/" in head or head.endswith((".pt", ".pth", ".ckpt", ".ts")))
    if looks_like_file and not Path(head).exists():
        raise source.error(node, where, f"checkpoint file {head} does not exist")


def load_comparisons(source: Source, entry, runs: dict[str, RunConfig], defaults: dict | None = None) -> dict[str, Comparison]:
    if entry is None:
        return {}
    items = source.mapping(entry[1], "comparisons")
    comparisons: dict[str, Comparison] = {}
    for name, (_, node) in items.items():
        comparisons[name] = load_comparison(source, name, node, runs, defaults or {})
        for run in comparisons[name].new_runs:
            if run.name in runs or any(run.name in {r.name for r in c.new_runs} for c in list(comparisons.values())[:-1]):
                raise source.error(node, f"comparisons.{name}.trajectory", f"checkpoint run {run.name!r} is named twice")
    return comparisons


def load_comparison(source: Source, name: str, node: yaml.Node, runs: dict[str, RunConfig],
                    defaults: dict | None = None) -> Comparison:
    where = f"comparisons.{name}"
    if not RUN_NAME.match(name):
        raise source.error(node, where, "a comparison name may hold letters, digits and _ . + @ = - only")
    schema = {"runs": (list, str), "teacher": str, "students": list, "ensemble": list, "pairs": list,
              "trajectory": dict, "pair_by_position": bool, "batch_size": int, "measures": list,
              "layers": (list, dict)}
    items = source.mapping(node, where, schema)
    kinds = [k for k in KINDS if k in items]
    if len(kinds) != 1:
        raise source.error(node, where, "give exactly one of runs, teacher (with students), ensemble, pairs, trajectory"
                           + (f" (got {', '.join(kinds)})" if kinds else ""))
    run_name = run_checker(source, runs)
    kind = kinds[0]
    if "students" in items and kind != "teacher":
        raise source.error(items["students"][0], f"{where}.students", "students need a teacher")
    if "layers" in items and kind not in ("teacher", "ensemble"):
        raise source.error(items["layers"][0], f"{where}.layers", "layers go with an ensemble or a teacher")
    if kind == "runs":
        members, pairs = load_run_set(source, items["runs"][1], f"{where}.runs", runs, run_name)
    elif kind == "ensemble":
        members, pairs = load_run_set(source, items["ensemble"][1], f"{where}.ensemble", runs, run_name)
    elif kind == "teacher":
        members, pairs = load_teacher(source, items, where, run_name)
    elif kind == "trajectory":
        trajectory, new_runs = load_trajectory(source, name, items["trajectory"][1], f"{where}.trajectory",
                                               run_name, defaults or {})
        members, pairs = trajectory_pairs(trajectory)
    else:
        members, pairs = load_pairs(source, items["pairs"][1], f"{where}.pairs", run_name)
    layers = None
    if "layers" in items:
        load = load_member_layers if kind == "ensemble" else load_layer_pairs
        layers = load(source, items["layers"][1], f"{where}.layers", members)
    options = source.section({k: v for k, v in items.items() if k in ("pair_by_position", "batch_size")},
                             where, schema)
    if "measures" in items:
        options["measures"] = load_measures(source, items["measures"][1], f"{where}.measures")
    if kind == "trajectory":
        options.update(trajectory=trajectory, new_runs=tuple(new_runs))
    return Comparison(name=name, runs=tuple(members), pairs=tuple(pairs), kind=kind, layers=layers, **options)


def load_member_layers(source, node, where, members) -> dict[str, tuple[str, ...]]:
    """An ensemble's matched layers: one list for every member, or one list per member, of one length."""
    if isinstance(node, yaml.SequenceNode):
        layers = tuple(non_empty(source, node, where))
        return {member: layers for member in members}
    items = source.mapping(node, where, {member: list for member in members})
    missing = [m for m in members if m not in items]
    if missing:
        raise source.error(node, where, f"no layers for {', '.join(missing)}: name the matched layers of every member")
    out = {m: tuple(non_empty(source, items[m][1], f"{where}.{m}")) for m in members}
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1:
        counts = ", ".join(f"{m}: {len(v)}" for m, v in out.items())
        raise source.error(node, where, f"every member needs as many matched layers ({counts})")
    return out


def load_layer_pairs(source, node, where, members) -> tuple[tuple[str, str], ...]:
    """Teacher/student layer pairs: ``LAYER`` (the same name in both) or ``[TEACHER-LAYER, STUDENT-LAYER]``."""
    pairs = []
    for i, item in enumerate(source_items(source, node, where)):
        here = f"{where}[{i}]"
        if isinstance(item, yaml.SequenceNode):
            pair = source.strings(item, here)
            if len(pair) != 2:
                raise source.error(item, here, f"a layer pair names a teacher layer and a student layer, got {len(pair)}")
            pairs.append(tuple(pair))
        else:
            layer = source.typed(item, here, str)
            pairs.append((layer, layer))
    if not pairs:
        raise source.error(node, where, "empty: name at least one layer")
    return tuple(pairs)


def non_empty(source, node, where) -> list[str]:
    layers = source.strings(node, where)
    if not layers:
        raise source.error(node, where, "empty: name at least one layer")
    return layers


def load_measures(source: Source, node: yaml.Node, where: str) -> tuple[str, ...]:
    """Measure spellings (analyze.measures), checked here so that a typo names its line."""
    names = source.strings(node, where)
    try:
        return tuple(measure.name for measure in parse_measures(names))
    except CkapipeError as err:
        raise source.error(node, where, str(err)) from None


def load_analyze(source: Source, entry) -> dict:
    analyze = load_flat(source, entry, "analyze", ANALYZE_KEYS)
    if "measures" in analyze:
        node = source.mapping(entry[1], "analyze", ANALYZE_KEYS)["measures"][1]
        analyze["measures"] = load_measures(source, node, "analyze.measures")
    return analyze


def load_trajectory(source: Source, comparison: str, node: yaml.Node, where: str, run_name,
                    defaults: dict) -> tuple[Trajectory, list[RunConfig]]:
    """The trajectory section: its checkpoint runs (one per series and step) and what they are compared with."""
    items = source.mapping(node, where, TRAJECTORY_KEYS)
    for required in ("checkpoints", "steps"):
        if required not in items:
            raise source.error(node, f"{where}.{required}", "missing: a trajectory needs checkpoints and steps")
    patterns_node = items["checkpoints"][1]
    if isinstance(patterns_node, yaml.MappingNode):
        patterns = {key: source.typed(v, f"{where}.checkpoints.{key}", str)
                    for key, (_, v) in source.mapping(patterns_node, f"{where}.checkpoints").items()}
    else:
        listed = source.strings(patterns_node, f"{where}.checkpoints")
        if len(listed) != 1:
            raise source.error(patterns_node, f"{where}.checkpoints",
                               f"{len(listed)} checkpoint patterns: name each series, e.g. {{kd: PATTERN, ce: PATTERN}}")
        patterns = {comparison: listed[0]}
    steps_node = items["steps"][1]
    steps = [source.typed(item, f"{where}.steps[{i}]", int) for i, item in enumerate(source_items(source, steps_node, f"{where}.steps"))]
    if not steps or min(steps) < 0 or len(set(steps)) != len(steps):
        raise source.error(steps_node, f"{where}.steps", "give distinct steps, at least one, none negative")
    steps = sorted(steps)
    reference = run_name(items["reference"][1], f"{where}.reference") if "reference" in items else None
    rankme = source.typed(items["rankme"][1], f"{where}.rankme", str) if "rankme" in items else "minibatch"
    if rankme not in RANKME_CHOICES:
        raise source.error(items["rankme"][1], f"{where}.rankme", f"{rankme!r} is not one of {', '.join(RANKME_CHOICES)}")
    arch = source.typed(items["arch"][1], f"{where}.arch", str) if "arch" in items else None
    series, new_runs = [], []
    for label, pattern in patterns.items():
        here = f"{where}.checkpoints" + (f".{label}" if isinstance(patterns_node, yaml.MappingNode) else "")
        if "{step}" not in pattern:
            raise source.error(patterns_node, here, f"checkpoint pattern {pattern!r} has no {{step}}")
        points = []
        for step in steps:
            run = f"{comparison}-step{step}" if label == comparison else f"{comparison}-{label}-step{step}"
            if not RUN_NAME.match(run):
                raise source.error(patterns_node, here, f"series name {label!r} makes the run name {run!r} unusable")
            model = pattern.replace("{step}", str(step))
            if arch:
                model += ("&" if "?" in model else "?") + f"arch={arch}"
            merged = {**defaults, "model": (patterns_node, model)}
            if "dataset" not in merged:
                raise source.error(node, where, "no dataset for the checkpoints: give it in the extract section")
            check_checkpoint(source, patterns_node, model, here)
            new_runs.append(run_config(source, patterns_node, here, run, merged))
            points.append((step, run))
        series.append((label, tuple(points)))
    return Trajectory(tuple(series), reference, rankme), new_runs


def trajectory_pairs(trajectory: Trajectory) -> tuple[list[str], list[tuple[str, str]]]:
    """The runs of a trajectory comparison (reference first) and its pairs: (reference, checkpoint)."""
    members = [trajectory.reference] if trajectory.reference else []
    pairs = []
    for label, points in trajectory.series:
        members += [run for _, run in points]
        reference = trajectory.reference_of(label)
        pairs += [(reference, run) for _, run in points if run != reference]
    return members, pairs


def run_checker(source: Source, runs: dict) -> Callable[[yaml.Node, str], str]:
    def run_name(node: yaml.Node, where: str) -> str:
        name = source.typed(node, where, str)
        if name not in runs:
            raise source.error(node, where, f"no run {name!r} in this study{suggest(name, list(runs))}")
        return name
    return run_name


def load_run_set(source, node, where, runs, run_name) -> tuple[list[str], list[tuple[str, str]]]:
    """``[a, b, c]`` or ``all``: the runs, and every pair among them."""
    if isinstance(node, yaml.ScalarNode):
        if source.value(node) != "all":
            raise source.error(node, where, f"expected a list of runs or 'all', got {source.value(node)!r}")
        members = list(runs)
    else:
        members = [run_name(item, f"{where}[{i}]") for i, item in enumerate(source_items(source, node, where))]
    members = unique(source, node, where, members)
    if len(members) < 2:
        raise source.error(node, where, "name at least two runs to compare")
    return members, [(a, b) for i, a in enumerate(members) for b in members[i + 1:]]


def load_teacher(source, items, where, run_name):
    if "students" not in items:
        raise source.error(items["teacher"][0], f"{where}.students", "missing: a teacher needs students")
    teacher = run_name(items["teacher"][1], f"{where}.teacher")
    node = items["students"][1]
    students = [run_name(item, f"{where}.students[{i}]")
                for i, item in enumerate(source_items(source, node, f"{where}.students"))]
    if not students:
        raise source.error(node, f"{where}.students", "empty: name at least one student")
    members = unique(source, node, where, [teacher, *students])
    return members, [(teacher, s) for s in students]


def load_pairs(source, node, where, run_name):
    pairs = []
    for i, pair in enumerate(source_items(source, node, where)):
        here = f"{where}[{i}]"
        names = [run_name(item, f"{here}[{j}]") for j, item in enumerate(source_items(source, pair, here))]
        if len(names) != 2:
            raise source.error(pair, here, f"a pair names two runs, got {len(names)}")
        pairs.append(tuple(names))
    if not pairs:
        raise source.error(node, where, "empty: name at least one pair")
    members = list(dict.fromkeys(name for pair in pairs for name in pair))
    return members, pairs


def source_items(source: Source, node: yaml.Node, where: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        source.typed(node, where, list)
    return node.value


def unique(source, node, where, members: list[str]) -> list[str]:
    seen = set()
    for name in members:
        if name in seen:
            raise source.error(node, where, f"run {name!r} is named twice")
        seen.add(name)
    return members


def load_dask(source: Source, entry) -> dict:
    dask = load_flat(source, entry, "dask", DASK_KEYS)
    if dask.get("cluster", "threads") not in DASK_CLUSTERS:
        node = source.mapping(entry[1], "dask", DASK_KEYS)["cluster"][1]
        raise source.error(node, "dask.cluster", f"{dask['cluster']!r} is not one of {', '.join(DASK_CLUSTERS)}")
    if "no_workers_timeout" in dask:
        try:
            parse_timedelta(dask["no_workers_timeout"], default="s")
        except (TypeError, ValueError, KeyError):
            node = source.mapping(entry[1], "dask", DASK_KEYS)["no_workers_timeout"][1]
            raise source.error(node, "dask.no_workers_timeout",
                               f"{dask['no_workers_timeout']!r} is not a duration such as 60, 90s or 10m") from None
    return dask


def load_slurm(source: Source, entry) -> dict:
    if entry is None:
        return {}
    items = source.mapping(entry[1], "slurm", SLURM_KEYS)
    slurm = source.section({k: v for k, v in items.items() if k != "analyze"}, "slurm", SLURM_KEYS)
    for key in ("extra", "setup"):
        if key in items:
            slurm[key] = source.strings(items[key][1], f"slurm.{key}")
    if slurm.get("tasks_per_run", 1) < 1:
        raise source.error(items["tasks_per_run"][1], "slurm.tasks_per_run", "must be at least 1")
    if "analyze" in items:
        sub = source.mapping(items["analyze"][1], "slurm.analyze", SLURM_JOB_KEYS)
        slurm["analyze"] = source.section(sub, "slurm.analyze", SLURM_JOB_KEYS)
        for key in ("extra", "setup"):
            if key in sub:
                slurm["analyze"][key] = source.strings(sub[key][1], f"slurm.analyze.{key}")
    return slurm

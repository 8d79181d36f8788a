"""The fixtures every test module shares, and what the markers mean.

Fixtures
    cache           an empty cache directory, ``tmp_path / "cache"``
    two_runs        two runs written from NumPy into ``cache`` (100 samples, m = 16); their layers
    fake_cupy       tests/fake_cupy.py installed as ``cupy``: the CUDA paths on the CPU, transfers counted
    reads           a Counter of (run slug, layer, chunk) reads through ``Run.read_chunk``
    zoo_cache       (session) a cache whose models/ holds the trained ``zoo:mlp2?seed=0``
    default_study   (session) pipelines/default.yaml extracted and analyzed ONCE per pytest run
                    (once for all of pytest-xdist's workers):
                    {"cache", "results", "study"}; tests that change it work on a copy

Elsewhere in tests/: the float64 formulas in reference.py, stores written from NumPy in
numpy_runs.py, the models and datasets that specs name in spec_factories.py.

Markers: a test marked ``slurm``, ``gpu`` or ``extras`` is skipped, with the reason, when what
it needs is missing, unless the environment variable below says it must be there; then the
missing piece fails it. ``.ci/run`` sets CKAPIPE_REQUIRE_SLURM once ``srun true`` works,
``make test`` sets CKAPIPE_REQUIRE_EXTRAS in .venv-extras, scripts/gpu_check.sh sets
CKAPIPE_REQUIRE_GPU: there a skip cannot hide a test that did not run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

REQUIRED_BY = {"slurm": "CKAPIPE_REQUIRE_SLURM", "gpu": "CKAPIPE_REQUIRE_GPU", "extras": "CKAPIPE_REQUIRE_EXTRAS"}
EXTRAS = ("torchvision", "timm", "transformers", "datasets")


# --------------------------------------------------------------------------- markers


def pytest_runtest_setup(item):
    for marker, variable in REQUIRED_BY.items():
        if item.get_closest_marker(marker) is None:
            continue
        why = MISSING[marker]()
        if why is None:
            continue
        if os.environ.get(variable):
            pytest.fail(f"{why}, and {variable} is set: this test must run here", pytrace=False)
        pytest.skip(why)


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (``--dist loadgroup``): a module's tests run on one worker, so that its
    module fixtures (a study run, a Dask cluster) are built once; the slurm tests, which share one
    single-node SLURM, run one after another on one worker, as their job timeouts assume."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") is not None else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@functools.cache
def slurm_missing() -> str | None:
    """Why SLURM cannot take jobs here, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch not found (CI installs and starts SLURM with .ci/slurm_setup.sh)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer: slurmctld is not running (start it with .ci/slurm_setup.sh)"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable SLURM node (sinfo: {(proc.stdout or proc.stderr).strip() or 'nothing'}); see .ci/slurm_setup.sh"
    return None


@functools.cache
def gpu_missing() -> str | None:
    from ckapipe.devices import gpu_available

    if not gpu_available("cupy"):
        return "no CuPy with a CUDA GPU here (scripts/gpu_check.sh runs the gpu tests on a GPU machine)"
    return None


@functools.cache
def extras_missing() -> str | None:
    """Which extra is not installed. An installed one that fails to import is not a skip: the test fails."""
    absent = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if absent:
        return f"{', '.join(absent)} not installed (make test runs the extras tests in .venv-extras)"
    return None


MISSING = {"slurm": slurm_missing, "gpu": gpu_missing, "extras": extras_missing}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed slurm test reports the queue and the node as they are: a job stuck in PENDING says why."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and item.get_closest_marker("slurm") is not None and shutil.which("squeue"):
        report.sections.append(("SLURM state", slurm_state()))


def slurm_state() -> str:
    commands = (["squeue", "-a", "-o", "%i %j %T %r %M"], ["sinfo", "-N", "-o", "%N %T %E"])
    lines = []
    for command in commands:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
            lines.append(f"$ {' '.join(command)}\n{proc.stdout}{proc.stderr}")
        except (OSError, subprocess.TimeoutExpired) as err:
            lines.append(f"$ {' '.join(command)}: {err}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- stores


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def two_runs(cache):
    """Two runs over the same 100 samples (a ragged tail of 4), float32 storage, large offset in one:
    net-a (layers l0-l2) and net-b (block0-block2), m = 16. Returns their layers, (a, b)."""
    from tests.numpy_runs import make_run, random_layers

    rng = np.random.default_rng(0)
    a = random_layers(rng, 100, [24, 40, 6])
    b = {f"block{i}": (x @ rng.standard_normal((x.shape[1], 12)) + 1e3).astype(np.float32) for i, x in enumerate(a.values())}
    make_run(cache, "net-a", a, 16)
    make_run(cache, "net-b", b, 16)
    return a, b


@pytest.fixture
def fake_cupy(monkeypatch):
    """tests/fake_cupy.py installed as ``cupy`` (its transfer counts at zero): every CuPy path runs
    on the CPU, on arrays that refuse implicit conversion to NumPy; gone after the test."""
    from tests import fake_cupy as standin

    monkeypatch.setitem(sys.modules, "cupy", standin)
    standin.transfers.reset()
    yield standin
    standin.transfers.reset()


@pytest.fixture
def reads(monkeypatch):
    """Counter of (run name, layer, chunk) reads through Run.read_chunk."""
    from ckapipe.store import Run

    counts: Counter = Counter()
    real = Run.read_chunk

    def counting(self, layer, k):
        counts[(self.slug, layer, k)] += 1
        return real(self, layer, k)

    monkeypatch.setattr(Run, "read_chunk", counting)
    return counts


@pytest.fixture(scope="session")
def zoo_cache(tmp_path_factory):
    """A cache whose models/ already holds the trained zoo:mlp2?seed=0 (trained once per run)."""
    from ckapipe.extract.models import load_model

    with built_once(tmp_path_factory, "zoo") as (cache, missing):
        if missing:
            load_model("zoo:mlp2?seed=0", cache=cache)
    return cache


@pytest.fixture(scope="session")
def default_study(tmp_path_factory):
    """pipelines/default.yaml, extracted and analyzed once per pytest run (about 50 s on 2 cores)."""
    from ckapipe.pipelines import run_study
    from ckapipe.pipelines.study import load_study
    from tests.pipeline_helpers import DEFAULT

    with built_once(tmp_path_factory, "default-study") as (base, missing):
        cache, results = base / "cache", base / "results"
        if missing:
            run_study(DEFAULT, cache=cache, results=results, progress=False, say=lambda line: None)
    return {"cache": cache, "results": results, "study": load_study(DEFAULT, cache=cache, results=results)}


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
    """(directory, whether it still has to be built) of a session fixture, built by one process of the
    run: with pytest-xdist's workers (``make test`` runs two) the first builds it, under a file lock,
    and the others wait and reuse it. Marked complete only when the build returned."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    directory, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        missing = not done.exists()
        if missing and directory.exists():
            shutil.rmtree(directory)  # a build that failed half-way
        directory.mkdir(exist_ok=True)
        yield directory, missing
        done.touch()

"""One namespace: everything imports as ckapipe.*, the stages stand on the floor and never on each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STAGES = {"extract": "ckapipe.extract", "analyze": "ckapipe.analyze", "pipelines": "ckapipe.pipelines"}


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (at any depth, in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imports_of(folder: str) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): imported_modules(p) for p in sorted((REPO / folder).glob("*.py"))}


def reaches(names: set[str], package: str) -> bool:
    return any(n == package or n.startswith(package + ".") for n in names)


@pytest.mark.parametrize("stage, other", [("extract", "analyze"), ("analyze", "extract")])
def test_the_stages_never_import_each_other(stage, other):
    offenders = {f: sorted(n for n in names if reaches({n}, STAGES[other]) or n.split(".")[0] == other)
                 for f, names in imports_of(stage).items()}
    assert not {f: n for f, n in offenders.items() if n}, f"{stage} imports {other}"


ROOF = {"__init__.py", "cli.py", "__main__.py", "store_cli.py"}  # the API and the command line: floor 4, above the stages


def test_the_floor_imports_neither_stage():
    offenders = {f: sorted(n for n in names if any(reaches({n}, pkg) or n.split(".")[0] == top
                                                   for top, pkg in STAGES.items()))
                 for f, names in imports_of("ckapipe").items() if Path(f).name not in ROOF}
    assert not {f: n for f, n in offenders.items() if n}


def test_nothing_imports_the_stage_folders_as_top_level_modules():
    tops = {f: sorted(n for n in names if n.split(".")[0] in STAGES)
            for folder in ("ckapipe", *STAGES, "tests", "bench") for f, names in imports_of(folder).items()}
    assert not {f: n for f, n in tops.items() if n}


@pytest.mark.parametrize("cwd", [REPO, None])
@pytest.mark.parametrize("module", sorted(STAGES))
def test_stage_folders_do_not_import_as_top_level_modules(module, cwd, tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=cwd or tmp_path)
    assert proc.returncode != 0
    assert ("ModuleNotFoundError" in proc.stderr) or (f"import {STAGES[module]}" in proc.stderr)
    ok = subprocess.run([sys.executable, "-c", f"import {STAGES[module]}"], capture_output=True, text=True,
                        cwd=cwd or tmp_path)
    assert ok.returncode == 0, ok.stderr


def test_the_api_is_lazy_and_analyze_is_callable():
    code = ("import sys, ckapipe; from ckapipe import analyze, load_results, plot_results; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import ckapipe.analyze as stage; assert analyze is stage and callable(analyze); "
            "import inspect; assert 'cache' in inspect.signature(analyze).parameters; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_a_users_analyze_py_in_the_working_directory_is_never_imported(tmp_path):
    """ckapipe searches the working directory for package.module:factory specs, after its own modules."""
    for name in ("analyze", "extract", "pipelines", "store", "kernels"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / (name + '.imported'))!r}, 'w').close()\n")
    (tmp_path / "mynets.py").write_text("import torch\n\ndef net():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n")
    cache = tmp_path / "cache"
    for args in (["extract", "-m", "mynets:net", "-b", "16", "--limit", "64", "--cache", str(cache), "-q"],
                 ["ls", "--cache", str(cache)],
                 ["analyze", "--cache", str(cache), "net@digits", "--out", str(tmp_path / "out"), "-q"]):
        proc = subprocess.run([sys.executable, "-m", "ckapipe", *args], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("*.imported"))


def test_the_wheel_installs_one_package_ckapipe(tmp_path):
    """What ``pip install .`` (or ``pip install ckapipe``) puts on sys.path: ckapipe and nothing else."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("ckapipe-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"ckapipe"}
    for expected in ("ckapipe/extract/runner.py", "ckapipe/analyze/engine.py", "ckapipe/pipelines/default.yaml",
                     "ckapipe/pipelines/examples/ensemble.yaml", "ckapipe/store/__init__.py"):
        assert expected in names

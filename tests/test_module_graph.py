"""The import graph of ckapipe, drawn from the source (AST, nothing imported): it has no cycle, its
edges point down the floors of docs/design.md, no function imports a ckapipe module, and a function
imports an outside package only when it is optional and says so (``# optional: <package>``).

The one exception is the lazy boundary of torch: the module-level ``__getattr__`` (PEP 562) of the
modules in LAZY_BOUNDARY, whose names need torch, import their module on first use.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"ckapipe": "ckapipe", "extract": "ckapipe.extract", "analyze": "ckapipe.analyze",
            "pipelines": "ckapipe.pipelines"}  # folder -> the package it installs as (pyproject.toml)

FLOORS = {  # bottom (0) to top (4): a module is on the floor of the longest name here that it starts with
    **dict.fromkeys(["ckapipe.errors", "ckapipe.progress", "ckapipe.atomic", "ckapipe.blas", "ckapipe.devices",
                     "ckapipe.globs", "ckapipe.kernels", "ckapipe.settings"], 0),
    # the stores (the package ckapipe.store), and the flags every command shares (--cache names the store's variable)
    **dict.fromkeys(["ckapipe.store", "ckapipe.options"], 1),
    "ckapipe.extract": 2, "ckapipe.analyze": 2,
    "ckapipe.pipelines": 3,
    **dict.fromkeys(["ckapipe", "ckapipe.cli", "ckapipe.__main__", "ckapipe.store_cli"], 4),
}
APART = ("ckapipe.extract", "ckapipe.analyze")  # the two stages never import each other
LAZY_BOUNDARY = {"ckapipe.extract", "ckapipe.pipelines.api"}  # their __getattr__ imports what needs torch
MARK = re.compile(r"#\s*optional:\s*([A-Za-z_][\w]*)")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported: a ckapipe module, or an outside package's top-level name
    line: int
    function: str | None  # the enclosing function, None at module level (class bodies included)
    mark: str | None  # the package named by a trailing ``# optional: <package>``
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    def __str__(self):
        where = f" (in {self.function}())" if self.function else ""
        return f"{self.module}:{self.line} imports {self.target}{where}"


# --------------------------------------------------------------------------- drawing the graph


def module_files(root: Path = REPO, packages: dict[str, str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> its file, for every .py under each package folder (subpackages too)."""
    modules = {}
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def known(name: str, modules) -> str:
    """The module an import of ``name`` runs: ``name`` or its longest prefix that is a module."""
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> list[str]:
    """What an import statement imports: ``from ckapipe import store`` imports ckapipe.store; an
    outside package counts as its top-level name."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the package of this module
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return sorted({known(n, modules) if n.split(".")[0] == "ckapipe" else n.split(".")[0] for n in names})


def imports_of(module: str, path: Path, modules) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    found = []

    def visit(node, function, type_only):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                mark = MARK.search(lines[child.end_lineno - 1])
                for target in targets(child, module, path.name == "__init__.py", modules):
                    found.append(Import(module, target, child.lineno, function, mark and mark.group(1), type_only))
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and function is None else function
            checking = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            visit(child, inner, type_only or checking)

    visit(ast.parse(source), None, False)
    return found


def draw(root: Path = REPO, packages: dict[str, str] = PACKAGES) -> list[Import]:
    """Every import statement of every module of the packages."""
    modules = module_files(root, packages)
    return [i for module, path in modules.items() for i in imports_of(module, path, modules)]


# --------------------------------------------------------------------------- the rules


def floor(module: str, floors: dict[str, int] = FLOORS) -> int | None:
    name = module
    while name not in floors and "." in name:
        name = name.rpartition(".")[0]
    return floors.get(name) if name != "ckapipe" or module == "ckapipe" else None


def internal(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.target.split(".")[0] == "ckapipe"]


def cycles(imports: list[Import]) -> list[list[str]]:
    """Every cycle of the graph of imports that run (type-only ones never do), each once, as a path."""
    edges: dict[str, set[str]] = {}
    for i in internal(imports):
        if not i.type_only and i.target != i.module:
            edges.setdefault(i.module, set()).add(i.target)
    found, done = [], set()

    def walk(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                if frozenset(cycle) not in done:
                    done.add(frozenset(cycle))
                    found.append(cycle)
            elif nxt not in seen:
                seen.add(nxt)
                walk(nxt, path + [nxt])

    for start in sorted(edges):
        seen = {start}
        walk(start, [start])
    return found


def upward(imports: list[Import], floors: dict[str, int] = FLOORS) -> list[str]:
    """Edges to a higher floor, edges between the two stages, and modules on no floor."""
    bad = []
    for i in internal(imports):
        here, there = floor(i.module, floors), floor(i.target, floors)
        if here is None or there is None:
            bad.append(f"{i}: {i.module if here is None else i.target} is on no floor (add it to FLOORS)")
        elif there > here:
            bad.append(f"{i}: floor {here} -> floor {there}")
        elif {stage(i.module), stage(i.target)} == set(APART):
            bad.append(f"{i}: the stages never import each other")
    return bad


def stage(module: str) -> str | None:
    """The stage of APART that the module is in, if any."""
    return next((p for p in APART if module == p or module.startswith(p + ".")), None)


def late(imports: list[Import], boundary=LAZY_BOUNDARY) -> list[str]:
    """Imports inside functions that are not the late import of an optional package, marked."""
    bad = []
    for i in imports:
        if i.function is None or i.type_only:
            continue
        if i.target.split(".")[0] == "ckapipe":
            if not (i.module in boundary and i.function == "__getattr__" and i.mark == "torch"):
                bad.append(f"{i}: a ckapipe module is imported at the top (or, needing torch, through the lazy boundary)")
        elif i.mark != i.target:
            bad.append(f"{i}: an outside package in a function needs '# optional: {i.target}'")
        elif i.target in CORE or i.target in sys.stdlib_module_names:
            bad.append(f"{i}: {i.target} is always installed: import it at the top")
    return bad


def core_packages() -> set[str]:
    """The import names of the packages every install has (pyproject.toml's dependencies)."""
    names = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    dists = {re.split(r"[\[<>=~! ;]", name, maxsplit=1)[0].lower().replace("-", "_") for name in names}
    return {"yaml" if d == "pyyaml" else d for d in dists} | {"google_crc32c"}  # zarr's own dependency


CORE = core_packages()


# --------------------------------------------------------------------------- ckapipe itself


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return draw()


def test_the_graph_is_drawn_from_every_module(graph):
    modules = {i.module for i in graph}
    assert {"ckapipe", "ckapipe.cli", "ckapipe.extract.runner", "ckapipe.analyze.engine",
            "ckapipe.pipelines.study"} <= modules
    assert any(i.module == "ckapipe.extract.cli" and i.target == "ckapipe.store" for i in graph)  # from ckapipe import store


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_every_edge_points_down_the_floors(graph):
    assert upward(graph) == []


def test_no_function_imports_a_ckapipe_module_or_an_always_installed_package(graph):
    assert late(graph) == []


def test_the_lazy_boundary_is_the_only_late_internal_import_and_it_imports_torchs_side(graph):
    lazy = sorted((i.module, i.target) for i in internal(graph) if i.function)
    assert lazy == [("ckapipe.extract", "ckapipe.extract.runner"), ("ckapipe.pipelines.api", "ckapipe.pipelines.compare")]
    torch_at_top = {i.module for i in graph if i.target == "torch" and i.function is None}
    assert {"ckapipe.extract.runner", "ckapipe.pipelines.compare"} <= torch_at_top


# --------------------------------------------------------------------------- each rule can fail


def package(tmp_path: Path, files: dict[str, str]) -> list[Import]:
    """A synthetic package ``ckapipe`` in tmp_path (folder ckapipe/), drawn as ckapipe is."""
    for name, text in files.items():
        path = tmp_path / "ckapipe" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return draw(tmp_path, {"ckapipe": "ckapipe"})


def test_a_cycle_is_named(tmp_path):
    graph = package(tmp_path, {"__init__.py": "", "kernels.py": "from ckapipe import errors\n",
                               "errors.py": "import ckapipe.kernels\n", "globs.py": "from ckapipe.errors import X\n"})
    assert cycles(graph) == [["ckapipe.errors", "ckapipe.kernels", "ckapipe.errors"]]


def test_a_cycle_through_a_package_and_a_relative_import_is_named(tmp_path):
    graph = package(tmp_path, {"__init__.py": "", "store/__init__.py": "from .codecs import tag\n",
                               "store/codecs.py": "def tag():\n    pass\n", "store/runs.py": "from . import codecs\n",
                               "store/locks.py": "from ckapipe.store import runs\n"})
    assert cycles(graph) == []
    (tmp_path / "ckapipe" / "store" / "codecs.py").write_text("from ckapipe.store.locks import x\n")
    assert cycles(draw(tmp_path, {"ckapipe": "ckapipe"})) == [
        ["ckapipe.store.codecs", "ckapipe.store.locks", "ckapipe.store.runs", "ckapipe.store.codecs"]]


def test_an_upward_edge_is_named(tmp_path):
    graph = package(tmp_path, {"__init__.py": "", "store.py": "from ckapipe.kernels import gram\n",
                               "kernels.py": "def gram():\n    from ckapipe import store  # optional: torch\n"})
    assert upward(graph) == ["ckapipe.kernels:2 imports ckapipe.store (in gram()): floor 0 -> floor 1"]


def test_the_stages_importing_each_other_and_a_module_on_no_floor_are_named(tmp_path):
    graph = package(tmp_path, {"__init__.py": "", "extract/__init__.py": "", "analyze/__init__.py": "",
                               "extract/runner.py": "from ckapipe.analyze import engine\n",
                               "analyze/engine.py": "", "lookup.py": "import ckapipe.errors\n", "errors.py": ""})
    assert upward(graph) == [
        "ckapipe.extract.runner:1 imports ckapipe.analyze.engine: the stages never import each other",
        "ckapipe.lookup:1 imports ckapipe.errors: ckapipe.lookup is on no floor (add it to FLOORS)"]


def test_a_late_internal_import_and_an_unmarked_late_import_are_named(tmp_path):
    graph = package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "kernels.py": ("import numpy\n\n\ndef gram():\n    from ckapipe import errors\n    import cupy\n"
                       "    import numpy as np  # optional: numpy\n    import json  # optional: json\n"
                       "    import cupy as cp  # optional: cupy\n    import dask_cuda  # optional: cupy\n"),
        "devices.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ckapipe import kernels\n\n\n"
                       "def __getattr__(name):\n    from ckapipe import errors  # optional: torch\n"),
    })
    assert late(graph, boundary=set()) == [
        "ckapipe.devices:7 imports ckapipe.errors (in __getattr__()): a ckapipe module is imported at the top "
        "(or, needing torch, through the lazy boundary)",
        "ckapipe.kernels:5 imports ckapipe.errors (in gram()): a ckapipe module is imported at the top "
        "(or, needing torch, through the lazy boundary)",
        "ckapipe.kernels:6 imports cupy (in gram()): an outside package in a function needs '# optional: cupy'",
        "ckapipe.kernels:7 imports numpy (in gram()): numpy is always installed: import it at the top",
        "ckapipe.kernels:8 imports json (in gram()): json is always installed: import it at the top",
        "ckapipe.kernels:10 imports dask_cuda (in gram()): an outside package in a function needs '# optional: dask_cuda'",
    ]
    assert late(graph, boundary={"ckapipe.devices"}) == late(graph, boundary=set())[1:]


MODULES = sorted(str(p.relative_to(REPO)) for folder in PACKAGES for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", MODULES)
def test_no_function_is_over_50_lines(path):
    """Issue 22: a function a reader takes in at once (the settings object is what keeps argument lists short)."""
    tree = ast.parse((REPO / path).read_text())
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50]
    assert long == []

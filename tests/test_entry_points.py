"""The ways in: the ``ckapipe`` command's root (help, version, unknown verbs) and the package's lazy API."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import ckapipe
from ckapipe.cli import COMMANDS, main
from tests import REPO


def ckapipe_exit(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_help_lists_every_verb_and_version_prints_it(capsys):
    main(["--help"])
    listed = capsys.readouterr().out
    assert all(f"  {verb}" in listed for verb in COMMANDS), listed
    main(["--version"])
    assert capsys.readouterr().out == f"ckapipe {ckapipe.__version__}\n"


def test_an_unknown_verb_or_option_is_one_line_and_exit_2(capsys):
    code, _, err = ckapipe_exit(capsys, "extrakt")
    assert code == 2 and err.startswith("ckapipe: error: No such command 'extrakt'") and err.count("\n") == 1
    assert "(see ckapipe --help)" in err
    code, _, err = ckapipe_exit(capsys, "ls", "--no-such-option")
    assert code == 2 and "No such option '--no-such-option'" in err and "(see ckapipe ls --help)" in err


def test_the_package_api_is_lazy():
    from ckapipe.analyze.results import load_results
    from ckapipe.pipelines.api import run_study

    assert ckapipe.load_results is load_results and ckapipe.run_study is run_study
    assert callable(ckapipe.analyze) and "extract_run" in dir(ckapipe)
    with pytest.raises(AttributeError, match="module 'ckapipe' has no attribute 'analyse'"):
        ckapipe.analyse  # noqa: B018


def test_the_stage_folders_import_only_as_ckapipe_packages():
    """Run from the repository root, where ``pipelines/`` is on the path: importing it bare is refused."""
    proc = subprocess.run([sys.executable, "-c", "import pipelines"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "ImportError: the folder pipelines/ is the package ckapipe.pipelines: import ckapipe.pipelines" in proc.stderr


def test_the_api_without_torch_names_the_extra_in_one_line():
    """torch blocked (None in sys.modules, as if not installed): the analysis API imports, compare says what to install."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ckapipe import analyze, load_results, run_study\n"
            "from ckapipe.errors import MissingExtra\n"
            "try:\n    from ckapipe import compare\n"
            "except ImportError as err:\n    print(type(err).__name__, isinstance(err, MissingExtra), err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "MissingExtra True compare needs torch: pip install 'ckapipe[torch]'\n"


def test_a_wheel_runs_the_packaged_studies_by_name_from_an_empty_folder(tmp_path):
    """Built as a wheel (package data only, no repository files), unpacked on the path of a
    folder with nothing in it: examples, init and run default work by name."""
    source = tmp_path / "source"
    for name in ("ckapipe", "analyze", "extract", "pipelines"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    source], check=True, capture_output=True, cwd=tmp_path)  # build/ goes there, not here
    (wheel,) = (tmp_path / "dist").glob("ckapipe-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    empty = tmp_path / "empty"
    empty.mkdir()

    def ckapipe_in_empty(*args: str) -> subprocess.CompletedProcess:
        code = "import ckapipe, sys\nfrom ckapipe.cli import main\nmain(sys.argv[1:])"
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=empty,
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})

    where = subprocess.run([sys.executable, "-c", "import ckapipe.pipelines; print(ckapipe.pipelines.__file__)"],
                           capture_output=True, text=True, cwd=empty, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert where.stdout.startswith(str(tmp_path / "site")), where.stdout  # the wheel's copy, not the repository's
    listed = ckapipe_in_empty("examples", "-q")
    assert listed.returncode == 0 and listed.stdout.split()[:3] == ["default", "dataset-drift", "ensemble"]
    assert ckapipe_in_empty("init", "-q").returncode == 0 and (empty / "study.yaml").is_file()
    ran = ckapipe_in_empty("run", "default", "--stage", "extract", "--task", "0", "-q")
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    assert [p.name.rsplit("-", 1)[0] for p in (empty / "cache").iterdir() if p.name not in ("models", ".locks")] == ["cnn3-s0"]


def test_the_gpu_checks_import_ckapipe_from_a_checkout_without_an_install(tmp_path):
    """scripts/gpu_check.sh runs the tests on a GPU node where ckapipe is not installed: its
    sitecustomize maps the checkout's folders to the ckapipe packages before the root imports its API."""
    checkout = tmp_path / "checkout"
    for name in ("ckapipe", "extract", "analyze", "pipelines"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(REPO / "scripts" / "sitecustomize.py", site / "sitecustomize.py")
    code = ("import ckapipe.analyze, ckapipe.pipelines.study, ckapipe.store, ckapipe.extract.cli; "
            "from ckapipe import analyze, run_study; "
            "print(*(m.__file__ for m in (ckapipe, ckapipe.analyze, ckapipe.pipelines.study, ckapipe.store, "
            "ckapipe.extract.cli)), sep='\\n')")
    env = dict(os.environ, PYTHONPATH=str(site), CKAPIPE_REPO=str(checkout))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(checkout / path) for path in (
        "ckapipe/__init__.py", "analyze/__init__.py", "pipelines/study.py", "ckapipe/store/__init__.py", "extract/cli.py")]

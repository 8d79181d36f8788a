"""The ways in: the ``ckapipe`` command's root (help, version, unknown verbs) and the package's lazy API."""

from __future__ import annotations

import subprocess
import sys

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

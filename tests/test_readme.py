"""Every command the README shows, run as written, offline on a CPU: in order, and each section
on its own right after the quick start (a reader who skips to one section).

The README's fenced blocks are the script: ```sh blocks are command lines
(``ckapipe ...`` and ``make ...``; comments and continuation backslashes as a
shell reads them), ```python blocks are programs. The quick start runs once in
a scratch directory; copies of that state then run the rest of the README in
order, and each later section alone.
```sh slurm blocks need a SLURM cluster and run in the slurm test. Not run:
``make test`` (this is it) and blocks marked ```sh notest, which hold only
``make test``, ``make coverage`` (this suite again, under coverage) and
``make bench`` (the benchmarks, 15 minutes on 2 cores).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_helpers import copy_models

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, tag, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]


def command_lines(body: str) -> list[str]:
    """The commands of a sh block: continuations joined, comments dropped."""
    lines = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def script(text: str, tag: str = "") -> list[tuple[str, str]]:
    """("sh", command) and ("python", program) steps of the blocks with this tag, in order."""
    steps = []
    for language, block_tag, body in blocks(text):
        if block_tag != tag:
            continue
        if language == "sh":
            steps += [("sh", line) for line in command_lines(body)]
        elif language == "python":
            steps.append(("python", body))
    return steps


QUICK_START = "Quick start"


def sections(text: str) -> dict[str, str]:
    """The text of each ``## `` section by its title (the part before the first title: "Introduction")."""
    parts = re.split(r"^## (.+)\n", text, flags=re.M)
    return {"Introduction": parts[0], **dict(zip(parts[1::2], parts[2::2]))}


def runnable_sections() -> list[str]:
    """The titles of the sections after the quick start that show commands to run."""
    return [title for title, body in sections(README.read_text()).items()
            if title != QUICK_START and script(body)]


def workdir(tmp_path: Path, trained: Path) -> Path:
    """A scratch directory with the repository's pipelines/ and, in cache/models/, the zoo networks the
    session already trained (the same weights a reader's first command trains: training is tested by
    the default_study fixture, and doing it again here would double this test's time)."""
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    copy_models(trained, tmp_path / "cache")
    return tmp_path


def run_step(kind: str, step: str, cwd: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    env.pop("CKAPIPE_CACHE", None)
    if kind == "python":
        proc = subprocess.run([sys.executable, "-"], input=step, capture_output=True, text=True, cwd=cwd, env=env)
    else:
        words = shlex.split(step)
        if words[0] == "ckapipe":
            argv = [sys.executable, "-m", "ckapipe", *words[1:]]
        elif words[0] == "make":
            venv = Path(sys.executable).parent.parent
            argv = ["make", "-s", "-C", str(REPO), *words[1:], f"VENV={venv}", f"CACHE={cwd / 'cache'}",
                    f"RESULTS={cwd / 'results'}", "-o", f"{venv}/.installed"]
        else:
            raise AssertionError(f"the README shows a command this test cannot run: {step}")
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    assert proc.returncode == 0, f"README step failed: {step}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def quick_started(tmp_path_factory, default_study) -> Path:
    """A scratch directory as the quick start leaves it (``make extract analyze`` run there)."""
    cwd = workdir(tmp_path_factory.mktemp("quick-start"), default_study["cache"])
    steps = [(kind, step) for kind, step in script(sections(README.read_text())[QUICK_START]) if step != "make test"]
    assert steps == [("sh", "make extract analyze")]
    for kind, step in steps:
        run_step(kind, step, cwd)
    assert (cwd / "results" / "default" / "summary.csv").exists()
    return cwd


def after_quick_start(quick_started: Path, tmp_path: Path) -> Path:
    """A copy of the quick start's directory (pipelines/ still a link to the repository's)."""
    return Path(shutil.copytree(quick_started, tmp_path / "reader", symlinks=True))


def test_the_readme_runs_as_written(quick_started, tmp_path):
    text = sections(README.read_text())
    steps = [step for title in runnable_sections() for step in script(text[title])]
    assert len(steps) > 10  # the parse found the README's commands
    cwd = after_quick_start(quick_started, tmp_path)
    for kind, step in steps:
        run_step(kind, step, cwd)


@pytest.mark.parametrize("title", runnable_sections())
def test_each_readme_section_runs_right_after_the_quick_start(quick_started, tmp_path, title):
    cwd = after_quick_start(quick_started, tmp_path)
    for kind, step in script(sections(README.read_text())[title]):
        run_step(kind, step, cwd)


def test_the_sections_hold_every_step_of_the_readme():
    text = sections(README.read_text())
    assert sum(len(script(body)) for body in text.values()) == len(script(README.read_text()))
    assert {"Introduction", "Comparing models in Python", "The cached workflow", "Studies in YAML"} <= set(runnable_sections())


@pytest.mark.slurm
def test_the_readme_slurm_commands_run_on_slurm(tmp_path, default_study):
    steps = script(README.read_text(), "slurm")
    assert steps
    cwd = workdir(tmp_path, default_study["cache"])
    for kind, step in steps:
        run_step(kind, step, cwd)


def test_the_script_parser_reads_shell_lines():
    text = "```sh\nckapipe ls   # the runs\nckapipe extract -m 'zoo:cnn3?seed=0' \\\n  -b 64\n# only a comment\n```\n"
    assert script(text) == [("sh", "ckapipe ls"), ("sh", "ckapipe extract -m 'zoo:cnn3?seed=0' -b 64")]
    assert script("```sh notest\nmake bench\n```\n") == []
    assert script("```sh slurm\nckapipe run x --slurm\n```\n", "slurm") == [("sh", "ckapipe run x --slurm")]


def test_only_the_suite_and_the_benchmarks_go_unrun():
    unrun = {line for _, tag, body in blocks(README.read_text()) if tag == "notest" for line in command_lines(body)}
    assert unrun <= {"make test", "make coverage", "make bench"}, unrun

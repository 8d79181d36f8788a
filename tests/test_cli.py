"""One CLI habit: --help and --version, -q on every command, --cache defaulting the same
way everywhere (CKAPIPE_CACHE too), progress as plain lines when not on a terminal,
ls --json, usage errors as one line with exit 2."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import click
import numpy as np
import pytest

import ckapipe
import ckapipe.cli
import ckapipe.pipelines.study
from ckapipe.cli import COMMANDS
from ckapipe.progress import Progress
from tests.cli_calls import ckapipe_cli


def test_help_lists_every_command_and_version_prints_it(capsys):
    code, out, _ = ckapipe_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in COMMANDS)
    code, out, _ = ckapipe_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"ckapipe {ckapipe.__version__}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_quiet_and_the_cache_default(capsys, command):
    code, out, _ = ckapipe_cli(capsys, command, "--help")
    assert code == 0 and "-q, --quiet" in out
    if "--cache" in out:
        assert "CKAPIPE_CACHE" in out


def test_the_cache_comes_from_ckapipe_cache(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CKAPIPE_CACHE", str(tmp_path / "elsewhere"))
    code, _, err = ckapipe_cli(capsys, "ls")
    assert code == 2 and f"cache directory {tmp_path / 'elsewhere'} does not exist" in err


def test_quiet_extract_and_ls_json(capsys, tmp_path):
    cache = str(tmp_path)
    code, out, err = ckapipe_cli(capsys, "extract", "-m", "zoo:mlp2", "-l", "head", "-b", "32", "--limit", "64",
                                 "--cache", cache, "-q")
    assert code == 0 and err == "" and "complete, 2/2 minibatches" in out
    code, out, _ = ckapipe_cli(capsys, "ls", "--cache", cache, "--json")
    (record,) = json.loads(out)
    assert record["slug"] == "mlp2@digits" and record["model"] == "zoo:mlp2" and record["status"] == "complete"
    assert (record["n_samples"], record["batch_size"], record["layers"], record["grams"]) == (64, 32, ["head"], [])


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()  # not a terminal
    bar = Progress(100, "extract net@digits", "samples", stream=stream, every=0.0)
    for _ in range(4):
        bar.update(25, "3.0 MB/s")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and lines[-1] == "extract net@digits: 100/100 samples (100 %), 3.0 MB/s"
    assert lines[0] == "extract net@digits: 25/100 samples (25 %), 3.0 MB/s"
    quiet = io.StringIO()
    bar = Progress(100, "x", "samples", enabled=False, stream=quiet)
    bar.update(100)
    bar.close()
    assert quiet.getvalue() == ""


def test_extraction_progress_in_a_log_has_no_carriage_returns(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "extract", "-m", "zoo:mlp2", "-l", "head", "-b", "32",
                           "--limit", "64", "--cache", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "extract mlp2@digits: 64/64 samples (100 %)" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "pipelines/default.yaml", "--dry-run"], "--dry-run goes with --slurm"),
    (["run", "pipelines/default.yaml", "--slurm", "--dry-run", "--time", "2h"], "--time '2h' is not a SLURM time"),
    (["run", "pipelines/default.yaml", "--slurm", "--dry-run", "--mem", "lots"], "--mem 'lots' is not a size"),
    (["run", "pipelines/default.yaml", "--slurm", "--dry-run", "--gres", "gpu 1"], "--gres 'gpu 1' is not generic"),
    (["run", "pipelines/default.yaml", "--slurm", "--dry-run", "--cpus-per-task", "0"], "--cpus-per-task 0 must be"),
    (["extract", "--nope"], "No such option '--nope'"),
    (["nope"], "No such command 'nope'"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, tmp_path, args, message):
    code, _, err = ckapipe_cli(capsys, *args, *(["--out", str(tmp_path)] if args[0] == "run" else []))
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("ckapipe: error: ")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("raised, code, line", [
    (KeyboardInterrupt(), 130, "ckapipe: aborted"),  # Ctrl-C: click turns it into Abort
    (click.ClickException("the disk said no"), 1, "ckapipe: error: the disk said no"),
    (click.exceptions.Exit(3), 3, None),  # ctx.exit(3): the status survives click's non-standalone mode
])
def test_an_interrupt_or_a_click_error_is_one_line_and_its_status(capsys, monkeypatch, raised, code, line):
    from ckapipe import store_cli

    def fail(**options):
        raise raised

    monkeypatch.setattr(store_cli.verify, "callback", fail)
    status, _, err = ckapipe_cli(capsys, "verify")
    assert status == code
    assert err.strip().splitlines()[-1:] == ([line] if line else [])


def command_options(name: str) -> dict[str, click.Option]:
    """Every visible option of ``ckapipe NAME`` by each of its spellings."""
    command = ckapipe.cli.cli.get_command(None, name)
    return {flag: p for p in command.params if isinstance(p, click.Option) and not p.hidden for flag in p.opts}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_same_flag_means_the_same_on_every_command(command):
    options = command_options(command)
    for short, long in (("-b", "--batch-size"), ("-o", "--out"), ("-q", "--quiet")):
        if short in options or long in options:
            assert options.get(short) is options.get(long) is not None, f"{command}: {short} and {long} are one option"
    if "--out" in options:  # a directory written, never a file
        assert isinstance(options["--out"].type, click.Path) and not options["--out"].type.file_okay, command
    if "--batch-size" in options:
        assert options["--batch-size"].type is click.INT and options["--batch-size"].help.startswith("Minibatch size m") \
            or options["--batch-size"].help.startswith("Analysis minibatch size m"), command
    if "--device" in options:
        assert options["--device"].default == "auto" and options["--device"].help.startswith("auto (CUDA when there is one), cpu, cuda")
    if "--cache" in options:
        assert options["--cache"].envvar == "CKAPIPE_CACHE"


def test_old_spellings_are_hidden_and_warn_naming_the_new_one(capsys, tmp_path):
    code, out, _ = ckapipe_cli(capsys, "run", "--help")
    assert code == 0 and "-o, --out" in out and "--results" not in out
    code, out, _ = ckapipe_cli(capsys, "rank", "--help")
    assert code == 0 and "--csv FILE" in out and "--out" not in out
    code, out, err = ckapipe_cli(capsys, "run", "default", "--slurm", "--dry-run", "--results", tmp_path / "old")
    assert code == 0 and err == "ckapipe: warning: --results is deprecated: use --out\n"
    assert f"--out {tmp_path / 'old'} " in out  # the jobs write where --results said
    code, new, err = ckapipe_cli(capsys, "run", "default", "--slurm", "--dry-run", "-o", tmp_path / "old")
    assert code == 0 and err == "" and new == out


def test_help_shows_each_command_s_whole_summary(capsys):
    code, out, _ = ckapipe_cli(capsys, "--help")
    flat = " ".join(out.split())
    assert code == 0 and "rank RankMe (Garrido et al. 2023) of every layer of RUNS: full data and per minibatch." in flat
    for name in COMMANDS:
        doc = ckapipe.cli.cli.get_command(None, name).help
        first = " ".join(doc.split("\n\n")[0].split())
        assert f"{name} {first}" in flat, name


def test_examples_lists_the_packaged_studies_and_init_writes_one(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = ckapipe_cli(capsys, "examples", "-q")
    packaged = sorted(p.stem for p in (ckapipe.pipelines.study.PACKAGED / "examples").glob("*.yaml"))
    assert code == 0 and out.split() == ["default", *packaged]
    code, out, _ = ckapipe_cli(capsys, "examples")
    assert out.splitlines()[0].split() == ["default", "The", "default", "study:", "small", "networks", "trained", "on",
                                          "scikit-learn's", "bundled", "digits", "(offline,", "CPU,", "about", "half",
                                          "a", "minute)."]
    code, out, _ = ckapipe_cli(capsys, "init")
    default = (ckapipe.pipelines.study.PACKAGED / "default.yaml").read_text()
    assert code == 0 and out == "wrote study.yaml: edit it, then ckapipe run study.yaml\n"
    assert (tmp_path / "study.yaml").read_text() == default
    code, _, err = ckapipe_cli(capsys, "init")
    assert code == 2 and err == "ckapipe: error: study.yaml exists: choose another FILE or remove it\n"
    code, _, err = ckapipe_cli(capsys, "init", "kd.yaml", "--from", "teacher-student-digits")
    assert code == 2 and err == ("ckapipe: error: teacher-student-digits: no such pipeline file, nor a packaged study; "
                                 "did you mean: teacher-students-digits, teacher-students? (ckapipe examples lists them)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]
    code, _, err = ckapipe_cli(capsys, "run", "defualt", "--slurm", "--dry-run")
    assert code == 2 and err.startswith("ckapipe: error: defualt: no such pipeline file, nor a packaged study; did you mean: default?")


def test_rank_out_is_the_old_spelling_of_csv(capsys, tmp_path):
    from tests.numpy_runs import make_run, random_layers

    cache = tmp_path / "cache"
    make_run(cache, "net", random_layers(np.random.default_rng(0), 64, [4, 6]), 16)
    code, new, err = ckapipe_cli(capsys, "rank", "--cache", cache, "net", "--csv", tmp_path / "new.csv", "--no-full")
    assert code == 0 and err == ""
    code, old, err = ckapipe_cli(capsys, "rank", "--cache", cache, "net", "--out", tmp_path / "old.csv", "--no-full")
    assert code == 0 and err == "ckapipe: warning: --out is deprecated: use --csv\n" and old == new
    assert (tmp_path / "old.csv").read_text() == (tmp_path / "new.csv").read_text()

"""The ``ckapipe`` command line: one subcommand per verb, each a thin layer over
the Python API of its stage.

Subcommands are imported on first use, so ``ckapipe analyze`` never imports
torch and ``ckapipe --help`` is instant. Every user error ends in one line on
stderr, ``ckapipe: error: ...``, and exit status 2.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import sys
import warnings

import click

from ckapipe import __version__
from ckapipe.errors import CkapipeError

COMMANDS = {
    "layers": "ckapipe.extract.cli:layers",
    "extract": "ckapipe.extract.cli:extract",
    "compare": "ckapipe.pipelines.commands:compare",
    "ls": "ckapipe.extract.cli:ls",
    "analyze": "ckapipe.analyze.cli:analyze",
    "plot": "ckapipe.analyze.cli:plot",
    "rank": "ckapipe.analyze.cli:rank",
    "diff": "ckapipe.analyze.cli:diff",
    "run": "ckapipe.pipelines.commands:run",
    "examples": "ckapipe.pipelines.commands:examples",
    "init": "ckapipe.pipelines.commands:init",
    "verify": "ckapipe.store_cli:verify",
    "unlock": "ckapipe.store_cli:unlock",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        """Every subcommand with its whole one-line summary (click would cut it to the terminal's width)."""
        rows = [(name, summary(self.get_command(ctx, name))) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows, col_max=max(map(len, COMMANDS)) + 2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ckapipe", message="%(prog)s %(version)s")
def cli():
    """Minibatch CKA at scale: extract activations once, compare any pairing offline."""


def summary(command: click.Command) -> str:
    """A command's one-line summary: the first paragraph of its docstring, whole."""
    return " ".join(inspect.cleandoc(command.help or "").partition("\n\n")[0].split())


def one_malloc_arena() -> None:
    """One glibc malloc arena for the whole process (as MALLOC_ARENA_MAX=1), set before any thread starts.

    glibc gives every allocating thread an arena of its own and keeps freed
    chunk buffers there, so the resident size of an analysis grew with the
    number of tasks instead of staying at what is live. A no-op where malloc
    is not glibc's.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # glibc's malloc.h
    mallopt(m_arena_max, 1)


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one ``ckapipe: warning: ...`` line, without a source path."""
    click.echo(f"ckapipe: warning: {message}", err=True)


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit status 2."""
    one_malloc_arena()
    warnings.showwarning = show_warning
    try:
        code = cli.main(args=argv, standalone_mode=False, prog_name="ckapipe")  # click returns ctx.exit's code here
    except CkapipeError as err:
        click.echo(f"ckapipe: error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("ckapipe: aborted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "ckapipe"
        click.echo(f"ckapipe: error: {err.format_message()} (see {command} --help)", err=True)
        sys.exit(2)
    except click.ClickException as err:
        click.echo(f"ckapipe: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)

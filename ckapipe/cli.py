"""The ``ckapipe`` command line: one subcommand per verb, each a thin layer over
the Python API of its stage.

The commands import with this module; none imports torch (the ones that run a model
import it when they run, through ``ckapipe.extract``'s lazy boundary), so ``ckapipe
analyze`` and ``ckapipe --help`` work without it. Every user error ends in one line on
stderr, ``ckapipe: error: ...``, and exit status 2.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
import warnings

import click

from ckapipe import __version__, store_cli
from ckapipe.analyze import cli as analyze_cli
from ckapipe.errors import CkapipeError
from ckapipe.extract import cli as extract_cli
from ckapipe.pipelines import commands as study_cli

COMMANDS = {  # in the order --help lists them
    "layers": extract_cli.layers,
    "extract": extract_cli.extract,
    "compare": study_cli.compare,
    "ls": extract_cli.ls,
    "analyze": analyze_cli.analyze,
    "plot": analyze_cli.plot,
    "rank": analyze_cli.rank,
    "diff": analyze_cli.diff,
    "run": study_cli.run,
    "examples": study_cli.examples,
    "init": study_cli.init,
    "verify": store_cli.verify,
    "unlock": store_cli.unlock,
}


class VerbGroup(click.Group):
    """The verbs of COMMANDS, listed in its order with their whole summaries."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return COMMANDS.get(name)

    def format_commands(self, ctx, formatter):
        """Every subcommand with its whole one-line summary (click would cut it to the terminal's width)."""
        rows = [(name, summary(command)) for name, command in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows, col_max=max(map(len, COMMANDS)) + 2)


@click.group(cls=VerbGroup, context_settings={"help_option_names": ["-h", "--help"]})
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

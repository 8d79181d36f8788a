"""The ``ckapipe`` command line: one subcommand per verb, each a thin layer
over the Python API of its stage.

Subcommands are imported on first use, so ``ckapipe analyze`` never imports
torch and ``ckapipe --help`` is instant.
"""

from __future__ import annotations

import ctypes
import importlib
import sys

import click

from extract.errors import CkapipeError

COMMANDS = {
    "layers": "extract.cli:layers",
    "extract": "extract.cli:extract",
    "ls": "extract.cli:ls",
    "analyze": "analyze.cli:analyze",
    "plot": "analyze.cli:plot",
    "run": "pipelines.commands:run",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Minibatch CKA at scale: extract activations once, compare any pairing offline."""


def one_malloc_arena() -> None:
    """One glibc malloc arena for the whole process (as MALLOC_ARENA_MAX=1), set before any thread starts.

    glibc gives every thread that allocates an arena of its own and keeps freed
    memory there, so the chunk buffers of Dask's threads and of Zarr's decoding
    threads (six by default) made the resident size grow with the number of
    tasks instead of staying at what is live: make bench's W4 re-analysis took
    +100 MB at N = 2,560 and +183 MB at 8,192; with one arena +80 and +94 MB, at
    the same speed, and extraction got no slower. A no-op where malloc is not glibc's.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # glibc's malloc.h
    mallopt(m_arena_max, 1)


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit status 2."""
    one_malloc_arena()
    try:
        cli.main(args=argv, standalone_mode=False)
    except CkapipeError as err:
        click.echo(f"ckapipe: error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("ckapipe: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)

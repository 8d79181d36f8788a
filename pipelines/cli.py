"""The ``ckapipe`` command line: one subcommand per verb, each a thin layer
over the Python API of its stage.

Subcommands are imported on first use, so ``ckapipe analyze`` never imports
torch and ``ckapipe --help`` is instant.
"""

from __future__ import annotations

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


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit status 2."""
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

"""Options that mean the same on every command, spelled once.

``--cache`` defaults to ``$CKAPIPE_CACHE``, else ``./cache``; ``-q/--quiet``
turns off progress and notes (errors and the results asked for still print).
"""

from __future__ import annotations

import click

CACHE_ENV = "CKAPIPE_CACHE"  # the cache directory when none is given (else ./cache): store.default_cache


def cache_option(default: str | None = "cache", help: str = "The activation cache directory."):
    """``--cache DIR``; ``default=None`` leaves the choice to the command (a study file's cache)."""
    return click.option("--cache", envvar=CACHE_ENV, show_envvar=True, default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), help=help)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; errors still print.")


def batch_size_option(default: int | None = None, help: str = "Minibatch size m."):
    """``-b/--batch-size M``: the minibatch size m of the minibatch CKA, on every command that takes one."""
    return click.option("-b", "--batch-size", type=int, default=default, show_default=default is not None, help=help)


def out_option(help: str, required: bool = False, dest: str = "out"):
    """``-o/--out DIR``: the directory a command writes (results, figures), on every command that writes one."""
    return click.option("-o", "--out", dest, required=required, type=click.Path(file_okay=False), default=None, help=help)


def device_option(choices: tuple[str, ...] | None = None):
    """``--device``: auto (CUDA when there is one), cpu, cuda (or cuda:i where the stage takes it)."""
    kind = click.Choice(list(choices)) if choices else str
    return click.option("--device", type=kind, default="auto", show_default=True,
                        help="auto (CUDA when there is one), cpu, cuda" + ("" if choices else " or cuda:i") + ".")


def deprecated_alias(old: str, dest: str, new: str, **kwargs):
    """A hidden ``old`` spelling kept one release (its value in parameter ``dest``): it warns, naming ``new``."""
    def warn(ctx, param, value):
        if value is not None:
            click.echo(f"ckapipe: warning: {old} is deprecated: use {new}", err=True)
        return value

    return click.option(old, dest, hidden=True, default=None, callback=warn, **kwargs)

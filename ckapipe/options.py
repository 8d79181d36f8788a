"""Options that mean the same on every command, spelled once.

``--cache`` defaults to ``$CKAPIPE_CACHE``, else ``./cache``; ``-q/--quiet``
turns off progress and notes (errors and the results asked for still print).
"""

from __future__ import annotations

import click

from ckapipe.store import CACHE_ENV


def cache_option(default: str | None = "cache", help: str = "The activation cache directory."):
    """``--cache DIR``; ``default=None`` leaves the choice to the command (a study file's cache)."""
    return click.option("--cache", envvar=CACHE_ENV, show_envvar=True, default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), help=help)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; errors still print.")

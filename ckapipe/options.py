"""Options that mean the same on every command, spelled once.

``--cache`` defaults to ``$CKAPIPE_CACHE``, else ``./cache``; ``-q/--quiet``
turns off progress and notes (errors and the results asked for still print).
A run setting's flag (``setting_options``) is made from its field in
ckapipe.settings: its spelling, default, type and help are written there once.
"""

from __future__ import annotations

import click

from ckapipe.settings import SETTING_FIELDS
from ckapipe.store import CACHE_ENV


def cache_option(default: str | None = "cache", help: str = "The activation cache directory."):
    """``--cache DIR``; ``default=None`` leaves the choice to the command (a study file's cache)."""
    return click.option("--cache", envvar=CACHE_ENV, show_envvar=True, default=default, show_default=default is not None,
                        type=click.Path(file_okay=False), help=help)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes; errors still print.")


def batch_size_option(default: int | None = None, help: str = "Minibatch size m."):
    """``-b/--batch-size M``: the minibatch size m of the minibatch CKA, on every command that takes one."""
    return click.option(*SETTING_FIELDS["batch_size"].metadata["flags"], "batch_size", type=int, default=default,
                        show_default=default is not None, help=help)


def out_option(help: str, required: bool = False, dest: str = "out"):
    """``-o/--out DIR``: the directory a command writes (results, figures), on every command that writes one."""
    return click.option("-o", "--out", dest, required=required, type=click.Path(file_okay=False), default=None, help=help)


def device_option(choices: tuple[str, ...] | None = None):
    """``--device``: auto (CUDA when there is one), cpu, cuda (or cuda:i where the stage takes it)."""
    kind = click.Choice(list(choices)) if choices else str
    return click.option(*SETTING_FIELDS["device"].metadata["flags"], "device", type=kind, default="auto",
                        show_default=True,
                        help="auto (CUDA when there is one), cpu, cuda" + ("" if choices else " or cuda:i") + ".")


def deprecated_alias(old: str, dest: str, new: str, **kwargs):
    """A hidden ``old`` spelling kept one release (its value in parameter ``dest``): it warns, naming ``new``."""
    def warn(ctx, param, value):
        if value is not None:
            click.echo(f"ckapipe: warning: {old} is deprecated: use {new}", err=True)
        return value

    return click.option(old, dest, hidden=True, default=None, callback=warn, **kwargs)


def parse_chunks(ctx, param, value):
    """``A:B`` -> (A, B)."""
    if value is None:
        return None
    start, sep, stop = value.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit():
        raise click.BadParameter("use A:B, minibatches A to B-1")
    return int(start), int(stop)


CALLBACKS = {"chunks": parse_chunks}


def setting_option(name: str):
    """The click option of run setting ``name`` (a field of settings.RunSettings), its value in parameter ``name``."""
    setting = SETTING_FIELDS[name]
    kwargs = dict(setting.metadata["click"])
    if "choices" in kwargs:
        kwargs["type"] = click.Choice(list(kwargs.pop("choices")))
    kwargs.setdefault("show_default", setting.default is not None and not kwargs.get("is_flag"))
    return click.option(*setting.metadata["flags"], name, default=setting.default, callback=CALLBACKS.get(name),
                        help=setting.metadata["help"] or None, **kwargs)


def setting_options(*names: str):
    """The options of these run settings, in this order in ``--help``."""
    def apply(command):
        for name in reversed(names):
            command = setting_option(name)(command)
        return command

    return apply

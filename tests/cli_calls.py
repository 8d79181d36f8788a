"""The ckapipe command line called in-process, as a test sees it: exit status, stdout, stderr."""

from __future__ import annotations

from ckapipe.cli import main


def ckapipe_cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``ckapipe ARGS`` (each argument str()-ed: paths welcome) and return (exit status, out, err)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    out, err = capsys.readouterr()
    return code, out, err

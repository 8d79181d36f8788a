"""Atomic writes: a file or directory appears whole or not at all.

Run stores, results directories, study records and trained zoo checkpoints
are all written the same way: into a hidden temporary sibling, then renamed
into place. A reader never sees half of one, and a failed write (a full disk,
a read-only directory) leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ckapipe.errors import StoreError


@contextmanager
def atomic_path(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it onto ``path`` when the block succeeds.

    With ``replace`` an existing ``path`` is replaced; without, an existing
    ``path`` wins (another process got there first) and the temporary is
    discarded. On any error the temporary is removed, and an OSError becomes a
    one-line StoreError naming the path.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.staging-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        yield tmp
        _publish(tmp, path, replace)
    except OSError as err:
        _remove(tmp)
        raise StoreError(f"cannot write {path}: {describe_os_error(err)}") from None
    except BaseException:
        _remove(tmp)
        raise


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if not replace:  # another process published first
        _remove(tmp)
        return
    if tmp.is_dir():
        old = path.parent / f".{path.name}.replaced-{os.getpid()}"
        os.rename(path, old)  # a directory cannot be renamed over a non-empty one
        os.rename(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            path.unlink()
        except OSError:
            pass


def describe_os_error(err: OSError) -> str:
    """A few words for a file-system error: 'the disk is full', 'permission denied', ..."""
    if err.errno == errno.ENOSPC:
        return "the disk is full"
    if err.errno in (errno.EROFS,):
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return err.strerror or str(err)

"""Writer locks: which process writes which chunks of a run.

One file per live writer and chunk range, ``CACHE/.locks/<run>/A-B.lock``,
holding "host pid". Outside the run's Zarr hierarchy, so readers listing a
store never meet files that are not Zarr nodes.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ckapipe.errors import StoreError


@contextmanager
def writer_lock(run_path: str | os.PathLike, chunks: range) -> Iterator[None]:
    """Claim chunks [start, stop) of a run for this process.

    Refuses when a live writer holds an overlapping range, so two extractions
    of one run never interleave writes to one chunk; disjoint ranges (a SLURM
    array over chunk ranges) proceed side by side. A lock left by a dead
    process on this host is taken over.
    """
    locks = lock_dir(run_path)
    locks.mkdir(parents=True, exist_ok=True)
    mine = locks / f"{chunks.start}-{chunks.stop}.lock"
    for other in locks.glob("*.lock"):
        start, stop = (int(x) for x in other.stem.split("-"))
        if start < chunks.stop and chunks.start < stop and _lock_alive(other):
            raise StoreError(
                f"run {Path(run_path).name} is being extracted by another process ({other.read_text().strip()}) "
                f"for chunks {start}-{stop}: wait for it, or give a disjoint --chunks range"
            )
        if not _lock_alive(other):
            other.unlink(missing_ok=True)
    try:
        fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise StoreError(f"chunks {chunks.start}-{chunks.stop} of {Path(run_path).name} are locked by another process") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield
    finally:
        mine.unlink(missing_ok=True)


def lock_dir(run_path: str | os.PathLike) -> Path:
    """Where the writers of a run leave their claims: ``CACHE/.locks/<run>/``."""
    run_path = Path(run_path)
    return run_path.parent / ".locks" / run_path.name


def _lock_alive(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True  # cannot tell for another host: assume alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

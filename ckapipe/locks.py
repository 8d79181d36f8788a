"""Writer locks: which process writes which chunks of a run, safe on a file system shared by nodes.

One file per live writer and chunk range, ``CACHE/.locks/<run>/A-B.lock``,
outside the run's Zarr hierarchy, holding JSON: host, pid, a random token,
when it started and its heartbeat (the writer's clock, seconds since the
epoch). A lock file only ever appears whole: it is written aside and
hard-linked into place (a link fails when the name exists, atomically on NFS
as on a local disk), and a thread of its writer refreshes the heartbeat every
``HEARTBEAT_S`` seconds the same way (written aside, renamed over).

A lock is dead when its heartbeat is older than the timeout
(``$CKAPIPE_LOCK_TIMEOUT`` seconds, default 600), on any node, or, on this
node, as soon as its process is gone. Another writer takes a dead lock over
(renaming it away first, so that of two takers one wins), and a writer whose
lock was taken over (a job suspended past the timeout, say) finds out at its
next chunk and stops with an error instead of writing beside its successor.
``unlock`` (``ckapipe unlock RUN``) removes a run's locks at once, for a
writer known dead on another node before its timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ckapipe.atomic import describe_os_error
from ckapipe.errors import StoreError

HEARTBEAT_S = 30.0  # how often a writer refreshes its lock
DEFAULT_TIMEOUT_S = 600.0  # a heartbeat older than this is a dead writer's, on any node
TIMEOUT_ENV = "CKAPIPE_LOCK_TIMEOUT"


@dataclass(frozen=True)
class Claim:
    """What one lock file says: who holds which chunks of a run, and when it last said so."""

    path: Path
    host: str
    pid: int
    token: str
    started: float
    heartbeat: float

    @property
    def chunks(self) -> range:
        start, stop = (int(x) for x in self.path.name.removesuffix(".lock").split("-"))
        return range(start, stop)

    def alive(self, timeout: float, now: float | None = None) -> bool:
        """Fresh heartbeat, and (on this node) a running process."""
        fresh = (time.time() if now is None else now) - self.heartbeat < timeout
        if self.host == socket.gethostname():
            return fresh and pid_running(self.pid)
        return fresh

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}, heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago"


def lock_timeout() -> float:
    """Seconds after its last heartbeat that a lock counts as dead: ``$CKAPIPE_LOCK_TIMEOUT`` or 600."""
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if timeout <= 0:
        raise StoreError(f"{TIMEOUT_ENV}={value!r} must be positive")
    return timeout


def lock_dir(run_path: str | os.PathLike) -> Path:
    """Where the writers of a run leave their claims: ``CACHE/.locks/<run>/``."""
    run_path = Path(run_path)
    return run_path.parent / ".locks" / run_path.name


def read_claim(path: Path) -> Claim | None:
    """The claim in a lock file, None when the file is gone. A file of another form (an older
    ckapipe's "host pid", or garbage) is dated by its modification time, so a fresh one still holds."""
    try:
        text = path.read_text()
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        text, mtime = "", time.time()
    try:
        d = json.loads(text)
        return Claim(path, str(d["host"]), int(d["pid"]), str(d["token"]), float(d["started"]), float(d["heartbeat"]))
    except (ValueError, KeyError, TypeError):
        words = text.split()
        host, pid = (words[0], int(words[1])) if len(words) == 2 and words[1].isdigit() else ("?", -1)
        return Claim(path, host, pid, "", mtime, mtime)


def pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """A held lock: ``check()`` raises once it was taken over; a thread keeps its heartbeat fresh."""

    def __init__(self, claim: Claim, timeout: float, every: float):
        self.claim, self.timeout, self.every = claim, timeout, every
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="ckapipe-lock-heartbeat")
        self._thread.start()

    def check(self) -> None:
        """Raise when another writer took this lock over (this writer must not go on)."""
        if self.lost:
            raise StoreError(self.lost)

    def refresh(self) -> None:
        """One heartbeat: rewrite the lock with the time now, unless it is no longer this writer's."""
        current = read_claim(self.claim.path)
        if current is None or current.token != self.claim.token:
            who = f" by {current.describe()}" if current is not None else ""
            run = self.claim.path.parent.name
            self.lost = (f"the lock on chunks {self.claim.chunks.start}-{self.claim.chunks.stop} of run {run} was taken "
                         f"over{who} (this writer's heartbeat stopped for longer than {self.timeout:.0f} s, or "
                         f"`ckapipe unlock` removed it): this writer stops; completed chunks are kept")
            return
        _write_claim(self.claim.path, self.claim.host, self.claim.pid, self.claim.token, self.claim.started,
                     replace=True)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        current = read_claim(self.claim.path)
        if current is not None and current.token == self.claim.token:
            self.claim.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every) and not self.lost:
            try:
                self.refresh()
            except OSError:  # a full or unreachable file system: try again next beat
                continue


@contextmanager
def writer_lock(run_path: str | os.PathLike, chunks: range, *, timeout: float | None = None,
                heartbeat: float = HEARTBEAT_S) -> Iterator[WriterLock]:
    """Claim chunks [start, stop) of a run for this process while the block runs.

    Refuses when a live writer holds an overlapping range, so two extractions
    of one run never interleave writes to one chunk; disjoint ranges (a SLURM
    array over chunk ranges) proceed side by side. Dead locks are taken over.
    """
    timeout = lock_timeout() if timeout is None else timeout
    try:
        claim = _claim(Path(run_path), chunks, timeout)
    except OSError as err:
        raise StoreError(f"cannot lock chunks {chunks.start}-{chunks.stop} of run {Path(run_path).name} in "
                         f"{lock_dir(run_path)}: {describe_os_error(err)}") from None
    lock = WriterLock(claim, timeout, heartbeat)
    try:
        yield lock
    finally:
        lock.release()


def _claim(run_path: Path, chunks: range, timeout: float) -> Claim:
    locks = lock_dir(run_path)
    locks.mkdir(parents=True, exist_ok=True)
    name = run_path.name
    for other in _claims(locks):
        live = other if other.alive(timeout) else _take_over(other, timeout)
        if live is not None and _overlap(live.chunks, chunks):
            raise _busy(name, live)
    mine = locks / f"{chunks.start}-{chunks.stop}.lock"
    token = secrets.token_hex(8)
    if not _write_claim(mine, socket.gethostname(), os.getpid(), token, time.time(), replace=False):
        other = read_claim(mine)
        raise _busy(name, other) if other is not None else StoreError(
            f"chunks {chunks.start}-{chunks.stop} of {name} are locked by another process")
    rivals = [c for c in _claims(locks) if c.token != token and _overlap(c.chunks, chunks) and c.alive(timeout)]
    if rivals:  # two writers claimed at once: both back off rather than both write
        mine.unlink(missing_ok=True)
        raise _busy(name, rivals[0])
    return read_claim(mine)


def unlock(run_path: str | os.PathLike) -> list[Claim]:
    """Remove every lock of a run (its writers are known dead); returns what was removed.

    Refuses while a lock's process still runs on this node: stop it first.
    """
    claims = _claims(lock_dir(run_path))
    here = socket.gethostname()
    running = [c for c in claims if c.host == here and pid_running(c.pid)]
    if running:
        c = running[0]
        raise StoreError(f"run {Path(run_path).name} is being extracted by pid {c.pid} on this host (chunks "
                         f"{c.chunks.start}-{c.chunks.stop}): stop that process first")
    for claim in claims:
        claim.path.unlink(missing_ok=True)
    return claims


def _claims(locks: Path) -> list[Claim]:
    if not locks.is_dir():
        return []
    claims = (read_claim(path) for path in sorted(locks.glob("*.lock")) if _is_lock_name(path.name))
    return [c for c in claims if c is not None]


def _is_lock_name(name: str) -> bool:
    start, sep, stop = name.removesuffix(".lock").partition("-")
    return bool(sep) and start.isdigit() and stop.isdigit()


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def _busy(run: str, other: Claim) -> StoreError:
    return StoreError(
        f"run {run} is being extracted by another process ({other.describe()}) for chunks "
        f"{other.chunks.start}-{other.chunks.stop}: wait for it, give a disjoint --chunks range, or if that "
        f"writer is dead, wait until its heartbeat is {lock_timeout():.0f} s old or run `ckapipe unlock {run}`"
    )


def _take_over(claim: Claim, timeout: float) -> Claim | None:
    """Remove a dead lock: renamed away first (of two takers one wins), and put back, and
    returned, when its writer refreshed it meanwhile (None when it is gone)."""
    aside = claim.path.with_name(f".{claim.path.name}.taken-{secrets.token_hex(4)}")
    try:
        os.rename(claim.path, aside)
    except FileNotFoundError:
        return None  # released, or taken over by another
    moved = read_claim(aside)
    if moved is not None and moved.alive(timeout):
        try:  # its writer refreshed it between our read and our rename: give it back
            os.link(aside, claim.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return read_claim(claim.path)
    aside.unlink(missing_ok=True)
    return None


def _write_claim(path: Path, host: str, pid: int, token: str, started: float, *, replace: bool) -> bool:
    """Write a whole lock file: aside, then linked (a new lock; False when the name is taken) or renamed over."""
    tmp = path.with_name(f".{path.name}.{token}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps({"host": host, "pid": pid, "token": token, "started": started,
                               "heartbeat": time.time()}) + "\n")
    try:
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)

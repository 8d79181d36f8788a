"""Writer locks at their edges: the timeout setting, lock files of an older ckapipe or damaged,
a dead lock whose writer came back, and a lock directory that cannot be written."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from ckapipe.errors import StoreError
from ckapipe.store.locks import Claim, _take_over, lock_dir, lock_timeout, read_claim, writer_lock


def test_the_lock_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("CKAPIPE_LOCK_TIMEOUT", raising=False)
    assert lock_timeout() == 600
    monkeypatch.setenv("CKAPIPE_LOCK_TIMEOUT", "30")
    assert lock_timeout() == 30.0
    monkeypatch.setenv("CKAPIPE_LOCK_TIMEOUT", "ten minutes")
    with pytest.raises(StoreError, match=r"CKAPIPE_LOCK_TIMEOUT='ten minutes' is not a number of seconds"):
        lock_timeout()
    monkeypatch.setenv("CKAPIPE_LOCK_TIMEOUT", "0")
    with pytest.raises(StoreError, match=r"CKAPIPE_LOCK_TIMEOUT='0' must be positive"):
        lock_timeout()


def test_an_older_or_damaged_lock_file_is_dated_by_its_modification_time(tmp_path):
    old = tmp_path / "0-4.lock"
    old.write_text("node17 4242\n")  # an older ckapipe's "host pid"
    os.utime(old, (1_000_000, 1_000_000))
    claim = read_claim(old)
    assert (claim.host, claim.pid, claim.heartbeat, claim.chunks) == ("node17", 4242, 1_000_000, range(0, 4))
    assert not claim.alive(600)  # its heartbeat is its mtime, long ago
    damaged = tmp_path / "4-8.lock"
    damaged.write_text("\x00\x17 not a lock")
    claim = read_claim(damaged)
    assert (claim.host, claim.pid) == ("?", -1) and claim.alive(600)  # fresh: left alone until it is old
    assert read_claim(tmp_path / "8-12.lock") is None


def test_a_dead_lock_whose_writer_refreshed_it_meanwhile_is_given_back(tmp_path):
    path = tmp_path / "0-4.lock"
    now = time.time()
    path.write_text(json.dumps({"host": "node-b", "pid": 7, "token": "t", "started": now, "heartbeat": now}) + "\n")
    seen_stale = Claim(path, "node-b", 7, "t", now - 900, now - 900)  # what a taker read before the refresh
    given_back = _take_over(seen_stale, timeout=600)
    assert given_back is not None and given_back.heartbeat == pytest.approx(now) and path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["0-4.lock"]  # nothing left aside
    path.write_text(json.dumps({"host": "node-b", "pid": 7, "token": "t", "started": 0, "heartbeat": 0}) + "\n")
    assert _take_over(read_claim(path), timeout=600) is None and not path.exists()  # really dead: removed
    assert _take_over(seen_stale, timeout=600) is None  # already gone: nothing to take


def test_a_lock_directory_that_cannot_be_made_is_one_error(tmp_path):
    run = tmp_path / "cache" / "net-0123456789"
    run.mkdir(parents=True)
    lock_dir(run).parent.write_text("a file where the locks' folder should be")
    with pytest.raises(StoreError, match=r"cannot lock chunks 0-4 of run net-0123456789 in .*\.locks/net-0123456789: "):
        with writer_lock(run, range(0, 4)):
            pass


def test_a_claim_holds_this_host_and_process(tmp_path):
    run = tmp_path / "cache" / "net-0123456789"
    run.mkdir(parents=True)
    with writer_lock(run, range(2, 6)) as lock:
        claim = read_claim(lock_dir(run) / "2-6.lock")
        assert (claim.host, claim.pid, claim.chunks) == (socket.gethostname(), os.getpid(), range(2, 6))
        assert claim.alive(600) and claim.describe().startswith(f"host {socket.gethostname()} pid {os.getpid()}, ")
        lock.check()
    assert read_claim(lock_dir(run) / "2-6.lock") is None

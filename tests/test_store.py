"""The run store on its own: layout read with plain zarr, completion markers and resume, run keys,
stores that are not ckapipe's, writer locks, names and aliases, and the Gram cache."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from ckapipe import store
from ckapipe.atomic import atomic_path, describe_os_error
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.store.locks import lock_dir, writer_lock
from tests import REPO
from tests.numpy_runs import make_run, random_layers


@pytest.fixture
def layers():
    return random_layers(np.random.default_rng(0), 64, [6, 9])


# --------------------------------------------------------------------------- markers and resume


def test_a_chunk_without_its_marker_is_never_read_and_reads_as_nan(cache, layers):
    run = make_run(cache, "net", layers, 16, chunks=[0, 2])
    assert run.status == store.IN_PROGRESS and run.missing_chunks() == [1, 3]
    with pytest.raises(StoreError, match=r"chunk 1 of layer 'l0' in run net-\w+ is missing \(extraction incomplete\)"):
        run.read_chunk("l0", 1)
    plain = zarr.open_group(run.path, mode="r")  # what another reader sees: NaN, never zeros
    assert np.isnan(plain["layers/l0"][16:32]).all() and np.isnan(plain["layers/l1"][48:]).all()
    np.testing.assert_array_equal(plain["layers/l1"][32:48], layers["l1"][32:48])
    assert list(plain["done"][:]) == [1, 0, 1, 0]


def test_resume_writes_only_what_is_missing_then_completes(cache, layers):
    first = make_run(cache, "net", layers, 16, chunks=[0, 2])
    again = store.create_run(cache, first.spec, np.arange(64), {})  # the same spec: the same store, resumed
    assert again.path == first.path and again.missing_chunks() == [1, 3]
    for k in again.missing_chunks():
        again.write_chunk(k, {name: x[again.chunk_slice(k)] for name, x in layers.items()})
    assert again.refresh_status() == store.COMPLETE and again.meta["completed"]
    np.testing.assert_array_equal(zarr.open_group(first.path, mode="r")["layers/l0"][:], layers["l0"])


def test_a_failed_run_stays_failed_until_extracted_again(cache, layers):
    run = make_run(cache, "net", layers, 16, chunks=[0])
    run.set_meta(status=store.FAILED, error="layer 'l0' has NaN")
    for k in (1, 2, 3):
        run.write_chunk(k, {name: x[run.chunk_slice(k)] for name, x in layers.items()})
    assert run.refresh_status() == store.FAILED  # every marker set, but the error stands


# --------------------------------------------------------------------------- what is and is not a run store


def test_a_store_holding_another_run_under_this_name_is_refused(cache, layers):
    """A store copied over another's directory: the key in its attributes is not the key of its name."""
    run = make_run(cache, "net", layers, 16)
    other = store.RunSpec(**{**run.spec.to_dict(), "weights_hash": "other-weights", "layers": run.spec.layers})
    shutil.copytree(run.path, cache / other.dirname)
    with pytest.raises(StoreError, match=rf"run {other.dirname} has inconsistent metadata: the store's name does not end with its key {run.key}"):
        store.create_run(cache, other, np.arange(64), {})


def test_a_zarr_group_that_is_not_a_run_store(cache, layers):
    make_run(cache, "net", layers, 16)
    plain = zarr.open_group(cache / "plain-0123456789", mode="w")
    plain.create_array("x", shape=(4,), dtype="float32")
    (cache / "notes").mkdir()
    (cache / "notes" / "zarr.json").write_text("not json")
    with pytest.raises(StoreError, match=r"plain-0123456789 is a Zarr group but not a ckapipe run store \(no 'ckapipe' attributes\)"):
        store.open_run(cache / "plain-0123456789")
    with pytest.raises(StoreError, match=r"notes is not a ckapipe run store \("):
        store.open_run(cache / "notes")
    assert [run.slug for run in store.list_runs(cache)] == ["net"]  # the others are passed over
    with pytest.raises(StoreError, match=r"no run 'plain' in cache"):
        store.find_runs(cache, ["plain"])


def test_a_missing_cache_and_an_unusable_run_name(tmp_path):
    with pytest.raises(StoreError, match=r"cache directory .*nowhere does not exist"):
        store.list_runs(tmp_path / "nowhere")
    for bad in ("../up", "a/b", ".hidden", "x" * 81):
        with pytest.raises(StoreError, match="is not usable"):
            store.check_run_name(bad)
    with pytest.raises(StoreError, match="dtype 'int8' is not supported"):
        store.check_dtype("int8")


# --------------------------------------------------------------------------- names, aliases, globs


def test_names_aliases_and_globs(cache, layers):
    a = make_run(cache, "student-a", layers, 16)
    b = make_run(cache, "student-b", layers, 16, seed=1)
    assert [r.name for r in store.find_runs(cache, ["student-*"])] == [a.name, b.name]
    assert store.find_runs(cache, [a.key])[0].name == a.name
    same = store.create_run(cache, store.RunSpec(**{**a.spec.to_dict(), "layers": a.spec.layers, "name": "teacher"}),
                            np.arange(64), {})
    assert same.path == a.path and a.aliases() == ["teacher"]  # the same contents: one store, two names
    assert store.find_runs(cache, ["teacher"])[0].name == a.name
    assert store.find_runs(cache, ["teach*"])[0].name == a.name
    with pytest.raises(StoreError, match=r"no run 'studnet-a'.*did you mean: student-a"):
        store.find_runs(cache, ["studnet-a"])


def test_a_name_given_to_two_stores_is_ambiguous(cache, layers):
    make_run(cache, "twin", layers, 16, seed=0)
    make_run(cache, "twin", layers, 16, seed=1)
    with pytest.raises(StoreError, match=r"run name 'twin' is ambiguous: name one of twin-\w+ \(zoo:twin on synthetic\); twin-"):
        store.find_runs(cache, ["twin"])
    assert len(store.find_runs(cache, ["tw*"])) == 2  # a glob picks every store it matches


@pytest.mark.parametrize("spec, slug", [
    ("zoo:cnn3?seed=1", "cnn3-seed1"),
    ("torchvision:resnet18?weights=none", "resnet18-weightsnone"),
    ("mypkg.nets:student?width=2", "student-width2"),
    ("cifar10:/data/cifar?split=test", "cifar10-splittest"),
    ("checkpoints/model.pt?arch=mypkg.nets:net", "model.pt-archnet"),
])
def test_slugs_keep_what_tells_runs_apart(spec, slug):
    assert store.spec_slug(spec) == slug


# --------------------------------------------------------------------------- writer locks


def test_overlapping_chunk_ranges_are_refused_and_disjoint_ones_proceed(cache, layers):
    run = make_run(cache, "net", layers, 16, chunks=[])
    with writer_lock(run.path, range(0, 2)):
        with pytest.raises(StoreError, match=r"being extracted by another process \(host \S+ pid \d+, heartbeat \d+ s ago\) for chunks 0-2"):
            with writer_lock(run.path, range(1, 4)):
                pass
        with writer_lock(run.path, range(2, 4)):
            assert sorted(p.name for p in lock_dir(run.path).iterdir()) == ["0-2.lock", "2-4.lock"]
    assert not list(lock_dir(run.path).iterdir())  # each writer removes its claim


HOLD_LOCK = """
import sys, time
from ckapipe.store.locks import writer_lock
with writer_lock(sys.argv[1], range(0, 4)):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_lock_of_a_killed_writer_is_taken_over(cache, layers):
    run = make_run(cache, "net", layers, 16, chunks=[])
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run.path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"another process \(host \S+ pid {proc.pid}, "):
            with writer_lock(run.path, range(3, 4)):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (lock_dir(run.path) / "0-4.lock").exists()  # SIGKILL leaves the claim behind ...
    with writer_lock(run.path, range(0, 4)):  # ... and the next writer takes it over
        assert (lock_dir(run.path) / "0-4.lock").read_text().split()[1] != str(proc.pid)


# --------------------------------------------------------------------------- the Gram cache


def test_gram_cache_rows_round_trip_by_minibatch(tmp_path):
    """GramCache: rows written for minibatches 0, 1 and 3 (two runs of consecutive minibatches) read
    back, into a given array too; minibatch 2 stays unmarked and reads as NaN."""
    run = make_run(tmp_path, "net", random_layers(np.random.default_rng(3), 80, [6, 9, 4]), 16)
    cache = run.grams(8, create=True)
    assert cache.n_minibatches == 10 and not cache.done().any()
    rows = np.random.default_rng(4).standard_normal((3, 3, 8 * 9 // 2))
    means = np.random.default_rng(5).standard_normal((3, 3, 9))
    cache.write([0, 1, 3], rows, means)
    again = run.grams(8)
    assert list(again.done()) == [True, True, False, True] + [False] * 6
    assert list(again.done([1, 2, 3])) == [True, False, True]
    np.testing.assert_array_equal(again.read_centered([0, 1, 3]), rows)
    np.testing.assert_array_equal(again.read_means([0, 1, 3]), means)
    into = np.zeros((2, 3, 36))
    assert again.read_centered([1, 3], into) is into
    np.testing.assert_array_equal(into, rows[1:])
    assert np.isnan(again.read_centered([2])).all()


def test_a_gram_cache_is_stamped_and_a_wrong_stamp_is_refused(cache, layers):
    run = make_run(cache, "net", layers, 16)
    assert run.grams(16) is None and run.gram_sizes() == []
    run.grams(16, create=True)
    assert run.gram_sizes() == [16] and run.grams(16).layers == ["l0", "l1"]
    group = run.group["grams/m16"]
    group.attrs["layers"] = ["l1", "l0"]  # rows are positional: another order is another cache
    with pytest.raises(StoreError, match=r"Gram cache of run net-\w+ at m=16 is not this run's \(another layer list\)"):
        run.grams(16)
    del group.attrs["run_key"]
    with pytest.raises(StoreError, match=r"is not this run's \(no stamp\): delete .*grams/m16 and it is filled again"):
        run.grams(16)


def test_an_unreadable_gram_chunk_is_named(cache, layers):
    run = make_run(cache, "net", layers, 16)
    grams = run.grams(16, create=True)
    grams.write([0], np.zeros((1, 2, 16 * 17 // 2)), np.zeros((1, 2, 17)))
    (run.path / "grams" / "m16" / "centred" / "c" / "0" / "0" / "0").write_bytes(b"flipped")
    with pytest.raises(StoreError, match=r"the Gram row of minibatch 0 \(m=16, every layer\) in run net-\w+ cannot be "
                                         r"read: .*ckapipe verify net-\w+ --repair"):
        run.grams(16).read([0])


def test_a_run_too_small_for_a_gram_size(cache, layers):
    run = make_run(cache, "net", layers, 16)
    with pytest.raises(CkapipeError, match="at least 4"):
        run.grams(2, create=True)
    assert store.disk_size(run.path) > layers["l0"].nbytes // 4  # compressed, but there


def test_an_old_unreadable_lock_is_dead_and_a_fresh_one_from_another_host_is_alive(cache, layers):
    run = make_run(cache, "net", layers, 16, chunks=[])
    locks = lock_dir(run.path)
    locks.mkdir(parents=True)
    (locks / "0-2.lock").write_text("")  # a writer killed between creating its claim and writing it ...
    old = time.time() - 3600
    os.utime(locks / "0-2.lock", (old, old))  # ... an hour ago
    with writer_lock(run.path, range(0, 2)):
        pass
    (locks / "0-2.lock").write_text("gpu-node-17 4242\n")  # an older ckapipe's lock, written just now on another node
    with pytest.raises(StoreError, match=r"being extracted by another process \(host gpu-node-17 pid 4242"):
        with writer_lock(run.path, range(1, 3)):
            pass


# --------------------------------------------------------------------------- atomic writes


def test_a_write_that_fails_leaves_nothing_behind(tmp_path):
    """ENOSPC from the kernel (/dev/full) inside the block: one line naming the path, no temporary left."""
    target = tmp_path / "results"
    with pytest.raises(StoreError, match=rf"cannot write {target}: the disk is full"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "part").write_text("half")
            with open("/dev/full", "wb") as full:
                full.write(b"x")
                full.flush()
    assert not list(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert not list(tmp_path.iterdir())


def test_the_first_writer_wins_unless_replacing(tmp_path):
    target = tmp_path / "store"
    for text in ("first", "second"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "who").write_text(text)
    assert (target / "who").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    with atomic_path(target, replace=True) as tmp:  # a directory is replaced whole
        tmp.mkdir()
        (tmp / "new").write_text("third")
    assert [p.name for p in target.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    with atomic_path(tmp_path / "alias", replace=True) as tmp:
        tmp.write_text("a")
    with atomic_path(tmp_path / "alias", replace=True) as tmp:
        tmp.write_text("b")
    assert (tmp_path / "alias").read_text() == "b"


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied"), (errno.EIO, os.strerror(errno.EIO))])
def test_file_system_errors_in_a_few_words(code, words):
    assert describe_os_error(OSError(code, os.strerror(code))) == words


def test_each_file_of_the_store_package_imports_only_those_above_it_in_its_map():
    """ckapipe/store/__init__.py lists its files bottom first; each imports only files listed before it
    (no cycle inside the package) and nothing of the stages (the store is their floor)."""
    import ast
    import re

    package = REPO / "ckapipe" / "store"
    order = re.findall(r"^    (\w+)\.py ", store.__doc__, flags=re.M)
    assert sorted(order) == sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    for i, name in enumerate(order):
        tree = ast.parse((package / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        inside = {m.removeprefix("ckapipe.store.") for m in imported if m.startswith("ckapipe.store.")}
        assert inside <= set(order[:i]), f"store/{name}.py imports {sorted(inside - set(order[:i]))}, listed after it"
        stages = {m for m in imported if m.split(".")[:2][-1] in ("extract", "analyze", "pipelines")}
        assert not stages, f"store/{name}.py imports {sorted(stages)}"

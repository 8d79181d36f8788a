"""extract_run: sample order, chunk contents, cache hits, resume, locks, Grams, bad values."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ckapipe.kernels import u_centered_triangle_from_features
from ckapipe import store
from ckapipe.store.locks import writer_lock
from ckapipe.errors import CkapipeError
from ckapipe.extract.runner import extract_run
from ckapipe.extract.zoo import digits_tensors
from tests import REPO

MLP = "zoo:mlp2?seed=0"  # trained once per pytest run into the zoo_cache fixture (conftest.py)


def _cache(zoo_cache, tmp_path) -> Path:
    """A fresh cache sharing the zoo checkpoints."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "models").symlink_to(zoo_cache / "models")
    return tmp_path


STAGES = ["block?", "head"]  # the zoo networks' stages and logits (the default is every leaf module)


def _extract(cache, **kw):
    kw = {"batch_size": 64, "progress": False, **kw}
    return store.open_run(extract_run(kw.pop("model", MLP), kw.pop("dataset", "digits"), kw.pop("layers", STAGES), cache=cache, **kw))


def test_chunks_hold_the_permuted_samples_through_the_model(zoo_cache, tmp_path):
    run = _extract(_cache(zoo_cache, tmp_path), batch_size=100)
    from ckapipe.extract.models import load_model

    model = load_model(MLP, cache=zoo_cache).module
    x, _ = digits_tensors()
    ids = run.sample_ids()
    assert sorted(ids) == list(range(1797)) and not np.array_equal(ids, np.arange(1797))
    assert run.n_chunks == 18 and run.status == store.COMPLETE
    with torch.no_grad():
        for k in (0, 17):
            rows = ids[run.chunk_slice(k)]
            hidden = model.block1(x[rows])
            np.testing.assert_allclose(run.read_chunk("block1", k), hidden.numpy(), rtol=1e-6)
            np.testing.assert_allclose(run.read_chunk("head", k), model(x[rows]).numpy(), rtol=1e-5, atol=1e-6)
    assert run.layer("block1").attrs["output_shape"] == [64] and run.layer("block1").chunks == (100, 64)


def test_same_spec_twice_gives_identical_order_and_chunks(zoo_cache, tmp_path):
    a = _extract(_cache(zoo_cache, tmp_path / "a"), order_seed=3)
    b = _extract(_cache(zoo_cache, tmp_path / "b"), order_seed=3)
    c = _extract(_cache(zoo_cache, tmp_path / "c"), order_seed=4)
    assert a.name == b.name and a.name != c.name
    np.testing.assert_array_equal(a.sample_ids(), b.sample_ids())
    assert [a.chunk_slice(k) for k in range(a.n_chunks)] == [b.chunk_slice(k) for k in range(b.n_chunks)]
    np.testing.assert_array_equal(a.layer("head")[:], b.layer("head")[:])
    assert not np.array_equal(a.sample_ids(), c.sample_ids())


def test_second_extract_is_a_cache_hit(zoo_cache, tmp_path, monkeypatch):
    cache = _cache(zoo_cache, tmp_path)
    first = _extract(cache)
    import ckapipe.extract.runner

    monkeypatch.setattr(ckapipe.extract.runner, "_extract_chunks", lambda *a, **k: pytest.fail("cache hit ran a forward"))
    assert _extract(cache).path == first.path


def test_batch_size_under_four_refused(tmp_path):
    with pytest.raises(CkapipeError, match="batch size 3 is too small.*at least 4"):
        extract_run(MLP, "digits", cache=tmp_path, batch_size=3)


def test_unwritable_cache(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(store.StoreError, match="cannot create cache directory .*file/cache"):
        extract_run(MLP, "digits", cache=tmp_path / "file" / "cache")
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o500)
    try:
        if os.access(blocked, os.W_OK):  # root ignores permissions: ask again without that privilege
            proc = without_permission_override([sys.executable, "-m", "ckapipe", "extract", "-m", MLP, "--cache", str(blocked)])
            assert proc.returncode == 2 and "ckapipe: error: cache directory" in proc.stderr, proc.stderr
            assert "is not writable" in proc.stderr and not list(blocked.iterdir())
        else:
            with pytest.raises(store.StoreError, match="not writable"):
                extract_run(MLP, "digits", cache=blocked)
    finally:
        blocked.chmod(0o700)


def without_permission_override(argv: list[str]) -> subprocess.CompletedProcess:
    """Run ``argv`` as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (util-linux setpriv drops
    them from the bounding set), so that file permissions apply as to any user; skip, saying why, where
    that is impossible."""
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot test an unwritable cache")
    probe = subprocess.run([*drop, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({probe.stderr.strip()})")
    return subprocess.run([*drop, *argv], capture_output=True, text=True, cwd=REPO)


def test_nan_marks_the_run_failed_naming_layer_and_minibatch(tmp_path):
    with pytest.raises(CkapipeError, match=r"layer 'fc' has NaN or Inf activations in minibatch \d+"):
        _extract(tmp_path, model="tests.spec_factories:poisoned", layers=["fc"], batch_size=32)
    (path,) = [r.path for r in store.list_runs(tmp_path)]
    run = store.open_run(path)
    assert run.status == store.FAILED and "NaN" in run.meta["error"]


def test_float16_overflow_is_an_error_not_inf(tmp_path):
    spec = "tests.spec_factories:poisoned?value=1e6"
    with pytest.raises(CkapipeError, match=r"layer 'fc' reaches 1e\+06 in minibatch \d+, beyond float16"):
        _extract(tmp_path, model=spec, layers=["fc"], dtype="float16")
    run = _extract(tmp_path, model=spec, layers=["fc"], dtype="float32")
    assert run.status == store.COMPLETE and np.nanmax(run.layer("fc")[:]) == 1e6


def test_float16_when_asked(zoo_cache, tmp_path):
    run = _extract(_cache(zoo_cache, tmp_path), dtype="float16")
    assert run.layer("head").dtype == np.float16 and run.layer("head").attrs["dtype"] == "float16"


def test_full_disk_keeps_the_store_resumable(zoo_cache, tmp_path, monkeypatch):
    cache = _cache(zoo_cache, tmp_path)
    real = store.Run.write_chunk
    written = []

    def failing(self, k, arrays):
        if len(written) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, k, arrays)
        written.append(k)

    monkeypatch.setattr(store.Run, "write_chunk", failing)
    with pytest.raises(store.StoreError, match=r"the disk is full; completed chunks are kept.*rerun to resume"):
        _extract(cache)
    monkeypatch.setattr(store.Run, "write_chunk", real)
    (path,) = [r.path for r in store.list_runs(cache)]
    assert store.open_run(path).done().sum() == len(written) >= 3 and store.open_run(path).status == store.IN_PROGRESS
    run = _extract(cache)
    reference = _extract(_cache(zoo_cache, tmp_path / "ref"))
    assert run.status == store.COMPLETE
    np.testing.assert_array_equal(run.layer("block2")[:], reference.layer("block2")[:])


def test_concurrent_extract_refused_disjoint_chunks_allowed(zoo_cache, tmp_path):
    cache = _cache(zoo_cache, tmp_path)
    first = _extract(cache, chunks=(0, 2))
    assert list(first.done()) == [True, True] + [False] * 27
    with writer_lock(first.path, range(0, 10)):  # another live writer holds chunks 0-9
        with pytest.raises(store.StoreError, match="being extracted by another process.*disjoint --chunks"):
            _extract(cache, chunks=(5, 12))
        run = _extract(cache, chunks=(10, 29))
        assert run.done()[10:].all() and not run.done()[2:10].any()
    assert _extract(cache).status == store.COMPLETE


def test_grams_match_the_kernel_and_grams_only_keeps_no_activations(zoo_cache, tmp_path):
    cache = _cache(zoo_cache, tmp_path)
    run = _extract(cache, grams=True, batch_size=100)
    grams = run.grams(100)
    assert grams.done().all() and grams.n_minibatches == 17  # full minibatches only
    head = run.layer_names.index("head")
    np.testing.assert_allclose(grams.read([5])[0, head], u_centered_triangle_from_features(run.read_chunk("head", 5)), rtol=1e-10)
    only = _extract(cache, grams_only=True, batch_size=100)
    assert only.path != run.path and "layers" not in only.group and only.status == store.COMPLETE
    every = list(range(17))
    np.testing.assert_allclose(only.grams(100).read(every), grams.read(every), rtol=1e-9)


def test_grams_added_to_a_complete_run_from_its_store(zoo_cache, tmp_path, monkeypatch):
    cache = _cache(zoo_cache, tmp_path)
    run = _extract(cache)
    import ckapipe.extract.writer

    monkeypatch.setattr(ckapipe.extract.writer.ChunkWriter, "submit", lambda *a: pytest.fail("activations were recomputed"))
    again = _extract(cache, grams=True)
    assert again.path == run.path and again.grams(64).done().all()


SCRIPT = """
import sys
from ckapipe.extract.runner import extract_run
extract_run("tests.spec_factories:slow?delay={delay}", "digits", cache=sys.argv[1], batch_size=8, limit=320, progress=False)
"""


def test_sigkill_mid_extraction_then_rerun_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(delay=0.05), str(killed)], cwd=REPO)
    try:
        done = _wait_for_chunks(killed, proc, at_least=5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 5 <= done < 40, "the run was not killed mid-extraction"
    (path,) = [r.path for r in store.list_runs(killed)]
    assert store.open_run(path).status == store.IN_PROGRESS
    spec = "tests.spec_factories:slow?delay=0.05"
    resumed = store.open_run(extract_run(spec, "digits", cache=killed, batch_size=8, limit=320, progress=False))
    reference = store.open_run(extract_run(spec, "digits", cache=clean, batch_size=8, limit=320, progress=False))
    assert resumed.status == store.COMPLETE and resumed.name == reference.name
    for layer in reference.layer_names:
        np.testing.assert_array_equal(resumed.layer(layer)[:], reference.layer(layer)[:])


def _wait_for_chunks(cache: Path, proc, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        runs = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")] if cache.exists() else []
        if runs:
            done = int(store.open_run(runs[0]).done().sum())
            if done >= at_least:
                return done
        time.sleep(0.02)
    raise AssertionError(f"extraction subprocess did not reach {at_least} chunks (rc={proc.poll()})")


def test_module_object_and_a_limit_beyond_the_dataset(tmp_path):
    from tests.spec_factories import BlockNet

    torch.manual_seed(0)
    net = BlockNet()
    a = store.open_run(extract_run(net, "digits", ["block"], cache=tmp_path, batch_size=256, progress=False))
    b = store.open_run(extract_run(net, "digits", ["block"], cache=tmp_path, batch_size=256, limit=5000, progress=False))
    assert a.path == b.path and a.spec.model == "module:tests.spec_factories.BlockNet" and a.n_samples == 1797


def test_token_mean_honours_the_padding_mask_end_to_end(tmp_path):
    from ckapipe.extract.models import load_model
    from tests.spec_factories import token_rows

    run = _extract(tmp_path, model="tests.spec_factories:tokens", dataset="tests.spec_factories:token_rows", layers=["encoder:mean", "embed"], batch_size=4)
    embed = load_model("tests.spec_factories:tokens").module.embed.weight.detach()
    rows = token_rows()
    for row, i in enumerate(run.sample_ids()):
        ids = torch.tensor(rows[i]["input_ids"])
        np.testing.assert_allclose(run.layer("encoder")[row], embed[ids].mean(0).numpy(), rtol=1e-6)
    assert run.layer("encoder").attrs["reduction"] == "mean"
    with pytest.raises(CkapipeError, match="'encoder' is selected twice, with different selectors or reductions"):
        _extract(tmp_path, model="tests.spec_factories:tokens", dataset="tests.spec_factories:token_rows", layers=["encoder:mean", "encoder:cls"], batch_size=4)


def test_a_disk_slower_than_the_model_loses_no_chunk(zoo_cache, tmp_path, monkeypatch):
    """The writers' queue fills while they write (a slow disk): closing waits for every queued chunk."""
    real = store.Run.write_chunk

    def slow_disk(self, k, arrays):
        time.sleep(0.3)
        real(self, k, arrays)

    monkeypatch.setattr(store.Run, "write_chunk", slow_disk)
    run = _extract(_cache(zoo_cache, tmp_path), limit=640)  # 10 minibatches: 2 in the writers, 4 queued, 4 waiting
    assert run.status == store.COMPLETE and run.done().all()


def test_a_failed_run_is_extracted_again_once_the_fault_is_gone(zoo_cache, tmp_path):
    """NaN activations mark the run failed with the error; rerunning the same spec after the cause is
    fixed resumes the same store, clears the error and completes it, equal to a run that never failed."""
    flag = tmp_path / "nan-while-this-exists"
    flag.touch()
    spec = f"tests.spec_factories:flaky?flag={flag}"
    with pytest.raises(CkapipeError, match=r"layer 'fault' has NaN or Inf activations in minibatch \d+"):
        _extract(tmp_path / "cache", model=spec, layers=["fault"], limit=256)
    (failed,) = store.list_runs(tmp_path / "cache")
    assert failed.status == store.FAILED and "NaN" in failed.meta["error"] and not failed.done().all()
    flag.unlink()
    run = _extract(tmp_path / "cache", model=spec, layers=["fault"], limit=256)
    assert run.path == failed.path and run.status == store.COMPLETE and run.meta["error"] is None
    clean = _extract(tmp_path / "clean", model=spec, layers=["fault"], limit=256)
    np.testing.assert_array_equal(run.layer("fault")[:], clean.layer("fault")[:])


def test_chunks_beyond_the_run_are_refused_before_any_forward(zoo_cache, tmp_path, monkeypatch, capsys):
    from ckapipe.cli import main
    import ckapipe.extract.runner

    monkeypatch.setattr(ckapipe.extract.runner, "_extract_chunks", lambda *a, **k: pytest.fail("extracted"))
    cache = _cache(zoo_cache, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", "-m", MLP, "-b", "64", "--chunks", "30:40", "--cache", str(cache), "-q"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "ckapipe: error: --chunks 30:40 is not a range within the run's 29 minibatches\n"
    with pytest.raises(CkapipeError, match=r"--chunks 5:2 is not a range"):
        _extract(cache, chunks=(5, 2))


def test_cuda_without_a_gpu_is_refused(zoo_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    cache = _cache(zoo_cache, tmp_path)
    with pytest.raises(CkapipeError, match=r"--device cuda needs a CUDA GPU that torch can use, and none is available: use --device cpu"):
        _extract(cache, device="cuda")
    with pytest.raises(CkapipeError, match=r"unknown device 'gpu': use auto, cpu, cuda or cuda:i"):
        _extract(cache, device="gpu")
    assert not store.list_runs(tmp_path)  # refused before a store was created


def test_ctrl_c_mid_extraction_exits_130_and_keeps_what_was_written(tmp_path):
    """SIGINT, as a terminal's Ctrl-C sends it: 'ckapipe: aborted', exit status 130, the chunks
    written so far kept with their markers (a rerun resumes from there)."""
    command = [sys.executable, "-m", "ckapipe", "extract", "-m", "tests.spec_factories:slow?delay=0.05", "-b", "8",
               "--limit", "1600", "--cache", str(tmp_path), "-q"]  # 200 minibatches: still running when the signal comes
    # A terminal's default disposition of SIGINT: pytest-xdist's workers ignore it, and a child inherits
    # an ignored signal (Python then installs no KeyboardInterrupt handler: the extraction ran to the end).
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_chunks(tmp_path, proc, at_least=3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "ckapipe: aborted", err
    (run,) = store.list_runs(tmp_path)
    assert run.status == store.IN_PROGRESS and 3 <= run.done().sum() < 200

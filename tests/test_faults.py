"""The fault matrix of issue 9: every fault ends in a one-line error (exit 2) or in correct behaviour,
never in exit 0 with a different number, and the store afterwards is complete or resumes to the same bytes.

Networks are the zoo's MLP with random weights (no training), over 256 digits in minibatches of 64.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import ckapipe.analyze as analyze
from ckapipe import store
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.extract.runner import extract_run
from ckapipe.store.locks import lock_dir, read_claim, writer_lock
from tests.cli_calls import ckapipe_cli
from tests.numpy_runs import make_run, random_layers
from tests.reference import minibatch_cka_reference

REPO = Path(__file__).resolve().parents[1]
M, N = 64, 256
A = "zoo:mlp2?weights=none&init_seed=0"
B = "zoo:mlp2?weights=none&init_seed=1"
G = "zoo:mlp2?weights=none&init_seed=2"
LAYERS = ("block1", "block2", "head")


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("ckapipe: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def extract(cache, model=A, **kw) -> store.Run:
    kw = {"batch_size": M, "limit": N, "progress": False, **kw}
    kw.setdefault("layers", ["block?", "head"])  # the zoo networks' stages (the default is every leaf module)
    return store.open_run(extract_run(model, "digits", cache=cache, **kw))


def stored(run: store.Run) -> dict[str, np.ndarray]:
    """The layers as plain zarr reads them (independent of ckapipe's reader)."""
    group = zarr.open_group(run.path, mode="r")
    return {name: group[f"layers/{name}"][:] for name in run.layer_names}


def chunk_files(run_path: Path) -> dict[str, bytes]:
    """Every chunk file of a run's layers, by path inside the store."""
    return {str(p.relative_to(run_path)): p.read_bytes()
            for p in sorted((run_path / "layers").rglob("*")) if p.is_file() and p.name != "zarr.json"}


def leftovers(root: Path) -> list[str]:
    """Hidden temporaries that a failed write must never leave (``.NAME.staging-PID``, zarr's ``.partial``)."""
    return sorted(str(p) for p in root.rglob("*") if ".staging-" in p.name or p.name.endswith(".partial"))


# --------------------------------------------------------------------------- 1. the writer


def test_slow_writer_still_writes_every_chunk(tmp_path, monkeypatch, capsys):
    """Writes slower than the forward pass fill the writer's queue; every chunk is still written."""
    real = store.Run.write_chunk

    def slow(self, k, arrays):
        time.sleep(0.2)  # a write takes longer than the writer's 0.1 s wait for room in its queue
        real(self, k, arrays)

    monkeypatch.setattr(store.Run, "write_chunk", slow)
    code, out, err = ckapipe_cli(capsys, "extract", "-m", A, "-b", 32, "--limit", N, "--cache", tmp_path / "cli", "-q")
    assert code == 0 and "complete, 8/8 minibatches" in out, err
    run = extract(tmp_path / "api", batch_size=32, writer_threads=1)
    assert run.status == store.COMPLETE and run.done().all()
    monkeypatch.setattr(store.Run, "write_chunk", real)
    reference = extract(tmp_path / "ref", batch_size=32)
    assert chunk_files(run.path) == chunk_files(reference.path)


def test_a_chunk_left_unwritten_is_an_error_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    real = store.Run.write_chunk
    monkeypatch.setattr(store.Run, "write_chunk", lambda self, k, arrays: None if k == 2 else real(self, k, arrays))
    code, _, err = ckapipe_cli(capsys, "extract", "-m", A, "-l", "block?,head", "-b", M, "--limit", N, "--cache", tmp_path,
                              "-q")
    assert_one_line_error(code, err, "1 minibatch(es) of 0:4 were not written (first 2)", "rerun")
    with pytest.raises(StoreError, match="were not written"):
        extract(tmp_path, chunks=(1, 3))
    monkeypatch.setattr(store.Run, "write_chunk", real)
    run = extract(tmp_path)
    assert run.status == store.COMPLETE
    assert chunk_files(run.path) == chunk_files(extract(tmp_path / "ref").path)


# --------------------------------------------------------------------------- 2. corruption


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Runs a (blosc-lz4), b (no compression) and g (blosc-lz4, Grams filled at extraction), their
    chunk files, and the CKA of every layer pair from the float64 formula."""
    cache = tmp_path_factory.mktemp("pristine")
    runs = [extract(cache, A, name="a"), extract(cache, B, name="b", compression="none"),
            extract(cache, G, name="g", grams=True)]
    features = {run.slug: stored(run) for run in runs}
    expected = {(a, b): np.array([[minibatch_cka_reference(x, y, M) for y in features[b].values()]
                                  for x in features[a].values()])
                for a in features for b in features}
    return cache, {run.slug: chunk_files(run.path) for run in runs}, expected


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    x, y = a.read_bytes(), b.read_bytes()
    a.write_bytes(y)
    b.write_bytes(x)


def _edit_meta(run_path: Path, edit) -> None:
    """Edit the run's attributes in its zarr.json by hand, as a user with an editor would."""
    meta_file = run_path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    edit(meta["attributes"]["ckapipe"])
    meta_file.write_text(json.dumps(meta, indent=2))


def _store(cache: Path, slug: str) -> Path:
    (path,) = [p for p in cache.iterdir() if p.name.startswith(f"{slug}-")]
    return path


def _chunk(cache, slug, layer, k) -> Path:
    return _store(cache, slug) / "layers" / layer / "c" / str(k) / "0"


def _gram_row(cache, slug, k) -> Path:
    return _store(cache, slug) / "grams" / f"m{M}" / "centred" / "c" / str(k) / "0" / "0"


CORRUPTIONS = {
    # name: (corrupt(cache), run, what the errors name)
    "flip in a compressed chunk": (lambda c: _flip(_chunk(c, "a", "block1", 2)), "a", ("'block1'", "2")),
    "flip in an uncompressed chunk": (lambda c: _flip(_chunk(c, "b", "block2", 1), 0.3), "b", ("'block2'", "1")),
    "flip in a Gram row": (lambda c: _flip(_gram_row(c, "g", 3), 0.7), "g", ("Gram row", "3")),
    "truncated chunk": (lambda c: _chunk(c, "a", "head", 3).write_bytes(_chunk(c, "a", "head", 3).read_bytes()[:100]),
                        "a", ("'head'", "3")),
    "deleted chunk": (lambda c: _chunk(c, "b", "head", 0).unlink(), "b", ("'head'", "0")),
    "swapped chunk files": (lambda c: _swap(_chunk(c, "a", "block2", 0), _chunk(c, "a", "block2", 1)),
                            "a", ("'block2'", "0")),
    "swapped Gram rows": (lambda c: _swap(_gram_row(c, "g", 0), _gram_row(c, "g", 2)), "g", ("Gram row", "0")),
    "chunk copied from another run": (lambda c: shutil.copyfile(_chunk(c, "g", "block1", 1), _chunk(c, "a", "block1", 1)),
                                      "a", ("'block1'", "1")),
    "layers reordered in zarr.json": (lambda c: _edit_meta(_store(c, "a"), lambda m: m["layers"].reverse()),
                                      "a", ("layers",)),
    "n_samples edited in zarr.json": (lambda c: _edit_meta(_store(c, "b"), lambda m: m.update(n_samples=N - 1)),
                                      "b", ("n_samples",)),
    "a foreign Gram cache": (lambda c: shutil.copytree(_store(c, "g") / "grams", _store(c, "a") / "grams"),
                             "a", ("Gram cache", f"m={M}", "not this run's")),
}


@pytest.mark.parametrize("fault", list(CORRUPTIONS))
def test_corruption_is_named_by_analyze_and_verify_and_repaired(fault, pristine, tmp_path, capsys):
    source, files, expected = pristine
    cache = tmp_path / "cache"
    shutil.copytree(source, cache, symlinks=True)
    corrupt, slug, named = CORRUPTIONS[fault]
    corrupt(cache)
    name = _store(cache, slug).name

    code, out, err = ckapipe_cli(capsys, "analyze", "--cache", cache, "a", "b", "g", "--out", tmp_path / "out", "-q")
    assert_one_line_error(code, err, name, *named)
    assert not (tmp_path / "out").exists()

    code, out, err = ckapipe_cli(capsys, "verify", "--cache", cache, "-q")
    assert_one_line_error(code, err, "in 1 of 3 run(s)")
    report = out[out.index(name):]
    assert all(fragment in report for fragment in named), out
    assert "ok" in out.split(_store(cache, "a" if slug != "a" else "b").name)[1].split("\n")[0]

    code, out, err = ckapipe_cli(capsys, "verify", "--cache", cache, "--repair", "-q")
    metadata = "zarr.json" in fault
    assert (code == 2) if metadata else (code == 0), err
    for line in out.splitlines():  # the commands verify prints rebuild what it found bad
        command = line.strip().split(" && ")[-1]
        if line.strip().startswith("rm -r "):
            shutil.rmtree(shlex.split(line.strip())[2])
        if command.startswith("ckapipe extract"):
            assert ckapipe_cli(capsys, *shlex.split(command)[1:], "-q")[0] == 0

    results = analyze.analyze(cache, ["a", "b", "g"], progress=False)
    for (a, b), cka in expected.items():
        np.testing.assert_allclose(results.cka(a, b).values, cka, rtol=1e-6, atol=1e-6)
    assert ckapipe_cli(capsys, "verify", "--cache", cache, "-q")[0] == 0
    for slug_, before in files.items():
        assert chunk_files(_store(cache, slug_)) == before, slug_


def test_store_version_2_is_read_as_before_and_reported_without_checksums(pristine, tmp_path, capsys):
    _, _, expected = pristine
    old = extract(tmp_path, A, name="a", checksums=False)
    assert old.store_version == 2 and "checksums" not in old.group
    results = analyze.analyze(tmp_path, ["a"], progress=False)
    np.testing.assert_allclose(results.cka("a").values, expected[("a", "a")], rtol=1e-6, atol=1e-6)
    code, out, _ = ckapipe_cli(capsys, "verify", "--cache", tmp_path, "-q")
    assert code == 0 and "no checksums (store version 2)" in out


# --------------------------------------------------------------------------- 3. float16 and --grams


def test_float16_grams_filled_at_extraction_are_those_of_the_stored_values(tmp_path):
    run = extract(tmp_path, A, dtype="float16", grams=True)
    cached = analyze.analyze(tmp_path, [run.name], progress=False)
    fresh = analyze.analyze(tmp_path, [run.name], progress=False, use_gram_cache=False)
    np.testing.assert_allclose(cached.hsic, fresh.hsic, rtol=1e-12, atol=0)
    x = run.read_chunk("block1", 1).astype(np.float64)  # the float16 values stored
    k = (x - x.mean(0)) @ (x - x.mean(0)).T
    np.fill_diagonal(k, 0)
    u = k - k.sum(0)[:, None] / (M - 2) - k.sum(0)[None, :] / (M - 2) + k.sum() / ((M - 1) * (M - 2))
    np.fill_diagonal(u, 0)
    row = run.grams(M).read([1])[0, run.layer_names.index("block1")]
    np.testing.assert_allclose(row, u[np.triu_indices(M, 1)], rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
def test_float16_grams_filled_on_the_gpu_are_those_of_the_stored_values(tmp_path):
    """The CUDA twin of the test above: Grams computed where the activations are (writer.device_grams)."""
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0 or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    run = extract(tmp_path, A, dtype="float16", grams=True, device="cuda")
    cached = analyze.analyze(tmp_path, [run.name], progress=False)
    fresh = analyze.analyze(tmp_path, [run.name], progress=False, use_gram_cache=False)
    np.testing.assert_allclose(cached.hsic, fresh.hsic, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- 4. bad input


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """A working directory holding bad inputs; returns their paths by name."""
    monkeypatch.chdir(tmp_path)
    np.save("empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.save("zero_d.npy", np.array(3.0))
    np.save("objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with zipfile.ZipFile("not_torchscript.pt", "w") as archive:
        archive.writestr("notes.txt", "not a model")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"weight": Evil()}, "evil.pt")
    Path("latin1.yaml").write_bytes("runs:\n  caf\xe9: zoo:mlp2\n".encode("latin-1"))
    study = "study: s\ncache: cache\nextract: {{dataset: '{dataset}', batch_size: 64, limit: 64}}\nruns:\n  {run}: '{model}'\n"
    Path("seed.yaml").write_text(study.format(dataset="digits", run="r", model="zoo:mlp2?seed=abc"))
    Path("size.yaml").write_text(study.format(dataset="digits?size=abc", run="r", model=A))
    Path("name.yaml").write_text(study.format(dataset="digits", run="a..b", model=A))
    return tmp_path


BAD_INPUT = [
    (["extract", "-m", "zoo:mlp2?seed=abc"], "model zoo:mlp2: seed='abc' is not an integer"),
    (["extract", "-m", "zoo:mlp2?weights=none&init_seed=abc"], "init_seed='abc' is not an integer"),
    (["extract", "-m", A, "-d", "digits?size=abc"], "dataset digits?size=abc: size='abc' is not an integer"),
    (["extract", "-m", "zoo:mlp2?dept=2"], "takes no parameter 'dept' (its parameters are seed, weights, steps, teacher)"),
    (["extract", "-m", "tests.fault_fixtures:flagged?flg=false"], "takes no parameter 'flg'; did you mean: flag?"),
    (["extract", "-m", "tests.spec_factories:block_net", "--random-init"], "has no 'weights' parameter"),
    (["extract", "-m", A, "--order-seed", "-1"], "--order-seed -1 is not a non-negative integer"),
    (["extract", "-m", A, "-d", "empty.npy"], "dataset empty.npy holds no samples"),
    (["extract", "-m", A, "-d", "zero_d.npy"], "dataset zero_d.npy is a 0-d array"),
    (["extract", "-m", A, "-d", "objects.npy"], "holds Python objects, which ckapipe does not unpickle"),
    (["extract", "-m", "not_torchscript.pt"], "neither a TorchScript archive nor a torch.save checkpoint"),
    (["extract", "-m", "evil.pt?arch=zoo:mlp2"], "holds Python objects besides tensors, which ckapipe does not unpickle"),
    (["extract", "-m", A, "--name", "../../escape"], "run name '../../escape' is not usable"),
    (["extract", "-m", A, "--name", "/abs"], "run name '/abs' is not usable"),
    (["extract", "-m", A, "--name", ".hidden"], "run name '.hidden' is not usable"),
    (["layers", "tests.spec_factories:block_net"], "cannot run on example inputs (3 x 224 x 224 images)"),
    (["run", "latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    (["run", "seed.yaml", "--stage", "extract"], "seed='abc' is not an integer"),
    (["run", "size.yaml", "--stage", "extract"], "size='abc' is not an integer"),
    (["run", "name.yaml", "--stage", "extract"], "run name 'a..b' is not usable"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, inputs, capsys):
    before = sorted(p.name for p in inputs.iterdir())
    cache = [] if args[0] == "run" else ["--cache", "cache"]
    code, _, err = ckapipe_cli(capsys, *args, *cache)
    assert_one_line_error(code, err, message)
    assert "weights_only" not in err and "Traceback" not in err
    assert sorted(p.name for p in inputs.iterdir() if p.name != "cache") == [n for n in before if n != "cache"]
    assert not (inputs / "cache").exists() or not store.list_runs(inputs / "cache")
    assert not leftovers(inputs)


def test_flag_false_means_false():
    from ckapipe.extract.models import load_model

    for text, value in (("false", False), ("False", False), ("true", True), ("TRUE", True)):
        assert load_model(f"tests.fault_fixtures:flagged?flag={text}").module.flag is value


def test_full_disk_creating_a_run_and_writing_results(tmp_path, monkeypatch, capsys):
    """The store layer raising ENOSPC (as a full disk does): one line, nothing half-written left."""
    from zarr.storage import LocalStore

    make_run(tmp_path / "cache", "net", random_layers(np.random.default_rng(0), 64, [8, 12]), 16)
    real = LocalStore.set

    async def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "set", full)
    code, _, err = ckapipe_cli(capsys, "extract", "-m", A, "-b", M, "--limit", N, "--cache", tmp_path / "cache", "-q")
    assert_one_line_error(code, err, "the disk is full")
    code, _, err = ckapipe_cli(capsys, "analyze", "--cache", tmp_path / "cache", "net", "--out", tmp_path / "out", "--ci", "0")
    assert_one_line_error(code, err, f"cannot write {tmp_path / 'out'}: the disk is full")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert [r.slug for r in store.list_runs(tmp_path / "cache")] == ["net"]
    monkeypatch.setattr(LocalStore, "set", real)
    assert ckapipe_cli(capsys, "analyze", "--cache", tmp_path / "cache", "net", "--out", tmp_path / "out", "-q")[0] == 0
    assert extract(tmp_path / "cache").status == store.COMPLETE


FULL_DISK_SCRIPT = r"""
import contextlib, io, json, os, shutil, sys
from pathlib import Path
from ckapipe.cli import main

disk, outside = Path(sys.argv[1]), Path(sys.argv[2])
A, report = sys.argv[3], {}

def ckapipe(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args]); code = 0
        except SystemExit as exit:
            code = exit.code or 0
    return code, err.getvalue()

def fill(leave):
    with open(disk / "filler", "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(disk / "filler", max(0, os.path.getsize(disk / "filler") - leave))

def hidden(root):
    return sorted(str(p) for p in root.rglob("*") if ".staging-" in p.name or p.name.endswith(".partial"))

extract = ["extract", "-m", A, "-l", "block?,head", "-b", "64", "--limit", "512", "--cache", disk / "cache", "-q"]
fill(0)
report["create"] = ckapipe(*extract, "--order-seed", "2") + (hidden(disk),)
os.remove(disk / "filler")
assert ckapipe(*extract, "--chunks", "0:1")[0] == 0
fill(40_000)
report["chunks"] = ckapipe(*extract) + (hidden(disk),)
os.remove(disk / "filler")
report["resume"] = ckapipe(*extract)
run = next(p for p in (disk / "cache").iterdir() if p.name.startswith("mlp2"))
fill(0)
report["results"] = ckapipe("analyze", "--cache", disk / "cache", run.name, "--out", disk / "out", "--no-gram-cache", "--ci", "0", "-q") \
    + (hidden(disk), (disk / "out").exists())
os.remove(disk / "filler")
os.system(f"mount -o remount,ro {disk}")
report["read_only"] = ckapipe(*extract, "--order-seed", "1")
report["read_only_results"] = ckapipe("analyze", "--cache", disk / "cache", run.name, "--out", disk / "out2", "--ci", "0", "-q")
report["files"] = {str(p.relative_to(run)): p.read_bytes().hex() for p in sorted((run / "layers").rglob("*"))
                   if p.is_file() and p.name != "zarr.json"}
print(json.dumps(report))
"""


def test_a_real_full_disk_and_a_read_only_file_system(tmp_path):
    """A small tmpfs in a private mount namespace, really full: creation, chunks, results; then read-only."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small file system")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "script.py"
    script.write_text(FULL_DISK_SCRIPT)
    shell = f'mount -t tmpfs -o size=4m tmpfs "$1" && exec "{sys.executable}" "$2" "$1" "$3" "$4"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", shell, "sh", str(disk), str(script), str(tmp_path), A],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, fragment in (("create", "the disk is full"), ("chunks", "the disk is full"),
                           ("results", "the disk is full"), ("read_only", "not writable"),
                           ("read_only_results", "read-only")):
        code, err = report[case][:2]
        assert_one_line_error(code, err, fragment)
    assert report["create"][2] == [] and report["chunks"][2] == [] and report["results"][2] == []
    assert report["results"][3] is False
    assert report["resume"][0] == 0, report["resume"][1]
    reference = extract(tmp_path / "reference", A, batch_size=64, limit=512)
    assert report["files"] == {k: v.hex() for k, v in chunk_files(reference.path).items()}


def test_the_torch_free_install_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from ckapipe.cli import main
        for args in (["extract", "-m", "zoo:mlp2"], ["layers", "zoo:mlp2"]):
            try:
                main(args)
            except SystemExit as exit:
                print(exit.code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.split() == ["2", "2"], proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ckapipe: error: torch is not installed: install ckapipe's 'torch' extra")
                                   for line in lines), proc.stderr


def test_a_warning_is_one_line(tmp_path):
    layers = random_layers(np.random.default_rng(1), 64, [8])
    layers["flat"] = np.ones((64, 4), np.float32)
    make_run(tmp_path, "net", layers, 16)
    proc = subprocess.run([sys.executable, "-m", "ckapipe", "analyze", "--cache", str(tmp_path), "net", "--out",
                           str(tmp_path / "out"), "-q"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "ckapipe: warning: CKA is undefined for layers with constant activations (HSIC(K, K) = 0): net:flat",
        "ckapipe: warning: only 4 minibatches enter the bootstrap (fewer than 10): its intervals are unreliable; "
        "use more samples or a smaller --batch-size"]


# --------------------------------------------------------------------------- 5. locks across nodes


def _claim(run_path: Path, chunks: str, host: str, heartbeat_age: float, pid: int = 4242) -> Path:
    """A lock file as a writer on ``host`` leaves it, its last heartbeat ``heartbeat_age`` seconds ago."""
    path = lock_dir(run_path) / f"{chunks}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    beat = time.time() - heartbeat_age
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "t" + host, "started": beat, "heartbeat": beat}))
    return path


def test_a_live_writer_on_another_node_is_waited_for_a_dead_one_taken_over(tmp_path, capsys):
    run = extract(tmp_path, chunks=(0, 1))
    lock = _claim(run.path, "0-4", "node-b", heartbeat_age=5)
    code, _, err = ckapipe_cli(capsys, "extract", "-m", A, "-l", "block?,head", "-b", M, "--limit", N, "--cache", tmp_path,
                              "-q")
    assert_one_line_error(code, err, "being extracted by another process (host node-b pid 4242", "ckapipe unlock")
    assert lock.exists() and not extract(tmp_path, chunks=(0, 1)).done()[1:].any()
    _claim(run.path, "0-4", "node-b", heartbeat_age=3600)  # node-b died an hour ago
    assert extract(tmp_path).status == store.COMPLETE
    assert not lock.exists()


def test_a_fresh_empty_lock_file_is_left_alone(tmp_path):
    """A writer of an older ckapipe between creating its lock file and filling it: alive, not deleted."""
    run = extract(tmp_path, chunks=(0, 1))
    empty = lock_dir(run.path) / "0-4.lock"
    empty.write_text("")
    with pytest.raises(StoreError, match="being extracted by another process"):
        extract(tmp_path)
    assert empty.exists()
    old = time.time() - 3600
    os.utime(empty, (old, old))  # its writer never came back
    assert extract(tmp_path).status == store.COMPLETE and not empty.exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    run = extract(tmp_path, chunks=(0, 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _claim(run.path, "0-4", socket.gethostname(), heartbeat_age=1, pid=int(dead.stdout))
    assert extract(tmp_path).status == store.COMPLETE


def test_a_writer_whose_lock_was_taken_over_stops(tmp_path):
    from ckapipe.extract.writer import ChunkWriter

    run = extract(tmp_path, chunks=(0, 1))
    with writer_lock(run.path, range(1, 4), heartbeat=3600) as lock:
        lock.refresh()
        lock.check()  # still its own
        _claim(run.path, "1-4", "node-b", heartbeat_age=0)  # node-b took it over
        lock.refresh()
        with pytest.raises(StoreError, match="taken over by host node-b.*this writer stops"):
            lock.check()
        writer = ChunkWriter(run, dtype="float32", lock=lock, threads=1)
        writer.submit(1, {name: torch.zeros(M, run.layer(name).shape[1]) for name in run.layer_names})
        with pytest.raises(StoreError, match="taken over"):
            writer.close()
    assert not run.done()[1] and read_claim(lock_dir(run.path) / "1-4.lock").host == "node-b"


def test_unlock_removes_a_dead_nodes_lock_and_refuses_a_live_local_one(tmp_path, capsys):
    run = extract(tmp_path, chunks=(0, 1))
    _claim(run.path, "1-4", "node-b", heartbeat_age=1)
    code, out, _ = ckapipe_cli(capsys, "unlock", "--cache", tmp_path, run.name)
    assert code == 0 and "removed the lock on chunks 1-4 (host node-b pid 4242" in out
    assert extract(tmp_path).status == store.COMPLETE
    _claim(run.path, "0-4", socket.gethostname(), heartbeat_age=0, pid=os.getpid())
    code, _, err = ckapipe_cli(capsys, "unlock", "--cache", tmp_path, run.name)
    assert_one_line_error(code, err, f"being extracted by pid {os.getpid()} on this host")

"""Results directories: every chunk checksummed and tagged, damage named in one line by every reader;
results that differ in what their numbers mean refuse to combine; an unwritable --out refused first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
import ckapipe.analyze.results as results_module
import ckapipe.store.results as results_store
from ckapipe.errors import CkapipeError, StoreError
from tests.cli_calls import ckapipe_cli
from tests.numpy_runs import make_run, random_layers
from tests.reference import minibatch_cka_reference

PAIR_A, PAIR_B = ("small:l0", "big:stage0"), ("small:l1", "big:stage1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Runs small, big and other (96 samples, m = 16) and two sealed results directories of (small, big)."""
    base = tmp_path_factory.mktemp("results-integrity")
    cache = base / "cache"
    rng = np.random.default_rng(0)
    a = random_layers(rng, 96, [10, 20, 5])
    make_run(cache, "small", a, 16)
    make_run(cache, "big", {f"stage{i}": x @ rng.standard_normal((x.shape[1], 8)) for i, x in enumerate(a.values())}, 16)
    make_run(cache, "other", {"o0": rng.standard_normal((96, 7))}, 16)
    make_run(cache, "shuffled", {"p0": rng.standard_normal((96, 7))}, 16, sample_ids=rng.permutation(96))
    make_run(cache, "partial", {"p0": rng.standard_normal((96, 7))}, 16, chunks=range(4), complete=False)
    with pytest.warns(UserWarning):  # 6 minibatches: too few for a reliable bootstrap
        analyze.analyze(cache, ["small", "big"], out=base / "results", progress=False)
        analyze.analyze(cache, ["small", "big"], out=base / "again", progress=False, seed=1)
    return {"cache": cache, "results": base / "results", "again": base / "again", "layers": a}


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of the sealed results directory, to damage."""
    out = tmp_path / "results"
    shutil.copytree(built["results"], out)
    return out


def flip(path, offset=6):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def edit_m(out):
    meta = json.loads((out / "zarr.json").read_text())
    for attrs in (meta["attributes"], meta["consolidated_metadata"].get("attributes") or meta["attributes"]):
        attrs["ckapipe_results"]["inputs"]["m"] = 32
    (out / "zarr.json").write_text(json.dumps(meta))


CHUNK = "hsic/c/2/0/0"
DAMAGE = {  # name: (what it does to the results directory `out`, the words that name it after "is damaged: ")
    "flipped byte": (lambda out, built: flip(out / CHUNK),
                     "array 'hsic', chunk 2.0.0: its bytes do not match their checksum (flipped, overwritten or truncated)"),
    "truncated chunk": (lambda out, built: truncate(out / CHUNK),
                        "array 'hsic', chunk 2.0.0: its file is not the one written there"),
    "deleted chunk": (lambda out, built: (out / CHUNK).unlink(),
                      "array 'hsic', chunk 2.0.0: its file is missing or truncated"),
    "deleted array folder": (lambda out, built: shutil.rmtree(out / "hsic"),
                             "array 'hsic': it is missing (its folder {out}/hsic was deleted)"),
    "chunk from another results dir": (lambda out, built: shutil.copy(built["again"] / "cka_low/c/0/0", out / "cka_low/c/0/0"),
                                       "array 'cka_low', chunk 0.0: its file is not the one written there"),
    "chunk moved within": (lambda out, built: shutil.copy(out / "hsic/c/1/0/0", out / CHUNK),
                           "array 'hsic', chunk 2.0.0: its file is not the one written there"),
    "flipped interval": (lambda out, built: flip(out / "cka_low/c/0/0"),
                         "array 'cka_low', chunk 0.0: its bytes do not match their checksum"),
    "edited attributes": (lambda out, built: edit_m(out),
                          "the attributes in {out}/zarr.json were edited after writing"),
}


def expected_line(out, words: str) -> str:
    return f"ckapipe: error: results directory {out} is damaged: {words.format(out=out)}"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damage_is_one_line_from_load_results_and_to_dataframe(built, copy, damage):
    harm, words = DAMAGE[damage]
    harm(copy, built)
    with pytest.raises(StoreError) as err:
        analyze.load_results(copy).to_dataframe()
    assert str(err.value).startswith(expected_line(copy, words).removeprefix("ckapipe: error: "))
    assert str(err.value).endswith(f"`ckapipe verify {copy}` names every bad chunk, and analysing again with "
                                   f"--out {copy} --overwrite rewrites it")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("command", ["plot", "diff", "summary"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_every_damage_is_one_line_and_exit_2_from_plot_diff_and_verify(built, copy, damage, command, capsys):
    harm, words = DAMAGE[damage]
    harm(copy, built)
    args = {"plot": ["plot", copy, "--format", "png"],
            "diff": ["diff", copy, "--a", *PAIR_A, "--b", *PAIR_B],
            "summary": ["verify", copy]}[command]
    code, out, err = ckapipe_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    if command == "summary":  # verify: the report on stdout, the verdict on stderr
        assert out.splitlines()[0].startswith(f"{copy}: ") and " bad (results, " in out.splitlines()[0]
        assert any(line.startswith(f"  {words.format(out=copy)}") for line in out.splitlines()), out
        assert lines == [f"ckapipe: error: {len(out.splitlines()) - 2} bad chunk(s) in 1 of 1 results directory: "
                         "analyse again as printed above"]
    else:
        assert len(lines) == 1 and lines[0].startswith(expected_line(copy, words)), err
        assert not (copy / "plots").exists()


def test_an_intact_results_directory_verifies_and_reads_the_right_numbers(built, capsys):
    out = built["results"]
    code, stdout, err = ckapipe_cli(capsys, "verify", out)
    arrays = zarr.open_group(out, mode="r").attrs["ckapipe_results"]["checksums"]
    chunks = sum(len(tags) for tags in arrays.values())
    assert (code, err) == (0, "")
    assert stdout == f"{out}: ok (results, {chunks} chunks read, checksums and tags verified)\n"
    frame = analyze.load_results(out).to_dataframe()
    row = frame[(frame.layer_a == "l1") & (frame.layer_b == "stage2")].iloc[0]
    assert row["cka"] == pytest.approx(reference_minibatch_cka(built, "l1", "stage2"), abs=1e-12)


def reference_minibatch_cka(built, layer_a: str, layer_b: str) -> float:
    """Minibatch CKA from the stored activations, by tests/reference.py's float64 formula."""
    from ckapipe.store import find_runs

    small, big = (find_runs(built["cache"], [name])[0] for name in ("small", "big"))
    x, y = small.layer(layer_a)[:].astype(np.float64), big.layer(layer_b)[:].astype(np.float64)
    return minibatch_cka_reference(x, y, 16)


def names(out) -> list[str]:
    return [run["name"] for run in zarr.open_group(out, mode="r").attrs["ckapipe_results"]["runs"]]


def test_verify_decodes_the_arrays_no_reader_uses(copy, capsys):
    """Labels and per-minibatch CKA are derived (load_results recomputes them): only verify reads them all."""
    flip(copy / "layer_a/c/0", 3)
    flip(copy / "minibatch_cka/c/4/0/0")
    code, out, err = ckapipe_cli(capsys, "verify", copy)
    assert code == 2 and err == "ckapipe: error: 2 bad chunk(s) in 1 of 1 results directory: analyse again as printed above\n"
    assert out.splitlines()[1:] == [
        "  array 'layer_a', chunk 0: its bytes do not match their checksum (flipped, overwritten or truncated)",
        "  array 'minibatch_cka', chunk 4.0.0: its bytes do not match their checksum (flipped, overwritten or truncated)",
        f"  rewrite it: analyse runs {', '.join(names(copy))} again with "
        f"--out {copy} --overwrite",
    ]
    np.testing.assert_array_equal(analyze.load_results(copy).hsic, zarr.open_group(copy, mode="r")["hsic"][:])


def write_unsealed(results, out, monkeypatch):
    """A results directory as written before checksums (results version 2: zstd chunks, no tags, no key)."""
    from zarr.codecs import ZstdCodec

    monkeypatch.setattr(results_store, "RESULTS_CODECS", (ZstdCodec(level=0),))
    monkeypatch.setattr(results_store, "RESULTS_VERSION", 2)
    monkeypatch.setattr(results_store, "seal", lambda root, attr: None)
    results_module.write_results(results, out)
    monkeypatch.undo()


def test_results_without_checksums_still_load_and_verify_says_so(built, tmp_path, monkeypatch, capsys):
    loaded = analyze.load_results(built["results"])
    old = tmp_path / "old"
    write_unsealed(loaded, old, monkeypatch)
    assert "checksums" not in zarr.open_group(old, mode="r").attrs["ckapipe_results"]
    np.testing.assert_array_equal(analyze.load_results(old).cka_all_runs.values, loaded.cka_all_runs.values)
    code, out, err = ckapipe_cli(capsys, "verify", old)
    chunks = sum(len(tags) for tags in zarr.open_group(built["results"], mode="r").attrs["ckapipe_results"]["checksums"].values())
    assert (code, err) == (0, "")
    assert out == f"{old}: ok (results, {chunks} chunks read, no checksums (results version 2): decoded)\n"


def test_results_without_checksums_name_a_deleted_hsic_chunk_and_a_corrupt_one(built, tmp_path, monkeypatch, capsys):
    old = tmp_path / "old"
    write_unsealed(analyze.load_results(built["results"]), old, monkeypatch)
    (old / "hsic/c/3/0/0").unlink()
    code, _, err = ckapipe_cli(capsys, "plot", old)
    assert code == 2 and err.splitlines() == [expected_line(old, "array 'hsic', chunk 3.0.0: it holds NaN or inf (its file is "
                                                                 "missing, or its bytes were changed)") + "; `ckapipe verify "
                                              f"{old}` names every bad chunk, and analysing again with --out {old} --overwrite rewrites it"]
    truncate(old / "hsic/c/1/0/0")
    code, _, err = ckapipe_cli(capsys, "plot", old)
    assert code == 2 and err.startswith(expected_line(old, "array 'hsic', chunk 1.0.0: it does not decode ("))
    assert len(err.splitlines()) == 1


# --------------------------------------------------------------------------- combining results


@pytest.fixture(scope="module")
def with_other(built):
    """analyze(small, other) under each setting that makes results incomparable: {setting: results directory}."""
    base = built["results"].parent / "with-other"
    settings = {"same": {}, "rbf": {"measures": "rbf:0.5"}, "rbf1": {"measures": "rbf:1"}, "m32": {"batch_size": 32}}
    out = {}
    with pytest.warns(UserWarning):
        for name, options in settings.items():
            out[name] = base / name
            analyze.analyze(built["cache"], ["small", "other"], out=out[name], progress=False, **options)
        for name, runs, options in (("rbf-big", ["small", "big"], {"measures": "rbf:0.5"}),
                                    ("position", ["small", "shuffled"], {"pair_by_position": True}),
                                    ("fewer", ["small", "partial"], {"completed_only": True})):
            out[name] = base / name
            analyze.analyze(built["cache"], runs, out=out[name], progress=False, **options)
    return out


def diff_across(capsys, first, second):
    run = {"position": "shuffled:p0", "fewer": "partial:p0"}.get(second.name, "other:o0")
    return ckapipe_cli(capsys, "diff", first, second, "--a", *PAIR_A, "--b", "small:l0", run, "--bootstrap", "200")


@pytest.mark.parametrize("first, second, why", [
    ("results", "rbf", "measure linear against rbf:0.5"),
    ("rbf-big", "rbf1", "rbf bandwidth 0.5 against 1 (rbf:0.5 against rbf:1)"),
    ("results", "m32", "minibatch size m=16 against m=32"),
    ("results", "position", "minibatches paired by sample_ids against by position"),
    ("results", "fewer", "other minibatches (6 from 0 against 4 from 0): analyse the runs together"),
])
def test_diff_refuses_results_of_other_measures_bandwidths_minibatch_sizes_pairings_or_minibatches(built, with_other, capsys, first, second, why):
    where = {"results": built["results"], **with_other}
    code, out, err = diff_across(capsys, where[first], where[second])
    assert (code, out) == (2, "")
    assert err == f"ckapipe: error: cannot combine results {where[first]} with results {where[second]}: {why}\n"


def test_diff_refuses_results_without_a_run_in_common(built, with_other, tmp_path):
    with pytest.warns(UserWarning):
        analyze.analyze(built["cache"], ["other"], out=tmp_path / "no-small", progress=False)
    with pytest.raises(CkapipeError) as err:
        analyze.diff([built["results"], tmp_path / "no-small"], PAIR_A, ("other:o0", "other:o0"))
    assert str(err.value) == (f"cannot combine results {built['results']} with results {tmp_path / 'no-small'}: no run in "
                              "common, so nothing says their minibatches hold the same samples: analyse the runs together")


def test_diff_across_comparable_results_is_the_reference_difference(built, with_other):
    from ckapipe.store import find_runs

    with pytest.warns(UserWarning):  # 6 minibatches
        (row,) = analyze.diff([built["results"], with_other["same"]], PAIR_A, ("small:l0", "other:o0"), bootstrap=200)
    layer = {name: find_runs(built["cache"], [run])[0].layer(lay)[:].astype(np.float64)
             for name, (run, lay) in {"a": ("small", "l0"), "b": ("big", "stage0"), "o": ("other", "o0")}.items()}
    cka_a = minibatch_cka_reference(layer["a"], layer["b"], 16)
    cka_b = minibatch_cka_reference(layer["a"], layer["o"], 16)
    assert (row.cka_a, row.cka_b, row.estimate) == pytest.approx((cka_a, cka_b, cka_a - cka_b), abs=1e-12)


# --------------------------------------------------------------------------- --out


def test_an_out_under_a_file_is_refused_before_any_work(built, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, out, err = ckapipe_cli(capsys, "analyze", "--cache", built["cache"], "small", "big", "--out", tmp_path / "file" / "out")
    assert (code, out) == (2, "")
    assert err == f"ckapipe: error: cannot write results to {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a directory\n"


def test_an_unwritable_out_is_refused_before_the_analysis_and_its_warnings(built, tmp_path):
    import os

    from tests.test_extract_run import without_permission_override

    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o500)
    argv = [sys.executable, "-m", "ckapipe", "analyze", "--cache", str(built["cache"]), "small", "big",
            "--out", str(blocked / "out")]
    try:
        if os.access(blocked, os.W_OK):  # root ignores permissions: ask again without that privilege
            proc = without_permission_override(argv)
        else:
            import subprocess

            proc = subprocess.run(argv, capture_output=True, text=True)
    finally:
        blocked.chmod(0o700)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"ckapipe: error: cannot write results to {blocked / 'out'}: {blocked} is not writable "
                           "(permission denied); choose another --out or fix its permissions\n")
    assert list(blocked.iterdir()) == []


def test_an_array_whose_dtype_was_edited_is_refused(copy, capsys):
    """The consolidated metadata in zarr.json is what readers use: an hsic retyped there reads other numbers."""
    meta = json.loads((copy / "zarr.json").read_text())
    meta["consolidated_metadata"]["metadata"]["hsic"]["data_type"] = "float32"
    (copy / "zarr.json").write_text(json.dumps(meta))
    code, _, err = ckapipe_cli(capsys, "plot", copy)
    assert code == 2 and err.startswith(expected_line(copy, "array 'hsic': its metadata was edited (float32 [6, 6, 6] in "
                                                            "chunks [1, 6, 6], written float64 [6, 6, 6] in chunks [1, 6, 6])"))


def test_compare_and_a_study_refuse_an_out_under_a_file_before_any_work(tmp_path):
    """compare checks --out before running a model; ``ckapipe run`` checks every comparison's directory
    before extracting (the cache is not even created)."""
    torch = pytest.importorskip("torch")
    from ckapipe import compare
    from ckapipe.pipelines import run_study
    from tests.pipeline_helpers import DEFAULT

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    with pytest.raises(CkapipeError) as err:
        compare(torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.zeros(8, 3), out=out, progress=False)
    assert str(err.value) == f"cannot write results to {out}: {tmp_path / 'file'} is a file, not a directory"
    with pytest.raises(CkapipeError, match=f"^cannot write results to {tmp_path / 'file'}/default/[a-z0-9_-]+: "
                                           f"{tmp_path / 'file'} is a file, not a directory$"):
        run_study(DEFAULT, cache=tmp_path / "cache", results=tmp_path / "file", progress=False, say=lambda line: None)
    assert not (tmp_path / "cache").exists()


def test_a_damaged_results_directory_is_out_of_date_so_a_study_analyses_it_again(built, copy):
    runs = ["small", "big"]
    assert analyze.is_up_to_date(copy, built["cache"], runs)
    (copy / CHUNK).unlink()
    assert not analyze.is_up_to_date(copy, built["cache"], runs)


def test_the_results_store_reads_back_as_numpy(built):
    """ckapipe.store.results opens a results directory on its own: the record and every array as NumPy, equal to
    what plain zarr reads (the analysis builds its Results from what it returns; that the store floor never
    imports the analysis is tests/test_module_graph.py's to check)."""
    from ckapipe.store.results import open_results_store

    s = open_results_store(built["results"])
    g = zarr.open_group(built["results"], mode="r")
    for name in ("hsic", "minibatch", "cka_low", "layer_a"):
        assert isinstance(s.read(name), np.ndarray) and np.array_equal(s.read(name), g[name][:]), name
    assert s.record["inputs"]["m"] == 16 and [r["slug"] for r in s.record["runs"]] == ["small", "big"]

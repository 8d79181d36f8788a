"""The extraction commands through the ckapipe entry point: output, one-line errors, exit status."""

from __future__ import annotations

import sys
import subprocess

import pytest

from tests.cli_calls import ckapipe_cli


def test_layers_extract_ls(capsys, tmp_path):
    cache = str(tmp_path)
    code, out, _ = ckapipe_cli(capsys, "layers", "zoo:mlp2", "--cache", cache)
    assert code == 0 and "block1.1  Linear" in out and out.splitlines()[-1].split() == ["head", "Linear", "10"]
    code, out, _ = ckapipe_cli(capsys, "extract", "-m", "zoo:mlp2", "-l", "block*,head:mean", "-b", "100", "--limit", "500", "--cache", cache, "-q")
    assert code == 0 and "complete, 5/5 minibatches, 3 layers" in out
    code, out, _ = ckapipe_cli(capsys, "ls", "--cache", cache, "--layers")
    lines = out.splitlines()
    assert lines[0].split() == ["run", "model", "dataset", "layers", "N", "m", "grams", "size", "status"]
    assert "zoo:mlp2" in lines[1] and lines[1].split()[4:7] == ["500", "100", "-"] and lines[1].endswith("complete")
    assert lines[2].endswith("block1, block2, head")


@pytest.mark.parametrize(
    "args, message",
    [
        (["extract", "-m", "zoo:mlp2", "-l", "blok1"], "no layer 'blok1' in the model; did you mean: block1"),
        (["extract", "-m", "zoo:mlp2", "-b", "2"], "batch size 2 is too small"),
        (["extract", "-m", "nope:x"], "unknown model spec 'nope:x'"),
        (["extract", "-m", "zoo:mlp2", "-d", "digitz"], "unknown dataset spec 'digitz'"),
        (["ls"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    code, out, err = ckapipe_cli(capsys, *args, "--cache", str(tmp_path / "cache"))
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("ckapipe: error: ")


def test_chunks_option_is_validated(capsys, tmp_path):
    code, _, err = ckapipe_cli(capsys, "extract", "-m", "zoo:mlp2", "--chunks", "3-4", "--cache", str(tmp_path))
    assert code == 2 and "use A:B" in err


def test_package_import_does_not_import_torch():
    code = "import sys, ckapipe.extract, ckapipe.store, ckapipe.extract.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

"""Run names: defaults that keep what tells runs apart, aliases instead of second extractions,
globs over full store names, ambiguity that lists the candidates."""

from __future__ import annotations

import json

import pytest

from ckapipe import store
from ckapipe.errors import StoreError
from ckapipe.extract.runner import extract_run
from tests.cli_calls import ckapipe_cli


@pytest.mark.parametrize("model, dataset, slug", [
    ("zoo:cnn3?seed=0", "digits", "cnn3-seed0@digits"),
    ("zoo:cnn3?seed=1", "digits", "cnn3-seed1@digits"),
    ("mymodels:tiny_resnet?depth=2", "digits", "tiny_resnet-depth2@digits"),
    ("torchvision:resnet18?weights=none", "cifar10:/data/cifar?split=test", "resnet18-weightsnone@cifar10-splittest"),
    ("ckpt/student.pt?arch=torchvision:resnet18", "digits?size=32", "student.pt-archresnet18@digits-size32"),
])
def test_default_names_keep_the_options(model, dataset, slug):
    spec = store.RunSpec(model=model, weights_hash="0" * 64, dataset=dataset, transform="none", order_seed=0,
                         batch_size=16, layers=(store.LayerSpec("head"),))
    assert spec.slug == slug


def extract(cache, model, **options):
    options = {"batch_size": 16, "limit": 64, "progress": False, **options}
    return store.open_run(extract_run(model, "digits", ["head"], cache=cache, **options))


def test_two_seeds_get_two_names_and_a_glob_finds_both(tmp_path):
    a, b = extract(tmp_path, "zoo:mlp2?seed=0"), extract(tmp_path, "zoo:mlp2?seed=1")
    assert (a.slug, b.slug) == ("mlp2-seed0@digits", "mlp2-seed1@digits")
    assert [r.name for r in store.find_runs(tmp_path, ["mlp2-seed1@digits"])] == [b.name]
    assert sorted(r.name for r in store.find_runs(tmp_path, ["mlp2-*"])) == sorted([a.name, b.name])
    assert [r.name for r in store.find_runs(tmp_path, [f"*-{b.key}"])] == [b.name]  # globs match full store names


def test_a_name_for_a_cached_key_is_an_alias_not_a_second_extraction(tmp_path, monkeypatch):
    first = extract(tmp_path, "zoo:mlp2?seed=0")
    import ckapipe.extract.runner as runner

    monkeypatch.setattr(runner, "_extract_chunks", lambda *a, **k: pytest.fail("the model ran again"))
    again = extract(tmp_path, "zoo:mlp2?seed=0", name="baseline")
    assert again.path == first.path and first.aliases() == ["baseline"]
    assert len(store.list_runs(tmp_path)) == 1
    assert [r.name for r in store.find_runs(tmp_path, ["baseline"])] == [first.name]
    assert [r.name for r in store.find_runs(tmp_path, ["base*"])] == [first.name]


def test_an_ambiguous_name_lists_the_candidates_with_their_specs(tmp_path):
    a = extract(tmp_path, "zoo:mlp2?seed=0", name="net")
    b = extract(tmp_path, "zoo:mlp2?seed=0", name="net", limit=48)  # another key, the same name
    assert a.slug == b.slug == "net" and a.key != b.key
    with pytest.raises(StoreError) as err:
        store.find_runs(tmp_path, ["net"])
    message = str(err.value)
    assert "run name 'net' is ambiguous" in message
    assert f"{a.name} (zoo:mlp2?seed=0 on digits)" in message and f"{b.name} (zoo:mlp2?seed=0 on digits)" in message
    assert [r.name for r in store.find_runs(tmp_path, [a.name])] == [a.name]


@pytest.mark.parametrize("name", ["../escape", "/abs", ".hidden", "a/b", "x" * 81, ""])
def test_names_that_escape_or_hide_the_run_are_refused(tmp_path, name):
    with pytest.raises(StoreError, match="is not usable"):
        extract(tmp_path, "zoo:mlp2?seed=0", name=name)
    assert not [p for p in tmp_path.iterdir() if p.name not in ("models", ".locks")]


def test_run_globs_match_whole_words_of_name_components(tmp_path):
    study = [extract(tmp_path, f"zoo:mlp2?seed={s}", name=f"mlp2-s{s}", batch_size=32) for s in (0, 1)]
    seeds = [extract(tmp_path, f"zoo:mlp2?seed={s}") for s in (0, 1)]  # mlp2-seed0@digits, another key
    names = lambda pattern: sorted(r.name for r in store.find_runs(tmp_path, [pattern]))  # noqa: E731
    assert names("mlp2-s*") == sorted(r.name for r in study)  # not mlp2-seed0@digits: "s" is not a word of "seed0"
    assert names("mlp2-seed*") == sorted(r.name for r in seeds)  # the pattern may stop before @digits-KEY
    assert names("mlp2-seed1*") == [seeds[1].name]
    assert names("*@digits") == sorted(r.name for r in seeds)  # a lone * stands for whole components
    assert names("mlp2-*") == sorted(r.name for r in study + seeds)


def test_a_glob_matches_inside_words_only_when_nothing_matches_whole_words(tmp_path):
    run = extract(tmp_path, "zoo:mlp2?seed=0", name="teacher")
    assert [r.name for r in store.find_runs(tmp_path, ["teach*"])] == [run.name]
    with pytest.raises(StoreError, match=r"^no run 'pupil\*' in cache "):
        store.find_runs(tmp_path, ["pupil*"])


def test_analyze_takes_a_whole_word_run_glob_on_the_command_line(capsys, tmp_path):
    study = [extract(tmp_path, f"zoo:mlp2?seed={s}", name=f"mlp2-s{s}") for s in (0, 1)]
    extract(tmp_path, "zoo:mlp2?seed=0", limit=48)  # mlp2-seed0@digits: not matched by mlp2-s*
    code, out, err = ckapipe_cli(capsys, "analyze", "mlp2-s*", "--cache", tmp_path, "--out", tmp_path / "res", "-q")
    assert code == 0 and "error" not in err
    runs = json.loads((tmp_path / "res" / "cka.json").read_text())["runs"]
    assert sorted(r["name"] for r in runs) == sorted(r.name for r in study)


def test_a_run_glob_that_matches_nothing_is_one_line_and_status_2(capsys, tmp_path):
    extract(tmp_path, "zoo:mlp2?seed=0")
    code, out, err = ckapipe_cli(capsys, "analyze", "cnn3-s*", "--cache", tmp_path, "--out", tmp_path / "res", "-q")
    assert (code, out) == (2, "")
    assert err.startswith("ckapipe: error: no run 'cnn3-s*' in cache ") and err.count("\n") == 1
    assert not (tmp_path / "res").exists()

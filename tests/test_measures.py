"""The measures beyond linear CKA (analyze/measures.py), from the Gram cache: Kornblith et al.'s
Demo through the whole pipeline, Huh et al.'s neighbour measures against a direct implementation
of their definitions, the invariances of each measure, and the Gram cache's store versions.

Every reference is computed here, in float64, from the published formulas."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import zarr

import ckapipe.analyze as analyze
from ckapipe.errors import CkapipeError, StoreError
from ckapipe.store import Run
from tests.numpy_runs import make_run, random_layers

ALL = "linear,linear_biased,rbf:0.5,rbf_biased:0.5,mutual_knn:5,cknna:5"


def measure_matrix(results, measure: str) -> np.ndarray:
    """(L, L) matrix of one measure over the stacked layers of every run (the Dataset's measure_cka)."""
    return results.to_xarray().measure_cka.sel(measure=measure).values


def identity():
    """The Demo's model (``tests.test_measures:identity``): its one layer, ``0``, returns the inputs."""
    import torch

    return torch.nn.Sequential(torch.nn.Identity())


# --------------------------------------------------------------------------- references (published formulas)


def gram_linear(x):
    """Kornblith et al. (2019), CKA.ipynb."""
    return x.dot(x.T)


def gram_rbf(x, threshold=1.0):
    """Kornblith et al. (2019), CKA.ipynb: the bandwidth from the median of all squared distances."""
    dot_products = x.dot(x.T)
    sq_norms = np.diag(dot_products)
    sq_distances = -2 * dot_products + sq_norms[:, None] + sq_norms[None, :]
    sq_median_distance = np.median(sq_distances)
    return np.exp(-sq_distances / (2 * threshold ** 2 * sq_median_distance))


def center_gram(gram, unbiased=False):
    """Kornblith et al. (2019), CKA.ipynb."""
    gram = gram.copy()
    if unbiased:
        n = gram.shape[0]
        np.fill_diagonal(gram, 0)
        means = np.sum(gram, 0, dtype=np.float64) / (n - 2)
        means -= np.sum(means) / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = np.mean(gram, 0, dtype=np.float64)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def scaled_hsic(gram_x, gram_y, debiased):
    """<centered K, centered L>: the numerator of Kornblith et al.'s ``cka``."""
    return center_gram(gram_x, debiased).ravel().dot(center_gram(gram_y, debiased).ravel())


def kornblith_cka(gram_x, gram_y, debiased=False):
    """Kornblith et al. (2019), CKA.ipynb: ``cka``."""
    return scaled_hsic(gram_x, gram_y, debiased) / np.sqrt(
        scaled_hsic(gram_x, gram_x, debiased) * scaled_hsic(gram_y, gram_y, debiased))


def minibatch_reference(x, y, m, gram, debiased):
    """Ratio of the sums over minibatches of m rows of the (un)biased HSIC numerators (Nguyen et al. 2021)."""
    s = np.zeros(3)
    for k in range(len(x) // m):
        a, b = gram(x[k * m:(k + 1) * m]), gram(y[k * m:(k + 1) * m])
        s += [scaled_hsic(a, b, debiased), scaled_hsic(a, a, debiased), scaled_hsic(b, b, debiased)]
    return s[0] / np.sqrt(s[1] * s[2])


def normalize(feats):
    """torch.nn.functional.normalize(feats, dim=-1), as Huh et al. prepare features."""
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def huh_nearest(feats, topk):
    """Huh et al. (2024), platonic-rep metrics.py: ``compute_nearest_neighbors``."""
    sim = feats @ feats.T
    np.fill_diagonal(sim, -1e8)
    return np.argsort(-sim, axis=1)[:, :topk]


def huh_mask(knn, n):
    mask = np.zeros((n, n))
    mask[np.arange(n)[:, None], knn] = 1.0
    return mask


def huh_mutual_knn_counts(feats_a, feats_b, topk):
    """Huh et al.'s ``mutual_knn`` before its mean: |N_a(i) ∩ N_b(i)| per row, on normalised features."""
    n = len(feats_a)
    mask_a = huh_mask(huh_nearest(normalize(feats_a), topk), n)
    mask_b = huh_mask(huh_nearest(normalize(feats_b), topk), n)
    return (mask_a * mask_b).sum(axis=1)


def hsic_unbiased(K, L):
    """Huh et al.'s ``hsic_unbiased`` (Song et al. 2012, eq. 5)."""
    m = K.shape[0]
    K_tilde, L_tilde = K.copy(), L.copy()
    np.fill_diagonal(K_tilde, 0)
    np.fill_diagonal(L_tilde, 0)
    value = (np.sum(K_tilde * L_tilde.T) + np.sum(K_tilde) * np.sum(L_tilde) / ((m - 1) * (m - 2))
             - 2 * np.sum(K_tilde @ L_tilde) / (m - 2))
    return value / (m * (m - 3))


def huh_cknna(feats_a, feats_b, topk):
    """Huh et al.'s ``cknna`` (unbiased, distance-aware) on normalised features, without the 1e-6 their
    code adds to the denominator (docs/measures.md)."""
    a, b = normalize(feats_a), normalize(feats_b)
    K, L = a @ a.T, b @ b.T
    n = len(a)

    def similarity(K, L):
        K_hat, L_hat = K.copy(), L.copy()
        np.fill_diagonal(K_hat, -np.inf)
        np.fill_diagonal(L_hat, -np.inf)
        mask = huh_mask(np.argsort(-K_hat, axis=1)[:, :topk], n) * huh_mask(np.argsort(-L_hat, axis=1)[:, :topk], n)
        return hsic_unbiased(mask * K, mask * L)

    return similarity(K, L) / np.sqrt(similarity(K, K) * similarity(L, L))


# --------------------------------------------------------------------------- Kornblith et al.'s Demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Kornblith et al.'s Demo (CKA.ipynb): numpy seed 1337, X = randn(100, 10), Y = randn(100, 10) + X,
    extracted through an identity module from .npy files, float64, Grams filled during extraction."""
    pytest.importorskip("torch")
    from ckapipe.extract.runner import extract_run

    root = tmp_path_factory.mktemp("demo")
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    cache = root / "cache"
    for name, data in (("x", x), ("y", y)):
        np.save(root / f"{name}.npy", data)
        extract_run("tests.test_measures:identity", str(root / f"{name}.npy"), cache=cache, batch_size=100,
                    dtype="float64", name=name, grams=True, progress=False)
    return cache, x, y


@pytest.mark.parametrize("use_gram_cache", [True, False])
def test_kornblith_demo_through_the_whole_pipeline(demo, use_gram_cache, monkeypatch):
    cache, x, y = demo
    reads = Counter()
    real = Run.read_chunk
    monkeypatch.setattr(Run, "read_chunk", lambda self, layer, k: reads.update([self.slug]) or real(self, layer, k))
    results = analyze.analyze(cache, ["x", "y"], batch_size=100, progress=False, use_gram_cache=use_gram_cache,
                              measures="linear_biased,rbf_biased:0.5,linear,rbf:0.5")
    assert not reads if use_gram_cache else set(reads) == {"x", "y"}  # the Grams were filled during extraction
    expected = {
        "linear_biased": (kornblith_cka(gram_linear(x), gram_linear(y)), 0.55761),
        "rbf_biased:0.5": (kornblith_cka(gram_rbf(x, 0.5), gram_rbf(y, 0.5)), 0.65483),
        "linear": (kornblith_cka(gram_linear(x), gram_linear(y), debiased=True), 0.51346),
        "rbf:0.5": (kornblith_cka(gram_rbf(x, 0.5), gram_rbf(y, 0.5), debiased=True), None),
    }
    for measure, (reference, published) in expected.items():
        assert abs(results.cka("x", "y", measure).values[0, 0] - reference) < 1e-5, measure
        if published is not None:
            assert round(reference, 5) == published  # the Demo's printed numbers
    assert results.cka("x", "y").values[0, 0] == results.cka("x", "y", "linear_biased").values[0, 0]  # the first is cka


# --------------------------------------------------------------------------- several minibatches, stored runs


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def pair(cache):
    """Two runs over the same 96 samples, three layers each, float32 storage (a large offset in one layer)."""
    rng = np.random.default_rng(7)
    a = random_layers(rng, 96, [12, 30, 5])
    b = {f"b{i}": np.tanh(x @ rng.standard_normal((x.shape[1], 9)) / 3).astype(np.float32) for i, x in enumerate(a.values())}
    b["b2"] += 50
    make_run(cache, "a", a, 32)
    make_run(cache, "b", b, 32)
    return {name: {k: np.asarray(v, dtype=np.float64) for k, v in layers.items()} for name, layers in (("a", a), ("b", b))}


def stored(run_path, layer):
    """A layer as plain zarr reads it, in float64."""
    return zarr.open_group(run_path, mode="r")[f"layers/{layer}"][:].astype(np.float64)


def test_kernel_cka_of_several_minibatches_is_the_ratio_of_sums(cache, pair):
    results = analyze.analyze(cache, ["a", "b"], measures=ALL, batch_size=16, progress=False)
    grams = {"linear": (gram_linear, True), "linear_biased": (gram_linear, False),
             "rbf:0.5": (lambda z: gram_rbf(z, 0.5), True), "rbf_biased:0.5": (lambda z: gram_rbf(z, 0.5), False)}
    for measure, (gram, debiased) in grams.items():
        ours = results.cka("a", "b", measure).values
        for i, x in enumerate(pair["a"].values()):
            for j, y in enumerate(pair["b"].values()):
                assert abs(ours[i, j] - minibatch_reference(x, y, 16, gram, debiased)) < 1e-9, (measure, i, j)


def test_neighbour_measures_equal_huh_et_al_definitions_minibatch_by_minibatch(cache, pair):
    m, k = 16, 5
    results = analyze.analyze(cache, ["a", "b"], measures=ALL, batch_size=m, progress=False)
    runs = {r.slug: r.path for r in results.runs}
    features = {f"{run}:{layer}": stored(runs[run], layer) for run in ("a", "b") for layer in results.layer_names(run)}
    labels = results.labels
    counts = results.statistics("mutual_knn:5").values * m * k  # per minibatch, Σ_i |N_a(i) ∩ N_b(i)|
    knn = measure_matrix(results, "mutual_knn:5")
    cknna = measure_matrix(results, "cknna:5")
    for i, la in enumerate(labels):
        for j, lb in enumerate(labels):
            x, y = features[la], features[lb]
            per_minibatch = [huh_mutual_knn_counts(x[s * m:(s + 1) * m], y[s * m:(s + 1) * m], k) for s in range(6)]
            assert np.array_equal(np.rint(counts[:, i, j]), [c.sum() for c in per_minibatch])
            assert np.abs(counts[:, i, j] - np.rint(counts[:, i, j])).max() < 1e-9  # whole numbers of neighbours
            assert abs(knn[i, j] - np.mean([(c / k).mean() for c in per_minibatch])) < 1e-15
            expected = np.mean([huh_cknna(x[s * m:(s + 1) * m], y[s * m:(s + 1) * m], k) for s in range(6)])
            assert abs(cknna[i, j] - expected) < 1e-12, (la, lb)


def test_full_data_neighbour_measures_with_one_minibatch(cache, pair):
    results = analyze.analyze(cache, ["a", "b"], measures="mutual_knn:10,cknna:10", batch_size=96, progress=False)
    x, y = pair["a"]["l1"], pair["b"]["b2"]
    assert abs(results.cka("a", "b", "mutual_knn:10").values[1, 2] - (huh_mutual_knn_counts(x, y, 10) / 10).mean()) < 1e-15
    assert abs(results.cka("a", "b", "cknna:10").values[1, 2] - huh_cknna(x, y, 10)) < 1e-12


def test_every_measure_is_one_on_identical_inputs_and_invariant_to_rotation_and_scale(cache):
    rng = np.random.default_rng(3)
    x = random_layers(rng, 64, [7, 20])
    q = {name: np.linalg.qr(rng.standard_normal((v.shape[1], v.shape[1])))[0] for name, v in x.items()}
    make_run(cache, "x", x, 32, dtype="float64")
    make_run(cache, "turned", {name: 3.7 * v.astype(np.float64) @ q[name] for name, v in x.items()}, 32, dtype="float64")
    make_run(cache, "shifted", {name: v.astype(np.float64) + 4.0 for name, v in x.items()}, 32, dtype="float64")
    results = analyze.analyze(cache, ["x", "turned", "shifted"], measures=ALL, batch_size=32, progress=False)
    for measure in results.measures:
        np.testing.assert_allclose(np.diag(results.cka("x", "x", measure).values), 1, atol=1e-12, err_msg=measure)
        np.testing.assert_allclose(np.diag(results.cka("x", "turned", measure).values), 1, atol=1e-9, err_msg=measure)
        shifted = np.diag(results.cka("x", "shifted", measure).values)
        if measure.startswith(("mutual_knn", "cknna")):  # neighbours of the L2-normalised raw features
            assert (shifted < 0.99).all(), measure
        else:  # kernel CKA of centered features
            np.testing.assert_allclose(shifted, 1, atol=1e-9, err_msg=measure)


def test_a_constant_layer_has_no_value_for_any_measure(cache):
    rng = np.random.default_rng(4)
    layers = random_layers(rng, 64, [6, 6])
    layers["l1"][:] = 2.5  # every sample the same: no kernel, no neighbours
    make_run(cache, "dead", layers, 32)
    with pytest.warns(UserWarning, match="undefined"):
        results = analyze.analyze(cache, ["dead"], measures=ALL, batch_size=32, progress=False)
    for measure in results.measures:
        values = results.cka("dead", "dead", measure).values
        assert np.isnan(values[1]).all() and np.isnan(values[:, 1]).all(), measure
        assert values[0, 0] == pytest.approx(1), measure


def test_measures_from_a_coarser_grams_only_cache_equal_those_from_activations(cache, pair):
    make_run(cache, "a-grams", {name: x.astype(np.float32) for name, x in pair["a"].items()}, 32, grams_only=True)
    make_run(cache, "b-grams", {name: x.astype(np.float32) for name, x in pair["b"].items()}, 32, grams_only=True)
    from_grams = analyze.analyze(cache, ["a-grams", "b-grams"], measures=ALL, batch_size=16, progress=False)
    from_activations = analyze.analyze(cache, ["a", "b"], measures=ALL, batch_size=16, progress=False,
                                       use_gram_cache=False)
    for measure in from_grams.measures:
        np.testing.assert_allclose(measure_matrix(from_grams, measure), measure_matrix(from_activations, measure), atol=1e-10,
                                   err_msg=measure)


def test_results_keep_every_measure_and_the_cli_writes_a_measure_dimension(cache, pair, tmp_path, capsys):
    from ckapipe.cli import main

    out = tmp_path / "out"
    main(["analyze", "--cache", str(cache), "a", "b", "--out", str(out), "--measure", "linear,rbf:0.5,mutual_knn:10",
          "--batch-size", "32"])
    printed = capsys.readouterr().out
    assert "columns: layer, best layer, linear, rbf:0.5, mutual_knn:10" in printed
    import xarray

    values = xarray.open_zarr(out)["measure_cka"]
    assert values.shape == (3, 6, 6) and values.dims == ("measure", "a", "b")
    assert list(values["measure"].values) == ["linear", "rbf:0.5", "mutual_knn:10"]
    loaded = analyze.load_results(out)
    for measure in ("linear", "rbf:0.5", "mutual_knn:10"):
        np.testing.assert_array_equal(measure_matrix(loaded, measure), values.sel(measure=measure).values)
    assert "rbf:0.5" in (out / "cka.csv").read_text().splitlines()[0]
    with pytest.raises(CkapipeError, match=r"these results hold no measure 'cknna:10'"):
        loaded.cka("a", "b", "cknna:10").values


@pytest.mark.parametrize("measures, message", [
    ("linear,rbf_biasd:0.5", "unknown measure 'rbf_biasd:0.5'; did you mean: rbf_biased"),
    ("rbf:wide", "measure 'rbf:wide': 'wide' is not a positive number"),
    ("cknna:1", "measure 'cknna:1': '1' is not a whole number of neighbours of at least 2"),
    ("mutual_knn:40", "measure mutual_knn:40 needs minibatches of more than 40 samples (analysis minibatch size 32)"),
    ("linear:2", "measure linear takes no parameter"),
])
def test_bad_measures_are_one_line_errors_before_any_work(cache, pair, tmp_path, capsys, measures, message):
    from ckapipe.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["analyze", "--cache", str(cache), "a", "b", "--out", str(out), "--measure", measures, "-q"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()


# --------------------------------------------------------------------------- the Gram cache's versions


def version_2_cache(run: Run, m: int, layers: dict) -> None:
    """The Gram cache as store version 2 wrote it: U-centered strict triangles and ``done``."""
    from ckapipe.kernels import u_centered_triangle_from_features

    n, width = run.n_samples // m, m * (m - 1) // 2
    group = run.group.create_group(f"grams/m{m}", attributes={"run_key": run.key, "layers": run.layer_names})
    rows = group.create_array("triangles", shape=(n, len(layers), width), chunks=(1, len(layers), width),
                              dtype="float64", fill_value=float("nan"))
    done = group.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=0)
    for k in range(n):
        rows[k] = np.stack([u_centered_triangle_from_features(x[k * m:(k + 1) * m]) for x in layers.values()])
        done[k] = 1


def test_a_version_2_cache_serves_linear_cka_and_is_filled_again_for_other_measures(cache, pair, monkeypatch):
    from ckapipe.store import find_runs

    (run,) = find_runs(cache, ["a"])
    version_2_cache(run, 32, {name: x.astype(np.float32) for name, x in pair["a"].items()})
    reads = Counter()
    real = Run.read_chunk
    monkeypatch.setattr(Run, "read_chunk", lambda self, layer, k: reads.update([(self.slug, layer, k)]) or real(self, layer, k))
    linear = analyze.analyze(cache, ["a"], progress=False)
    assert not reads  # served by the version-2 rows
    assert run.grams(32).layout == 2
    fresh = analyze.analyze(cache, ["a"], progress=False, use_gram_cache=False)
    np.testing.assert_allclose(linear.cka("a").values, fresh.cka("a").values, atol=1e-12)
    reads.clear()
    rbf = analyze.analyze(cache, ["a"], measures="linear,rbf:0.5", progress=False)
    assert set(reads.values()) == {1} and len(reads) == 3 * 3  # every chunk read once, to fill version 3
    group = run.group["grams/m32"]
    assert "triangles" in group and "centred" in group and run.grams(32).layout == 3  # the old rows stay
    reads.clear()
    again = analyze.analyze(cache, ["a"], measures="linear,rbf:0.5", progress=False)
    assert not reads
    np.testing.assert_array_equal(measure_matrix(again, "rbf:0.5"), measure_matrix(rbf, "rbf:0.5"))
    np.testing.assert_allclose(again.cka("a").values, fresh.cka("a").values, atol=1e-12)


def test_a_version_2_grams_only_run_serves_linear_cka_only(cache, pair):
    make_run(cache, "legacy", {name: x.astype(np.float32) for name, x in pair["a"].items()}, 32, grams_only=False)
    from ckapipe.store import find_runs

    (run,) = find_runs(cache, ["legacy"])
    version_2_cache(run, 32, pair["a"])
    run.set_meta(grams_only=True)
    assert analyze.analyze(cache, ["legacy"], progress=False).cka("legacy").values.shape == (3, 3)
    with pytest.raises(StoreError, match="layout of ckapipe store version 2 .* serves linear CKA only"):
        analyze.analyze(cache, ["legacy"], measures="rbf:0.5", progress=False)


def test_the_raw_gram_is_recovered_exactly_from_the_cache(cache):
    """K = C + a1ᵀ + 1aᵀ + s from the cached row equals X Xᵀ of the stored features, offset and all."""
    from ckapipe.kernels import raw_gram, square_from_triangle
    from ckapipe.store import find_runs

    rng = np.random.default_rng(11)
    x = rng.standard_normal((64, 40)) * 3 + 1e3
    make_run(cache, "offset", {"x": x}, 32, dtype="float64")
    analyze.analyze(cache, ["offset"], measures="rbf:0.5", progress=False)
    (run,) = find_runs(cache, ["offset"])
    grams = run.grams(32)
    raw = raw_gram(square_from_triangle(grams.read_centered([1]), diagonal=True), grams.read_means([1]))[0, 0]
    exact = x[32:] @ x[32:].T
    assert np.abs(raw - exact).max() <= 1e-12 * np.abs(exact).max()
    centered = x[32:] - x[32:].mean(axis=0)
    u = center_gram(centered @ centered.T, unbiased=True)[np.triu_indices(32, 1)]
    assert np.abs(grams.read([1])[0, 0] - u).max() <= 1e-12 * np.abs(u).max()  # the U-centered rows, derived on read


@pytest.mark.gpu
def test_cupy_measures_agree_with_numpy(cache, pair):
    cupy = pytest.importorskip("cupy")
    if cupy.cuda.runtime.getDeviceCount() == 0:
        pytest.skip("no CUDA GPU")
    cpu = analyze.analyze(cache, ["a", "b"], measures=ALL, batch_size=16, device="cpu", progress=False,
                          use_gram_cache=False, rankme=True)
    gpu = analyze.analyze(cache, ["a", "b"], measures=ALL, batch_size=16, device="cuda", progress=False,
                          use_gram_cache=False, rankme=True)
    for measure in cpu.measures:
        np.testing.assert_allclose(measure_matrix(gpu, measure), measure_matrix(cpu, measure), atol=1e-9, err_msg=measure)
    np.testing.assert_allclose(gpu.rankme, cpu.rankme, rtol=1e-9)


@pytest.mark.gpu
def test_device_grams_equal_the_cpu_twin():
    cupy = pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from ckapipe.extract.writer import compute_grams, device_grams

    x = torch.randn(32, 300, generator=torch.Generator().manual_seed(0)) + 100
    on_gpu = device_grams({"l": x.cuda()})["l"]
    on_cpu = compute_grams({"l": x.numpy()})["l"]
    for gpu_part, cpu_part in zip(on_gpu, on_cpu):
        np.testing.assert_allclose(gpu_part, cpu_part, rtol=1e-9, atol=1e-9 * np.abs(cpu_part).max())

"""ckapipe.analyze.stats against brute force written here, and its calibration by simulation.

The references are plain loops over the same resampled indices and permutations,
and Song et al.'s (2012, eq. 5) unbiased HSIC with explicit traces on explicitly
permuted features, in float64. The calibration tests draw synthetic features
whose population CKA is known in closed form.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from ckapipe.analyze import stats
from ckapipe.errors import CkapipeError
from ckapipe.kernels import hsic1_matrix, u_centered_triangle_from_features


def song_hsic(k, l):
    """Song et al. (2012), eq. 5: [tr(K~L~) + 1ᵀK~1 1ᵀL~1/((m-1)(m-2)) - 2/(m-2) 1ᵀK~L~1] / (m(m-3)),
    K~, L~ = K, L with zero diagonals."""
    k, l = np.array(k, dtype=np.float64), np.array(l, dtype=np.float64)
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    m = k.shape[0]
    one = np.ones(m)
    value = np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((m - 1) * (m - 2)) - 2.0 / (m - 2) * (one @ k @ l @ one)
    return value / (m * (m - 3))


def minibatch_hsic(features, m):
    """(n, L, L) HSIC_1 per minibatch of m rows of every (N, D) array in ``features``, by Song's formula."""
    n = len(features[0]) // m
    out = np.empty((n, len(features), len(features)))
    for k in range(n):
        grams = [x[k * m:(k + 1) * m] @ x[k * m:(k + 1) * m].T for x in features]
        for i, gi in enumerate(grams):
            for j, gj in enumerate(grams):
                out[k, i, j] = song_hsic(gi, gj)
    return out


def related_features(rng, n_rows, dims=(6, 5, 4), noise=(1.0, 1.5, 2.0)):
    z = rng.standard_normal((n_rows, 3))
    return [z @ rng.standard_normal((3, d)) + s * rng.standard_normal((n_rows, d)) for d, s in zip(dims, noise)]


@pytest.fixture(scope="module")
def hsic():
    """(14, 3, 3) per-minibatch HSIC of three related layers, m = 10."""
    return minibatch_hsic(related_features(np.random.default_rng(0), 140), 10)


def loop_cka(hsic, picks, i, j):
    """CKA_ij of the sum of the minibatches in ``picks``, one minibatch at a time."""
    s_ij = s_ii = s_jj = 0.0
    for k in picks:
        s_ij += hsic[k, i, j]
        s_ii += hsic[k, i, i]
        s_jj += hsic[k, j, j]
    return s_ij / math.sqrt(s_ii * s_jj)


# --------------------------------------------------------------------------- bootstrap against brute force


def test_bootstrap_distribution_of_one_entry_equals_a_loop_over_the_same_indices(hsic):
    n = hsic.shape[0]
    indices = stats.resample_indices(n, 300, seed=5)
    counts = stats.resample_counts(indices, n)
    assert counts.sum(axis=1).tolist() == [n] * 300
    vectorised = stats.weighted_cka(hsic, counts, [0, 1], [2, 2])
    for e, (i, j) in enumerate([(0, 2), (1, 2)]):
        looped = np.array([loop_cka(hsic, picks, i, j) for picks in indices])
        np.testing.assert_allclose(vectorised[:, e], looped, rtol=0, atol=1e-12)
    assert not np.allclose(vectorised[:, 0], vectorised[0, 0])  # the resamples do differ


def bca_reference(hsic, i, j, indices, level):
    """Efron's BCa interval written out: z0 from the share below the estimate, â from the jackknife."""
    n = hsic.shape[0]
    theta = loop_cka(hsic, range(n), i, j)
    boot = np.array([loop_cka(hsic, picks, i, j) for picks in indices])
    jack = np.array([loop_cka(hsic, [k for k in range(n) if k != left], i, j) for left in range(n)])
    normal = NormalDist()
    z0 = normal.inv_cdf(((boot < theta).sum() + 0.5 * (boot == theta).sum()) / len(boot))
    d = jack.mean() - jack
    a = (d**3).sum() / (6 * ((d**2).sum()) ** 1.5)
    alpha = 1 - level
    quantiles = [normal.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (normal.inv_cdf(alpha / 2), normal.inv_cdf(1 - alpha / 2))]
    return np.quantile(boot, quantiles), np.quantile(boot, [alpha / 2, 1 - alpha / 2])


def test_percentile_and_bca_intervals_equal_their_formulas(hsic):
    n = hsic.shape[0]
    for method in ("bca", "percentile"):
        resampling = stats.Resampling(ci=0.9, bootstrap=400, seed=11, method=method)
        bounds = stats.bootstrap_bounds(hsic, resampling)
        indices = stats.resample_indices(n, 400, 11)
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            bca, percentile = bca_reference(hsic, i, j, indices, 0.9)
            expected = bca if method == "bca" else percentile
            np.testing.assert_allclose(bounds[:, i, j], expected, rtol=0, atol=1e-12)
            np.testing.assert_array_equal(bounds[:, i, j], bounds[:, j, i])
    np.testing.assert_allclose(bounds[:, 0, 0], [1, 1], atol=1e-12)  # a layer with itself


def test_intervals_are_computed_block_by_block_the_same(hsic, monkeypatch):
    whole = stats.bootstrap_bounds(hsic)
    monkeypatch.setattr(stats, "BLOCK_BYTES", 8 * 2100)  # one entry per block
    np.testing.assert_allclose(stats.bootstrap_bounds(hsic), whole, rtol=0, atol=1e-12)


def test_a_constant_layer_gets_no_interval(hsic):
    dead = hsic.copy()
    dead[:, 2, :] = dead[:, :, 2] = 0
    bounds = stats.bootstrap_bounds(dead)
    assert np.isnan(bounds[:, 2]).all() and np.isnan(bounds[:, :, 2]).all()
    assert np.isfinite(bounds[:, 0, 1]).all()


def test_few_minibatches_warn_once(hsic):
    with pytest.warns(UserWarning, match="only 6 minibatches") as caught:
        stats.bootstrap_bounds(hsic[:6])
    assert len(caught) == 1


def test_bad_settings_are_refused():
    for bad in (dict(ci=1.5), dict(ci=0.0), dict(bootstrap=1), dict(method="bootstrap-t"), dict(permutations=-1)):
        with pytest.raises(CkapipeError):
            stats.Resampling(**bad)


def test_paired_difference_equals_a_loop(hsic):
    n = hsic.shape[0]
    resampling = stats.Resampling(bootstrap=500, seed=2, method="percentile")
    (d,) = stats.paired_differences(hsic, [(0, 1)], [(0, 2)], resampling)
    indices = stats.resample_indices(n, 500, 2)
    looped = np.array([loop_cka(hsic, p, 0, 1) - loop_cka(hsic, p, 0, 2) for p in indices])
    estimate = loop_cka(hsic, range(n), 0, 1) - loop_cka(hsic, range(n), 0, 2)
    assert d.estimate == pytest.approx(estimate, abs=1e-12)
    np.testing.assert_allclose([d.low, d.high], np.quantile(looped, [0.025, 0.975]), rtol=0, atol=1e-12)
    other = (looped <= 0).mean() if estimate >= 0 else (looped >= 0).mean()
    assert d.other_side == other


def test_paired_interval_is_tighter_than_an_unpaired_one():
    """Two students of one teacher (two seeds of one map): the noise of the minibatches they share cancels
    in the paired difference, not when a and b are resampled independently."""
    rng = np.random.default_rng(4)
    teacher = related_features(rng, 400, dims=(6,))[0]
    student = rng.standard_normal((6, 5))
    x = [teacher, teacher @ student + 0.8 * rng.standard_normal((400, 5)),
         teacher @ student + rng.standard_normal((400, 5))]
    hsic = minibatch_hsic(x, 10)
    resampling = stats.Resampling(method="percentile")
    (d,) = stats.paired_differences(hsic, [(0, 1)], [(0, 2)], resampling)
    n = hsic.shape[0]
    a = stats.weighted_cka(hsic, stats.resample_counts(stats.resample_indices(n, 2000, 1), n), [0], [1])[:, 0]
    b = stats.weighted_cka(hsic, stats.resample_counts(stats.resample_indices(n, 2000, 2), n), [0], [2])[:, 0]
    low, high = np.quantile(a - b, [0.025, 0.975])
    assert d.high - d.low < 0.5 * (high - low)


# --------------------------------------------------------------------------- permutations against brute force


def test_permuted_hsic_equals_song_on_explicitly_permuted_features():
    """Both ways round: more layers on a's side than on b's, and fewer (then a's side is the one gathered)."""
    rng = np.random.default_rng(1)
    m = 12
    xa, xb = related_features(rng, m, dims=(7, 4))
    perms = stats.minibatch_permutations(m, 25, seed=3, k=4)
    assert sorted(perms[0]) == list(range(m)) and len({tuple(p) for p in perms}) == 25
    layers_a, layers_b = [xa, xa[:, :3]], [xb, xb[:, 1:] ** 2]
    ta = np.stack([u_centered_triangle_from_features(x) for x in layers_a])
    tb = np.stack([u_centered_triangle_from_features(x) for x in layers_b])
    for fa, fb in ((ta, tb[:1]), (ta[:1], tb)):
        fast = stats.permuted_hsic(fa, fb, perms)
        assert fast.shape == (25, len(fa), len(fb))
        for r, p in enumerate(perms):
            for i in range(len(fa)):
                for j in range(len(fb)):
                    x, y = layers_a[i], layers_b[j][p]  # the samples of b, permuted
                    expected = song_hsic(x @ x.T, y @ y.T)
                    assert abs(fast[r, i, j] - expected) <= 1e-10 * max(1.0, abs(expected)), (r, i, j)


def test_permutations_depend_on_seed_and_minibatch_only():
    a = stats.minibatch_permutations(10, 5, seed=1, k=2)
    np.testing.assert_array_equal(a, stats.minibatch_permutations(10, 5, seed=1, k=2))
    assert not np.array_equal(a, stats.minibatch_permutations(10, 5, seed=1, k=3))
    assert not np.array_equal(a, stats.minibatch_permutations(10, 5, seed=2, k=2))


def test_permutation_p_values_count_the_permuted_sums_at_least_as_large():
    rng = np.random.default_rng(2)
    m, n, R = 8, 5, 30
    features = related_features(rng, m * n, dims=(3, 4, 2))
    sizes = [2, 1]  # run A: layers 0, 1; run B: layer 2
    triangles = [np.stack([u_centered_triangle_from_features(x[k * m:(k + 1) * m]) for x in features]) for k in range(n)]
    sums = stats.permuted_sums(enumerate(triangles), sizes, R, seed=9)
    observed = minibatch_hsic(features, m).sum(axis=0)
    p = stats.permutation_p_values(observed, sums)
    for i in (0, 1):
        permuted = np.zeros(R)
        for k in range(n):
            x_a, x_b = features[i][k * m:(k + 1) * m], features[2][k * m:(k + 1) * m]
            for r, perm in enumerate(stats.minibatch_permutations(m, R, 9, k)):
                permuted[r] += song_hsic(x_a @ x_a.T, x_b[perm] @ x_b[perm].T)
        expected = (1 + (permuted >= observed[i, 2]).sum()) / (R + 1)
        assert p[i, 2] == p[2, i] == expected
    assert np.isnan(p[0, 1]) and np.isnan(p[0, 0])  # within run A: not tested


# --------------------------------------------------------------------------- calibration by simulation


def population_cka(a, b, noise_a, noise_b):
    """Linear CKA of x = z A + σ_a e, y = z B + σ_b e' (z, e, e' standard normal):
    ||AᵀB||² / (||AᵀA + σ_a² I|| ||BᵀB + σ_b² I||), Frobenius norms of the population covariances."""
    cxx = a.T @ a + noise_a**2 * np.eye(a.shape[1])
    cyy = b.T @ b + noise_b**2 * np.eye(b.shape[1])
    return np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(cxx) * np.linalg.norm(cyy))


def fast_minibatch_hsic(x, y, m):
    """(n, 2, 2) HSIC_1 per minibatch through the U-centered triangles (the analysis's own path)."""
    n = len(x) // m
    return np.stack([hsic1_matrix(np.stack([u_centered_triangle_from_features(x[k * m:(k + 1) * m]), u_centered_triangle_from_features(y[k * m:(k + 1) * m])]))
                     for k in range(n)])


@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_95_percent_intervals_cover_the_population_cka(method):
    rng = np.random.default_rng(2024)
    a, b = rng.standard_normal((2, 4)), rng.standard_normal((2, 3))
    truth = population_cka(a, b, 1.0, 1.0)
    assert 0.2 < truth < 0.9
    m, n, repetitions = 16, 40, 200
    covered = 0
    for _ in range(repetitions):
        z = rng.standard_normal((m * n, 2))
        x = z @ a + rng.standard_normal((m * n, 4))
        y = z @ b + rng.standard_normal((m * n, 3))
        low, high = stats.bootstrap_bounds(fast_minibatch_hsic(x, y, m), stats.Resampling(bootstrap=1000, method=method))
        covered += low[0, 1] <= truth <= high[0, 1]
    assert 0.90 <= covered / repetitions <= 0.99, covered


def ks_statistic_uniform(p):
    """Kolmogorov-Smirnov distance of a sample from the uniform distribution on [0, 1]."""
    p = np.sort(p)
    n = len(p)
    i = np.arange(1, n + 1)
    return max((i / n - p).max(), (p - (i - 1) / n).max())


def test_permutation_p_values_are_uniform_under_independence_and_small_under_dependence():
    rng = np.random.default_rng(7)
    m, n, R, repetitions = 12, 6, 199, 200

    def p_value(related):
        x = rng.standard_normal((m * n, 4))
        y = related * x[:, :3] @ rng.standard_normal((3, 3)) + rng.standard_normal((m * n, 3))
        triangles = [np.stack([u_centered_triangle_from_features(x[k * m:(k + 1) * m]), u_centered_triangle_from_features(y[k * m:(k + 1) * m])])
                     for k in range(n)]
        observed = sum(hsic1_matrix(t) for t in triangles)
        return stats.permutation_p_values(observed, stats.permuted_sums(enumerate(triangles), [1, 1], R, seed=0))[0, 1]

    null = np.array([p_value(False) for _ in range(repetitions)])
    assert ks_statistic_uniform(null) < 1.628 / math.sqrt(repetitions)  # KS critical value at the 1 % level
    assert null.min() >= 1 / (R + 1)
    dependent = np.array([p_value(True) for _ in range(20)])
    assert (dependent < 0.01).all(), dependent


# --------------------------------------------------------------------------- reading intervals


def test_ties_with_best_marks_overlapping_intervals():
    cka = np.array([[0.90, 0.87, 0.50], [0.2, 0.6, 0.59]])
    low = cka - np.array([[0.02, 0.03, 0.01], [0.01, 0.01, 0.01]])
    high = cka + 0.02
    best, tied = stats.ties_with_best(cka, low, high)
    assert best.tolist() == [0, 1]
    assert tied.tolist() == [[False, True, False], [False, False, True]]
    best, tied = stats.ties_with_best(np.eye(2) + 0.5, np.eye(2), np.eye(2) + 1, exclude_diagonal=True)
    assert best.tolist() == [1, 0] and not tied.any()

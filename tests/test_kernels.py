"""The kernels against the published formulas, their invariances, and the anchors
torch-cka 0.21 and ckatorch 1.0.3 (test-only dependencies, fed float64)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ckapipe.kernels import (
    cka, double_center, gram_linear, hsic1_matrix, square_from_triangle, sub_triangles, u_center, u_centered_triangle,
    u_centered_triangle_from_features, u_centered_triangle_from_packed, upper_triangle,
)
from tests.reference import double_centered_reference, hsic1_reference, minibatch_cka_reference, u_centered_reference

M = 32


def minibatch_cka(x, y, m=M):
    """ckapipe's kernels: one HSIC matrix per minibatch, summed, then CKA."""
    total = np.zeros((2, 2))
    for k in range(len(x) // m):
        rows = slice(k * m, (k + 1) * m)
        total += hsic1_matrix(np.stack([u_centered_triangle_from_features(x[rows]), u_centered_triangle_from_features(y[rows])]))
    return cka(total[:1, 1:], total[:1, 0], total[1:, 1])[0, 0]


@pytest.fixture
def xy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4 * M, 40))
    y = np.tanh(x @ rng.standard_normal((40, 25))) + 0.3 * rng.standard_normal((4 * M, 25))
    return x, y


def test_hsic1_matches_song_et_al_formula():
    rng = np.random.default_rng(0)
    for m in (4, 5, 17, 64):
        x = rng.standard_normal((m, 9)).astype(np.float32) + 3
        y = rng.standard_normal((m, 30)).astype(np.float32) - 1
        ours = hsic1_matrix(np.stack([u_centered_triangle_from_features(x), u_centered_triangle_from_features(y)]))
        K, L = gram_linear(x.astype(np.float64)), gram_linear(y.astype(np.float64))
        expected = [[hsic1_reference(K, K), hsic1_reference(K, L)], [hsic1_reference(L, K), hsic1_reference(L, L)]]
        np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-12)


def test_minibatch_cka_matches_reference_on_float32_data(xy):
    x, y = (a.astype(np.float32) for a in xy)
    assert abs(minibatch_cka(x, y) - minibatch_cka_reference(x, y, M)) < 1e-6


def test_cka_of_a_representation_with_itself_is_one(xy):
    x, _ = xy
    assert abs(minibatch_cka(x, x) - 1) < 1e-12


def test_cka_is_symmetric(xy):
    x, y = xy
    assert abs(minibatch_cka(x, y) - minibatch_cka(y, x)) < 1e-12


def test_cka_is_invariant_to_orthogonal_transform_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((x.shape[1], x.shape[1])))
    base = minibatch_cka(x, y)
    assert abs(minibatch_cka(x @ q, y) - base) < 1e-10
    assert abs(minibatch_cka(7.5 * x, 0.01 * y) - base) < 1e-10


def test_cka_is_not_invariant_to_a_general_invertible_linear_map(xy):
    x, y = xy
    rng = np.random.default_rng(3)
    a = rng.standard_normal((x.shape[1], x.shape[1])) @ np.diag(np.logspace(0, 2, x.shape[1]))
    assert np.linalg.cond(a) < 1e8  # invertible
    assert abs(minibatch_cka(x @ a, y) - minibatch_cka(x, y)) > 1e-2


def test_a_large_constant_offset_changes_nothing(xy):
    x, y = xy
    assert abs(minibatch_cka(x + 1e4, y - 1e4) - minibatch_cka(x, y)) < 1e-6
    np.testing.assert_allclose(u_centered_triangle_from_features(x[:M] + 1e4), u_centered_triangle_from_features(x[:M]), atol=1e-6 * np.abs(u_centered_triangle_from_features(x[:M])).max())


def test_u_centered_triangle_from_features_is_the_triangle_of_a_zero_diagonal_u_centered_matrix(xy):
    """u_centered_triangle_from_features(X) = the strict upper triangle, row by row, of U(X Xᵀ) computed element by
    element from Székely & Rizzo's formula; U's rows sum to zero and its diagonal is zero."""
    x, _ = xy
    for m in (4, 7, M):
        rows = x[:m] + 5.0  # an offset: u_centered_triangle_from_features centers the features, U does not need it
        u = u_centered_reference(rows.astype(np.float64) @ rows.astype(np.float64).T)
        assert np.allclose(np.diag(u), 0) and np.allclose(u.sum(axis=0), 0, atol=1e-9)
        i, j = np.triu_indices(m, k=1)
        np.testing.assert_allclose(u_centered_triangle_from_features(rows), u[i, j], rtol=1e-9, atol=1e-9 * np.abs(u).max())
    u = u_center(gram_linear(x[:M]))
    np.testing.assert_allclose(square_from_triangle(upper_triangle(u)), u)


def test_u_center_and_its_triangles_are_szekely_and_rizzo_element_by_element():
    """u_center(K), u_centered_triangle(K) and u_centered_triangle_from_packed of a centered Gram's upper
    triangle with its diagonal: all three are Székely & Rizzo's U-centering of the float64 reference."""
    rng = np.random.default_rng(7)
    for m in (4, 9, M):
        x = rng.standard_normal((m, 6)) + 3.0
        gram = x @ x.T
        u = u_centered_reference(gram)
        i, j = np.triu_indices(m, k=1)
        scale = np.abs(u).max()
        assert np.abs(u_center(gram) - u).max() <= 1e-12 * scale
        assert np.abs(u_centered_triangle(gram) - u[i, j]).max() <= 1e-12 * scale
        centered = x - x.mean(axis=0)  # U(C) = U(X Xᵀ): U-centering removes every a_i + a_j
        packed = (centered @ centered.T)[np.triu_indices(m, k=0)]
        assert np.abs(u_centered_triangle_from_packed(packed) - u[i, j]).max() <= 1e-12 * scale


def test_double_center_is_gretton_et_al_h_k_h():
    """double_center(K) = H K H with H = I - 11ᵀ/m (the biased HSIC_0's centering), for one Gram and a
    stack of them; it is not the U-centering (whose diagonal is zero)."""
    rng = np.random.default_rng(8)
    grams = np.stack([gram_linear(rng.standard_normal((M, 5)) + 2.0) for _ in range(3)])
    ours = double_center(grams)
    for gram, mine in zip(grams, ours):
        reference = double_centered_reference(gram)
        assert np.abs(mine - reference).max() <= 1e-12 * np.abs(reference).max()
        assert np.abs(np.diag(reference)).min() > 0  # H K H keeps a diagonal; U(K) has none
    assert np.abs(double_center(grams[0]) - double_centered_reference(grams[0])).max() <= 1e-12 * np.abs(grams[0]).max()


def test_sub_triangles_equal_grams_of_the_sub_minibatches(xy):
    x, _ = xy
    big = u_centered_triangle_from_features(x[:M])
    subs = sub_triangles(big, M // 4)
    for i in range(4):
        np.testing.assert_allclose(subs[i], u_centered_triangle_from_features(x[i * M // 4:(i + 1) * M // 4]), rtol=1e-9, atol=1e-9)


def test_constant_layer_gives_nan_with_a_warning_naming_it():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((M, 5))
    const = np.full((M, 3), 0.1)
    h = hsic1_matrix(np.stack([u_centered_triangle_from_features(x), u_centered_triangle_from_features(const)]))
    assert h[1, 1] == 0
    with pytest.warns(UserWarning, match="dead.layer"):
        out = cka(h, np.diag(h), np.diag(h), ["x", "dead.layer"], ["x", "dead.layer"])
    assert np.isnan(out[1]).all() and np.isnan(out[:, 1]).all() and out[0, 0] == pytest.approx(1)


def test_minibatch_under_four_is_refused():
    with pytest.raises(ValueError, match="at least 4"):
        u_centered_triangle_from_features(np.ones((3, 2)))


# --------------------------------------------------------------------------- anchors


def test_torch_cka_hsic_agrees_in_float64(monkeypatch, xy):
    """torch-cka 0.21's _HSIC with its ones vector made float64 (it builds a float32 one)."""
    torch = pytest.importorskip("torch")
    from torch_cka.cka import CKA

    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *shape, **kw: real_ones(*shape, **{**kw, "dtype": torch.float64}))

    class Device:
        device = "cpu"

    x, y = xy
    sums = np.zeros(3)
    for k in range(len(x) // M):
        a, b = (torch.from_numpy(v[k * M:(k + 1) * M]) for v in (x, y))
        K, L = a @ a.T, b @ b.T
        K.fill_diagonal_(0)
        L.fill_diagonal_(0)
        theirs = np.array([CKA._HSIC(Device, K, L), CKA._HSIC(Device, K, K), CKA._HSIC(Device, L, L)])
        ours = hsic1_matrix(np.stack([u_centered_triangle_from_features(v[k * M:(k + 1) * M]) for v in (x, y)]))
        np.testing.assert_allclose(theirs, [ours[0, 1], ours[0, 0], ours[1, 1]], rtol=1e-6)
        sums += theirs
    assert abs(sums[0] / np.sqrt(sums[1] * sums[2]) - minibatch_cka(x, y)) < 1e-6


def test_torch_cka_compare_agrees_in_float64(monkeypatch, xy):
    """torch-cka's whole compare loop on two float64 networks (it sums in float32)."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset
    from torch_cka import CKA

    real_ones = torch.ones
    monkeypatch.setattr(torch, "ones", lambda *shape, **kw: real_ones(*shape, **{**kw, "dtype": torch.float64}))
    torch.manual_seed(0)
    net1 = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 20)).double()
    net2 = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Tanh(), torch.nn.Linear(50, 10)).double()
    x, _ = xy
    data = torch.from_numpy(x)
    loader = DataLoader(TensorDataset(data, torch.zeros(len(x))), batch_size=M, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        anchor = CKA(net1, net2, "a", "b", model1_layers=["0", "2"], model2_layers=["1", "2"])
        anchor.compare(loader)
    theirs = anchor.export()["CKA"].numpy()
    with torch.no_grad():
        f1 = [net1[0](data), net1(data)]
        f2 = [net2[1](net2[0](data)), net2(data)]
    ours = np.array([[minibatch_cka(a.numpy(), b.numpy()) for b in f2] for a in f1])
    np.testing.assert_allclose(theirs, ours, atol=1e-6)


def test_ckatorch_hsic1_and_cka_batch_agree_in_float64(xy):
    torch = pytest.importorskip("torch")
    from ckatorch import cka_batch, hsic1

    x, y = xy
    bx = torch.from_numpy(x).reshape(-1, M, x.shape[1])
    by = torch.from_numpy(y).reshape(-1, M, y.shape[1])
    assert abs(cka_batch(bx, by).item() - minibatch_cka(x, y)) < 1e-6
    gx, gy = torch.bmm(bx, bx.transpose(1, 2)), torch.bmm(by, by.transpose(1, 2))
    theirs = hsic1(gx, gy).numpy()
    ours = [hsic1_matrix(np.stack([u_centered_triangle_from_features(x[k * M:(k + 1) * M]), u_centered_triangle_from_features(y[k * M:(k + 1) * M])]))[0, 1]
            for k in range(len(x) // M)]
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)


@pytest.mark.gpu
def test_cupy_kernels_match_numpy(xy):
    import cupy

    x, y = xy
    host = hsic1_matrix(np.stack([u_centered_triangle_from_features(x[:M]), u_centered_triangle_from_features(y[:M])]))
    device = hsic1_matrix(cupy.stack([u_centered_triangle_from_features(cupy.asarray(x[:M])), u_centered_triangle_from_features(cupy.asarray(y[:M]))]))
    np.testing.assert_allclose(device.get(), host, rtol=1e-10)


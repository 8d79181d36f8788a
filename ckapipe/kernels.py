"""Gram, U-centering, HSIC and CKA kernels: arrays in, arrays out.

Every function works on NumPy and CuPy arrays alike: the array module is taken
from the input (``array_module``), never imported by the caller. Everything is
computed in float64.

References
----------
- Gretton, Bousquet, Smola, Schölkopf (2005), "Measuring statistical dependence
  with Hilbert-Schmidt norms", ALT: the biased estimator HSIC_0 and its double
  centering H K H.
- Song, Smola, Gretton, Bedo, Borgwardt (2012), "Feature selection via
  dependence maximization", JMLR 13: the unbiased estimator HSIC_1.
- Székely & Rizzo (2014), "Partial distance correlation with methods for
  dissimilarities", Ann. Statist. 42: U-centering, with which
  HSIC_1(K, L) = <U(K), U(L)> / (m (m - 3)).
- Kornblith, Norouzi, Lee, Hinton (2019), "Similarity of neural network
  representations revisited", ICML: linear CKA.
- Nguyen, Raghu, Kornblith (2021), "Do wide and deep networks learn the same
  things?", ICLR: minibatch CKA, the ratio of HSIC_1 sums over minibatches.
- Huh, Cheung, Wang, Isola (2024), "The Platonic Representation Hypothesis",
  ICML: mutual k-nearest-neighbour alignment and CKNNA.
- Garrido, Balestriero, Najman, LeCun (2023), "RankMe: assessing the downstream
  performance of pretrained self-supervised representations by their rank", ICML.
"""

from __future__ import annotations

import functools
import sys
import warnings

import numpy as np

from ckapipe.errors import CkapipeError

MIN_MINIBATCH = 4  # HSIC_1 divides by m(m - 3), and U-centering by (m - 1)(m - 2)


def check_minibatch_size(m: int, option: str = "--batch-size") -> int:
    """m, or a one-line error: the unbiased HSIC needs minibatches of at least 4 samples."""
    if m < MIN_MINIBATCH:
        raise CkapipeError(
            f"minibatch size {m} is too small: the unbiased HSIC needs minibatches of at least "
            f"{MIN_MINIBATCH} samples (use {option} >= {MIN_MINIBATCH})"
        )
    return m


def array_module(x):
    """``cupy`` for CuPy arrays, ``numpy`` for everything else.

    A CuPy array means CuPy is imported already, so this never imports it (a
    failed ``import cupy`` costs a search of sys.path, on every call).
    """
    cupy = sys.modules.get("cupy")
    return np if cupy is None else cupy.get_array_module(x)


def center_features(x):
    """X - 1 μᵀ in float64 (m × D → m × D), μ the column means: the centering of features that
    Kornblith et al. (2019) apply before linear CKA.

    U-centering is invariant to a constant added to the features, so removing
    the column means first changes no HSIC and removes the cancellation that
    makes float32 Grams of offset features wrong. The first row is subtracted
    before the mean so that a constant column becomes exactly zero (a constant
    layer then has HSIC(K, K) = 0 exactly, not a rounding residue).
    """
    return center_features_and_mean(x)[0]


def center_features_and_mean(x):
    """(X - 1 μᵀ, μ) in float64: the centered features (m × D) and their column means μ (D,).

    See ``center_features``; μ is what the uncentered Gram needs besides the centered one.
    """
    xp = array_module(x)
    if x.dtype.itemsize < 8:
        # float32/float16 columns: their float64 mean is exact for a constant column (the sum of
        # m equal narrow values is exact in float64, and k·v / k rounds to v), so no first-row step
        mean = x.mean(axis=0, dtype=xp.float64, keepdims=True)
        x = x.astype(xp.float64)
        x -= mean
        return x, mean[0]
    x = xp.array(x, dtype=xp.float64, copy=True)  # the one float64 copy; the rest is in place
    first = x[0].copy()
    x -= first
    mean = x.mean(axis=0, keepdims=True)
    x -= mean
    return x, first + mean[0]


PRODUCTS = ("float64", "float32")


def gram_linear(x, product="float64"):
    """Linear-kernel Gram matrix K = X Xᵀ (m × D → m × m), returned in float64 (Kornblith et al. 2019's ``gram_linear``).

    ``product="float32"`` multiplies in float32 (up to ~2x faster on CPUs). Only
    for centered features, where the products carry no large common offset:
    the rounding is then relative to the signal (about 1e-9 in CKA on ResNet
    features); the U-centering and HSIC stay in float64.
    """
    if product == "float32":
        xp = array_module(x)
        x32 = x.astype(xp.float32)
        return (x32 @ x32.T).astype(xp.float64)
    return x @ x.T


def u_center(gram):
    """U-centering U(K) of Grams K (…, m, m) → (…, m, m), float64 (Székely & Rizzo 2014, eq. 3.1):

    U_ij = K_ij - r_i/(m-2) - r_j/(m-2) + t/((m-1)(m-2)) for i != j, U_ii = 0,

    with the diagonal of K zeroed first, r_i its row sums and t its total; then
    <U(K), U(L)> / (m (m - 3)) is the unbiased HSIC_1 of Song et al. (2012). Needs m >= 4.
    """
    xp = array_module(gram)
    m = check_minibatch_size(gram.shape[-1])
    u = xp.array(gram, dtype=xp.float64, copy=True)
    _zero_diagonal(u)
    means = u.sum(axis=-2) / (m - 2)
    means -= means.sum(axis=-1, keepdims=True) / (2 * (m - 1))
    u -= means[..., :, None]
    u -= means[..., None, :]
    _zero_diagonal(u)
    return u


def double_center(gram):
    """Double centering H K H of Grams K (…, m, m) → (…, m, m), float64, with H = I - 11ᵀ/m
    (Gretton et al. 2005): the centering of the biased HSIC_0 = <H K H, H L H> / (m-1)², Kornblith
    et al. (2019)'s ``center_gram``."""
    xp = array_module(gram)
    k = xp.array(gram, dtype=xp.float64, copy=True)
    means = k.mean(axis=-2)
    means -= means.mean(axis=-1, keepdims=True) / 2
    k -= means[..., :, None]
    k -= means[..., None, :]
    return k


def _zero_diagonal(u) -> None:
    xp = array_module(u)
    i = xp.arange(u.shape[-1])
    u[..., i, i] = 0


def upper_triangle(u, diagonal: bool = False):
    """The upper triangle of symmetric matrices (…, m, m), row by row, flattened (…, width).

    Strict (m(m-1)/2 numbers, for zero-diagonal U-centered Grams: <U, V> = 2 <triu(U), triu(V)>),
    or with the ``diagonal`` (m(m+1)/2 numbers, the Gram cache's centered Grams).
    """
    xp = array_module(u)
    m = u.shape[-1]
    flat = u.reshape(*u.shape[:-2], m * m)
    return flat.take(triangle_positions(xp, m, diagonal), axis=-1)


@functools.lru_cache(maxsize=32)
def triangle_positions(xp, m: int, diagonal: bool = False):
    """Flat positions i·m + j (i < j, or i <= j with the diagonal) of the upper triangle
    of an m × m matrix, row by row.

    The same for every minibatch, so computed once per (array module, m): a
    ``take`` at these positions costs a tenth of ``u[triu_indices(m, 1)]``.
    """
    i, j = xp.triu_indices(m, k=0 if diagonal else 1)
    return i * m + j


@functools.lru_cache(maxsize=32)
def triangle_indices(xp, m: int):
    """(i, j) of the strict upper triangle's entries, row by row (cached like triangle_positions)."""
    return xp.triu_indices(m, k=1)


@functools.lru_cache(maxsize=32)
def strict_in_diagonal_triangle(xp, m: int):
    """Positions of the strict upper triangle's entries within an upper triangle with the diagonal."""
    i, j = np.triu_indices(m, k=0)
    return xp.asarray(np.flatnonzero(i != j))


@functools.lru_cache(maxsize=16)
def diagonal_positions(xp, m: int):
    """Positions of the diagonal in an upper triangle with the diagonal (row-major): i(2m - i + 1)/2."""
    i = np.arange(m)
    return xp.asarray(i * (2 * m - i + 1) // 2)


FEATURE_BLOCK = 4096  # columns centered and multiplied at a time on the CPU (256 × 4096 float64 = 8 MiB)


def gram_parts(x, product="float64", block=FEATURE_BLOCK):
    """(C, a, s) of features X (m × D), in float64, with c_i the centered rows and μ the column mean:

    C = [c_i·c_j] (m × m), a = [c_i·μ] (m,), s = μ·μ,

    so that the Gram of the raw features is X Xᵀ = C + a 1ᵀ + 1 aᵀ + s exactly, without the
    cancellation of an uncentered product. C is ``gram_linear(center_features(x), product)`` up to
    the order of the float64 sums, but ``block`` columns at a time, so the float64 copy stays in the
    CPU cache instead of costing three passes over an m × D array (centering is per column, so
    blocks of columns are centered independently). CuPy arrays go in one block (the GPU has the
    memory bandwidth).
    """
    xp = array_module(x)
    m, d = x.shape
    step = d if xp is not np else max(1, block)
    c = xp.zeros((m, m), dtype=xp.float64)
    a = xp.zeros(m, dtype=xp.float64)
    s = xp.zeros((), dtype=xp.float64)  # on the device: a float() here would wait for the GPU per layer
    for start in range(0, d, step):
        centered, mean = center_features_and_mean(x[:, start:start + step])
        c += gram_linear(centered, product)
        a += centered @ mean
        s += mean @ mean
    return c, a, s


def u_centered_triangle_from_features(x, product="float64"):
    """Features X (m × D) → strict upper triangle of U(X Xᵀ), float64, (m(m-1)/2,): one layer's row of
    ``hsic1_matrix`` (Song et al. 2012; U-centering of Székely & Rizzo 2014).

    The composition ``u_centered_triangle(C)`` of the Gram C of the features centered in float64
    (``gram_parts``; U(C) = U(X Xᵀ)); ``product`` is the precision of the Gram product (see gram_linear).
    """
    return u_centered_triangle(gram_parts(x, product)[0])


def u_centered_triangle(gram):
    """Strict upper triangle of U(K), (…, m(m-1)/2), from Grams K (…, m, m), without forming U(K):

    U_ij = K_ij - r_i/(m-2) - r_j/(m-2) + t/((m-1)(m-2)) for i < j,

    r the row sums of K with its diagonal zeroed and t their total (Székely & Rizzo 2014, eq. 3.1):
    ``u_center``'s numbers from one pass over K and a pass over the triangle, not five over K.
    """
    xp = array_module(gram)
    gram = xp.asarray(gram, dtype=xp.float64)
    m = check_minibatch_size(gram.shape[-1])
    rows = gram.sum(axis=-2) - xp.diagonal(gram, axis1=-2, axis2=-1)
    return _u_center_off_diagonal(upper_triangle(gram), rows, m)


def _u_center_off_diagonal(off, rows, m: int):
    """U-center strict upper triangles ``off`` (…, m(m-1)/2) of Grams whose zero-diagonal row sums are ``rows`` (…, m),
    in u_center's order of operations (a constant Gram gives exact zeros, as there)."""
    i, j = triangle_indices(array_module(off), m)
    means = rows / (m - 2)
    means -= means.sum(axis=-1, keepdims=True) / (2 * (m - 1))
    return off - means.take(i, axis=-1) - means.take(j, axis=-1)


def minibatch_grams(x, product="float64"):
    """Features (m × D) -> the Gram cache's row of one layer: (upper triangle with the diagonal of C,
    m(m+1)/2; mean products [a, s], m + 1), float64 (see ``gram_parts``).

    Every measure of ckapipe is a function of these: U(C) = U(X Xᵀ) for the unbiased HSIC,
    C = H X Xᵀ H for the biased one, the distances C_ii + C_jj - 2 C_ij for RBF kernels,
    and the raw Gram C + a 1ᵀ + 1 aᵀ + s for neighbours of the L2-normalized features and ranks.
    """
    xp = array_module(x)
    c, a, s = gram_parts(x, product)
    return upper_triangle(c, diagonal=True), xp.concatenate([a, s.reshape(1)])


def square_from_triangle(t, diagonal: bool = False):
    """The symmetric m × m matrices whose upper triangles are t (…, width): zero-diagonal from a
    strict triangle, or with the ``diagonal`` from a triangle that holds it."""
    xp = array_module(t)
    m = gram_size(t.shape[-1]) if diagonal else minibatch_size(t.shape[-1])
    lead = t.shape[:-1]
    u = xp.zeros((*lead, m * m), dtype=xp.float64)
    u[..., triangle_positions(xp, m, diagonal)] = t
    u = u.reshape(*lead, m, m)
    if diagonal:
        lower = xp.swapaxes(u, -1, -2).copy()
        _zero_diagonal(lower)
        return u + lower
    return u + xp.swapaxes(u, -1, -2)


def u_centered_triangle_from_packed(t):
    """Strict upper triangles of U(C), (…, m(m-1)/2), from the upper triangles with the diagonal
    ("packed", row by row) of centered Grams C (…, m(m+1)/2) (Székely & Rizzo 2014, eq. 3.1).

    U-centering removes every a_i + a_j term, so U(C) = U(X Xᵀ): the Gram cache keeps C with its
    diagonal and the unbiased HSIC's triangles are derived on read.
    """
    xp = array_module(t)
    m = check_minibatch_size(gram_size(t.shape[-1]))
    half = xp.zeros((*t.shape[:-1], m * m), dtype=xp.float64)  # the upper half: its row and column sums are K's row sums
    half[..., triangle_positions(xp, m, True)] = t
    half = half.reshape(*t.shape[:-1], m, m)
    rows = half.sum(axis=-1) + half.sum(axis=-2) - 2 * xp.diagonal(half, axis1=-2, axis2=-1)
    return _u_center_off_diagonal(t.take(strict_in_diagonal_triangle(xp, m), axis=-1), rows, m)


def raw_gram(centered, mean_products):
    """X Xᵀ = C + a 1ᵀ + 1 aᵀ + s from the square centered Grams C (…, m, m) and mean products [a, s] (…, m + 1).

    a_i + a_j is added before C, so the result is exactly symmetric.
    """
    a, s = mean_products[..., :-1], mean_products[..., -1:, None]
    return centered + ((a[..., :, None] + a[..., None, :]) + s)


def sub_gram_parts(centered, mean_products, m_sub: int):
    """Centered Grams (…, m/m_sub, m_sub, m_sub) and mean products (…, m/m_sub, m_sub + 1) of the
    consecutive sub-minibatches of m_sub rows, from those of the whole minibatch (…, m, m) and (…, m + 1).

    A sub-minibatch's rows c_i are centered on the whole minibatch's mean μ; on its own mean
    μ' = μ + c̄ they are c_i - c̄, so with r = C_b 1/m_sub, t = mean(r) (C_b the diagonal block):
    C' = J C_b J, c'_i·μ' = a_i + r_i - mean(a) - t and μ'·μ' = s + 2 mean(a) + t.
    A Gram cached at m serves every analysis minibatch size that divides m, for every measure.
    """
    xp = array_module(centered)
    m = centered.shape[-1]
    if m % m_sub:
        raise ValueError(f"{m_sub} does not divide {m}")
    n = m // m_sub
    starts = range(0, m, m_sub)
    blocks = xp.stack([centered[..., s:s + m_sub, s:s + m_sub] for s in starts], axis=-3)
    a = mean_products[..., :-1].reshape(*mean_products.shape[:-1], n, m_sub)
    s = mean_products[..., -1:, None]
    r = blocks.mean(axis=-1)
    t = r.mean(axis=-1, keepdims=True)
    a_mean = a.mean(axis=-1, keepdims=True)
    sub_centered = double_center(blocks)
    sub_a = a + r - a_mean - t
    sub_s = s + 2 * a_mean + t
    return sub_centered, xp.concatenate([sub_a, sub_s], axis=-1)


def sub_triangles(t, m_sub: int):
    """U-centered Grams of the m/m_sub consecutive sub-minibatches of one minibatch.

    U-centering removes every term of the form a_i + a_j (Székely & Rizzo 2014,
    Sec. 3), and U(K)_ij = K_ij - a_i - a_j + c, so a diagonal block of U(K),
    U-centered again, equals U of the same block of K: a Gram cached at m serves
    every analysis minibatch size that divides m, without the activations.
    Returns (m // m_sub) × m_sub(m_sub-1)/2.
    """
    xp = array_module(t)
    u = square_from_triangle(t)
    m = u.shape[0]
    if m % m_sub:
        raise ValueError(f"{m_sub} does not divide {m}")
    blocks = [u[s:s + m_sub, s:s + m_sub] for s in range(0, m, m_sub)]
    return u_centered_triangle(xp.stack(blocks))


def gram_size(n_triangle: int) -> int:
    """m from the length m(m+1)/2 of an upper triangle with its diagonal."""
    m = int(round((np.sqrt(1 + 8 * n_triangle) - 1) / 2))
    if m * (m + 1) // 2 != n_triangle:
        raise ValueError(f"{n_triangle} is not the length of an upper triangle with its diagonal")
    return m


def minibatch_size(n_triangle: int) -> int:
    """m from the length m(m-1)/2 of an upper triangle."""
    m = int(round((1 + np.sqrt(1 + 8 * n_triangle)) / 2))
    if m * (m - 1) // 2 != n_triangle:
        raise ValueError(f"{n_triangle} is not the length of an upper triangle")
    return m


def hsic1_matrix(triangles, others=None):
    """HSIC_1 of every pair of rows: 2 T Tᵀ / (m (m - 3)), or 2 T Sᵀ / (m (m - 3)) with ``others`` S.

    ``triangles`` stacks u_centered_triangle_from_features of every layer (of every run) of one
    minibatch (L × m(m-1)/2); one matrix product gives the L × L unbiased HSIC
    matrix (Song et al. 2012, eq. 5), each layer with itself on the diagonal.
    ``others`` (L' × m(m-1)/2, the same minibatch) gives the L × L' block
    between two stacks without concatenating them.
    """
    m = minibatch_size(triangles.shape[1])
    product = triangles @ (triangles if others is None else others).T
    return 2.0 * product / (m * (m - 3))


def cka(hsic_ab, hsic_aa, hsic_bb, names_a=None, names_b=None):
    """Minibatch CKA = S_ab / sqrt(S_aa S_bb) from HSIC sums (Nguyen et al. 2021, eq. 2).

    ``hsic_ab`` is (La × Lb), ``hsic_aa`` (La,) and ``hsic_bb`` (Lb,). A layer with
    S = 0 (constant activations) makes its row or column NaN, with a warning
    naming the layer when names are given.
    """
    xp = array_module(hsic_ab)
    hsic_aa = xp.asarray(hsic_aa, dtype=xp.float64)
    hsic_bb = xp.asarray(hsic_bb, dtype=xp.float64)
    for diag, names in ((hsic_aa, names_a), (hsic_bb, names_b)):
        dead = np.flatnonzero(to_host(diag) <= 0)
        if dead.size:
            which = ", ".join(str(names[i]) if names is not None else str(i) for i in dead)
            warnings.warn(f"CKA is undefined for layers with constant activations (HSIC(K, K) = 0): {which}", stacklevel=2)
    denom = xp.sqrt(xp.clip(hsic_aa, 0, None))[:, None] * xp.sqrt(xp.clip(hsic_bb, 0, None))[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = xp.asarray(hsic_ab, dtype=xp.float64) / denom
    return xp.where(denom > 0, out, xp.nan)


# --------------------------------------------------------------------------- the biased HSIC_0


def biased_triangles(centered):
    """Rows whose dot product is <H K H, H L H>: the upper triangles with the diagonal of
    double-centered Grams (…, m, m), the off-diagonal entries times √2 (…, m(m+1)/2).

    HSIC_0(K, L) = <H K H, H L H> / (m-1)² (Gretton et al. 2005), Kornblith et al.'s
    original CKA; a product of these rows gives it for every pair of layers at once.
    """
    xp = array_module(centered)
    t = upper_triangle(centered, diagonal=True)
    return t * _triangle_weights(xp, centered.shape[-1])


@functools.lru_cache(maxsize=16)
def _triangle_weights(xp, m: int):
    i, j = xp.triu_indices(m, k=0)
    return xp.where(i == j, 1.0, np.sqrt(2.0))


def hsic0_matrix(rows, others=None):
    """HSIC_0 of every pair of ``biased_triangles`` rows R (L × m(m+1)/2) [and S (L' × m(m+1)/2)]:
    R Sᵀ / (m-1)² (L × L'), the biased HSIC_0 = <H K H, H L H> / (m-1)² of Gretton et al. (2005)."""
    m = gram_size(rows.shape[-1])
    return rows @ (rows if others is None else others).T / (m - 1) ** 2


# --------------------------------------------------------------------------- RBF kernels


def squared_distances(gram):
    """|x_i - x_j|² = G_ii + G_jj - 2 G_ij from a Gram of the rows (…, m, m), clipped at 0.

    Distances do not change under translation, so the centered Gram serves (and loses no digits).
    """
    xp = array_module(gram)
    diag = xp.diagonal(gram, axis1=-2, axis2=-1)
    d = (diag[..., :, None] + diag[..., None, :]) - 2 * gram
    return xp.clip(d, 0, None)


def rbf_gram(gram, threshold: float):
    """RBF kernel exp(-d_ij / (2 σ²)), σ² = threshold² · median(d), from a Gram of the rows (…, m, m).

    d are the squared distances and the median is over all m² of them, the diagonal's
    zeros included, per matrix: Kornblith et al.'s (2019) ``gram_rbf``, so σ is ``threshold``
    times the median distance of each minibatch. Where that median is 0 (most rows equal),
    the limit σ → 0: 1 where d = 0, 0 elsewhere.
    """
    xp = array_module(gram)
    d = squared_distances(gram)
    m = d.shape[-1]
    median = xp.median(d.reshape(*d.shape[:-2], m * m), axis=-1)
    sigma2 = (threshold ** 2 * median)[..., None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        k = xp.exp(-d / (2 * sigma2))
    return xp.where(d == 0, 1.0, k)


# --------------------------------------------------------------------------- neighbours (Huh et al. 2024)

NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps: a zero row stays a zero row


def cosine_gram(raw):
    """Gram of the L2-normalized rows, x_i / max(|x_i|, 1e-12), from the raw Gram X Xᵀ (…, m, m).

    Huh et al. normalize the raw (uncentered) features before their neighbour measures,
    as torch.nn.functional.normalize does.
    """
    xp = array_module(raw)
    norms = xp.maximum(xp.sqrt(xp.clip(xp.diagonal(raw, axis1=-2, axis2=-1), 0, None)), NORM_EPS)
    return raw / (norms[..., :, None] * norms[..., None, :])


def knn_mask(similarity, k: int):
    """(…, m, m) float64 0/1: row i has a 1 at the k rows j != i most similar to row i.

    Huh et al.'s ``compute_nearest_neighbors`` (the diagonal excluded); ties go to the
    lower index (a stable sort), so the neighbours are the same on every machine.
    """
    xp = array_module(similarity)
    m = similarity.shape[-1]
    s = xp.array(similarity, dtype=xp.float64, copy=True).reshape(-1, m, m)
    i = xp.arange(m)
    s[:, i, i] = -xp.inf
    nearest = xp.argsort(-s, axis=-1, kind="stable")[..., :k]
    mask = xp.zeros_like(s)
    mask[xp.arange(len(s))[:, None, None], i[None, :, None], nearest] = 1.0
    return mask.reshape(similarity.shape)


def mutual_knn_matrix(masks, others, k: int):
    """Mutual k-NN alignment of every pair of layers (La × Lb) from their ``knn_mask`` (L, m, m):
    the mean over rows i of |N_a(i) ∩ N_b(i)| / k (Huh et al. 2024, ``mutual_knn``)."""
    m = masks.shape[-1]
    return masks.reshape(len(masks), -1) @ others.reshape(len(others), -1).T / (m * k)


def cknna_parts(similarity, k: int):
    """(L, 3, m, m): the neighbour mask M, M ∘ K and (M ∘ Mᵀ) ∘ K of each layer's kernel K (L, m, m),
    from which ``cknna_hsic`` gives every pair's CKNNA similarity with products alone."""
    xp = array_module(similarity)
    mask = knn_mask(similarity, k)
    both = mask * xp.swapaxes(mask, -1, -2)
    return xp.stack([mask, mask * similarity, both * similarity], axis=-3)


def cknna_hsic(parts, others):
    """Unbiased HSIC (Song et al. 2012, eq. 5) of A = M ∘ K_a and B = M ∘ K_b, M = M_a ∘ M_b,
    for every pair of layers (La × Lb), from their ``cknna_parts``: Huh et al.'s (2024) CKNNA
    similarity, ``hsic_unbiased(mask * K, mask * L)``, all pairs at once:

    Σ_ij A_ij B_ji = <(M_a∘M_aᵀ)∘K_a, (M_b∘M_bᵀ)∘K_b>,   1ᵀA1 = <M_a∘K_a, M_b>,   1ᵀB1 = <M_a, M_b∘K_b>,
    1ᵀAB1 = Σ_l (Σ_i (M_a∘K_a)_il (M_b)_il) (Σ_j (M_a)_lj (M_b∘K_b)_lj)   (a batched product over l).

    The masks exclude the diagonal, so A and B have a zero diagonal as eq. 5 needs.
    """
    m = parts.shape[-1]
    flat = lambda x: x.reshape(len(x), -1)  # noqa: E731
    mask_a, masked_a, mutual_a = parts[:, 0], parts[:, 1], parts[:, 2]
    mask_b, masked_b, mutual_b = others[:, 0], others[:, 1], others[:, 2]
    trace = flat(mutual_a) @ flat(mutual_b).T
    sum_a = flat(masked_a) @ flat(mask_b).T
    sum_b = flat(mask_a) @ flat(masked_b).T
    columns = masked_a.transpose(2, 0, 1) @ mask_b.transpose(2, 1, 0)  # (l, La, Lb): Σ_i A_il
    rows = mask_a.transpose(1, 0, 2) @ masked_b.transpose(1, 2, 0)  # (l, La, Lb): Σ_j B_lj
    products = (columns * rows).sum(axis=0)
    return (trace + sum_a * sum_b / ((m - 1) * (m - 2)) - 2 * products / (m - 2)) / (m * (m - 3))


# --------------------------------------------------------------------------- RankMe (Garrido et al. 2023)


def singular_values_from_gram(gram, size: int | None = None):
    """Singular values of X from G = X Xᵀ or Xᵀ X (…, n, n): √λ of G's eigenvalues, largest first.

    Eigenvalues carry a rounding of about eps · λ_max, so those below λ_max · size · eps
    (``size``: max(N, D), default n, or an array of them broadcast against (…, 1);
    numpy.linalg.matrix_rank's tolerance) count as 0: singular values under
    σ_max · √(size · eps) cannot be told from 0 this way.
    """
    xp = array_module(gram)
    lam = xp.linalg.eigvalsh(gram)[..., ::-1]
    size = gram.shape[-1] if size is None else xp.maximum(xp.asarray(size), gram.shape[-1])
    floor = lam[..., :1] * size * np.finfo(np.float64).eps
    return xp.sqrt(xp.where(lam > floor, lam, 0.0))


def rankme(singular_values):
    """RankMe = exp(-Σ_k p_k log p_k), p = σ / Σ σ (Garrido et al. 2023, eq. 1, without their
    ε = 1e-7 inside p): the effective rank, from 1 to the number of nonzero σ; over the last
    axis (…, n) -> (…); NaN where every σ is 0."""
    xp = array_module(singular_values)
    sigma = xp.asarray(singular_values, dtype=xp.float64)
    total = sigma.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = sigma / total
        terms = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)
    return xp.where(total[..., 0] > 0, xp.exp(-terms.sum(axis=-1)), xp.nan)


def to_host(x) -> np.ndarray:
    """A NumPy array of x: copied from the GPU for a CuPy array, as is otherwise."""
    return x.get() if hasattr(x, "get") else np.asarray(x)

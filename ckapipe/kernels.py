"""Gram, U-centering, HSIC and CKA kernels: arrays in, arrays out.

Every function works on NumPy and CuPy arrays alike: the array module is taken
from the input (``array_module``), never imported by the caller. Everything is
computed in float64.

References
----------
- Song, Smola, Gretton, Bedo, Borgwardt (2012), "Feature selection via
  dependence maximization", JMLR 13: the unbiased estimator HSIC_1.
- Székely & Rizzo (2014), "Partial distance correlation with methods for
  dissimilarities", Ann. Statist. 42: U-centering, with which
  HSIC_1(K, L) = <U(K), U(L)> / (m (m - 3)).
- Kornblith, Norouzi, Lee, Hinton (2019), "Similarity of neural network
  representations revisited", ICML: linear CKA.
- Nguyen, Raghu, Kornblith (2021), "Do wide and deep networks learn the same
  things?", ICLR: minibatch CKA, the ratio of HSIC_1 sums over minibatches.
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
    """X - 1 meanᵀ in float64 (m × D).

    U-centering is invariant to a constant added to the features, so removing
    the column means first changes no HSIC and removes the cancellation that
    makes float32 Grams of offset features wrong. The first row is subtracted
    before the mean so that a constant column becomes exactly zero (a constant
    layer then has HSIC(K, K) = 0 exactly, not a rounding residue).
    """
    xp = array_module(x)
    if x.dtype.itemsize < 8:
        # float32/float16 columns: their float64 mean is exact for a constant column (the sum of
        # m equal narrow values is exact in float64, and k·v / k rounds to v), so no first-row step
        mean = x.mean(axis=0, dtype=xp.float64, keepdims=True)
        x = x.astype(xp.float64)
        x -= mean
        return x
    x = xp.array(x, dtype=xp.float64, copy=True)  # the one float64 copy; the rest is in place
    x -= x[0].copy()
    x -= x.mean(axis=0, keepdims=True)
    return x


PRODUCTS = ("float64", "float32")


def gram_linear(x, product="float64"):
    """Linear-kernel Gram matrix K = X Xᵀ (m × m), returned in float64.

    ``product="float32"`` multiplies in float32 (up to ~2x faster on CPUs). Only
    for centred features, where the products carry no large common offset:
    the rounding is then relative to the signal (about 1e-9 in CKA on ResNet
    features); the U-centering and HSIC stay in float64.
    """
    if product == "float32":
        xp = array_module(x)
        x32 = x.astype(xp.float32)
        return (x32 @ x32.T).astype(xp.float64)
    return x @ x.T


def center_gram(gram):
    """U-centred Gram matrix U(K) (Székely & Rizzo 2014, eq. 3.1):

    U_ij = K_ij - r_i/(m-2) - r_j/(m-2) + t/((m-1)(m-2)) for i != j, U_ii = 0,

    with the diagonal of K zeroed first, r_i its row sums and t its total.
    Needs m >= 4.
    """
    xp = array_module(gram)
    m = check_minibatch_size(gram.shape[0])
    u = xp.array(gram, dtype=xp.float64, copy=True)
    xp.fill_diagonal(u, 0)
    means = u.sum(axis=0) / (m - 2)
    means -= means.sum() / (2 * (m - 1))
    u -= means[:, None]
    u -= means[None, :]
    xp.fill_diagonal(u, 0)
    return u


def upper_triangle(u):
    """The strict upper triangle of a symmetric zero-diagonal matrix, flattened.

    <U, V> = 2 <triu(U), triu(V)>, so the Gram cache and the HSIC product carry
    m(m-1)/2 numbers per minibatch instead of m².
    """
    xp = array_module(u)
    return xp.ravel(u).take(triangle_positions(xp, u.shape[0]))


@functools.lru_cache(maxsize=16)
def triangle_positions(xp, m: int):
    """Flat positions i·m + j (i < j) of the strict upper triangle of an m × m matrix, row by row.

    The same for every minibatch, so computed once per (array module, m): a
    ``take`` at these positions costs a tenth of ``u[triu_indices(m, 1)]``.
    """
    i, j = xp.triu_indices(m, k=1)
    return i * m + j


FEATURE_BLOCK = 4096  # columns centred and multiplied at a time on the CPU (256 × 4096 float64 = 8 MiB)


def centered_gram(x, product="float64", block=FEATURE_BLOCK):
    """Gram matrix of the centred features, (X - 1 meanᵀ)(X - 1 meanᵀ)ᵀ, in float64.

    The same numbers as ``gram_linear(center_features(x), product)`` up to the
    order of the float64 sums, but ``block`` columns at a time, so the float64
    copy stays in the CPU cache instead of costing three passes over an m × D
    array. Centring is per column, so blocks of columns are centred independently.
    CuPy arrays go in one block (the GPU has the memory bandwidth).
    """
    xp = array_module(x)
    d = x.shape[1]
    step = d if xp is not np else max(1, block)
    k = xp.zeros((x.shape[0], x.shape[0]), dtype=xp.float64)
    for start in range(0, d, step):
        k += gram_linear(center_features(x[:, start:start + step]), product)
    return k


def ucentered_gram(x, product="float64"):
    """Features (m × D) -> strict upper triangle of U(X Xᵀ), float64, length m(m-1)/2.

    The features are centred in float64 first; ``product`` is the precision of
    the Gram product (see gram_linear).
    """
    return upper_triangle(center_gram(centered_gram(x, product)))


def square_from_triangle(t):
    """The symmetric zero-diagonal m × m matrix whose strict upper triangle is t."""
    xp = array_module(t)
    m = minibatch_size(t.shape[-1])
    u = xp.zeros((m, m), dtype=xp.float64)
    xp.ravel(u)[triangle_positions(xp, m)] = t
    return u + u.T


def sub_triangles(t, m_sub: int):
    """U-centred Grams of the m/m_sub consecutive sub-minibatches of one minibatch.

    U-centering removes every term of the form a_i + a_j (Székely & Rizzo 2014,
    Sec. 3), and U(K)_ij = K_ij - a_i - a_j + c, so a diagonal block of U(K),
    U-centred again, equals U of the same block of K: a Gram cached at m serves
    every analysis minibatch size that divides m, without the activations.
    Returns (m // m_sub) × m_sub(m_sub-1)/2.
    """
    xp = array_module(t)
    u = square_from_triangle(t)
    m = u.shape[0]
    if m % m_sub:
        raise ValueError(f"{m_sub} does not divide {m}")
    blocks = [u[s:s + m_sub, s:s + m_sub] for s in range(0, m, m_sub)]
    return xp.stack([upper_triangle(center_gram(b)) for b in blocks])


def minibatch_size(n_triangle: int) -> int:
    """m from the length m(m-1)/2 of an upper triangle."""
    m = int(round((1 + np.sqrt(1 + 8 * n_triangle)) / 2))
    if m * (m - 1) // 2 != n_triangle:
        raise ValueError(f"{n_triangle} is not the length of an upper triangle")
    return m


def hsic1_matrix(triangles, others=None):
    """HSIC_1 of every pair of rows: 2 T Tᵀ / (m (m - 3)), or 2 T Sᵀ / (m (m - 3)) with ``others`` S.

    ``triangles`` stacks ucentered_gram of every layer (of every run) of one
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


def to_host(x) -> np.ndarray:
    """A NumPy array of x: copied from the GPU for a CuPy array, as is otherwise."""
    return x.get() if hasattr(x, "get") else np.asarray(x)

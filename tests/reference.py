"""The independent float64 references every number of ckapipe is checked against.

Written from the papers' formulas with explicit traces, ones vectors and loops,
never with ckapipe's kernels: a test that compares ckapipe with these checks
ckapipe, not ckapipe against itself.
"""

from __future__ import annotations

import numpy as np


def hsic1_reference(k, l):
    """Song et al. (2012), eq. 5, with explicit traces and ones vectors, in float64:

    HSIC_1 = [tr(K~L~) + 1ᵀK~1 1ᵀL~1 / ((m-1)(m-2)) - 2/(m-2) 1ᵀK~L~1] / (m(m-3)),
    K~, L~ = K, L with the diagonal set to zero.
    """
    k = np.array(k, dtype=np.float64)
    l = np.array(l, dtype=np.float64)
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    m = k.shape[0]
    one = np.ones((m, 1))
    value = (
        np.trace(k @ l)
        + (one.T @ k @ one).item() * (one.T @ l @ one).item() / ((m - 1) * (m - 2))
        - 2.0 / (m - 2) * (one.T @ k @ l @ one).item()
    )
    return value / (m * (m - 3))


def u_centered_reference(k):
    """Székely & Rizzo (2014), U-centering, element by element in float64 (m >= 4):

    U_ij = K~_ij - Σ_l K~_il/(m-2) - Σ_l K~_lj/(m-2) + Σ_kl K~_kl/((m-1)(m-2)) for i != j, U_ii = 0,
    K~ = K with the diagonal set to zero.
    """
    k = np.array(k, dtype=np.float64)
    np.fill_diagonal(k, 0)
    m = k.shape[0]
    rows, cols, total = k.sum(axis=1), k.sum(axis=0), k.sum()
    u = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if i != j:
                u[i, j] = k[i, j] - rows[i] / (m - 2) - cols[j] / (m - 2) + total / ((m - 1) * (m - 2))
    return u


def minibatch_cka_reference(x, y, m, minibatches=None, y_minibatches=None):
    """Nguyen et al. (2021): sum of HSIC_1 over minibatches of m rows, linear kernel, float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ks = range(min(len(x), len(y)) // m) if minibatches is None else minibatches
    s_xy = s_xx = s_yy = 0.0
    for k in ks:
        a = x[k * m:(k + 1) * m]
        b = y[k * m:(k + 1) * m]
        K, L = a @ a.T, b @ b.T
        s_xy += hsic1_reference(K, L)
        s_xx += hsic1_reference(K, K)
        s_yy += hsic1_reference(L, L)
    return s_xy / np.sqrt(s_xx * s_yy)


def minibatch_cka_matrix_reference(xs, ys, m):
    """(len(xs), len(ys)) minibatch CKA of every pair of layers, from the same formula, with each
    layer's linear Gram of a minibatch computed once (float64)."""
    n = min(len(xs[0]), len(ys[0]))
    s_xy, s_xx, s_yy = np.zeros((len(xs), len(ys))), np.zeros(len(xs)), np.zeros(len(ys))
    for k in range(n // m):
        gx = [linear_gram(x[k * m:(k + 1) * m]) for x in xs]
        gy = [linear_gram(y[k * m:(k + 1) * m]) for y in ys]
        s_xx += [hsic1_reference(K, K) for K in gx]
        s_yy += [hsic1_reference(L, L) for L in gy]
        s_xy += [[hsic1_reference(K, L) for L in gy] for K in gx]
    return s_xy / np.sqrt(np.outer(s_xx, s_yy))


def linear_gram(x):
    """K = X Xᵀ in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def double_centered_reference(k):
    """Gretton et al. (2005): H K H with the centering matrix H = I - 11ᵀ/m written out, float64."""
    k = np.array(k, dtype=np.float64)
    m = k.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m
    return h @ k @ h

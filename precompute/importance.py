"""Concept importance as Sobol total-order indices: CRAFT's estimator, the one FACE uses to order
concepts for C-Del and C-Ins (Fel et al., CRAFT, 2023; Xplique's ``Craft.estimate_importance``).

For each image, the concept codes are perturbed by random masks, one scalar per concept shared by
every pixel of the image (CRAFT's re-parameterisation for spatial codes): S'[p, j] = m_j S[p, j],
m in [0, 1]^k; the perturbed activations S' P go through the head, and the class logit's variance
over the masks is attributed to the concepts by Sobol total-order indices

    ST_j = E_{m_~j}[ Var_{m_j}( logit | m_~j ) ] / Var( logit ),

the share of the logit's variance that goes away when every mask but m_j is fixed. The masks form a
replicated design: matrices A and B (n_designs x k each) of a quasi-Monte Carlo sequence in
[0, 1]^{2k}, and for each concept j the matrix C_j, A with column j taken from B; the estimator is
Jansen's (1999),

    ST_j = sum_r (f(A_r) - f(C_j,r))^2 / (2 n Var(f(A))),     Var with ddof = 1, floored at 1e-12,

and the class's importance is its mean over the images. That is CRAFT's behaviour (n_designs = 32,
a Halton sequence, Jansen's estimator, the mean over images), with one difference: the Halton
sequence here is scrambled with ``seed``. Unscrambled, the Halton coordinates of the high prime
bases cover only a corner of [0, 1] with few designs (2k = 20 coordinates: the 20th prime is 71, so
32 points of that coordinate lie in [0, 0.44)); scrambled, each coordinate is spread over [0, 1]
and the estimate is still deterministic for a seed.

For a GAP+linear head the logit is linear in the masks, f(m) = sum_j m_j u_j + const with
u_j = mean_p S[p, j] (P_j . W[y]) the concept's contribution to the image's logit; with independent
uniform masks Var f = sum_j u_j^2 / 12 and ST_j = u_j^2 / sum_l u_l^2 exactly (tests/test_importance.py
checks the estimator against it). Unlike the mean contribution, the index is per image and
scale-free: a concept that dominates the logit of a few images weighs no more than one that
dominates the logit of as many others, however large its contribution there.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-12


def halton_ab(k: int, n_designs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A, B): two (n_designs, k) float64 matrices in [0, 1): the first and last k coordinates of
    n_designs points of a 2k-dimensional Halton sequence, scrambled with ``seed``."""
    from scipy.stats import qmc

    try:
        sampler = qmc.Halton(2 * k, scramble=True, rng=np.random.default_rng(seed))
    except TypeError:  # scipy < 1.15 names it seed
        sampler = qmc.Halton(2 * k, scramble=True, seed=np.random.default_rng(seed))
    ab = sampler.random(n_designs)
    return ab[:, :k], ab[:, k:]


def replicated_design(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Masks (n (k + 2), k): A (n, k), then B, then C_0 ... C_{k-1}, C_j = A with column j from B."""
    n, k = a.shape
    c = np.repeat(a[None], k, axis=0)  # (k, n, k)
    j = np.arange(k)
    c[j, :, j] = b.T
    return np.concatenate([a, b, c.reshape(k * n, k)])


def jansen_total_order(outputs: np.ndarray, n_designs: int, k: int) -> np.ndarray:
    """Jansen's total-order indices (k, ...) of ``outputs`` (n_designs (k + 2), ...): the model's
    outputs on the masks of :func:`replicated_design`, in that order (trailing axes: independent
    outputs, e.g. images)."""
    y = np.asarray(outputs, np.float64)
    if y.shape[0] != n_designs * (k + 2):
        raise ValueError(f"expected {n_designs * (k + 2)} outputs (n_designs (k + 2)), got {y.shape[0]}")
    a = y[:n_designs]
    c = y[2 * n_designs:].reshape(k, n_designs, *y.shape[1:])
    var = np.maximum(a.var(axis=0, ddof=1) if n_designs > 1 else np.zeros(y.shape[1:]), EPS)
    return ((a[None] - c) ** 2).sum(axis=1) / (2 * n_designs * var)


def sobol_total_order(codes: np.ndarray, basis: np.ndarray, logits_fn, cid: int,
                      feature_shape: tuple[int, int, int], n_designs: int = 32, seed: int = 0,
                      batch_size: int = 256) -> np.ndarray:
    """Sobol total-order importance (k,) of a class's concepts on a set of images (CRAFT's estimator).

    codes (N, HW, k): the served codes of N images (pixel-major, H W pixels); basis (k, C): the
    directions the codes reconstruct with (activations = codes @ basis); ``logits_fn``: the head,
    either a function features (n, C, H, W) float32 -> logits (n, K), or the W (K, C) of a GAP+linear
    head (or its (W, b)), for which the logit is computed in closed form from the concepts'
    contributions; ``cid``: the class whose logit is explained; ``feature_shape`` (C, H, W).
    ``n_designs``: rows of each of A and B (CRAFT: 32); every image is evaluated on
    n_designs (k + 2) masks. Returns the mean over the images of each image's Jansen estimate,
    float64, deterministic for a ``seed``.
    """
    codes = np.asarray(codes, np.float32)
    basis = np.asarray(basis, np.float32)
    if codes.ndim != 3 or codes.shape[2] != basis.shape[0]:
        raise ValueError(f"codes {codes.shape} (N, HW, k) do not match basis {basis.shape} (k, C)")
    n, hw, k = codes.shape
    c, h, w = (int(s) for s in feature_shape)
    if hw != h * w or basis.shape[1] != c:
        raise ValueError(f"codes {codes.shape} and basis {basis.shape} do not match features {(c, h, w)}")
    if n == 0 or k == 0:
        return np.zeros(k)
    masks = replicated_design(*halton_ab(k, n_designs, seed))  # (M, k)
    if isinstance(logits_fn, tuple):
        logits_fn = logits_fn[0]
    if not callable(logits_fn):  # GAP + linear: f(m) = sum_j m_j u_j + b (the bias drops out)
        wy = np.asarray(logits_fn, np.float64)[cid]  # (C,)
        u = codes.astype(np.float64).mean(axis=1) * (basis.astype(np.float64) @ wy)  # (N, k) contributions
        outputs = masks @ u.T  # (M, N)
    else:
        outputs = np.empty((len(masks), n))
        m32 = masks.astype(np.float32)
        for i in range(n):
            for s in range(0, len(masks), batch_size):
                pert = codes[i][None] * m32[s:s + batch_size, None, :]  # (b, HW, k)
                feats = (pert @ basis).transpose(0, 2, 1).reshape(-1, c, h, w)
                outputs[s:s + batch_size, i] = np.asarray(logits_fn(np.ascontiguousarray(feats)))[:, cid]
    return jansen_total_order(outputs, n_designs, k).mean(axis=1)

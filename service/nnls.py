"""Non-negative least squares with a fixed basis, batched over pixels, in numpy.

The projection of the explain core: S = argmin_{S >= 0} ||V - S P||^2 for V (n, C), P (k, C).
With the Gram matrix G = P P^T (k, k) and B = V P^T (n, k) this is n small quadratic programs
min_s 1/2 s^T G s - b^T s, s >= 0, solved together by accelerated projected gradient (FISTA)
started from the clipped unconstrained solution. Only B costs O(n C k); the iterations are O(n k^2).

Logit-aware projection (``logit_row`` u (C,), the head's row of the explained class, and
``logit_weight`` alpha): S = argmin_{S >= 0} ||V - S P||^2 + alpha / ||u||^2 ||V u - S P u||^2, the
same least squares with the error along the head's direction u weighted 1 + alpha times: each pixel's
codes also keep the pixel's contribution to the class's logit. It is NNLS of [V, sqrt(mu) V u] on
[P, sqrt(mu) P u] (mu = alpha / ||u||^2): G = P P^T + mu q q^T and B = V R^T with the reader
R = P + mu q u^T (k, C), q = P u. alpha = 0 is the plain projection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NNLSProjector:
    """Per-basis constants of the projection, computed once (bundle load time)."""

    basis: np.ndarray  # (k, C) float32: P, what the codes reconstruct with
    gram_pinv: np.ndarray  # (k, k) float32
    step: float  # 1 / largest eigenvalue of gram
    descent: np.ndarray  # (k, k) float32: I - step * gram, so a gradient step is y @ descent + step * B
    reader: np.ndarray | None = None  # (k, C) float32: R, B = V R^T (None: R = P, the plain projection)
    logit_row: np.ndarray | None = None  # (C,) float32: u of a logit-aware projection
    logit_term: np.ndarray | None = None  # (k,) float32: mu q, so that B = V P^T + (V u) mu q^T

    @classmethod
    def from_basis(cls, basis: np.ndarray, logit_row: np.ndarray | None = None,
                   logit_weight: float = 0.0) -> "NNLSProjector":
        """Constants for basis P (k, C); with ``logit_row`` u (C,) and ``logit_weight`` alpha > 0 the
        logit-aware projection (module docstring)."""
        basis = np.ascontiguousarray(basis, dtype=np.float32)
        p = basis.astype(np.float64)
        gram = p @ p.T
        reader = logit_term = row = None
        if logit_row is not None and logit_weight > 0:
            u = np.asarray(logit_row, np.float64).reshape(-1)
            if u.shape[0] != basis.shape[1]:
                raise ValueError(f"logit row of {u.shape[0]} channels does not match the basis {basis.shape}")
            mu = float(logit_weight) / max(float(u @ u), 1e-30)
            q = p @ u  # (k,)
            gram = gram + mu * np.outer(q, q)
            reader = (p + mu * np.outer(q, u)).astype(np.float32)
            logit_term, row = (mu * q).astype(np.float32), u.astype(np.float32)
        lmax = float(np.linalg.eigvalsh(gram)[-1]) if gram.size else 1.0
        step = 1.0 / max(lmax, 1e-12)
        return cls(basis=basis, gram_pinv=np.linalg.pinv(gram).astype(np.float32),
                   step=step, descent=(np.eye(len(gram)) - step * gram).astype(np.float32),
                   reader=reader, logit_row=row, logit_term=logit_term)

    def correlations(self, v: np.ndarray, plain: np.ndarray | None = None) -> np.ndarray:
        """B (n, k) of pixels V (n, C) for :meth:`project_from_correlations`: V R^T; ``plain``: V P^T when
        already at hand (then only V u is computed for a logit-aware projection)."""
        if plain is None:
            return np.asarray(v, dtype=np.float32) @ (self.basis if self.reader is None else self.reader).T
        if self.logit_row is None:
            return plain
        return plain + (np.asarray(v, dtype=np.float32) @ self.logit_row)[:, None] * self.logit_term[None, :]

    def project(self, v: np.ndarray, max_iter: int = 200, tol: float = 1e-5) -> np.ndarray:
        """Codes S (n, k) >= 0 for pixels V (n, C), float32.

        Stops when the largest change of a code is below ``tol`` times the largest code.
        """
        return self.project_from_correlations(self.correlations(v), max_iter=max_iter, tol=tol)

    def project_from_correlations(self, b: np.ndarray, max_iter: int = 200, tol: float = 1e-5) -> np.ndarray:
        """Codes S (n, k) from B = V R^T (n, k) (:meth:`correlations`); see :meth:`project`."""
        # Few numpy calls per iteration, in place: this runs right after inference, when each call
        # is slow (the model has evicted the caches). y - step (y G - B) = y (I - step G) + step B.
        b = np.asarray(b, dtype=np.float32)
        scaled_b = b * np.float32(self.step)
        s = np.maximum(b @ self.gram_pinv, 0.0)
        y, t = s, 1.0
        for it in range(max_iter):
            s_next = y @ self.descent
            s_next += scaled_b
            np.maximum(s_next, 0.0, out=s_next)
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            y = s_next - s
            y *= np.float32((t - 1.0) / t_next)
            y += s_next
            if it % 8 == 7:
                delta = float(np.abs(s_next - s).max(initial=0.0))
                if delta <= tol * max(float(s_next.max(initial=0.0)), 1e-12):
                    s = s_next
                    break
            s, t = s_next, t_next
        return s

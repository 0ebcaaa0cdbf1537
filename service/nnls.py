"""Non-negative least squares with a fixed basis, batched over pixels, in numpy.

The projection of the explain core: S = argmin_{S >= 0} ||V - S P||^2 for V (n, C), P (k, C).
With the Gram matrix G = P P^T (k, k) and B = V P^T (n, k) this is n small quadratic programs
min_s 1/2 s^T G s - b^T s, s >= 0, solved together by accelerated projected gradient (FISTA)
started from the clipped unconstrained solution. Only B costs O(n C k); the iterations are O(n k^2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NNLSProjector:
    """Per-basis constants of the projection, computed once (bundle load time)."""

    basis: np.ndarray  # (k, C) float32
    gram_pinv: np.ndarray  # (k, k) float32
    step: float  # 1 / largest eigenvalue of gram
    descent: np.ndarray  # (k, k) float32: I - step * gram, so a gradient step is y @ descent + step * B

    @classmethod
    def from_basis(cls, basis: np.ndarray) -> "NNLSProjector":
        basis = np.ascontiguousarray(basis, dtype=np.float32)
        gram = (basis.astype(np.float64) @ basis.T.astype(np.float64))
        lmax = float(np.linalg.eigvalsh(gram)[-1]) if gram.size else 1.0
        step = 1.0 / max(lmax, 1e-12)
        return cls(basis=basis, gram_pinv=np.linalg.pinv(gram).astype(np.float32),
                   step=step, descent=(np.eye(len(gram)) - step * gram).astype(np.float32))

    def project(self, v: np.ndarray, max_iter: int = 200, tol: float = 1e-5) -> np.ndarray:
        """Codes S (n, k) >= 0 for pixels V (n, C), float32.

        Stops when the largest change of a code is below ``tol`` times the largest code.
        """
        b = np.asarray(v, dtype=np.float32) @ self.basis.T  # (n, k)
        return self.project_from_correlations(b, max_iter=max_iter, tol=tol)

    def project_from_correlations(self, b: np.ndarray, max_iter: int = 200, tol: float = 1e-5) -> np.ndarray:
        """Codes S (n, k) from B = V P^T (n, k); see :meth:`project`."""
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

"""FACE concept learner (Bhusal et al.): NMF whose basis also keeps the head's prediction, on torch.

For images n with pixel activations V_n (HW, C) >= 0 and a GAP+linear head h(A) = W mean_pixels(A) + b,
the basis P (k, C) >= 0 minimizes

    F(P) = mean_{pixels, channels} (V - S P)^2  +  lam * mean_n KL(softmax h(V_n) || softmax h(S_n P)),
    S = NNLS(V; P)   (per pixel: the projection the service applies to new images).

The reference (dipkamal/FACE) trains free codes U jointly with P; the KL term then shapes codes that new
images never get, and held-out fidelity gets worse (REFERENCES.md). Here S is always the NNLS solution
for P, differentiated implicitly (on each pixel's support F, G_FF s_F = B_F with G = P P^T, B = V P^T),
and P is optimized by projected L-BFGS (active set, Armijo along the projection arc), warm-started from
the plain NMF basis (the ``nmf`` learner, same k and seed; see ``FACE.fit``). The normalisation (squared
error averaged over elements, KL averaged over images) is the reference's, so lam means the same in both.

Cost (issue 12; ``bench/bench_face_speed.py`` measures it against plain NMF). One evaluation of F is two
n x C x k products (B = V P^T and the gradient's (U - cS)^T V) and O(n k^2 + k C K) more: the squared
error comes from k x k quantities (||V||^2 - 2 <S, B> + <S^T S, G>), the gradient is written out (no
autograd), and the NNLS codes are warm-started by block principal pivoting from the previous codes'
supports (one exact solve on them settles most rows). The L-BFGS's initial Hessian is per channel a
k x k block (the squared error's with the codes held, plus the KL's Gauss-Newton term with the head's
mean Fisher diagonal), softened within the span of P's rows, which the codes absorb; it roughly halves
the iterations of a diagonal one. The optimizer stops once F fell by less than ``tol`` relatively over
``window`` iterations. The second, head-weighted start runs only where NMF's basis loses the head's
signal, and the NMF start is kept for further fits on the same data (a λ sweep). On CUDA the support
solves are one batched inverse per row (no host-side grouping) and the FISTA fallback checks
convergence less often. ``face_reference.py`` holds the reference optimizer and the λ-sweep helpers.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .base import ConceptLearner
from .nmf import NMF

_CHUNK = 65536  # rows per batched k x k solve (bounds memory at CHUNK * k^2 floats)
_NMF_CACHE_SIZE = 4  # NMF warm starts kept (k x C each), keyed by the data's fingerprint and the settings
_NMF_STARTS: dict[tuple, torch.Tensor] = {}
_KKT_EPS = 100  # KKT tolerance of the pivoting, in machine epsilons of the dtype, times the row's largest |b|


# ---- NNLS codes with an implicit gradient ---------------------------------------------------------

class _SupportInverse:
    """Inverses of G_FF for each row's support F (mask (n, k)).

    ``apply(rhs)`` solves G_FF x_F = rhs_F for every row at once (x = 0 off F). On the CPU one inverse per
    distinct support (codes are sparse, so the supports are far fewer than the rows); with ``per_row``
    (CUDA) one inverse per row, in one batched call, with no host-side grouping (``torch.unique``
    would wait for the device).
    """

    def __init__(self, g: torch.Tensor, mask: torch.Tensor, per_row: bool = False):
        k = g.shape[0]
        if per_row:
            self.index = None
            m = mask.to(g.dtype)
        elif k <= 62:  # one integer per support: a 1-D unique is much faster than unique(dim=0)
            bit = torch.arange(k, device=mask.device)
            codes, self.index = torch.unique((mask.long() << bit).sum(1), return_inverse=True)
            m = ((codes[:, None] >> bit) & 1).to(g.dtype)
        else:
            pats, self.index = torch.unique(mask, dim=0, return_inverse=True)
            m = pats.to(g.dtype)
        ridge = 1e-7 * float(g.diagonal().mean().clamp(min=1e-30))
        # G on the support, identity off it: SPD, and its inverse restricted to F is G_FF^{-1}
        parts = []
        for i in range(0, m.shape[0], _CHUNK):
            mm = m[i:i + _CHUNK]
            outer = mm[:, :, None] * mm[:, None, :]
            parts.append(torch.linalg.inv(g * outer + torch.diag_embed(1 + ridge - mm)) * outer)
        self.inv = parts[0] if len(parts) == 1 else torch.cat(parts)

    def replace_rows(self, rows: torch.Tensor, other: "_SupportInverse") -> "_SupportInverse":
        """This solver with the rows ``rows`` served by ``other`` (built for those rows only); in place."""
        if self.index is None:
            self.inv[rows] = other.inv
        else:
            self.index = self.index.clone()
            self.index[rows] = other.index + self.inv.shape[0]
            self.inv = torch.cat([self.inv, other.inv])
        return self

    def apply(self, rhs: torch.Tensor) -> torch.Tensor:
        if rhs.shape[0] <= _CHUNK:
            inv = self.inv if self.index is None else self.inv[self.index]
            return torch.bmm(inv, rhs[:, :, None])[..., 0]
        out = torch.empty_like(rhs)
        for i in range(0, rhs.shape[0], _CHUNK):
            sl = slice(i, i + _CHUNK)
            inv = self.inv[sl] if self.index is None else self.inv[self.index[sl]]
            out[sl] = torch.bmm(inv, rhs[sl, :, None])[..., 0]
        return out


def _fista(b: torch.Tensor, g: torch.Tensor, s: torch.Tensor | None, max_iter: int, tol: float,
           check_every: int = 10) -> torch.Tensor:
    """Projected accelerated gradient (as ``service.nnls``) on min_s 1/2 s G s^T - b s^T, s >= 0, per row."""
    lmax = torch.linalg.eigvalsh(g.double())[-1].clamp(min=1e-30)
    step = float(1.0 / lmax)
    s = (b @ torch.linalg.pinv(g)).clamp(min=0) if s is None else s.clone()
    y, t = s, 1.0
    for it in range(max_iter):
        s_next = (y - step * (y @ g - b)).clamp(min=0)
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = s_next + ((t - 1.0) / t_next) * (s_next - s)
        done = (it % check_every == check_every - 1
                and float((s_next - s).abs().max()) <= tol * float(s_next.max().clamp(min=1e-30)))
        s, t = s_next, t_next
        if done:
            break
    return s


def _solve_on_support(b: torch.Tensor, g: torch.Tensor, s: torch.Tensor, per_row: bool
                      ) -> tuple[torch.Tensor, _SupportInverse]:
    """One exact solve on each row's support of ``s``, kept where it stays non-negative."""
    solver = _SupportInverse(g, s > 0, per_row)
    exact = solver.apply(b)
    return torch.where((exact >= 0).all(dim=1, keepdim=True), exact, s), solver


@torch.no_grad()
def _nnls(b: torch.Tensor, g: torch.Tensor, s0: torch.Tensor | None, max_iter: int, tol: float,
          per_row: bool | None = None) -> tuple[torch.Tensor, _SupportInverse]:
    """NNLS codes (n, k) and the support solver of the result (for the implicit gradient).

    Block principal pivoting from the support of ``s0`` (warm start, e.g. the codes of a nearby basis:
    most rows keep their support, and one exact solve, checked against the KKT conditions, settles them)
    or of the clipped unconstrained solution; FISTA from there only for rows that did not settle in its
    rounds, then an exact solve on the support FISTA found.
    """
    per_row = b.is_cuda if per_row is None else per_row
    check = 50 if b.is_cuda else 10  # each convergence check waits for the device
    if s0 is None:  # the clipped unconstrained solution's support
        s0 = (b @ torch.linalg.pinv(g)).clamp(min=0)
    s, solver, left = _pivot(b, g, s0 > 0, per_row)
    if left.numel():  # rows block pivoting did not settle: FISTA, then the exact solve on its support
        s_left, sub = _solve_on_support(b[left], g, _fista(b[left], g, s0[left], max_iter, tol, check), per_row)
        s[left] = s_left
        solver.replace_rows(left, sub)
    return s, solver


def _kkt_violations(s: torch.Tensor, grad: torch.Tensor, support: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """(n, k) mask of the NNLS optimality conditions violated: a code < 0 on the support, or a gradient
    < 0 off it, beyond ``slack`` (n, 1)."""
    return torch.where(support, s, grad) < -slack


def _pivot(b: torch.Tensor, g: torch.Tensor, support: torch.Tensor, per_row: bool, max_rounds: int = 30
           ) -> tuple[torch.Tensor, _SupportInverse, torch.Tensor]:
    """Block principal pivoting (Kim & Park 2011) for NNLS from a start support (n, k), all rows at once.

    Each round solves every row exactly on its support and swaps the variables that violate the KKT
    conditions in or out (all of them while the count of violations keeps falling or within 3 rounds
    of its best, else only the last one: Murty's rule, which cannot cycle). Returns the codes, their
    support solver and the indices of rows still unsettled after ``max_rounds`` (codes there: clipped).
    """
    k = support.shape[1]
    slack = _KKT_EPS * torch.finfo(b.dtype).eps * b.abs().amax(dim=1, keepdim=True)  # relative to the row's b
    solver = _SupportInverse(g, support, per_row)  # round 0, all rows: most keep their support
    x = solver.apply(b)
    s = x.clamp(min=0)
    bad = _kkt_violations(x, x @ g - b, support, slack)
    count = bad.sum(1)
    idx = count.nonzero()[:, 0]  # rows still pivoting; their support, violations, best count, backup
    sup, bad, best = support[idx], bad[idx], count[idx]
    backup = torch.full_like(best, 3)
    order = torch.arange(k, device=b.device)
    for rnd in range(1, max_rounds):
        if idx.numel() == 0:
            break
        if rnd > 3:  # backup starts at 3 and falls by at most 1 a round: before this, all exchange fully
            last = (bad * order).argmax(1)  # Murty's rule: the violation of largest index only
            single = torch.zeros_like(bad).scatter_(1, last[:, None], True)
            bad = torch.where((backup >= 0)[:, None], bad, single)
        sup = sup ^ bad
        b_i = b[idx]
        sub = _SupportInverse(g, sup, per_row)
        x = sub.apply(b_i)
        s[idx] = x.clamp(min=0)
        solver.replace_rows(idx, sub)
        bad = _kkt_violations(x, x @ g - b_i, sup, slack[idx])
        count = bad.sum(1)
        left = count.nonzero()[:, 0]
        idx, sup, bad, count, best, backup = idx[left], sup[left], bad[left], count[left], best[left], backup[left]
        improved = count < best
        best = torch.minimum(count, best)
        backup = torch.where(improved, 3, backup - 1)
    return s, solver, idx


def nnls_codes(b: torch.Tensor, g: torch.Tensor, s0: torch.Tensor | None = None, max_iter: int = 500,
               tol: float = 1e-6) -> torch.Tensor:
    """S (n, k) = argmin_{S >= 0} ||V - S P||^2 from B = V P^T (n, k) and G = P P^T (k, k).

    Exact on each row (block principal pivoting from the support of ``s0`` or of the clipped
    unconstrained solution; FISTA, as ``service.nnls``, for rows it leaves unsettled).
    """
    return _nnls(b, g, s0, max_iter, tol)[0]


class NNLSCodes(torch.autograd.Function):
    """Differentiable NNLS codes: ``NNLSCodes.apply(B, G, s0) -> S`` (n, k).

    Backward by implicit differentiation on each row's support F: with u_F = G_FF^{-1} (dL/dS)_F and
    u = 0 off F, dL/dB = U and dL/dG = -U^T S. ``s0`` (n, k) or None is a warm start.
    """

    @staticmethod
    def forward(ctx, b, g, s0):
        s, ctx.solver = _nnls(b, g, s0, 500, 1e-6)
        ctx.save_for_backward(s)
        return s

    @staticmethod
    def backward(ctx, grad_s):
        (s,) = ctx.saved_tensors
        u = ctx.solver.apply(grad_s)
        return u, -(u.T @ s), None


# ---- inputs -----------------------------------------------------------------------------------------

def _acts(acts, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    a = torch.as_tensor(acts).detach().to(device, dtype)
    if a.ndim != 3:
        raise ValueError(f"expected activations (N, HW, C), got shape {tuple(a.shape)}")
    if (a < 0).any():
        raise ValueError("activations must be non-negative")
    return a


def _head(head_weight, head_bias, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.as_tensor(head_weight).detach().to(device, dtype)
    b = torch.zeros(w.shape[0]) if head_bias is None else torch.as_tensor(head_bias).detach()
    return w, b.to(device, dtype)


# ---- FACE -----------------------------------------------------------------------------------------

class _FaceObjective:
    """F(P) for images a (N, HW, C) and head (w, b): ``self(P) -> (F, dF/dP, initial inverse Hessian)``
    (the last a ``_ChannelBlocks``, the L-BFGS's H0).

    Warm-starts each NNLS solve from the previous codes; ``history`` keeps loss, mse, kl and the logit
    error of class ``class_id`` (None: each image's predicted class) per evaluation.
    """

    def __init__(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: float, class_id: int | None,
                 span_beta: float = 0.1):
        self.n_img, self.hw, c = a.shape
        self.span_beta = span_beta
        self.v, self.w, self.b, self.lam = a.reshape(-1, c), w, b, lam
        # transposed copies too: P V^T and P W^T run faster on (C, n) and (C, K) rows than V P^T on (n, C)
        self.vt, self.wt = self.v.T.contiguous(), w.T.contiguous()
        # ||V||^2 once (row sums, then a float64 total): the squared error is then O(n k^2) per call
        self.v_sq = self.v.square().sum(1).sum(dtype=torch.float64)
        self.f_true = a.mean(1) @ w.T + b
        self.logp_true = torch.log_softmax(self.f_true, 1)
        self.p_true = self.logp_true.exp()
        # the diagonal of W^T (diag p - p p^T) W per channel, mean over images (C,): the KL's curvature scale
        self.fisher = (self.p_true.mean(0) @ w.square() - (self.p_true @ w).square().mean(0)).clamp(min=0)
        self.rows = torch.arange(self.n_img, device=a.device)
        self.cls = self.f_true.argmax(1) if class_id is None else torch.full_like(self.rows, class_id)
        self.codes: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    @torch.no_grad()
    def __call__(self, p: torch.Tensor) -> tuple[float, torch.Tensor, "_ChannelBlocks"]:
        # All by hand (no autograd): two n k C matmuls (B = V P^T and the gradient's (U - cS)^T V), the
        # rest is O(n k^2 + k C K). Squared error: ||V||^2 - 2 <S, B> + <S^T S, G>; by the envelope
        # theorem only its partial in P counts, -2/(nC) S^T R. KL, with f = mean_pixels(S) P W^T + b:
        # dKL/df = (softmax f - p) / N, directly in P through the head (s_bar^T dKL/df W) and through S
        # implicitly, U = G_FF^{-1} dKL/dS per pixel, which enters via B = V P^T (U^T V) and G = P P^T
        # (-(U^T S + S^T U) P).
        v, n_img, hw, lam = self.v, self.n_img, self.hw, self.lam
        p = p.detach()
        bm, g = (p @ self.vt).T.contiguous(), p @ p.T
        s, solver = _nnls(bm, g, self.codes, 500, 1e-6)
        self.codes = s
        sts = s.T @ s
        sse = self.v_sq - 2 * (s * bm).sum(dtype=torch.float64) + (sts * g).sum(dtype=torch.float64)
        mse = float(sse.clamp(min=0)) / v.numel()
        s_bar = s.view(n_img, hw, -1).mean(1)  # (N, k)
        head = p @ self.wt  # (k, K)
        f_rec = s_bar @ head + self.b
        logq = torch.log_softmax(f_rec, 1)
        kl = float((self.p_true * (self.logp_true - logq)).sum()) / n_img
        df = (logq.exp() - self.p_true) / n_img  # (N, K)
        c = 2.0 / v.numel()
        u = solver.apply((lam / hw) * (df @ head.T).repeat_interleave(hw, dim=0))
        grad = (u - c * s).T @ v + (c * sts - u.T @ s - s.T @ u) @ p + lam * ((s_bar.T @ df) @ self.w)
        loss = mse + lam * kl
        true_y, rec_y = self.f_true[self.rows, self.cls], f_rec[self.rows, self.cls]
        err = (true_y - rec_y).abs().mean() / (true_y.mean().abs() + 1e-4)
        self.history.append({"loss": loss, "mse": mse, "kl": kl, "logit_err": err.item()})
        return loss, grad, _ChannelBlocks(c * sts, (lam / n_img) * (s_bar.T @ s_bar), self.fisher, p,
                                          self.span_beta)


class _ChannelBlocks:
    """Inverse of an approximate Hessian of F in P (k, C), one k x k block per channel c, as the initial
    inverse Hessian of the L-BFGS: H_c = A + f_c Sbar, A = 2 S^T S / (nC) the squared error's (codes
    held), Sbar = lam mean_n s_n s_n^T with the head's mean Fisher diagonal f (C,) the KL's (Gauss-
    Newton). The codes absorb moves of P within the span of its own rows (a row's scale exactly, a mix of
    rows where supports are full), so there the curvature is taken ``span_beta`` times smaller: the
    inverse is M H^-1 M with M = I + (span_beta^-1/2 - 1) Q^T Q on the channel side, Q (k, C) an
    orthonormal basis of P's rows. All blocks at once by simultaneous diagonalization of A and Sbar
    (k x k): H_c^-1 = T^T diag(1 / (1 + e f_c)) T. ``self(q)`` = the inverse applied to q (k, C)."""

    def __init__(self, a: torch.Tensor, sbar: torch.Tensor, fisher: torch.Tensor, p: torch.Tensor,
                 span_beta: float):
        k = a.shape[0]
        a64, sb64 = a.double(), sbar.double()
        ridge = 1e-6 * float((a64.diagonal() + float(fisher.max()) * sb64.diagonal()).max()) + 1e-30
        li = torch.linalg.inv(torch.linalg.cholesky(a64 + ridge * torch.eye(k, dtype=a64.dtype, device=a.device)))
        e, q = torch.linalg.eigh(li @ sb64 @ li.T)
        self.t = (q.T @ li).to(a.dtype)  # (k, k)
        self.den = 1 + e.clamp(min=0).to(a.dtype)[:, None] * fisher[None, :]  # (k, C)
        self.q = torch.linalg.qr(p.T)[0].T if span_beta != 1 else None  # (k, C)
        self.shrink = span_beta ** -0.5 - 1

    def _m(self, q: torch.Tensor) -> torch.Tensor:
        return q if self.q is None else q + self.shrink * ((q @ self.q.T) @ self.q)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        return self._m(self.t.T @ ((self.t @ self._m(q)) / self.den))


class FACE(ConceptLearner):
    """FACE basis trained through the served NNLS projection.

    ``fit(acts (N, HW, C), head_weight (K, C), head_bias (K,))`` learns ``components_`` (k, C) >= 0;
    ``encode`` gives NNLS codes (n, k) of pixels (n, C), ``decode`` maps codes back to (n, C).
    ``max_iter``/``tol`` bound the projected L-BFGS iterations on P (stop when the objective fell by
    less than ``tol`` relatively over the last ``window`` iterations: 5e-4 ends near 0.1-0.2 % above the
    converged objective, where held-out fidelity no longer improves); ``nmf_max_iter``/``nmf_tol`` are
    the warm start's (the NMF learner's); ``head_weighted_start``/``head_weighted_threshold``/
    ``screen_iter``: the second start (see ``fit``); ``span_beta``: the preconditioner's curvature within
    the span of P's rows (``_ChannelBlocks``). After ``fit``: ``loss_`` (F), ``n_iter_``, ``n_evals_``
    (all starts), ``start_``, ``start_loss_`` (F at the chosen start), ``history_`` (per evaluation of the
    chosen start: loss, mse, kl, logit_err).
    """

    needs_linear_head = True

    @classmethod
    def fit_class(cls, feats: np.ndarray, *, k: int, class_id: int | None = None, head_weight: np.ndarray | None = None,
                  head_bias: np.ndarray | None = None, seed: int = 0, device=None, max_iter: int = 200,
                  tol: float = 1e-4, params: dict | None = None, init: np.ndarray | None = None,
                  **_) -> "FACE":
        """One class's features (N, C, H, W) -> fitted (the job's entry, ``ConceptLearner.fit_class``).
        ``max_iter``/``tol`` are the NMF warm start's (the ``nmf`` learner's settings, so the start is the
        basis ``--method nmf`` would serve); ``params["face_lambda"]`` is the KL weight (1.0),
        ``params["face_tol"]`` FACE's own stop rule (5e-4: see the class); ``init`` (k, C): a FACE basis
        of similar data to start from instead of NMF's (the λ sweep's on the class's fit part, polished on
        all its training images), so without the head-weighted second start, which exists for NMF starts."""
        params = params or {}
        n, c, h, w = feats.shape
        acts = torch.from_numpy(np.ascontiguousarray(feats.reshape(n, c, h * w).transpose(0, 2, 1)))
        learner = cls(k, lam=float(params.get("face_lambda", 1.0)), tol=float(params.get("face_tol", 5e-4)),
                      seed=seed, device=device, nmf_max_iter=max_iter, nmf_tol=tol,
                      head_weighted_start="auto" if init is None else False)
        return learner.fit(acts, torch.from_numpy(head_weight), torch.from_numpy(head_bias), class_id=class_id,
                           init=None if init is None else torch.from_numpy(init))

    def __init__(self, n_components: int, lam: float = 1.0, max_iter: int = 200, tol: float = 5e-4,
                 seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 nmf_max_iter: int = 200, nmf_tol: float = 1e-4, window: int = 5,
                 head_weighted_start: bool | str = "auto", head_weighted_threshold: float = 0.25,
                 screen_iter: int = 15, span_beta: float = 0.1):
        if lam < 0:
            raise ValueError("lam must be non-negative")
        if head_weighted_start not in (True, False, "auto"):
            raise ValueError("head_weighted_start must be True, False or 'auto'")
        super().__init__(n_components, device, dtype)
        self.lam, self.max_iter, self.tol, self.seed = lam, max_iter, tol, seed
        self.nmf_max_iter, self.nmf_tol, self.window = nmf_max_iter, nmf_tol, window
        self.head_weighted_start, self.head_weighted_threshold = head_weighted_start, head_weighted_threshold
        self.screen_iter, self.span_beta = screen_iter, span_beta
        self.n_iter_, self.n_evals_, self.loss_, self.start_loss_, self.start_ = 0, 0, float("nan"), float("nan"), ""
        self.history_: list[dict[str, float]] = []

    def fit(self, acts, head_weight, head_bias, class_id: int | None = None, init=None) -> "FACE":
        """Learn the basis. ``init`` (k, C): start basis (default: the NMF learner's basis of the pixels,
        same k and seed).

        NMF's basis is the warm start: its squared error is optimal, the KL term then moves it, so the
        projected L-BFGS polishes it and the stop rule ends it once the relative decrease over ``window``
        iterations is below ``tol``. But F(P) has poor local minima near NMF's basis: a concept the head
        relies on but NMF left out is not reached by small moves. So when the start loses the head's
        signal (its logit error, as ``history_`` follows it, above ``head_weighted_threshold``; or always
        with ``head_weighted_start=True``, never with False) and ``lam > 0``, a second start is the NMF of
        the pixels with each channel c scaled by sqrt(1 + lam C F_cc / 2), F = the mean over images of the
        softmax's Fisher matrix W^T (diag p - p p^T) W: the diagonal of the KL term's quadratic
        approximation per pixel, taking the residuals within an image as fully correlated (an upper
        bound). Both starts then run ``screen_iter`` iterations and the one with the lower objective runs
        on (``start_`` says which). With ``lam > 0`` the rows of ``components_`` have unit norm (F does
        not depend on row scales). ``class_id`` only selects the logit followed by ``history_``'s
        ``logit_err`` (None: each image's predicted class); the objective uses the full softmax, as FACE
        does.
        """
        a = _acts(acts, self.device, self.dtype)
        n_img, hw, c = a.shape
        w, b = _head(head_weight, head_bias, self.device, self.dtype)
        v = a.reshape(-1, c)
        if v.shape[0] < self.n_components:
            raise ValueError(f"{v.shape[0]} pixels are too few for {self.n_components} components")
        p0 = self._nmf(v) if init is None else torch.as_tensor(init).detach().to(self.device, self.dtype)
        objective = _FaceObjective(a, w, b, self.lam, class_id, self.span_beta)
        if self.lam == 0:  # NMF's basis is already stationary for F when lam = 0
            self.start_, runs = "nmf", {"nmf": (p0, objective(p0)[0], 0, objective)}
        else:
            p0 = p0.clamp(min=0)
            p0 = p0 / p0.norm(dim=1, keepdim=True).clamp(min=1e-30)  # F is invariant to row scales
            first = objective(p0)
            hw_start = self.head_weighted_start
            if hw_start == "auto":
                hw_start = objective.history[0]["logit_err"] > self.head_weighted_threshold
            budget = min(self.screen_iter, self.max_iter) if hw_start else self.max_iter
            runs = {"nmf": (*_projected_lbfgs(objective, p0, budget, self.tol, self.window, first=first),
                            objective)}
            if hw_start:
                # objective.fisher: (C,) diag of the mean W^T (diag p - p p^T) W, clamped at 0
                alpha = (1 + self.lam * c * objective.fisher / 2).sqrt()
                p1 = (self._nmf(v * alpha) / alpha).clamp(min=0)
                p1 = p1 / p1.norm(dim=1, keepdim=True).clamp(min=1e-30)
                other = _FaceObjective(a, w, b, self.lam, class_id, self.span_beta)
                runs["head_weighted"] = (*_projected_lbfgs(other, p1, budget, self.tol, self.window), other)
            # the start ahead runs on (fresh L-BFGS memory)
            self.start_ = min(runs, key=lambda k: runs[k][1])
        p, f, it, objective = runs[self.start_]
        if len(runs) > 1 and it < self.max_iter:
            p, f, more = _projected_lbfgs(objective, p, self.max_iter - it, self.tol, self.window)
            it += more
        self.loss_, self.n_iter_, self.history_ = f, it, objective.history
        self.start_loss_ = objective.history[0]["loss"]
        self.n_evals_ = sum(len(r[3].history) for r in runs.values())
        self.components_ = p.detach()
        return self

    def _nmf(self, x: torch.Tensor) -> torch.Tensor:
        """The NMF learner's basis of the rows x (the warm start), kept for the next fits on the same data
        (a λ sweep fits FACE several times on one class: one NMF serves them all)."""
        # the data's fingerprint: its row and column sums (hashing all of it would cost a good part of an NMF)
        marg = torch.cat([x.sum(0), x.sum(1)]).detach().cpu().numpy()
        key = (self.n_components, self.seed, self.nmf_max_iter, self.nmf_tol, str(self.dtype), str(x.device),
               tuple(x.shape), hashlib.blake2b(marg.tobytes(), digest_size=16).hexdigest())
        basis = _NMF_STARTS.pop(key, None)
        if basis is None:
            basis = NMF(self.n_components, max_iter=self.nmf_max_iter, tol=self.nmf_tol, seed=self.seed,
                        device=self.device, dtype=self.dtype).fit(x).components_
        _NMF_STARTS[key] = basis  # most recent last
        while len(_NMF_STARTS) > _NMF_CACHE_SIZE:
            _NMF_STARTS.pop(next(iter(_NMF_STARTS)))
        return basis.clone()

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """NNLS codes (n, k) of pixels X (n, C) for the learned basis."""
        x = torch.as_tensor(x).detach().to(self.device, self.dtype)
        p = self.components_
        return nnls_codes(x @ p.T, p @ p.T)


def _h0(h, q: torch.Tensor) -> torch.Tensor:
    """The initial inverse Hessian applied to q: ``h`` a diagonal curvature (divide) or a callable."""
    return h(q) if callable(h) else q / h


def _two_loop(s: torch.Tensor, y: torch.Tensor, rho: np.ndarray, g: torch.Tensor, free: torch.Tensor, h0
              ) -> torch.Tensor:
    """L-BFGS's two-loop recursion H g restricted to the variables ``free`` (1, n): memory s, y (m, n)
    oldest first, rho_i = 1 / s_i^T y_i (of the whole pairs), ``g`` (1, n) zero off ``free``, ``h0(q)`` the
    initial inverse Hessian. The recursions run on m x m inner products of the masked pairs, so the
    (m, n) work is a few matrix products, not 4m vector operations."""
    m = len(rho)
    ym = y * free
    sy = (s @ ym.T).double().cpu().numpy()  # sy[i, j] = s_i^T y_j on the free variables
    sg = (s @ g.T)[:, 0].double().cpu().numpy()
    alpha = np.zeros(m)
    for i in range(m - 1, -1, -1):  # alpha_i = rho_i s_i^T (g - sum_{j > i} alpha_j y_j)
        alpha[i] = rho[i] * (sg[i] - sy[i, i + 1:] @ alpha[i + 1:])
    r = h0(g - torch.from_numpy(alpha).to(g)[None] @ ym)
    yr = (ym @ r.T)[:, 0].double().cpu().numpy()
    beta = np.zeros(m)
    for i in range(m):  # beta_i = rho_i y_i^T (r + sum_{j < i} (alpha_j - beta_j) s_j)
        beta[i] = rho[i] * (yr[i] + sy[:i, i] @ (alpha[:i] - beta[:i]))
    return (r + torch.from_numpy(alpha - beta).to(g)[None] @ s) * free


def _projected_lbfgs(fun, x0: torch.Tensor, max_iter: int, tol: float, window: int = 5, history: int = 20,
                     first_step: float = 0.05, first=None) -> tuple[torch.Tensor, float, int]:
    """Minimize f over {x >= 0} by projected L-BFGS with an active set. Returns x, f(x), iterations.

    ``fun(x) -> (f, grad, h)``, h an initial Hessian: a diagonal curvature broadcastable to x, or a
    callable applying its inverse (here: ``_ChannelBlocks``), scaled as usual by s^T y / y^T H0 y.
    Variables at 0 with a positive gradient are held (two-metric projection, Bertsekas 1982); the
    two-loop direction acts on the others, the step is Armijo along the projection arc max(x + t d, 0),
    backtracking by quadratic interpolation (t in [0.1, 0.5] of the last); the first step, before any
    curvature pair, moves x by at most ``first_step`` of its norm. Stops when f fell by less than ``tol``
    relatively over ``window`` iterations, or nothing can move. ``first``: fun(x0), when already at hand.
    """
    x = x0.clamp(min=0)
    f, g, h = fun(x) if first is None else first
    mem_s, mem_y, rho = x.new_zeros(0, x.numel()), x.new_zeros(0, x.numel()), np.zeros(0)
    gamma, hist, it = None, [f], 0
    for it in range(1, max_iter + 1):
        free = ((x > 0) | (g < 0)).reshape(1, -1).to(x.dtype)
        gf = g.reshape(1, -1) * free
        if len(rho):
            d = -_two_loop(mem_s, mem_y, rho, gf, free,
                           lambda q: gamma * _h0(h, q.reshape(x.shape)).reshape(1, -1)).reshape(x.shape)
        if not len(rho) or float((g * d).sum()) >= 0:  # no memory, or gone stale against the active set
            mem_s, mem_y, rho = mem_s[:0], mem_y[:0], rho[:0]
            d = -(_h0(h, gf.reshape(x.shape)).reshape(1, -1) * free).reshape(x.shape)
        t = 1.0
        if gamma is None:
            t = min(1.0, first_step * float(x.norm()) / max(float(d.norm()), 1e-30))
        while True:
            x_new = (x + t * d).clamp(min=0)
            decrease = float((g * (x_new - x)).sum())
            if decrease >= 0:
                return x, f, it
            f_new, g_new, h_new = fun(x_new)
            if f_new <= f + 1e-4 * decrease:
                break
            # the minimum of the quadratic through f, the slope along the arc and f_new, kept in [0.1, 0.5] t
            curv = f_new - f - decrease
            t *= min(max(-decrease / (2 * curv) if curv > 0 else 0.1, 0.1), 0.5)
            if t < 1e-8:
                return x, f, it
        s_vec, y_vec = x_new - x, g_new - g
        sy = float((s_vec * y_vec).sum())
        if sy > 1e-10 * float(s_vec.norm() * y_vec.norm()):
            mem_s = torch.cat([mem_s, s_vec.reshape(1, -1)])[-history:]
            mem_y = torch.cat([mem_y, y_vec.reshape(1, -1)])[-history:]
            rho = np.append(rho, 1.0 / sy)[-history:]
            gamma = sy / float((y_vec * _h0(h_new, y_vec)).sum())
        x, f, g, h = x_new, f_new, g_new, h_new
        hist.append(f)
        if len(hist) > window and hist[-window - 1] - f <= tol * abs(f):
            break
    return x, f, it

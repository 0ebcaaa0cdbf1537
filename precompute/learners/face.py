"""FACE concept learner (Bhusal et al.): NMF whose basis also keeps the head's prediction, on torch.

For images n with pixel activations V_n (HW, C) >= 0 and a GAP+linear head h(A) = W mean_pixels(A) + b,
the basis P (k, C) >= 0 minimizes

    F(P) = mean_{pixels, channels} (V - S P)^2  +  lam * mean_n KL(softmax h(V_n) || softmax h(S_n P)),
    S = NNLS(V; P)   (per pixel: the projection the service applies to new images).

The reference (dipkamal/FACE) trains free codes U jointly with P; the KL term then shapes codes that new
images never get, and held-out fidelity gets worse (REFERENCES.md). Here S is always the NNLS solution
for P, differentiated implicitly (on each pixel's support F, G_FF s_F = B_F with G = P P^T, B = V P^T),
and P is optimized by projected L-BFGS (active set, Armijo along the projection arc) from the plain NMF
(HALS) basis and from a head-weighted NMF basis (see ``FACE.fit``). The normalisation (squared error
averaged over elements, KL averaged over images) is the reference's, so lam means the same in both.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .nmf import NMF, resolve_device, to_numpy

_CHUNK = 65536  # rows per batched k x k solve (bounds memory at CHUNK * k^2 floats)


# ---- NNLS codes with an implicit gradient ---------------------------------------------------------

class _SupportInverse:
    """Inverses of G_FF for each row's support F (mask (n, k)), one per distinct support.

    ``apply(rhs)`` solves G_FF x_F = rhs_F for every row at once (x = 0 off F). Codes are sparse, so the
    distinct supports are far fewer than the rows, and one small inverse serves many rows.
    """

    def __init__(self, g: torch.Tensor, mask: torch.Tensor):
        k = g.shape[0]
        if k <= 62:  # one integer per support: a 1-D unique is much faster than unique(dim=0)
            bit = torch.arange(k, device=mask.device)
            codes, self.index = torch.unique((mask.long() << bit).sum(1), return_inverse=True)
            m = ((codes[:, None] >> bit) & 1).to(g.dtype)
        else:
            pats, self.index = torch.unique(mask, dim=0, return_inverse=True)
            m = pats.to(g.dtype)
        eye = torch.eye(k, dtype=g.dtype, device=g.device)
        ridge = 1e-7 * g.diagonal().mean().clamp(min=1e-30)
        # G on the support, identity off it: SPD, and its inverse restricted to F is G_FF^{-1}
        a = g * m[:, :, None] * m[:, None, :] + eye * (1 - m)[:, :, None] + ridge * eye
        self.inv = torch.linalg.inv(a) * m[:, :, None] * m[:, None, :]

    def apply(self, rhs: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rhs)
        for i in range(0, rhs.shape[0], _CHUNK):
            sl = slice(i, i + _CHUNK)
            out[sl] = torch.bmm(self.inv[self.index[sl]], rhs[sl, :, None])[..., 0]
        return out


@torch.no_grad()
def _nnls(b: torch.Tensor, g: torch.Tensor, s0: torch.Tensor | None, max_iter: int, tol: float
          ) -> tuple[torch.Tensor, _SupportInverse]:
    lmax = torch.linalg.eigvalsh(g.double())[-1].clamp(min=1e-30)
    step = float(1.0 / lmax)
    s = (b @ torch.linalg.pinv(g)).clamp(min=0) if s0 is None else s0.clone()
    y, t = s, 1.0
    for it in range(max_iter):
        s_next = (y - step * (y @ g - b)).clamp(min=0)
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = s_next + ((t - 1.0) / t_next) * (s_next - s)
        done = it % 10 == 9 and float((s_next - s).abs().max()) <= tol * float(s_next.max().clamp(min=1e-30))
        s, t = s_next, t_next
        if done:
            break
    solver = _SupportInverse(g, s > 0)
    exact = solver.apply(b)
    return torch.where((exact >= 0).all(dim=1, keepdim=True), exact, s), solver


def nnls_codes(b: torch.Tensor, g: torch.Tensor, s0: torch.Tensor | None = None, max_iter: int = 500,
               tol: float = 1e-6) -> torch.Tensor:
    """S (n, k) = argmin_{S >= 0} ||V - S P||^2 from B = V P^T (n, k) and G = P P^T (k, k).

    FISTA (as ``service.nnls``) from ``s0`` or the clipped unconstrained solution, then one exact solve on
    each row's support, kept where it stays non-negative.
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


# ---- inputs and metrics ---------------------------------------------------------------------------

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


def served_metrics(acts, basis, head_weight, head_bias, class_id: int | None = None,
                   lam: float = 0.0) -> dict[str, float]:
    """How a basis explains images as served: codes from the service's NNLS projection (numpy).

    acts (N, HW, C), basis (k, C), head W (K, C), b (K,). Returns ``logit_err`` (ICE fidelity: mean
    |f_c(A) - f_c(SP)| / (|mean f_c(A)| + 1e-4) for c = ``class_id``, or each image's predicted class
    when None), ``top1`` (argmax agreement of h(SP) with h(A)), ``kl`` (batchmean), ``mse`` (per
    element), ``objective`` (mse + lam * kl) and ``rel_err`` (||V - SP||_F / ||V||_F).
    """
    from conceptlens.service.nnls import NNLSProjector

    a, p = to_numpy(acts, np.float32), to_numpy(basis, np.float32)
    n_img, hw, c = a.shape
    w = to_numpy(head_weight, np.float64)
    b = np.zeros(w.shape[0]) if head_bias is None else to_numpy(head_bias, np.float64)
    v = a.reshape(-1, c)
    s = NNLSProjector.from_basis(p).project(v)
    rec = (s @ p).astype(np.float64)
    f_true = a.mean(axis=1, dtype=np.float64) @ w.T + b
    f_rec = rec.reshape(n_img, hw, c).mean(axis=1) @ w.T + b
    cls = f_true.argmax(axis=1) if class_id is None else np.full(n_img, class_id)
    rows = np.arange(n_img)
    err = np.abs(f_true[rows, cls] - f_rec[rows, cls]).mean() / (abs(f_true[rows, cls].mean()) + 1e-4)
    lt = torch.log_softmax(torch.from_numpy(f_true), 1)
    lr = torch.log_softmax(torch.from_numpy(f_rec), 1)
    kl = float((lt.exp() * (lt - lr)).sum() / n_img)
    mse = float(np.square(v - rec).mean())
    return {"logit_err": float(err), "top1": float((f_rec.argmax(1) == f_true.argmax(1)).mean()), "kl": kl,
            "mse": mse, "objective": mse + lam * kl,
            "rel_err": float(np.linalg.norm(v - rec) / max(np.linalg.norm(v), 1e-30))}


# ---- FACE -----------------------------------------------------------------------------------------

class _FaceObjective:
    """F(P) for images a (N, HW, C) and head (w, b): ``self(P) -> (F, dF/dP, row curvature (k, 1))``.

    Warm-starts each NNLS solve from the previous codes; ``history`` keeps loss, mse, kl and the logit
    error of class ``class_id`` (None: each image's predicted class) per evaluation.
    """

    def __init__(self, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lam: float, class_id: int | None):
        self.n_img, self.hw, c = a.shape
        self.v, self.w, self.b, self.lam = a.reshape(-1, c), w, b, lam
        self.f_true = a.mean(1) @ w.T + b
        self.logp_true = torch.log_softmax(self.f_true, 1)
        self.rows = torch.arange(self.n_img, device=a.device)
        self.cls = self.f_true.argmax(1) if class_id is None else torch.full_like(self.rows, class_id)
        self.codes: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    def __call__(self, p: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        # The gradient by hand, not autograd through the (n, C) products: three n k C matmuls, not five.
        # Squared error: by the envelope theorem only its partial in P counts, -2/(nC) S^T R. KL: through
        # the small head graph directly, and through S implicitly, U = G_FF^{-1} dKL/dS per pixel, which
        # enters via B = V P^T (U^T V) and G = P P^T (-(U^T S + S^T U) P).
        v, n_img, hw, lam = self.v, self.n_img, self.hw, self.lam
        p = p.detach()
        with torch.no_grad():
            s, solver = _nnls(v @ p.T, p @ p.T, self.codes, 500, 1e-6)
            self.codes = s
            mse = (v - s @ p).square().sum(dtype=torch.float64) / v.numel()
        s_bar = s.view(n_img, hw, -1).mean(1).requires_grad_(True)
        p_head = p.clone().requires_grad_(True)
        f_rec = s_bar @ (p_head @ self.w.T) + self.b
        kl = (self.logp_true.exp() * (self.logp_true - torch.log_softmax(f_rec, 1))).sum() / n_img
        kl.backward()
        with torch.no_grad():
            u = solver.apply(lam * s_bar.grad.repeat_interleave(hw, dim=0) / hw)
            c = 2.0 / v.numel()
            grad = (u - c * s).T @ v + (c * (s.T @ s) - u.T @ s - s.T @ u) @ p + lam * p_head.grad
            loss = float(mse) + lam * kl.item()
            true_y, rec_y = self.f_true[self.rows, self.cls], f_rec[self.rows, self.cls]
            err = (true_y - rec_y).abs().mean() / (true_y.mean().abs() + 1e-4)
            self.history.append({"loss": loss, "mse": float(mse), "kl": kl.item(), "logit_err": err.item()})
            h = c * s.square().sum(0)[:, None]  # the squared error's curvature in row j: 2 (S^T S)_jj / (nC)
        return loss, grad, h + 1e-6 * h.max().clamp(min=1e-30)


class FACE(nn.Module):
    """FACE basis trained through the served NNLS projection.

    ``fit(acts (N, HW, C), head_weight (K, C), head_bias (K,))`` learns ``components_`` (k, C) >= 0;
    ``encode`` gives NNLS codes (n, k) of pixels (n, C), ``decode`` maps codes back to (n, C).
    ``max_iter``/``tol`` bound the projected L-BFGS iterations on P (stop when the objective fell by
    less than ``tol`` relatively over the last ``window`` iterations); ``nmf_max_iter`` bounds the HALS
    starts. After ``fit``: ``loss_`` (F), ``n_iter_``, ``n_evals_`` (all starts), ``start_``,
    ``history_`` (per evaluation of the chosen start: loss, mse, kl, logit_err).
    """

    needs_linear_head = True

    @classmethod
    def fit_class(cls, feats: np.ndarray, *, k: int, class_id: int, head_weight: np.ndarray, head_bias: np.ndarray,
                  seed: int, device, max_iter: int = 200, params: dict | None = None, **_) -> "FACE":
        """One class's features (N, C, H, W) -> fitted (the job's entry, as ``NMF.fit_class``).
        ``max_iter`` bounds the NMF starts; ``params["face_lambda"]`` is the KL weight (1.0)."""
        n, c, h, w = feats.shape
        acts = torch.from_numpy(np.ascontiguousarray(feats.reshape(n, c, h * w).transpose(0, 2, 1)))
        return cls(k, lam=float((params or {}).get("face_lambda", 1.0)), seed=seed, device=device,
                   nmf_max_iter=max_iter).fit(acts, torch.from_numpy(head_weight), torch.from_numpy(head_bias),
                                              class_id=class_id)

    def __init__(self, n_components: int, lam: float = 1.0, max_iter: int = 200, tol: float = 1e-4,
                 seed: int = 0, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 nmf_max_iter: int = 200, window: int = 5, head_weighted_start: bool = True,
                 screen_iter: int = 15):
        super().__init__()
        if n_components < 1:
            raise ValueError("n_components must be at least 1")
        if lam < 0:
            raise ValueError("lam must be non-negative")
        self.n_components, self.lam, self.max_iter, self.tol, self.seed = n_components, lam, max_iter, tol, seed
        self.device, self.dtype = resolve_device(device), dtype
        self.nmf_max_iter, self.window, self.head_weighted_start = nmf_max_iter, window, head_weighted_start
        self.screen_iter = screen_iter
        self.register_buffer("components_", torch.zeros(0))
        self.n_iter_, self.n_evals_, self.loss_, self.start_ = 0, 0, float("nan"), ""
        self.history_: list[dict[str, float]] = []

    def fit(self, acts, head_weight, head_bias, class_id: int | None = None, init=None) -> "FACE":
        """Learn the basis. ``init`` (k, C): start basis (default: NMF/HALS of the pixels, same seed).

        F(P) has poor local minima near NMF's basis: a concept the head relies on but NMF left out is
        not reached by small moves. So with ``lam > 0`` and ``head_weighted_start``, a second start is
        the NMF of the pixels with each channel c scaled by sqrt(1 + lam C F_cc / 2), F = the mean over
        images of the softmax's Fisher matrix W^T (diag p - p p^T) W: the diagonal of the KL term's
        quadratic approximation per pixel, taking the residuals within an image as fully correlated
        (an upper bound). Both starts run ``screen_iter`` iterations, the one with the lower objective
        then runs on (``start_`` says which). With ``lam > 0`` the rows of ``components_`` have unit
        norm (F does not depend on row scales). ``class_id`` only selects the logit followed by
        ``history_``'s ``logit_err`` (None: each image's predicted class); the objective uses the full
        softmax, as FACE does.
        """
        a = _acts(acts, self.device, self.dtype)
        n_img, hw, c = a.shape
        w, b = _head(head_weight, head_bias, self.device, self.dtype)
        v = a.reshape(-1, c)
        if v.shape[0] < self.n_components:
            raise ValueError(f"{v.shape[0]} pixels are too few for {self.n_components} components")
        starts = {"nmf": self._nmf(v) if init is None else torch.as_tensor(init).detach().to(self.device, self.dtype)}
        if self.lam > 0 and self.head_weighted_start:
            p = torch.softmax(a.mean(1) @ w.T + b, 1)
            fisher = (p @ w.square() - (p @ w).square()).mean(0)  # (C,) diag of mean W^T(diag p - pp^T)W
            alpha = (1 + self.lam * c * fisher.clamp(min=0) / 2).sqrt()
            starts["head_weighted"] = self._nmf(v * alpha) / alpha
        # each start gets ``screen_iter`` iterations; the one ahead runs on (fresh L-BFGS memory)
        runs = {}
        for name, p0 in starts.items():
            objective = _FaceObjective(a, w, b, self.lam, class_id)
            if self.lam == 0:  # NMF's basis is already stationary for F when lam = 0
                runs[name] = (p0, objective(p0)[0], 0, objective)
                continue
            p0 = p0.clamp(min=0)
            p0 = p0 / p0.norm(dim=1, keepdim=True).clamp(min=1e-30)  # F is invariant to row scales
            budget = self.max_iter if len(starts) == 1 else min(self.screen_iter, self.max_iter)
            runs[name] = (*_projected_lbfgs(objective, p0, budget, self.tol, self.window), objective)
        self.start_ = min(runs, key=lambda k: runs[k][1])
        p, f, it, objective = runs[self.start_]
        if len(starts) > 1 and self.lam > 0 and it < self.max_iter:
            p, f, more = _projected_lbfgs(objective, p, self.max_iter - it, self.tol, self.window)
            it += more
        self.loss_, self.n_iter_, self.history_ = f, it, objective.history
        self.n_evals_ = sum(len(r[3].history) for r in runs.values())
        self.components_ = p.detach()
        return self

    def _nmf(self, x: torch.Tensor) -> torch.Tensor:
        return NMF(self.n_components, max_iter=self.nmf_max_iter, seed=self.seed, device=self.device,
                   dtype=self.dtype).fit(x).components_

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """NNLS codes (n, k) of pixels X (n, C) for the learned basis."""
        x = torch.as_tensor(x).detach().to(self.device, self.dtype)
        p = self.components_
        return nnls_codes(x @ p.T, p @ p.T)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.components_


def _projected_lbfgs(fun, x0: torch.Tensor, max_iter: int, tol: float, window: int = 5, history: int = 10
                     ) -> tuple[torch.Tensor, float, int]:
    """Minimize f over {x >= 0} by projected L-BFGS with an active set. Returns x, f(x), iterations.

    ``fun(x) -> (f, grad, h)``, h > 0 a diagonal preconditioner broadcastable to x (here: each basis
    row's curvature of the squared error) used as the initial inverse Hessian, scaled as usual by
    s^T y / y^T H0 y. Variables at 0 with a positive gradient are held (two-metric projection,
    Bertsekas 1982); the two-loop direction acts on the others, the step is Armijo along the
    projection arc max(x + t d, 0). Stops when f fell by less than ``tol`` relatively over ``window``
    iterations, or nothing can move.
    """
    x = x0.clamp(min=0)
    f, g, h = fun(x)
    mem: list[tuple[torch.Tensor, torch.Tensor, float]] = []
    gamma, hist, it = 1.0, [f], 0
    for it in range(1, max_iter + 1):
        free = (x > 0) | (g < 0)
        q = torch.where(free, g, 0)
        alphas = []
        for s_i, y_i, rho in reversed(mem):
            a = rho * float((s_i * q).sum())
            q = q - a * torch.where(free, y_i, 0)
            alphas.append(a)
        r = gamma * q / h
        for (s_i, y_i, rho), a in zip(mem, reversed(alphas)):
            r = r + (a - rho * float((torch.where(free, y_i, 0) * r).sum())) * torch.where(free, s_i, 0)
        d = -torch.where(free, r, 0)
        if float((g * d).sum()) >= 0:  # memory gone stale against the active set: restart
            mem, d = [], -torch.where(free, g / h, 0)
        t = 1.0
        while True:
            x_new = (x + t * d).clamp(min=0)
            decrease = float((g * (x_new - x)).sum())
            if decrease >= 0:
                return x, f, it
            f_new, g_new, h_new = fun(x_new)
            if f_new <= f + 1e-4 * decrease:
                break
            t *= 0.3
            if t < 1e-8:
                return x, f, it
        s_vec, y_vec = x_new - x, g_new - g
        sy = float((s_vec * y_vec).sum())
        if sy > 1e-10 * float(s_vec.norm() * y_vec.norm()):
            mem = (mem + [(s_vec, y_vec, 1.0 / sy)])[-history:]
            gamma = sy / float((y_vec * y_vec / h_new).sum())
        x, f, g, h = x_new, f_new, g_new, h_new
        hist.append(f)
        if len(hist) > window and hist[-window - 1] - f <= tol * abs(f):
            break
    return x, f, it


# ---- the λ sweep ----------------------------------------------------------------------------------

def sweep_lambda(acts_train, acts_val, head, lams, n_components: int = 10, class_id: int | None = None,
                 **face_kwargs) -> tuple[float, list[dict[str, float]]]:
    """Pick λ by held-out fidelity of the served explanation.

    acts_train (N, HW, C), acts_val (M, HW, C), head = (W (K, C), b (K,)). Fits one NMF basis, then
    FACE from it for each λ > 0 (λ = 0 is the NMF basis), and scores every basis on ``acts_val`` with
    :func:`served_metrics`. Returns the λ with the lowest held-out ``logit_err`` (ties: the smaller λ)
    and per-λ rows ``{"lam", "val_*", "train_*", "fit_s"}``.
    """
    w, b = head
    kw = dict(face_kwargs)
    device = resolve_device(kw.pop("device", None))
    seed = kw.get("seed", 0)
    a = torch.as_tensor(acts_train).detach()
    nmf = NMF(n_components, seed=seed, device=device, max_iter=kw.get("nmf_max_iter", 200))
    p0 = nmf.fit(a.reshape(-1, a.shape[-1]).to(device, torch.float32)).components_
    rows = []
    for lam in sorted(float(x) for x in lams):
        t0 = time.perf_counter()
        basis = p0 if lam == 0 else FACE(n_components, lam=lam, device=device, **kw).fit(
            acts_train, w, b, class_id=class_id, init=p0).components_
        row: dict[str, float] = {"lam": lam, "fit_s": time.perf_counter() - t0}
        for split, acts in (("train", acts_train), ("val", acts_val)):
            for key, val in served_metrics(acts, basis, w, b, class_id, lam).items():
                row[f"{split}_{key}"] = val
        rows.append(row)
    best = min(rows, key=lambda r: (r["val_logit_err"], r["lam"]))
    return best["lam"], rows


# ---- the reference optimizer, for the benchmark ---------------------------------------------------

def _nndsvd_reference(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD exactly as dipkamal/FACE codes it (full SVD, zeros left as zeros): U (n, r), W (r, C)."""
    u_svd, s_svd, vh = torch.linalg.svd(a, full_matrices=False)
    u = torch.zeros(a.shape[0], r, dtype=a.dtype, device=a.device)
    w = torch.zeros(r, a.shape[1], dtype=a.dtype, device=a.device)
    u[:, 0] = s_svd[0].sqrt() * u_svd[:, 0].abs()
    w[0] = s_svd[0].sqrt() * vh[0].abs()
    for i in range(1, r):
        x, y = u_svd[:, i], vh[i]
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        if xp.norm() * yp.norm() > xn.norm() * yn.norm():
            u[:, i], w[i] = s_svd[i].sqrt() * xp / xp.norm(), s_svd[i].sqrt() * yp / yp.norm()
        else:
            u[:, i], w[i] = s_svd[i].sqrt() * xn / xn.norm(), s_svd[i].sqrt() * yn / yn.norm()
    return u, w


@dataclass
class ReferenceResult:
    components: torch.Tensor  # (k, C)
    codes: torch.Tensor  # (N*HW, k), the free codes it trained
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # all of it
    init_seconds: float = 0.0  # of which the NNDSVD start
    first_step_seconds: float = 0.0  # start to the end of step 1 (one-time costs land there)


def reference_face_adam(acts, head_weight, head_bias, n_components: int, lam: float, lr: float = 5e-4,
                        tol: float = 1e-3, max_steps: int = 22000, device: str | torch.device | None = None,
                        max_seconds: float | None = None) -> ReferenceResult:
    """dipkamal/FACE's optimizer on the same inputs, for comparison.

    acts (N, HW, C): Adam (lr 5e-4) on free codes U (N*HW, k) and basis W (k, C) jointly, full batch,
    clamp >= 0 after each step, loss = mse_loss(UW, A) + lam * KL(softmax h(A) || softmax h(UW))
    (batchmean over images; h on each image's pixel mean, which is the reference's per-row head when
    HW = 1), NNDSVD init, stop when |Δloss| < ``tol`` or after ``max_steps`` (``tol`` < 0: never early;
    ``max_seconds``: also stop after that much time, for time-matched comparisons).
    """
    dev = resolve_device(device)
    a = _acts(acts, dev, torch.float32)
    n_img, hw, c = a.shape
    w_head, b_head = _head(head_weight, head_bias, dev, torch.float32)
    v = a.reshape(-1, c)
    t0 = time.perf_counter()
    u, w = _nndsvd_reference(v, n_components)
    t_init = time.perf_counter() - t0
    u.requires_grad_(True)
    w.requires_grad_(True)
    logp_true = torch.log_softmax(a.mean(1) @ w_head.T + b_head, 1)
    opt = torch.optim.Adam([u, w], lr=lr)
    prev, losses, step = float("inf"), [], 0
    for step in range(1, max_steps + 1):
        opt.zero_grad()
        rec = u @ w
        f_rec = rec.view(n_img, hw, c).mean(1) @ w_head.T + b_head
        kl = F.kl_div(torch.log_softmax(f_rec, 1), logp_true.exp(), reduction="batchmean")
        loss = F.mse_loss(rec, v) + lam * kl
        loss.backward()
        opt.step()
        with torch.no_grad():
            u.clamp_(min=0)
            w.clamp_(min=0)
        losses.append(loss.item())
        if step == 1:
            t_first = time.perf_counter() - t0
        if abs(prev - losses[-1]) < tol or (max_seconds is not None and time.perf_counter() - t0 > max_seconds):
            break
        prev = losses[-1]
    return ReferenceResult(w.detach(), u.detach(), step, losses, time.perf_counter() - t0, t_init, t_first)

"""FACE's reference optimizer and the λ-sweep / scoring helpers: for benchmarks and tests, not the job.

- :func:`served_metrics`: how a basis explains images as served (the service's NNLS projection): ICE
  logit error, top-1 agreement, KL, mse, the FACE objective and the relative reconstruction error;
- :func:`sweep_lambda`: FACE for several λ from one NMF basis, scored on held-out images;
- :func:`reference_face_adam`: dipkamal/FACE's optimizer (Adam on free codes and basis jointly), on
  the same inputs as :class:`~.face.FACE`, for ``bench/bench_face.py``.

The precompute job's λ selection (``--face-lambda auto``) lives in ``precompute/selection.py`` and
goes through ``fit_learner``; these helpers are its offline counterparts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .face import FACE, _acts, _head
from .nmf import NMF, resolve_device, to_numpy

__all__ = ["ReferenceResult", "reference_face_adam", "served_metrics", "sweep_lambda"]


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

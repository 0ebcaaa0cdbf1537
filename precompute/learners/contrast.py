"""Class contrast, "why A rather than B" (Herdt & Otero Baguer), on torch, CPU or CUDA.

1. ``filter_pixels``: activation vectors of the pixels that strongly support a class (channel-mean
   attribution above a fraction of the image's largest).
2. ``fit_hyperplane``: logistic regression between A's and B's pixels; label 1 is A, so the normal w
   points from B towards A and w . a + b > 0 on A's side. The reference trains it with plain SGD
   (lr 0.01, 100 full-batch epochs), which stops far from the optimum; the default is the service's
   converged Newton-CG solver (one implementation for precompute and on-request pairs).
   ``method="sgd"`` reproduces the reference for comparison.
3. ``contrast_concepts``: NMF of A's pixels scaled by max(w . a + b, 0), again the service's code.
4. ``shift_test``: move B's activations along the normal, A' = ReLU(A - w * offset) with offsets <= 0 (so
   A' = ReLU(A + |offset| w), towards A, as in the reference's code), and report the largest mean
   p(target) over the offsets.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .nmf import resolve_device, to_numpy

DEFAULT_OFFSETS = (0.0, -0.5, -1.0, -2.0, -10.0, -15.0, -20.0, -35.0, -50.0, -200.0)
Head = tuple[torch.Tensor, torch.Tensor] | Callable[[torch.Tensor], torch.Tensor]


def filter_pixels(acts, attributions, frac: float = 0.25) -> torch.Tensor:
    """Pixels (n, C) of acts (N, C, H, W) whose attribution (N, H, W) exceeds ``frac`` x its image's max.

    Only pixels with positive attribution pass (an image with no positive pixel contributes none).
    """
    a = torch.as_tensor(acts).detach()
    m = torch.as_tensor(attributions).detach().to(a.device)
    if a.ndim != 4 or m.shape != (a.shape[0], a.shape[2], a.shape[3]):
        raise ValueError(f"acts {tuple(a.shape)} and attributions {tuple(m.shape)} do not match")
    peak = m.flatten(1).max(dim=1).values.clamp(min=0)
    keep = (m > frac * peak[:, None, None]) & (m > 0)
    return a.permute(0, 2, 3, 1)[keep]


def fit_hyperplane(pixels_a, pixels_b, method: str = "newton", l2: float = 1e-3, lr: float = 0.01,
                   epochs: int = 100, seed: int = 0, device: str | torch.device | None = None
                   ) -> tuple[torch.Tensor, float]:
    """Logistic regression A (label 1) vs B (label 0) on pixels (n_a, C), (n_b, C): (normal (C,), offset).

    ``newton`` (default): the service's solver (``conceptlens.service.contrast.fit_hyperplane``,
    balanced classes, L2 ``l2``, Newton-CG to convergence), so precomputed pairs and pairs computed
    on request are fitted the same way. ``sgd``: the reference, nn.Linear's default init (seeded),
    SGD ``lr`` for ``epochs`` full-batch steps, no penalty, on ``device``.
    """
    if method == "newton":
        from ...service.contrast import fit_hyperplane as fit_np

        normal, offset = fit_np(to_numpy(pixels_a), to_numpy(pixels_b), l2=l2)
        return torch.from_numpy(np.asarray(normal, np.float32)), float(offset)
    if method != "sgd":
        raise ValueError(f"unknown method {method!r}: newton or sgd")
    dev = resolve_device(device)
    xa = torch.as_tensor(pixels_a).to(dev, torch.float32)
    xb = torch.as_tensor(pixels_b).to(dev, torch.float32)
    x = torch.cat([xa, xb])
    y = torch.cat([torch.ones(len(xa), device=dev), torch.zeros(len(xb), device=dev)])
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        lin = torch.nn.Linear(x.shape[1], 1).to(dev)
    finally:
        torch.random.set_rng_state(gen_state)
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(lin(x)[:, 0], y).backward()
        opt.step()
    return lin.weight.detach()[0], float(lin.bias.detach()[0])


def contrast_concepts(pixels_a, normal, offset: float, k: int, seed: int = 0) -> torch.Tensor:
    """Basis (k, C) of "A rather than B": NMF of pixels (n, C) scaled by max(w . a + b, 0).

    The service's implementation (``conceptlens.service.contrast.contrast_basis``), as a tensor.
    """
    from ...service.contrast import contrast_basis

    return torch.from_numpy(contrast_basis(to_numpy(pixels_a), to_numpy(normal), float(offset), k, seed=seed))


def _logits(head: Head, acts: torch.Tensor) -> torch.Tensor:
    if callable(head):
        return head(acts)
    w, b = head
    return acts.mean(dim=(2, 3)) @ torch.as_tensor(w).detach().to(acts).T + torch.as_tensor(b).detach().to(acts)


@torch.no_grad()
def shift_curve(acts, normal, head: Head, target_class: int, offsets: Sequence[float] = DEFAULT_OFFSETS,
                batch_size: int = 256) -> torch.Tensor:
    """Mean p(target) (len(offsets),) over images acts (N, C, H, W) shifted to ReLU(A - normal * offset).

    ``head``: (W (K, C), b (K,)) of a GAP+linear head, or a callable mapping (n, C, H, W) to logits.
    """
    a = torch.as_tensor(acts).detach()
    if not callable(head):
        return _shift_curve_linear(a, torch.as_tensor(normal).detach().to(a), head, target_class, offsets)
    n = torch.as_tensor(normal).detach().to(a)[None, :, None, None]
    out = []
    for off in offsets:
        total = 0.0
        for i in range(0, a.shape[0], batch_size):
            shifted = (a[i:i + batch_size] - n * off).clamp(min=0)
            total += float(torch.softmax(_logits(head, shifted), 1)[:, target_class].sum())
        out.append(total / a.shape[0])
    return torch.tensor(out)


def _shift_curve_linear(a: torch.Tensor, normal: torch.Tensor, head: Head, target_class: int,
                        offsets: Sequence[float]) -> torch.Tensor:
    """:func:`shift_curve` for a GAP + linear head, pooling ReLU(A - t) per channel without shifting
    every map: a channel whose threshold t = normal * offset is at or below its smallest activation
    pools to mean(A) - t, one at or above its largest to 0; only the channels in between are clamped
    (for offsets <= 0 on a non-negative layer, those whose normal component is negative)."""
    w, b = (torch.as_tensor(v).detach().to(a) for v in head)
    flat = a.flatten(2)  # (N, C, HW)
    mean, lo, hi = flat.mean(dim=2), flat.amin(dim=(0, 2)), flat.amax(dim=(0, 2))
    out = []
    for off in offsets:
        t = normal * off
        pooled = (mean - t).clamp(min=0)  # exact where t <= lo, and 0 where t >= hi (mean <= hi)
        mid = torch.nonzero((t > lo) & (t < hi)).flatten()
        if len(mid):
            pooled[:, mid] = (flat[:, mid] - t[mid, None]).clamp(min=0).mean(dim=2)
        out.append(float(torch.softmax(pooled @ w.T + b, 1)[:, target_class].mean()))
    return torch.tensor(out)


def shift_test(acts, normal, offset: float | None, head: Head, target_class: int,
               offsets: Sequence[float] = DEFAULT_OFFSETS) -> float:
    """Largest mean p(target) over ``offsets`` when B's activations (N, C, H, W) move along the normal.

    ``offset`` (the hyperplane's bias) does not enter the shift, as in the reference; it is accepted so
    the pair from :func:`fit_hyperplane` can be passed as is.
    """
    return float(shift_curve(acts, normal, head, target_class, offsets).max())

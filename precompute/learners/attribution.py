"""Attribution-weighted NMF (Herdt & Otero Baguer): concepts of the pixels that push a class up.

Per pixel, the weight is ReLU of the channel-mean attribution of the class logit at the feature layer;
NMF runs on the activations scaled by it, so pixels that do not support the class drop out and strongly
supporting pixels weigh more. Default attribution: gradient x activation, which the paper found as good
as DeepLift at the last convolutional layer. For a GAP+linear head, d logit_y / d A[c, h, w] =
W[y, c] / (H W), so it needs no autograd; any other head is differentiated with autograd, and DeepLift
(captum ``LayerDeepLift``, baseline 1.0 in normalized input space as the reference) is available from
images through a model split into ``features`` and ``head`` modules.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .nmf import NMF, resolve_device

Head = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def attribution_map(acts, head_weight: Head, class_id: int, batch_size: int = 256) -> torch.Tensor:
    """ReLU(channel mean of gradient x activation) of logit ``class_id``: (N, H, W) >= 0.

    acts (N, C, H, W) >= 0. ``head_weight``: the linear layer's W (K, C) of a GAP+linear head (closed
    form), or a callable head mapping features (n, C, H, W) to logits (n, K) (autograd, in batches).
    """
    a = torch.as_tensor(acts).detach()
    if a.ndim != 4:
        raise ValueError(f"expected activations (N, C, H, W), got shape {tuple(a.shape)}")
    if not callable(head_weight):
        w = torch.as_tensor(head_weight).detach().to(a.device, a.dtype)[class_id]
        hw = a.shape[2] * a.shape[3]
        return torch.einsum("nchw,c->nhw", a, w).div_(a.shape[1] * hw).clamp_(min=0)
    maps = []
    for i in range(0, a.shape[0], batch_size):
        x = a[i:i + batch_size].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(head_weight(x)[:, class_id].sum(), x)
        maps.append((grad * x).mean(1).clamp(min=0).detach())
    return torch.cat(maps)


def deeplift_map(images, features: nn.Module, head: nn.Module, class_id: int, baseline: float = 1.0,
                 nt_samples: int = 0, nt_stdev: float = 0.25, batch_size: int = 16) -> torch.Tensor:
    """ReLU(channel mean of LayerDeepLift at the output of ``features``) of logit ``class_id``: (N, H, W).

    images (N, 3, h, w) preprocessed; the model is ``head(features(x))`` (wrap a method such as
    EfficientNet's ``extract_features`` in a module). ``nt_samples`` > 0 wraps it in a SmoothGrad noise
    tunnel (the reference: 20 samples, stdev 0.25). Needs captum. Captum's DeepLift rules cover ReLU,
    ELU, LeakyReLU, Sigmoid, Tanh, Softplus, max-pooling and softmax modules (each used once per forward,
    or captum raises); other activations, such as EfficientNet-Lite's ReLU6, pass plain gradients.
    """
    from captum.attr import LayerDeepLift, NoiseTunnel

    model = nn.Sequential(features, head).eval()
    method = LayerDeepLift(model, features)
    if nt_samples:
        method = NoiseTunnel(method)
    x_all = torch.as_tensor(images).detach()
    maps = []
    for i in range(0, x_all.shape[0], batch_size):
        x = x_all[i:i + batch_size]
        kw = {"nt_type": "smoothgrad", "nt_samples": nt_samples, "stdevs": nt_stdev} if nt_samples else {}
        attr = method.attribute(x, baselines=torch.full_like(x, baseline), target=class_id, **kw)
        maps.append(attr.mean(1).clamp(min=0).detach())
    return torch.cat(maps)


class AttributionNMF(nn.Module):
    """NMF of pixel activations weighted by their attribution to one class.

    ``fit(acts (N, C, H, W), head_weight, head_bias, class_id)`` -> ``components_`` (k, C). The maps are
    divided by their largest value over the data (directions do not change; the basis stays in
    activation units) and pixels with weight 0 are left out. ``method``: "grad_x_act" (default) or
    "deeplift" (then pass ``images``, ``features`` and ``head`` to ``fit``); precomputed ``maps``
    (N, H, W) override both.
    """

    needs_linear_head = True

    @classmethod
    def fit_class(cls, feats, *, k: int, class_id: int, head_weight, head_bias, seed: int, device,
                  max_iter: int = 200, tol: float = 1e-4, params: dict | None = None, **_) -> "AttributionNMF":
        """One class's features (N, C, H, W) -> fitted (the job's entry, as ``NMF.fit_class``).
        ``params["attribution"]``: the attribution method ("grad_x_act")."""
        return cls(k, method=(params or {}).get("attribution", "grad_x_act"), max_iter=max_iter, tol=tol, seed=seed,
                   device=device).fit(torch.from_numpy(feats), torch.from_numpy(head_weight),
                                      torch.from_numpy(head_bias), class_id)

    def __init__(self, n_components: int, method: str = "grad_x_act", solver: str = "hals", max_iter: int = 200,
                 tol: float = 1e-4, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if method not in ("grad_x_act", "deeplift"):
            raise ValueError(f"unknown attribution method {method!r}")
        self.method = method
        self.nmf = NMF(n_components, solver=solver, max_iter=max_iter, tol=tol, seed=seed, device=device, dtype=dtype)
        self.device, self.dtype = resolve_device(device), dtype
        self.register_buffer("components_", torch.zeros(0))
        self.n_pixels_ = 0

    def fit(self, acts, head_weight: Head | None, head_bias=None, class_id: int = 0, *, maps=None, images=None,
            features: nn.Module | None = None, head: nn.Module | None = None) -> "AttributionNMF":
        """``head_bias`` is accepted for a uniform learner API; a bias does not change the attribution."""
        a = torch.as_tensor(acts).detach().to(self.device, self.dtype)
        if maps is None:
            if self.method == "deeplift":
                if images is None or features is None or head is None:
                    raise ValueError("method='deeplift' needs images, features and head")
                maps = deeplift_map(images, features, head, class_id)
            else:
                maps = attribution_map(a, head_weight, class_id)
        m = torch.as_tensor(maps).detach().to(self.device, self.dtype)
        if m.shape != (a.shape[0], a.shape[2], a.shape[3]):
            raise ValueError(f"maps {tuple(m.shape)} do not match activations {tuple(a.shape)}")
        m = m.reshape(-1)
        keep = m > 0
        if int(keep.sum()) < self.nmf.n_components:
            raise ValueError("too few pixels with positive attribution for this many components")
        x = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])[keep] * (m[keep] / m.max())[:, None]
        self.n_pixels_ = x.shape[0]
        self.components_ = self.nmf.fit(x).components_
        return self

    def encode(self, x) -> torch.Tensor:
        """NNLS codes (n, k) of pixels X (n, C) for the learned basis."""
        return self.nmf.encode(x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.components_

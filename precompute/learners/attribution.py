"""Attribution-weighted NMF (Herdt & Otero Baguer): concepts of the pixels that push a class up.

Per pixel, the weight is ReLU of the channel-mean attribution of the class logit at the feature layer;
NMF runs on the activations scaled by it, so pixels that do not support the class drop out and strongly
supporting pixels weigh more. Attributions (``--attribution``, ``params["attribution"]``):

- ``gradxact`` (default; ``grad_x_act`` is the same): gradient x activation, which the paper found as
  good as DeepLift at the last convolutional layer. For a GAP+linear head, d logit_y / d A[c, h, w] =
  W[y, c] / (H W), so it needs no autograd; any other head is differentiated with autograd.
- ``deeplift``: DeepLift (captum) of the class logit at the feature layer. Its reference is an image,
  constant 1.0 in normalized input space (:func:`reference_image`; the reference of the paper's
  code), so DeepLift needs that image's features A0 = g(reference) (:func:`reference_features`, one
  forward pass of the model, ONNX or torch). DeepLift's multipliers at a layer depend only on the
  modules after it, so captum's ``LayerDeepLift`` of the whole model at the features' output equals
  ``DeepLift`` of the head with the image's features A as input and A0 as baseline:
  (A - A0) x the DeepLift multipliers of the head (:func:`deeplift_feature_map`). That needs no
  images beyond the reference, and for a GAP+linear head it is exactly gradient x (A - A0). Without
  a reference the baseline is zero activations, and DeepLift of a linear head is then gradient x
  activation. :func:`deeplift_map` computes it from images through the whole model instead (a
  model split into ``features`` and ``head`` torch modules), with a SmoothGrad option.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from .base import ConceptLearner
from .nmf import NMF

Head = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

ATTRIBUTIONS = ("gradxact", "deeplift")
_ALIASES = {"gradxact": "gradxact", "grad_x_act": "gradxact", "grad-x-act": "gradxact", "deeplift": "deeplift"}
REFERENCE_VALUE = 1.0  # DeepLift's reference image: this constant in normalized input space


def attribution_method(name: str | None) -> str:
    """The canonical attribution name ("gradxact" or "deeplift"); "grad_x_act" is "gradxact"; None is
    the default "gradxact"."""
    if name is None:
        return "gradxact"
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown attribution method {name!r}: choose {' or '.join(ATTRIBUTIONS)}")
    return _ALIASES[key]


def reference_image(size: int | tuple[int, int], value: float = REFERENCE_VALUE) -> np.ndarray:
    """DeepLift's reference: one image (1, 3, h, w) float32, ``value`` everywhere in normalized input space."""
    h, w = (size, size) if isinstance(size, int) else size
    return np.full((1, 3, int(h), int(w)), value, np.float32)


def reference_features(forward, size: int | tuple[int, int], value: float = REFERENCE_VALUE) -> np.ndarray:
    """Features (C, H, W) float32 of :func:`reference_image`: what DeepLift at the feature layer needs.

    ``forward``: the model as a function image batch (n, 3, h, w) float32 -> (features, logits) (the
    precompute job's ONNX forward) or -> features (a torch ``features`` module)."""
    x = reference_image(size, value)
    if isinstance(forward, nn.Module):
        p = next(forward.parameters(), None)
        with torch.no_grad():
            out = forward(torch.from_numpy(x).to(p.device if p is not None else "cpu"))
    else:
        out = forward(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return np.ascontiguousarray(out[0], np.float32)


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


class _PooledLinear(nn.Module):
    """GAP + linear, logits (n, K) of features (n, C, H, W): a linear head as a module for captum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            if bias is not None:
                self.fc.bias.copy_(bias)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(a).flatten(1))


class _Fn(nn.Module):
    """A callable head as a module (captum attributes modules); its non-linearities pass plain gradients."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.fn(a)


def head_module(head, bias=None) -> nn.Module:
    """The head as a torch module: W (K, C) of a GAP+linear head (numpy or torch; optional bias) ->
    pool + linear; a module as it is; any other callable wrapped."""
    if isinstance(head, nn.Module):
        return head
    if callable(head):
        return _Fn(head)
    w = torch.as_tensor(head).detach().float().cpu()
    b = None if bias is None else torch.as_tensor(bias).detach().float().cpu()
    return _PooledLinear(w, b)


def deeplift_feature_map(acts, head, class_id: int, reference=None, batch_size: int = 256) -> torch.Tensor:
    """ReLU(channel mean of DeepLift of logit ``class_id`` at the features): (N, H, W) >= 0.

    acts (N, C, H, W): the images' features A; ``head``: W (K, C) of a GAP+linear head, a torch head
    module, or a callable (see :func:`head_module`); ``reference``: the reference's features A0
    (C, H, W) or (N, C, H, W) (:func:`reference_features`), zeros when None. Captum's ``DeepLift`` on
    the head with A as input and A0 as baseline: (A - A0) x the head's DeepLift multipliers, which is
    captum's ``LayerDeepLift`` of the whole model at the features with the reference image as baseline
    (see the module's docstring). For a GAP+linear head: W[y, c] (A - A0)[c, h, w] / (H W). Captum's
    rules cover the non-linearities that are modules of the head (ReLU, Sigmoid, ... each used once);
    other non-linearities pass plain gradients. Runs on the head module's device (else ``acts``'),
    and returns the maps there.
    """
    from captum.attr import DeepLift

    a = torch.as_tensor(acts).detach().float()
    if a.ndim != 4:
        raise ValueError(f"expected activations (N, C, H, W), got shape {tuple(a.shape)}")
    ref = torch.zeros_like(a[:1]) if reference is None else torch.as_tensor(reference).detach().float().to(a.device)
    if ref.ndim == 3:
        ref = ref[None]
    if ref.shape[1:] != a.shape[1:] or ref.shape[0] not in (1, a.shape[0]):
        raise ValueError(f"reference {tuple(ref.shape)} does not match activations {tuple(a.shape)}")
    model = head_module(head)
    if model is head:  # the caller's module stays where it is: the data goes to it
        p = next(model.parameters(), None)
        if p is not None:
            a, ref = a.to(p.device), ref.to(p.device)
    else:
        model = model.to(a.device)
    method = DeepLift(model.eval())
    maps = []
    for i in range(0, a.shape[0], batch_size):
        x = a[i:i + batch_size]
        base = ref.expand_as(x) if ref.shape[0] == 1 else ref[i:i + batch_size]
        with warnings.catch_warnings():  # captum announces its hooks on every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            attr = method.attribute(x.clone().requires_grad_(True), baselines=base.contiguous(), target=class_id)
        maps.append(attr.mean(1).clamp(min=0).detach())
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


class AttributionNMF(ConceptLearner):
    """NMF of pixel activations weighted by their attribution to one class.

    ``fit(acts (N, C, H, W), head_weight, head_bias, class_id)`` -> ``components_`` (k, C). The maps are
    divided by their largest value over the data (directions do not change; the basis stays in
    activation units) and pixels with weight 0 are left out. ``method``: "gradxact" (default; also
    spelled "grad_x_act") or "deeplift": DeepLift at the features against ``reference`` (the reference
    image's features (C, H, W), :func:`reference_features`; zeros when None), or, when ``fit`` is
    given ``images``, ``features`` and ``head`` modules, captum's LayerDeepLift through the whole
    model; precomputed ``maps`` (N, H, W) override both.
    """

    needs_linear_head = True

    @classmethod
    def fit_class(cls, feats, *, k: int, class_id: int, head_weight, head_bias, seed: int, device,
                  max_iter: int = 200, tol: float = 1e-4, params: dict | None = None, **_) -> "AttributionNMF":
        """One class's features (N, C, H, W) -> fitted (the job's entry, as ``NMF.fit_class``).
        ``params["attribution"]``: "gradxact" (default; or "grad_x_act") or "deeplift";
        ``params["deeplift_reference"]``: the reference image's features (C, H, W) for "deeplift"
        (:func:`reference_features`; zeros when absent)."""
        params = params or {}
        return cls(k, method=params.get("attribution", "gradxact"), max_iter=max_iter, tol=tol, seed=seed,
                   device=device, reference=params.get("deeplift_reference")).fit(
            torch.from_numpy(feats), torch.from_numpy(head_weight), torch.from_numpy(head_bias), class_id)

    def __init__(self, n_components: int, method: str = "gradxact", solver: str = "hals", max_iter: int = 200,
                 tol: float = 1e-4, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, reference=None):
        super().__init__(n_components, device, dtype)
        self.method = attribution_method(method)
        self.reference = reference
        self.nmf = NMF(n_components, solver=solver, max_iter=max_iter, tol=tol, seed=seed, device=device, dtype=dtype)
        self.n_pixels_ = 0

    def fit(self, acts, head_weight: Head | None, head_bias=None, class_id: int = 0, *, maps=None, images=None,
            features: nn.Module | None = None, head: nn.Module | None = None) -> "AttributionNMF":
        """``head_bias`` is accepted for a uniform learner API; a bias does not change the attribution."""
        a = torch.as_tensor(acts).detach().to(self.device, self.dtype)
        if maps is None:
            if self.method == "deeplift" and images is not None:
                if features is None or head is None:
                    raise ValueError("method='deeplift' from images needs the features and head modules")
                maps = deeplift_map(images, features, head, class_id)
            elif self.method == "deeplift":
                if head is None and head_weight is None:
                    raise ValueError("method='deeplift' needs the head (head_weight or head)")
                maps = deeplift_feature_map(a, head if head is not None else head_weight, class_id, self.reference)
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

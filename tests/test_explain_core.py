"""The explain core (service/explain.py, with service/nnls.py, head.py and projection.py as it uses
them), each number checked against a computation of the test's own (DESIGN.md, "The math"):

- the projection against scipy's NNLS, pixel by pixel, and against the KKT conditions of
  min_{s >= 0} 1/2 ||v - s P||^2 checked on the code's own output (degenerate banks included);
- a linear head: presence, weights, contributions, residual and bias from the raw arrays, and their
  sum against W[y] . GAP(A) + b[y] computed here, not by the explain code's helpers;
- a non-linear head (a smooth head with a closed-form gradient, in numpy and as head.onnx): the
  finite-difference weights against the gradient, the residual h(A)_y - h(S P)_y and the bias
  against the head run here on the NNLS oracle's reconstruction, the logit against the head's own;
- classes without concepts (absent from the bundle, or an empty bank): the head's own logit, all
  of it residual (with the bias for a linear head);
- "A rather than B": logit_A - logit_B against the logits computed here, and its split.

For a non-linear head the identity sum c + r + bias = logit holds by construction (the bias is what
remains), so it is never the only check here. numpy and ONNX Runtime on the CPU; no server.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import nnls

from service_conftest import TINY_C, jpeg_bytes

from conceptlens.service.bundle import Bundle, ClassConcepts, load_bundle
from conceptlens.service.config import ServerConfig
from conceptlens.service.explain import Explainer, softmax, top_predictions
from conceptlens.service.head import FD_EPS, Head
from conceptlens.service.manifest import HeadCard, Manifest, MethodCard, ModelCard, Preprocessing
from conceptlens.service.nnls import NNLSProjector
from conceptlens.service.runtime import OnnxRuntime
from conceptlens.service.serving_model import ServingModel
from conceptlens.v1 import explain_service_pb2 as pb

C, H, W = 12, 5, 5
NAMES = ["zero", "one", "two", "three", "single", "bare"]  # "single": one concept; "bare": none
K = len(NAMES)
BARE = 5


# -- independent computations ---------------------------------------------------------------------
def nnls_oracle(basis: np.ndarray, v: np.ndarray) -> np.ndarray:
    """scipy's NNLS, pixel by pixel: S[i] = argmin_{s >= 0} ||v_i - s P|| in float64; (n, k)."""
    p = np.asarray(basis, np.float64).T  # (C, k)
    if p.shape[1] == 0:
        return np.zeros((len(v), 0))
    return np.array([nnls(p, np.asarray(row, np.float64))[0] for row in v])


def objective(basis: np.ndarray, v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """1/2 ||v_i - s_i P||^2 per pixel, float64."""
    r = np.asarray(v, np.float64) - np.asarray(s, np.float64) @ np.asarray(basis, np.float64)
    return 0.5 * (r * r).sum(axis=1)


def assert_kkt(basis: np.ndarray, v: np.ndarray, s: np.ndarray, tol: float) -> None:
    """The KKT conditions of min_{s >= 0} 1/2 ||v - s P||^2, pixel by pixel, on codes ``s``:
    primal feasibility s >= 0; dual feasibility g = s P P^T - v P^T >= 0 (the gradient); and
    complementary slackness s * g = 0. ``tol`` is relative to max ||v_i|| max ||p_j||."""
    p = np.asarray(basis, np.float64)
    s64 = np.asarray(s, np.float64)
    g = s64 @ (p @ p.T) - np.asarray(v, np.float64) @ p.T
    scale = max(float(np.linalg.norm(v, axis=1).max()) * float(np.linalg.norm(p, axis=1).max(initial=0.0)), 1e-12)
    assert np.isfinite(s).all() and (s >= 0).all(), "codes must be finite and >= 0"
    assert g.min(initial=0.0) >= -tol * scale, f"dual feasibility: gradient {g.min():.3g} < 0 at a code"
    slack = np.abs(s64 * g).max(initial=0.0)
    assert slack <= tol * scale * max(float(s64.max(initial=0.0)), 1e-12), f"complementary slackness {slack:.3g}"


def assert_optimal(basis: np.ndarray, v: np.ndarray, codes: np.ndarray, rel: float) -> None:
    """Each pixel's objective at ``codes`` is scipy's optimum, up to ``rel`` of it and of ||v_i||^2 / 1e4."""
    ours, best = objective(basis, v, codes), objective(basis, v, nnls_oracle(basis, v))
    slack = rel * (best + 1e-2 * (np.asarray(v, np.float64) ** 2).sum(axis=1))
    worst = int(np.argmax(ours - best - slack))
    assert (ours <= best + slack).all(), f"pixel {worst}: objective {ours[worst]:.6g} > optimum {best[worst]:.6g}"


def gap64(features: np.ndarray) -> np.ndarray:
    """GAP(A) (C,) in float64, from the raw (C, H, W) array."""
    a = np.asarray(features, np.float64)
    return a.sum(axis=(1, 2)) / (a.shape[1] * a.shape[2])


def pixels64(features: np.ndarray) -> np.ndarray:
    """V (H*W, C) float64, pixel (y, x) = row y * W + x."""
    c = features.shape[0]
    return np.asarray(features, np.float64).reshape(c, -1).T


def relu_features(seed: int, n: int | None = None, c: int = C, h: int = H, w: int = W) -> np.ndarray:
    """ReLU-like activations (C, H, W) or (n, C, H, W): a few parts per pixel plus noise, clipped at 0
    (about a third of the entries are 0, as after a ReLU)."""
    rng = np.random.default_rng(seed)
    m = 1 if n is None else n
    parts = np.abs(rng.standard_normal((4, c))) * (rng.random((4, c)) < 0.6)
    z = rng.exponential(1.0, (m, h * w, 4)) * (rng.random((m, h * w, 4)) < 0.5)
    v = np.maximum(z @ parts + 0.3 * rng.standard_normal((m, h * w, c)), 0.0)
    f = np.ascontiguousarray(v.reshape(m, h, w, c).transpose(0, 3, 1, 2), np.float32)
    return f[0] if n is None else f


def class_bases(seed: int = 1, c: int = C) -> dict[int, np.ndarray]:
    """Non-negative banks: classes 0-3 with 4 concepts, class 4 with one, class 5 (BARE) none."""
    rng = np.random.default_rng(seed)
    bases = {cid: (np.abs(rng.standard_normal((4, c))) * (rng.random((4, c)) < 0.7) + 0.05).astype(np.float32)
             for cid in range(4)}
    bases[4] = np.abs(rng.standard_normal((1, c))).astype(np.float32)
    return bases


def memory_bundle(bases: dict[int, np.ndarray], weights: dict[int, np.ndarray], *, head_weight=None,
                  head_bias=None, tensors=None, names=NAMES, shape=(C, H, W), root: Path = Path(".")) -> Bundle:
    """A bundle held in memory (what load_bundle returns, without files): ``head_weight`` and
    ``head_bias`` make the head linear, else it is generic (head.onnx under ``root``)."""
    linear = head_weight is not None
    card = ModelCard(source="test", name="test", file_sha256="", layer="features", feature_shape=tuple(shape),
                     num_classes=len(names), head=HeadCard("linear" if linear else "generic",
                                                           "head.safetensors" if linear else "head.onnx"))
    manifest = Manifest(model=card, preprocessing=Preprocessing(), class_names=list(names),
                        method=MethodCard("nmf"), classes={}, bundle_id="explain-core-test")
    classes = {cid: ClassConcepts(cid, names[cid], np.asarray(b, np.float32), np.asarray(weights[cid], np.float32))
               for cid, b in bases.items()}
    return Bundle(root=root, manifest=manifest, classes=classes, class_names=list(names),
                  head_weight=None if not linear else np.asarray(head_weight, np.float32),
                  head_bias=None if not linear else np.asarray(head_bias, np.float32),
                  preprocessing=manifest.preprocessing, tensors=dict(tensors or {}))


class SmoothHead:
    """A non-linear head with a closed-form gradient: per pixel a 1x1 layer and softplus, then GAP
    and a linear layer, h(A)_y = W2[y] . mean_p softplus(W1 a_p + b1) + b2[y]; evaluated in float64."""

    def __init__(self, c: int, classes: int, hidden: int = 16, seed: int = 7):
        rng = np.random.default_rng(seed)
        self.w1 = (rng.standard_normal((hidden, c)) / np.sqrt(c)).astype(np.float32)
        self.b1 = (0.2 * rng.standard_normal(hidden)).astype(np.float32)
        self.w2 = rng.standard_normal((classes, hidden)).astype(np.float32)
        self.b2 = rng.standard_normal(classes).astype(np.float32)

    def _pre(self, f: np.ndarray) -> np.ndarray:  # (N, C, H, W) -> (N, M, H, W)
        return (np.einsum("mc,nchw->nmhw", self.w1.astype(np.float64), np.asarray(f, np.float64))
                + self.b1.astype(np.float64)[None, :, None, None])

    def __call__(self, f: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, K) float64."""
        hid = np.logaddexp(0.0, self._pre(f)).mean(axis=(2, 3))
        return hid @ self.w2.T.astype(np.float64) + self.b2.astype(np.float64)

    def directional(self, anchor: np.ndarray, d: np.ndarray) -> np.ndarray:
        """d/dt h(anchor + t d)_y at t = 0 for all y (K,): d (C,) added at every pixel of ``anchor`` (C, H, W).
        = W2 (mean_p sigmoid(W1 a_p + b1) * (W1 d))."""
        sig = 1.0 / (1.0 + np.exp(-self._pre(anchor[None])[0]))  # (M, H, W)
        return self.w2.astype(np.float64) @ (sig.mean(axis=(1, 2)) * (self.w1.astype(np.float64) @ np.asarray(d, np.float64)))


def close(got: float, want: float, scale: float, rel: float = 1e-4) -> bool:
    return abs(got - want) <= rel * max(1.0, scale)


# -- (1) the projection against scipy's NNLS and the KKT conditions ----------------------------------
def _cases():
    rng = np.random.default_rng(0)
    yield "random non-negative", np.abs(rng.standard_normal((5, 16))), np.abs(rng.standard_normal((64, 16)))
    basis = np.abs(rng.standard_normal((4, C))) * (rng.random((4, C)) < 0.6)
    z = rng.exponential(1.0, (H * W, 4)) * (rng.random((H * W, 4)) < 0.5)
    yield "ReLU-like pixels of a planted basis", basis, np.maximum(z @ basis + 0.1 * rng.standard_normal((H * W, C)), 0)
    yield "signed (semi-NMF) basis and pixels", rng.standard_normal((4, 10)), rng.standard_normal((64, 10))
    yield "a class bank on ReLU-like feature maps", class_bases()[0], pixels64(relu_features(3))
    yield "more concepts than channels", np.abs(rng.standard_normal((6, 4))), np.abs(rng.standard_normal((30, 4)))


@pytest.mark.parametrize("name,basis,v", list(_cases()), ids=[c[0] for c in _cases()])
def test_projection_is_scipys_nnls_and_meets_the_kkt_conditions(name, basis, v):
    basis, v = np.asarray(basis, np.float32), np.asarray(v, np.float32)
    codes = NNLSProjector.from_basis(basis).project(v)
    assert codes.shape == (len(v), len(basis)) and codes.dtype == np.float32
    assert_kkt(basis, v, codes, tol=1e-4)
    assert_optimal(basis, v, codes, rel=1e-4)  # the optimum, pixel by pixel (up to float32 and the stop rule)
    want = nnls_oracle(basis, v)
    if name != "more concepts than channels":  # unique optimum: the codes themselves
        np.testing.assert_allclose(codes, want, atol=1e-3 * max(float(want.max()), 1e-6), rtol=0)
    if name != "signed (semi-NMF) basis and pixels":
        assert (want == 0).any()  # the constraint binds somewhere: not the unconstrained solution


def test_zero_activations_give_zero_codes():
    basis = class_bases()[0]
    v = np.abs(np.random.default_rng(2).standard_normal((10, C))).astype(np.float32)
    v[[0, 4, 9]] = 0.0  # dead pixels amid live ones
    codes = NNLSProjector.from_basis(basis).project(v)
    assert np.array_equal(codes[[0, 4, 9]], np.zeros((3, 4), np.float32))
    np.testing.assert_allclose(codes, nnls_oracle(basis, v), atol=1e-3 * float(codes.max()))
    assert np.array_equal(NNLSProjector.from_basis(basis).project(np.zeros((7, C), np.float32)), np.zeros((7, 4)))


def test_a_zero_concept_gets_zero_codes_and_the_others_the_reduced_optimum():
    basis = class_bases()[0].copy()
    basis[2] = 0.0
    v = pixels64(relu_features(4)).astype(np.float32)
    codes = NNLSProjector.from_basis(basis).project(v)
    assert np.array_equal(codes[:, 2], np.zeros(len(v), np.float32))
    keep = [0, 1, 3]
    np.testing.assert_allclose(codes[:, keep], nnls_oracle(basis[keep], v), atol=1e-3 * float(codes.max()))
    assert_kkt(basis, v, codes, tol=1e-4)


def test_duplicated_concepts_share_the_reduced_optimum():
    base = class_bases()[1]
    basis = np.stack([base[0], base[1], base[1], base[2]])  # concept 1 twice: the codes are not unique
    v = pixels64(relu_features(5)).astype(np.float32)
    codes = NNLSProjector.from_basis(basis).project(v)
    assert_kkt(basis, v, codes, tol=1e-4)
    reduced = nnls_oracle(base[:3], v)
    scale = float(reduced.max())
    np.testing.assert_allclose(codes[:, 0], reduced[:, 0], atol=1e-3 * scale)
    np.testing.assert_allclose(codes[:, 1] + codes[:, 2], reduced[:, 1], atol=1e-3 * scale)  # split, sum unique
    np.testing.assert_allclose(codes[:, 3], reduced[:, 2], atol=1e-3 * scale)


def test_one_concept_is_the_clipped_scalar_projection():
    p = np.abs(np.random.default_rng(6).standard_normal((1, C))).astype(np.float32)
    v = np.random.default_rng(7).standard_normal((40, C)).astype(np.float32)  # signed: some clip to 0
    codes = NNLSProjector.from_basis(p).project(v)
    want = np.maximum(v.astype(np.float64) @ p[0].astype(np.float64) / float(p[0].astype(np.float64) @ p[0]), 0)
    np.testing.assert_allclose(codes[:, 0], want, rtol=1e-5, atol=1e-6 * float(want.max()))
    assert (want == 0).sum() >= 5 and (want > 0).sum() >= 5


def test_an_empty_bank_projects_to_no_codes():
    codes = NNLSProjector.from_basis(np.zeros((0, C), np.float32)).project(np.ones((9, C), np.float32))
    assert codes.shape == (9, 0)


def test_ill_conditioned_bank_reaches_the_optimal_objective():
    """Two nearly parallel concepts (condition number of P P^T ~ 1e5): the codes along them are
    unstable, but the fit (the objective, hence the reconstruction and the residual) is the optimum."""
    rng = np.random.default_rng(8)
    base = np.abs(rng.standard_normal((3, C)))
    basis = np.stack([base[0], base[0] + 1e-2 * rng.standard_normal(C), base[1], base[2]]).astype(np.float32)
    assert np.linalg.cond(basis.astype(np.float64) @ basis.T.astype(np.float64)) > 1e4
    v = np.abs(rng.standard_normal((64, C))).astype(np.float32)
    codes = NNLSProjector.from_basis(basis).project(v)
    assert_optimal(basis, v, codes, rel=1e-3)
    assert_kkt(basis, v, codes, tol=1e-2)  # the stop rule leaves it less converged than a well-posed bank


def weighted_nnls_oracle(basis: np.ndarray, v: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """scipy's NNLS of the logit-aware problem, pixel by pixel: argmin_{s >= 0} ||v_i - s P||^2 +
    alpha ||(v_i - s P) . u||^2 / ||u||^2, written as one least squares on C + 1 rows; (n, k) float64."""
    p, u = np.asarray(basis, np.float64), np.asarray(u, np.float64)
    root = np.sqrt(alpha / (u @ u))
    a = np.vstack([p.T, root * (p @ u)[None, :]])  # (C + 1, k)
    return np.array([nnls(a, np.append(row, root * (row @ u)))[0] for row in np.asarray(v, np.float64)])


@pytest.mark.parametrize("alpha", [1.0, 100.0])
def test_logit_aware_projection_is_scipys_nnls_of_the_weighted_problem(alpha):
    basis = class_bases()[0]
    v = pixels64(relu_features(5)).astype(np.float32)
    u = np.random.default_rng(6).standard_normal(C).astype(np.float32)
    proj = NNLSProjector.from_basis(basis, u, alpha)
    codes = proj.project(v, max_iter=2000, tol=1e-7)
    want = weighted_nnls_oracle(basis, v, u, alpha)
    np.testing.assert_allclose(codes, want, atol=2e-3 * float(want.max()), rtol=0)
    assert np.abs(want - nnls_oracle(basis, v)).max() > 0.05 * want.max()  # it is not the plain projection
    # the correlations from V P^T at hand (prototype mining's path) are the same
    np.testing.assert_allclose(proj.correlations(v, plain=v @ basis.T), proj.correlations(v), rtol=1e-5, atol=1e-4)
    assert NNLSProjector.from_basis(basis, u, 0.0).reader is None  # alpha 0: the plain projection


def test_logit_aware_codes_keep_the_class_logit_at_a_small_cost_in_reconstruction():
    """A basis missing one of the pixels' parts: the plain codes leave part of u . GAP(A) out; the
    logit-aware codes leave less out, and reconstruct the pixels almost as well."""
    rng = np.random.default_rng(13)
    parts = np.abs(rng.standard_normal((4, C))) * (rng.random((4, C)) < 0.6)
    n = 8
    z = rng.exponential(1.0, (n * H * W, 4)) * (rng.random((n * H * W, 4)) < 0.5)
    v = np.maximum(z @ parts + 0.1 * rng.standard_normal((n * H * W, C)), 0.0)
    basis = parts[:3] + 0.05  # the fourth part is not a concept
    u = np.abs(rng.standard_normal(C))
    gaps = v.reshape(n, H * W, C).mean(axis=1)
    out = {}
    for alpha in (0.0, 100.0):
        s = weighted_nnls_oracle(basis, v, u, alpha) if alpha else nnls_oracle(basis, v)
        recon = (s @ basis).reshape(n, H * W, C).mean(axis=1)
        out[alpha] = (float(np.abs((gaps - recon) @ u).mean()), float(np.linalg.norm(v - s @ basis) / np.linalg.norm(v)))
    (plain_err, plain_rec), (aware_err, aware_rec) = out[0.0], out[100.0]
    assert aware_err < 0.5 * plain_err, out
    assert aware_rec < plain_rec + 0.05, out


def test_a_bundles_logit_weight_makes_the_explainer_project_logit_aware():
    rng = np.random.default_rng(14)
    w = rng.standard_normal((K, C)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    bases = class_bases()
    bundle = memory_bundle(bases, {cid: p @ w[cid] for cid, p in bases.items()}, head_weight=w, head_bias=b)
    bundle.manifest.method = dataclasses.replace(bundle.manifest.method, logit_weight=30.0)
    explainer = Explainer(bundle)
    f = relu_features(15)
    logits = (np.einsum("kc,chw->k", w, f) / (H * W) + b).astype(np.float32)
    ex = explainer.explain(f, logits, 2)
    want = weighted_nnls_oracle(bases[2], pixels64(f), w[2], 30.0)
    for c in ex.concepts:
        assert abs(c.presence - want[:, c.concept].mean()) <= 2e-3 * want.max()
    total = sum(c.contribution for c in ex.concepts) + ex.residual + ex.bias
    assert total == pytest.approx(float(logits[2]), rel=1e-4, abs=1e-4)  # the identity holds all the same


# -- (2) a linear head: the identity against W . GAP(A) + b computed here ---------------------------
@pytest.fixture(scope="module")
def linear_case():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((K, C)).astype(np.float32)
    b = rng.standard_normal(K).astype(np.float32)
    bases = class_bases()
    # stored weights deliberately off (a float16 bundle): the served ones must be P . W[y] exact
    stored = {cid: (p @ w[cid]).astype(np.float16) for cid, p in bases.items()}
    bundle = memory_bundle(bases, stored, head_weight=w, head_bias=b)
    contrast_basis = np.abs(rng.standard_normal((3, C))).astype(np.float32)
    projectors = {(0, 1): (NNLSProjector.from_basis(contrast_basis), "contrast")}
    explainer = Explainer(bundle, contrast_projectors=lambda a, c: projectors.get((a, c)))
    feats = relu_features(12, n=6)
    # the model's logits, float32 as a runtime gives them (einsum: not the core's mean + matmul)
    logits = (np.einsum("kc,nchw->nk", w, feats) / (H * W) + b).astype(np.float32)
    return explainer, w.astype(np.float64), b.astype(np.float64), bases, contrast_basis, feats, logits


def expected_linear(basis, u, bias, f):
    """Presence, weights, contributions, residual, bias and target of target = u . GAP(A) + bias,
    from scipy's codes and the raw arrays."""
    s = nnls_oracle(basis, pixels64(f))
    presence = s.mean(axis=0)
    weights = np.asarray(basis, np.float64) @ u
    g = gap64(f)
    return dict(codes=s, presence=presence, weights=weights, contrib=presence * weights,
                residual=float((g - presence @ np.asarray(basis, np.float64)) @ u), bias=bias, target=float(u @ g + bias))


def assert_matches(ex, want, h=H, w=W, rel=2e-3):
    """``ex`` (a ClassExplanation) against ``want`` computed here. The identity against our target is
    tight (1e-5); the parts within ``rel`` of the explanation's scale: the served codes are FISTA's,
    which a bank with cond(P P^T) ~ 100 leaves ~1e-3 of the largest code off scipy's after its 200
    steps (below the 1/255 of a heatmap)."""
    scale = abs(want["target"]) + float(np.abs(want["contrib"]).sum()) + abs(want["residual"])
    total = sum(c.contribution for c in ex.concepts) + ex.residual + ex.bias
    assert close(total, want["target"], scale, 1e-5), (total, want["target"])  # the identity, against our target
    assert close(ex.target, want["target"], scale, 1e-5), (ex.target, want["target"])
    assert close(ex.residual, want["residual"], scale, rel), (ex.residual, want["residual"])
    assert close(ex.bias, want["bias"], scale, rel), (ex.bias, want["bias"])
    assert sorted(c.concept for c in ex.concepts) == list(range(len(want["presence"])))
    code_tol = rel * max(float(want["codes"].max(initial=0.0)), 1e-6)
    for c in ex.concepts:
        j = c.concept
        assert abs(c.presence - want["presence"][j]) <= code_tol, (j, c.presence, want["presence"][j])
        assert close(c.weight, want["weights"][j], float(np.abs(want["weights"]).max()), 1e-4), (j, c.weight)
        assert close(c.contribution, want["contrib"][j], scale, rel), (j, c.contribution, want["contrib"][j])
        if c.heatmap.size:
            np.testing.assert_allclose(c.heatmap, want["codes"][:, j].reshape(h, w), rtol=0, atol=code_tol)
    # the largest contribution first; |r| / (sum |c| + |r|)
    got = [abs(c.contribution) for c in ex.concepts]
    assert got == sorted(got, reverse=True)
    denom = float(np.abs(want["contrib"]).sum()) + abs(want["residual"])
    assert ex.relative_residual == pytest.approx(abs(want["residual"]) / denom if denom else 0.0, abs=rel)


@pytest.mark.parametrize("cid", [0, 1, 2, 3, 4])
def test_linear_head_explanation_against_the_raw_arrays(linear_case, cid):
    explainer, w, b, bases, _, feats, logits = linear_case
    for f, lg in zip(feats, logits):
        want = expected_linear(bases[cid], w[cid], b[cid], f)
        ex = explainer.explain(f, lg, cid)
        assert ex.contrast_class is None and ex.class_id == cid and ex.name == NAMES[cid]
        assert_matches(ex, want)
        assert ex.method == "nmf"


def test_linear_head_keeps_the_largest_contributions(linear_case):
    explainer, w, b, bases, _, feats, logits = linear_case
    want = expected_linear(bases[0], w[0], b[0], feats[0])
    ex = explainer.explain(feats[0], logits[0], 0, max_concepts=2)
    assert [c.concept for c in ex.concepts] == list(np.argsort(-np.abs(want["contrib"]))[:2])
    dropped = float(np.sort(np.abs(want["contrib"]))[:2].sum())
    assert ex.identity_error <= dropped + 1e-4 * max(1.0, abs(want["target"]))  # only what was dropped
    assert ex.residual == pytest.approx(want["residual"], rel=1e-4, abs=1e-4)  # the residual is not what moves


def test_linear_contrast_against_the_raw_arrays(linear_case):
    """logit_A - logit_B = sum of contrast contributions + residual + (b_A - b_B), on a contrast basis
    (0 rather than 1) and, without one, on A's class basis with the contrast weights (2 rather than 3)."""
    explainer, w, b, bases, contrast_basis, feats, logits = linear_case
    for f, lg in zip(feats[:3], logits[:3]):
        for (a, c), basis, method in (((0, 1), contrast_basis, "contrast"), ((2, 3), bases[2], "nmf"),
                                      ((4, BARE), bases[4], "nmf")):
            want = expected_linear(basis, w[a] - w[c], b[a] - b[c], f)
            assert want["target"] == pytest.approx(float(lg[a]) - float(lg[c]), rel=1e-5, abs=1e-5)
            ex = explainer.explain(f, lg, a, contrast=c)
            assert ex.contrast_class == c and ex.method == method
            assert_matches(ex, want)
    with pytest.raises(ValueError):
        explainer.explain(feats[0], logits[0], 1, contrast=1)


def test_a_class_without_concepts_is_not_explained_by_the_core(linear_case):
    explainer, *_, feats, logits = linear_case
    with pytest.raises(KeyError, match="no concepts"):
        explainer.explain(feats[0], logits[0], BARE)


def test_an_empty_bank_leaves_the_whole_logit_to_residual_and_bias():
    """k = 0 (an empty bank): nothing is projected, the residual is W[y] . GAP(A) and the bias b[y]
    (linear); h(A)_y - h(0)_y and h(0)_y (non-linear, whose bias is h(S P)_y with S P = 0)."""
    rng = np.random.default_rng(13)
    w, b = rng.standard_normal((K, C)).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    empty = {1: np.zeros((0, C), np.float32)}
    f = relu_features(14)
    lin = Explainer(memory_bundle(empty, {1: np.zeros(0)}, head_weight=w, head_bias=b))
    lg = (np.einsum("kc,chw->k", w, f) / (H * W) + b).astype(np.float32)
    ex = lin.explain(f, lg, 1)
    g = gap64(f)
    assert ex.concepts == [] and ex.relative_residual == 1.0
    assert ex.residual == pytest.approx(float(w[1].astype(np.float64) @ g), rel=1e-5, abs=1e-5)
    assert ex.bias == pytest.approx(float(b[1]))
    assert ex.residual + ex.bias == pytest.approx(float(w[1].astype(np.float64) @ g + b[1]), rel=1e-5, abs=1e-5)
    head = SmoothHead(C, K)
    anchor = relu_features(15)
    gen = Explainer(memory_bundle(empty, {1: np.zeros(0)}, tensors={"anchor/1": anchor}),
                    head=lambda x: head(x).astype(np.float32))
    z, z0 = head(f[None])[0], head(np.zeros((1, C, H, W)))[0]
    for contrast in (None, 3):
        ex = gen.explain(f, z.astype(np.float32), 1, contrast=contrast)
        sel = (lambda t: t[1] - (t[contrast] if contrast is not None else 0.0))
        assert ex.concepts == []
        assert ex.residual == pytest.approx(sel(z) - sel(z0), rel=1e-5, abs=1e-5)
        assert ex.bias == pytest.approx(sel(z0), rel=1e-5, abs=1e-5)


# -- (3) a non-linear head: its own logits and its own gradient ------------------------------------
@pytest.fixture(scope="module")
def smooth_case():
    head = SmoothHead(C, K)
    bases = class_bases(seed=21)
    anchors = {cid: relu_features(100 + cid) for cid in bases}  # where the weights are measured
    fn = Head(fn=lambda x: head(x).astype(np.float32))
    # the class weights as precompute stores them: central differences at the class's anchor
    weights = {cid: fn.concept_weights(p, cid, anchor=anchors[cid]) for cid, p in bases.items()}
    contrast_basis = np.abs(np.random.default_rng(22).standard_normal((3, C))).astype(np.float32)
    projectors = {(0, 1): (NNLSProjector.from_basis(contrast_basis), "contrast")}
    bundle = memory_bundle(bases, weights, tensors={f"anchor/{cid}": a for cid, a in anchors.items()})
    explainer = Explainer(bundle, head=lambda x: head(x).astype(np.float32),
                          contrast_projectors=lambda a, c: projectors.get((a, c)))
    feats = relu_features(23, n=4)
    return explainer, head, bases, anchors, contrast_basis, feats


def closed_form_weights(head: SmoothHead, basis: np.ndarray, anchor: np.ndarray, y: int, contrast: int | None = None):
    """d (h_y - h_contrast) / d presence_j at the anchor, from the head's closed-form gradient."""
    grads = np.array([head.directional(anchor, p) for p in np.asarray(basis, np.float64)])  # (k, K)
    return grads[:, y] - (grads[:, contrast] if contrast is not None else 0.0)


def test_finite_difference_weights_are_the_heads_gradient_at_the_anchor(smooth_case):
    explainer, head, bases, anchors, *_ = smooth_case
    for cid, basis in bases.items():
        got = explainer.concept_weights(cid)
        want = closed_form_weights(head, basis, anchors[cid], cid)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
        # and the derivative of our own, by a step 5x the code's: the same slope (a smooth head)
        step = 5 * FD_EPS
        own = [(head(anchors[cid][None] + step * p[:, None, None])[0, cid]
                - head(anchors[cid][None] - step * p[:, None, None])[0, cid]) / (2 * step) for p in basis]
        np.testing.assert_allclose(got, own, rtol=2e-3, atol=1e-4 * float(np.abs(want).max()))


def test_finite_difference_weights_average_over_several_anchors():
    head = SmoothHead(C, K)
    basis = class_bases(seed=31)[0]
    anchors = relu_features(32, n=3)
    got = Head(fn=lambda x: head(x).astype(np.float32)).concept_weights(basis, 2, contrast=4, anchor=anchors)
    want = np.mean([closed_form_weights(head, basis, a, 2, 4) for a in anchors], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))
    with pytest.raises(ValueError, match="anchor"):
        Head(fn=head).concept_weights(basis, 2)
    assert Head(fn=head).concept_weights(np.zeros((0, C), np.float32), 2, anchor=anchors).shape == (0,)


def expected_generic(head: SmoothHead, basis, weights, f, y: int, contrast: int | None = None):
    """The split of target = h(A)_y (- h(A)_contrast) for a non-linear head, computed here: scipy's
    codes S, the head run on A and on S P, the given per-concept weights."""
    sel = (lambda z: float(z[y] - (z[contrast] if contrast is not None else 0.0)))
    s = nnls_oracle(basis, pixels64(f))
    presence = s.mean(axis=0)
    recon = (s @ np.asarray(basis, np.float64)).T.reshape(1, *f.shape)
    target, at_recon = sel(head(f[None])[0]), sel(head(recon)[0])
    contrib = presence * weights
    return dict(codes=s, presence=presence, weights=weights, contrib=contrib, residual=target - at_recon,
                bias=at_recon - float(contrib.sum()), target=target)


@pytest.mark.parametrize("cid", [0, 2, 4])
def test_nonlinear_head_explanation_against_the_heads_own_output(smooth_case, cid):
    explainer, head, bases, anchors, _, feats = smooth_case
    weights = closed_form_weights(head, bases[cid], anchors[cid], cid)
    for f in feats:
        own = head(f[None])[0]  # the head's own logits: what the model gives for these activations
        ex = explainer.explain(f, own.astype(np.float32), cid)
        want = expected_generic(head, bases[cid], weights, f, cid)
        assert want["target"] == pytest.approx(float(own[cid]))
        assert_matches(ex, want)


def test_nonlinear_contrast_against_the_heads_own_output(smooth_case):
    """"a rather than c": weights d(h_a - h_c) at a's anchor, residual (h_a - h_c)(A) - (h_a - h_c)(S P)."""
    explainer, head, bases, anchors, contrast_basis, feats = smooth_case
    for f in feats[:2]:
        own = head(f[None])[0]
        for (a, c), basis, method in (((0, 1), contrast_basis, "contrast"), ((2, 3), bases[2], "nmf"),
                                      ((3, BARE), bases[3], "nmf")):
            weights = closed_form_weights(head, basis, anchors[a], a, c)
            want = expected_generic(head, basis, weights, f, a, c)
            assert want["target"] == pytest.approx(float(own[a] - own[c]))
            ex = explainer.explain(f, own.astype(np.float32), a, contrast=c)
            assert ex.contrast_class == c and ex.method == method
            assert_matches(ex, want)


# -- (4) the served answer: the model's own logits, classes without concepts --------------------------
def smooth_head_onnx(path: Path, head: SmoothHead, c: int, prefix=None) -> None:
    """``head`` as ONNX: features (N, C, H, W) -> 1x1 Conv -> Softplus -> GAP -> Gemm -> logits;
    with ``prefix`` (nodes, initializers, inputs) in front of it, the whole model (image -> features, logits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Conv", ["features", "w1", "b1"], ["pre"], kernel_shape=[1, 1]),
             helper.make_node("Softplus", ["pre"], ["hid"]),
             helper.make_node("GlobalAveragePool", ["hid"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(head.w1[:, :, None, None], "w1"), numpy_helper.from_array(head.b1, "b1"),
             numpy_helper.from_array(head.w2, "w2"), numpy_helper.from_array(head.b2, "b2")]
    k = head.w2.shape[0]
    feats = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", c, 7, 7])
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])]
    inputs = [feats]
    if prefix is not None:
        pnodes, pinits, inputs = prefix
        nodes, inits, outputs = pnodes + nodes, pinits + inits, [feats] + outputs
    model = helper.make_model(helper.make_graph(nodes, "smooth", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def generic_bundle(tmp_path_factory) -> tuple[Path, SmoothHead]:
    """A real bundle on disk whose head is not linear: image -> Conv 32x32/32 -> ReLU = features
    (N, 8, 7, 7) -> the smooth head -> logits (N, 10); head.onnx is the head alone. Classes 0-7
    have 3 concepts (weights by finite differences at their anchors), 8 and 9 none."""
    from onnx import TensorProto, helper, numpy_helper

    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.service.manifest import ClassEntry

    d = tmp_path_factory.mktemp("generic")
    head = SmoothHead(TINY_C, 10, seed=41)
    rng = np.random.default_rng(42)
    conv_w = (rng.standard_normal((TINY_C, 3, 32, 32)) * 0.02).astype(np.float32)
    prefix = ([helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["pre_features"], kernel_shape=[32, 32],
                                strides=[32, 32]),
               helper.make_node("Relu", ["pre_features"], ["features"])],
              [numpy_helper.from_array(conv_w, "conv_w"),
               numpy_helper.from_array(np.full(TINY_C, 0.05, np.float32), "conv_b")],
              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])])
    smooth_head_onnx(d / "model.onnx", head, TINY_C, prefix)
    smooth_head_onnx(d / "head.onnx", head, TINY_C)
    fn = Head(fn=lambda x: head(x).astype(np.float32))
    tensors, classes = {}, {}
    for cid in range(8):
        basis = np.abs(rng.standard_normal((3, TINY_C))).astype(np.float32)
        anchor = np.abs(rng.standard_normal((TINY_C, 7, 7))).astype(np.float32)
        tensors.update({f"basis/{cid}": basis, f"anchor/{cid}": anchor,
                        f"weights/{cid}": fn.concept_weights(basis, cid, anchor=anchor)})
        classes[cid] = ClassEntry(name=f"thing{cid}", k=3, method="nmf")
    names = [f"thing{i}" for i in range(8)] + ["lonely", "empty"]
    out = write_bundle(d / "bundle", model_onnx=d / "model.onnx",
                       model=ModelCard(source="onnx:model.onnx", name="smooth", file_sha256="", layer="features",
                                       feature_shape=(TINY_C, 7, 7), num_classes=10,
                                       head=HeadCard("generic", "head.onnx")),
                       class_names=names, preprocessing=Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3),
                       head_weight=None, head_bias=None, head_onnx=d / "head.onnx", classes=classes,
                       tensors=tensors, prototypes={}, prototype_jpegs={}, method=MethodCard("nmf", {"concepts": 3}))
    return out, head


def serve_locally(bundle_dir: Path, image: bytes, **options):
    """The server's pipeline without a transport: decode, the model (ONNX Runtime), the answer."""
    bundle = load_bundle(bundle_dir)
    model = ServingModel(bundle, OnnxRuntime(bundle.model_path, device="cpu"), ServerConfig(device="cpu"))
    x, info = model.decode(image)
    ((features, logits),) = model.infer([x])
    resp, _, _ = model.answer_message(features, logits, model.plan(pb.ExplainOptions(**options)), info)
    return bundle, features, resp


def assert_predictions(resp, own: np.ndarray) -> None:
    """The ranked predictions against logits computed here: top-1 the argmax, the order, softmax."""
    order = np.argsort(-own, kind="stable")
    assert resp.predictions[0].class_id == int(np.argmax(own))
    assert [p.class_id for p in resp.predictions] == list(order[:len(resp.predictions)])
    probs = np.exp(own - own.max()) / np.exp(own - own.max()).sum()
    for p in resp.predictions:
        assert p.logit == pytest.approx(float(own[p.class_id]), rel=1e-4, abs=1e-4)
        assert p.probability == pytest.approx(float(probs[p.class_id]), rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("seed", [1, 2])
def test_served_generic_head_answers_with_the_heads_own_logits(generic_bundle, seed):
    """Every class of the top 10 through the serving pipeline and head.onnx: the logit is the head's
    own (run here in numpy on the model's features), the split is the head on scipy's
    reconstruction, and a class without concepts is its logit, all residual, bias 0."""
    path, head = generic_bundle
    bundle, features, resp = serve_locally(path, jpeg_bytes(seed, (96, 80)), top_k=10, num_predictions=10)
    own = head(features[None])[0]
    assert_predictions(resp, own)
    assert [x.class_id for x in resp.explanations] == list(np.argsort(-own, kind="stable"))
    for x in resp.explanations:
        assert x.logit == pytest.approx(float(own[x.class_id]), rel=1e-4, abs=1e-4)
        if x.class_id in bundle.classes:
            cc = bundle.classes[x.class_id]
            anchor = bundle.tensors[f"anchor/{x.class_id}"]
            weights = closed_form_weights(head, cc.basis, anchor, x.class_id)
            want = expected_generic(head, cc.basis, weights, features, x.class_id)
            scale = abs(want["target"]) + float(np.abs(want["contrib"]).sum())
            assert close(x.residual, want["residual"], scale, 2e-3), (x.residual, want["residual"])
            assert close(x.bias, want["bias"], scale, 2e-3), (x.bias, want["bias"])
            for c in x.concepts:
                assert close(c.weight, weights[c.concept_id], float(np.abs(weights).max()), 2e-3)
                assert close(c.contribution, want["contrib"][c.concept_id], scale, 2e-3)
        else:
            assert x.class_name in ("lonely", "empty") and list(x.flags) == ["no_concepts"] and not x.concepts
            assert x.bias == 0.0 and x.residual == x.logit and x.relative_residual == 1.0


def test_served_generic_head_contrast(generic_bundle):
    """Every class "rather than lonely" (which has no concepts): the logit is the difference of the
    head's own logits; the split is d(h_y - h_8) at y's anchor and the head on scipy's reconstruction;
    "empty rather than lonely" is all residual."""
    path, head = generic_bundle
    bundle, features, resp = serve_locally(path, jpeg_bytes(3, (64, 64)), top_k=10, contrast=pb.ClassRef(id=8))
    own = head(features[None])[0]
    assert sorted(x.class_id for x in resp.explanations) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    for x in resp.explanations:
        y = x.class_id
        assert x.contrast_class_id == 8
        assert x.logit == pytest.approx(float(own[y] - own[8]), rel=1e-4, abs=1e-4)
        if y == 9:
            assert x.residual == x.logit and x.bias == 0.0 and not x.concepts
            continue
        basis = bundle.classes[y].basis
        weights = closed_form_weights(head, basis, bundle.tensors[f"anchor/{y}"], y, 8)
        want = expected_generic(head, basis, weights, features, y, 8)
        scale = abs(want["target"]) + float(np.abs(want["contrib"]).sum())
        assert close(x.residual, want["residual"], scale, 2e-3), (x.residual, want["residual"])
        assert close(x.bias, want["bias"], scale, 2e-3), (x.bias, want["bias"])
        for c in x.concepts:
            assert close(c.weight, weights[c.concept_id], float(np.abs(weights).max()), 2e-3)


@pytest.mark.parametrize("seed", [4, 5])
def test_served_linear_head_classes_without_concepts_are_w_gap_plus_b(tiny_bundle, seed):
    """The tiny linear bundle through the serving pipeline and its ONNX model: the logits are
    W . GAP(A) + b computed here from the model's features; a class without concepts answers
    residual W[y] . GAP(A) and bias b[y]; top-1 is the argmax; "A rather than B" is logit_A - logit_B."""
    bundle, features, resp = serve_locally(tiny_bundle, jpeg_bytes(seed, (120, 90)), top_k=10, num_predictions=10)
    w, b = bundle.head_weight.astype(np.float64), bundle.head_bias.astype(np.float64)
    g = gap64(features)
    own = w @ g + b
    assert_predictions(resp, own)
    assert len(resp.explanations) == 10
    for x in resp.explanations:
        assert x.logit == pytest.approx(float(own[x.class_id]), rel=1e-4, abs=1e-4)
        if x.class_id in bundle.classes:
            want = expected_linear(bundle.classes[x.class_id].basis, w[x.class_id], b[x.class_id], features)
            scale = abs(want["target"]) + float(np.abs(want["contrib"]).sum())
            assert close(x.residual, want["residual"], scale, 2e-3), (x.residual, want["residual"])
            assert sum(c.contribution for c in x.concepts) + x.residual + x.bias == pytest.approx(
                float(own[x.class_id]), rel=1e-4, abs=1e-4)
        else:
            assert list(x.flags) == ["no_concepts"] and not x.concepts
            assert x.bias == pytest.approx(float(b[x.class_id]), abs=1e-6)
            assert x.residual == pytest.approx(float(w[x.class_id] @ g), rel=1e-4, abs=1e-4)
    # "y rather than 0" for the 9 others, with and without concepts
    _, features, resp = serve_locally(tiny_bundle, jpeg_bytes(seed, (120, 90)), top_k=9, contrast=pb.ClassRef(id=0))
    g = gap64(features)
    assert sorted(x.class_id for x in resp.explanations) == list(range(1, 10))
    for x in resp.explanations:
        y = x.class_id
        assert x.contrast_class_id == 0
        assert x.logit == pytest.approx(float(own[y] - own[0]), rel=1e-4, abs=1e-4)
        if y in bundle.classes:
            want = expected_linear(bundle.classes[y].basis, w[y] - w[0], b[y] - b[0], features)
            scale = abs(want["target"]) + float(np.abs(want["contrib"]).sum())
            assert close(x.residual, want["residual"], scale, 2e-3), (x.residual, want["residual"])
            assert x.bias == pytest.approx(want["bias"], abs=1e-6)
        else:
            assert x.bias == pytest.approx(float(b[y] - b[0]), abs=1e-6)
            assert x.residual == pytest.approx(float((w[y] - w[0]) @ g), rel=1e-4, abs=1e-4)


# -- (5) predictions ------------------------------------------------------------------------------
def test_top_predictions_are_the_sorted_logits_and_their_softmax():
    rng = np.random.default_rng(51)
    logits = (3 * rng.standard_normal(40)).astype(np.float32)
    names = [f"c{i}" for i in range(40)]
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    for k in (1, 5, 40, 100):
        got = top_predictions(logits, names, k)
        order = np.argsort(-z, kind="stable")[:min(k, 40)]
        assert [p.class_id for p in got] == list(order) and [p.name for p in got] == [names[i] for i in order]
        np.testing.assert_allclose([p.probability for p in got], probs[order], rtol=1e-5)
        np.testing.assert_allclose([p.logit for p in got], z[order], rtol=0, atol=0)
    assert top_predictions(logits, names, 0) == []
    np.testing.assert_allclose(softmax(logits), probs, rtol=1e-5)

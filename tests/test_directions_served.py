"""Encoding/decoding direction pairs (arXiv 2509.23926) served as the paper describes them.

(1) On planted pairs (a = sum_k z_k e_k + noise, z >= 0 sparse, encoding directions with
overlapping supports) the learner recovers both directions of every pair.
(2) The served explanation of a class with decoding directions: codes are the latent factors
max(V D^T, 0), contributions presence_k * (e_k . u), and logit = sum c + r + b holds for a linear
and a non-linear head, also through a bundle written to and loaded from disk.
(3) The precompute entry (``fit_learner``) gives the decoding directions to the bundle.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from conceptlens.precompute.evaluate import evaluate_class, reconstruct, served_codes, single_class_explainer
from conceptlens.precompute.fit import fit_learner
from conceptlens.precompute.learners.directions import DirectionPairs
from conceptlens.service.bundle import BundleError, load_bundle
from conceptlens.service.explain import Explainer
from conceptlens.service.head import FD_EPS, Head
from conceptlens.service.nnls import NNLSProjector
from conceptlens.service.projection import LinearProjector

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C, K, H, W_ = 64, 5, 7, 7


def planted_pairs(n: int = 8000, seed: int = 0, noise: float = 0.05):
    """Activations a (n, C) = z E + noise and the planted factors z (n, k) >= 0 and encoding
    directions E (k, C). Every direction has 10 channels of its own and draws on a block of 16
    channels shared by all (overlapping supports: the directions are correlated, so a filter that
    reads one concept has to cancel the others). Factors: one concept per pixel (amplitude
    0.5-2), a weaker second one on 30 % of the pixels, 10 % of the pixels empty; directions of
    different norms (0.5-2)."""
    rng = np.random.default_rng(seed)
    e = np.zeros((K, C))
    shared = rng.choice(C, 16, replace=False)
    own_pool = np.setdiff1d(np.arange(C), shared)
    for j in range(K):
        own = rng.choice(own_pool, 10, replace=False)
        e[j, own] = rng.uniform(0.5, 1.5, 10)
        e[j, shared] = 0.6 * rng.uniform(0, 1.5, 16) * (rng.random(16) < 0.7)
    e *= rng.uniform(0.5, 2.0, (K, 1))
    z = np.zeros((n, K))
    rows = np.arange(n)
    first, second = rng.integers(K, size=n), rng.integers(K, size=n)
    amp = rng.uniform(0.5, 2.0, n)
    z[rows, first] = amp
    z[rows, second] += amp * 0.3 * rng.random(n) * (rng.random(n) < 0.3)
    z *= rng.random((n, 1)) > 0.1
    a = z @ e + noise * rng.random((n, C))
    return a.astype(np.float32), z, e


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def correlations(responses: np.ndarray, z: np.ndarray, rows, cols) -> np.ndarray:
    return np.array([np.corrcoef(responses[:, i], z[:, j])[0, 1] for i, j in zip(rows, cols)])


@pytest.fixture(scope="module")
def planted_fit():
    a, z, e = planted_pairs()
    model = DirectionPairs(K, seed=0).fit(torch.from_numpy(a))
    enc = model.encoding_.numpy().astype(np.float64)
    dec = model.decoding_.numpy().astype(np.float64)
    cos = unit(enc) @ unit(e).T
    rows, cols = linear_sum_assignment(-cos)  # fitted pair i <-> planted pair cols[i]
    return a, z, e, model, enc, dec, rows, cols


# ---- (1) both directions of the planted pairs are recovered -------------------------------------

def test_planted_encoding_directions_recovered(planted_fit):
    a, z, e, model, enc, dec, rows, cols = planted_fit
    assert (unit(e) @ unit(e).T - np.eye(K)).max() > 0.25  # the planted directions are correlated
    assert (unit(enc) @ unit(e).T)[rows, cols].min() >= 0.95
    assert torch.equal(model.components_, model.encoding_)  # the served basis is the encoding directions


def test_planted_decoding_directions_recover_the_latent_factors(planted_fit):
    """A decoding direction is a filter: what it is for is z_k = a . d_k. Two measures, both >= 0.95:

    - the correlation of d_k . a with the planted z_k over all pixels (the filter's purpose; blind
      to the filter's scale and to components outside span(E), which only meet noise);
    - the cosine with the ideal filter of the noise-free model, the row of pinv(E)^T (the unique
      filter in span(E) with d_k . e_j = [k = j]).

    The cluster directions themselves (the centroids, what the learner served before as filters)
    read a share of every concept they overlap with: on these correlated pairs some fall short."""
    a, z, e, model, enc, dec, rows, cols = planted_fit
    assert correlations(a @ dec.T, z, rows, cols).min() >= 0.95
    ideal = np.linalg.pinv(e).T  # (k, C)
    assert (unit(dec) @ unit(ideal).T)[rows, cols].min() >= 0.95
    centroids = model.centroids_.numpy().astype(np.float64)
    assert correlations(a @ centroids.T, z, rows, cols).min() < 0.9
    # the pair's scale convention: the encoding direction is what one unit of the factor adds
    np.testing.assert_allclose(dec @ enc.T, np.eye(K), atol=1e-4)


def test_joint_signal_vectors_undo_correlated_factors(planted_fit):
    """Concepts that exclude each other at a pixel have negatively correlated factors; the
    per-concept signal vector Cov(a, z_k) / Var(z_k) mixes in the others, the joint one does not."""
    a, z, e, *_ = planted_fit
    single = DirectionPairs(K, seed=0, signal="single").fit(torch.from_numpy(a)).encoding_.numpy()
    cos = unit(single) @ unit(e).T
    r, c = linear_sum_assignment(-cos)
    assert cos[r, c].min() < 0.95


# ---- (2) the served explanation -----------------------------------------------------------------

def feature_maps(a: np.ndarray, n_img: int) -> np.ndarray:
    """(n_img, C, H, W) float32 from the first n_img * H * W pixel rows."""
    return np.ascontiguousarray(a[: n_img * H * W_].reshape(n_img, H, W_, C).transpose(0, 3, 1, 2), np.float32)


def pixels(f: np.ndarray) -> np.ndarray:
    """(H*W, C) float64 of one (C, H, W) map."""
    return f.reshape(C, -1).T.astype(np.float64)


def linear_head(seed: int = 3, classes: int = 4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((classes, C)).astype(np.float32), rng.standard_normal(classes).astype(np.float32)


def mlp_head(seed: int = 4, classes: int = 4, hidden: int = 16):
    """A non-linear head: per-pixel 1x1 convolution + ReLU, average pooling, linear."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((hidden, C)) / np.sqrt(C)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = rng.standard_normal((classes, hidden)).astype(np.float32)
    b2 = rng.standard_normal(classes).astype(np.float32)

    def head(f: np.ndarray) -> np.ndarray:
        hid = np.maximum(np.einsum("jc,nchw->njhw", w1, f.astype(np.float64)) + b1[None, :, None, None], 0)
        return (hid.mean(axis=(2, 3)) @ w2.T + b2).astype(np.float32)

    return head


NAMES = ["a", "b", "c", "d"]
CLS = 1


def check_explanation(ex: Explainer, f: np.ndarray, logits: np.ndarray, enc: np.ndarray, dec: np.ndarray,
                      head=None, contrast: int | None = None, anchor: np.ndarray | None = None) -> None:
    """The explanation of CLS for one map ``f`` against an independent computation (a non-linear
    head's weights against our own central difference at ``anchor``, when given)."""
    v = pixels(f)
    codes = np.maximum(v @ dec.astype(np.float64).T, 0)  # the latent factors, clipped at 0
    presence = codes.mean(axis=0)
    out = ex.explain(f, logits, CLS, contrast=contrast)
    scale = float(np.abs(logits).max()) + float(np.abs(presence).sum())
    assert out.identity_error <= 1e-5 * scale
    assert out.target == pytest.approx(float(logits[CLS] - (logits[contrast] if contrast is not None else 0)),
                                       abs=1e-5 * scale)
    by_id = {c.concept: c for c in out.concepts}
    assert sorted(by_id) == list(range(len(enc)))
    for j, c in by_id.items():
        np.testing.assert_allclose(c.heatmap, codes[:, j].reshape(H, W_), rtol=1e-4, atol=1e-5)
        assert c.presence == pytest.approx(presence[j], rel=1e-4, abs=1e-6)
        assert c.contribution == pytest.approx(c.presence * c.weight, rel=1e-5, abs=1e-6)
    if ex.bundle.head_kind == "linear":
        w, b = ex.bundle.head_weight.astype(np.float64), ex.bundle.head_bias.astype(np.float64)
        u = w[CLS] - (w[contrast] if contrast is not None else 0)
        bias = b[CLS] - (b[contrast] if contrast is not None else 0)
        weights = enc.astype(np.float64) @ u  # contribution_k = presence_k * (e_k . u)
        for j, c in by_id.items():
            assert c.weight == pytest.approx(weights[j], rel=1e-4, abs=1e-5)
            assert c.contribution == pytest.approx(presence[j] * weights[j], rel=1e-4, abs=1e-5)
        residual = v.mean(axis=0) @ u - presence @ weights  # GAP(V) . u - sum_k s_k w_k
        assert out.residual == pytest.approx(residual, rel=1e-4, abs=1e-4)
        assert out.bias == pytest.approx(bias, rel=1e-6, abs=1e-6)
    else:
        recon = (codes @ enc.astype(np.float64)).T.reshape(1, C, H, W_).astype(np.float32)

        def sel(z):
            return float(z[CLS] - (z[contrast] if contrast is not None else 0))
        at_recon = sel(head(recon)[0])
        # the identity holds by construction here (the bias is what remains): the parts are checked
        assert out.residual == pytest.approx(sel(logits) - at_recon, rel=1e-4, abs=1e-4)
        weights = np.array([by_id[j].weight for j in range(len(enc))], np.float64)
        assert out.bias == pytest.approx(at_recon - float(presence @ weights), rel=1e-4, abs=1e-4)
        if anchor is not None:  # d target / d presence_k at the anchor, by a step 3x the code's (ReLU head)
            step = 3 * FD_EPS
            own = np.array([(sel(head(anchor[None] + step * e[:, None, None])[0])
                             - sel(head(anchor[None] - step * e[:, None, None])[0])) / (2 * step)
                            for e in enc.astype(np.float32)])
            np.testing.assert_allclose(weights, own, rtol=0, atol=0.05 * float(np.abs(own).max()))


@pytest.fixture(scope="module")
def fitted_maps(planted_fit):
    a, z, e, model, enc, dec, rows, cols = planted_fit
    feats = feature_maps(a, 12)
    return feats, z[: 12 * H * W_], model.encoding_.numpy(), model.served_tensors()["decoding"], rows, cols


def test_served_linear_head(fitted_maps):
    feats, z, enc, dec, rows, cols = fitted_maps
    w, b = linear_head()
    weights = Head(weight=w, bias=b).concept_weights(enc, CLS)
    ex = single_class_explainer(NAMES, CLS, enc, weights, w, b, None, "directions", None, {f"decoding/{CLS}": dec})
    proj = ex.projector(CLS)
    assert isinstance(proj, LinearProjector)
    np.testing.assert_array_equal(proj.basis, enc)
    logits = feats.mean(axis=(2, 3)) @ w.T + b
    for f, lg in zip(feats[:4], logits[:4]):
        check_explanation(ex, f, lg, enc, dec)
        check_explanation(ex, f, lg, enc, dec, contrast=3)  # "1 rather than 3" on the class's pairs

    # what precompute evaluates is what is served: codes, reconstruction, identity
    codes = served_codes(ex, CLS, feats)
    v = feats.transpose(0, 2, 3, 1).reshape(len(feats), -1, C).astype(np.float64)
    np.testing.assert_allclose(codes, np.maximum(v @ dec.astype(np.float64).T, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reconstruct(ex, CLS, feats, codes),
                               (codes @ enc).transpose(0, 2, 1).reshape(feats.shape), rtol=1e-5, atol=1e-5)
    metrics = evaluate_class(ex, CLS, feats, w, b)
    assert metrics["identity_max_error"] < 1e-3
    # the heatmaps are the planted latent factors (matched pair by pair)
    flat = codes.reshape(-1, K)
    assert correlations(flat, z, rows, cols).min() >= 0.95


def test_served_nonlinear_head(fitted_maps):
    feats, z, enc, dec, rows, cols = fitted_maps
    head = mlp_head()
    anchor = feats.mean(axis=0)
    weights = Head(fn=head).concept_weights(enc, CLS, anchor=anchor)  # finite differences along e_k
    ex = single_class_explainer(NAMES, CLS, enc, weights, None, None, head, "directions", anchor,
                                {f"decoding/{CLS}": dec})
    assert isinstance(ex.projector(CLS), LinearProjector)
    logits = head(feats)
    for f, lg in zip(feats[:4], logits[:4]):
        check_explanation(ex, f, lg, enc, dec, head=head, anchor=anchor)
        check_explanation(ex, f, lg, enc, dec, head=head, contrast=0, anchor=anchor)
    assert evaluate_class(ex, CLS, feats, None, None, head)["identity_max_error"] < 1e-3


def test_contrast_projector_on_a_directions_class(fitted_maps):
    """A precomputed (or on-request) contrast basis is NNLS, as before; the identity holds on a
    directions class too."""
    feats, z, enc, dec, *_ = fitted_maps
    w, b = linear_head()
    pc = np.abs(np.random.default_rng(9).standard_normal((3, C))).astype(np.float32)
    base = single_class_explainer(NAMES, CLS, enc, Head(weight=w, bias=b).concept_weights(enc, CLS), w, b, None,
                                  "directions", None, {f"decoding/{CLS}": dec})
    ex = Explainer(base.bundle, contrast_projectors=lambda a, c: (NNLSProjector.from_basis(pc), "contrast"))
    f = feats[0]
    logits = f.mean(axis=(1, 2)) @ w.T + b
    out = ex.explain(f, logits, CLS, contrast=2)
    assert out.method == "contrast" and len(out.concepts) == 3
    assert out.identity_error < 1e-4 * (1 + abs(out.target))
    assert isinstance(ex.projector(CLS), LinearProjector)


def write_directions_bundle(out, enc, dec, w, b):
    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.service.manifest import ClassEntry, HeadCard, MethodCard, ModelCard, Preprocessing

    onnx = out.parent / "model.onnx"
    onnx.write_bytes(b"not read by load_bundle")
    nmf_basis = np.abs(np.random.default_rng(5).standard_normal((3, C))).astype(np.float32)
    tensors = {f"basis/{CLS}": enc, f"weights/{CLS}": (enc @ w[CLS]).astype(np.float32), f"decoding/{CLS}": dec,
               "basis/2": nmf_basis, "weights/2": (nmf_basis @ w[2]).astype(np.float32)}
    classes = {CLS: ClassEntry(name=NAMES[CLS], k=len(enc), method="directions"),
               2: ClassEntry(name=NAMES[2], k=3, method="nmf")}
    return write_bundle(out, model_onnx=onnx,
                        model=ModelCard(source="onnx:model.onnx", name="planted", file_sha256="", layer="features",
                                        feature_shape=(C, H, W_), num_classes=len(NAMES),
                                        head=HeadCard("linear", "head.safetensors")),
                        class_names=NAMES, preprocessing=Preprocessing(), head_weight=w, head_bias=b,
                        head_onnx=None, classes=classes, tensors=tensors, prototypes={}, prototype_jpegs={},
                        method=MethodCard("directions", {"concepts": len(enc)}))


def test_bundle_carries_the_decoding_directions(fitted_maps, tmp_path):
    feats, z, enc, dec, *_ = fitted_maps
    w, b = linear_head()
    bundle = load_bundle(write_directions_bundle(tmp_path / "bundle", enc, dec, w, b))
    assert bundle.classes[CLS].decoding.shape == (K, C) and bundle.classes[CLS].decoding.dtype == np.float32
    assert bundle.classes[2].decoding is None
    ex = Explainer(bundle)
    assert isinstance(ex.projector(CLS), LinearProjector) and isinstance(ex.projector(2), NNLSProjector)
    logits = feats.mean(axis=(2, 3)) @ w.T + b
    check_explanation(ex, feats[0], logits[0], enc, dec)
    nmf = ex.explain(feats[0], logits[0], 2)  # the other method's class is untouched
    assert nmf.identity_error < 1e-4 * (1 + abs(nmf.target))


def test_bundle_refuses_decoding_of_the_wrong_shape(fitted_maps, tmp_path):
    feats, z, enc, dec, *_ = fitted_maps
    w, b = linear_head()
    path = write_directions_bundle(tmp_path / "bad", enc, dec[:-1], w, b)
    with pytest.raises(BundleError, match="decoding directions of class 1"):
        load_bundle(path)


def test_linear_projector_validates_and_clips():
    enc = np.eye(2, 3, dtype=np.float32)
    with pytest.raises(ValueError):
        LinearProjector.from_pair(enc, np.ones((3, 3), np.float32))
    proj = LinearProjector.from_pair(enc, np.array([[1, -1, 0], [0, 1, 0]], np.float32))
    v = np.array([[1.0, 2.0, 5.0], [3.0, 1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(proj.project(v), [[0.0, 2.0], [2.0, 1.0]])
    assert proj.project(v).dtype == np.float32


# ---- (3) the precompute entry ------------------------------------------------------------------

def test_fit_learner_serves_the_decoding_directions():
    a, z, e = planted_pairs(n=20 * H * W_, seed=1)
    feats = feature_maps(a, 20)
    learner = fit_learner("directions", feats, k=K, class_id=0, head_weight=None, head_bias=None, seed=0,
                          device=torch.device("cpu"))
    served = learner.served_tensors()
    assert set(served) == {"decoding"}
    assert served["decoding"].shape == (K, C) and served["decoding"].dtype == np.float32
    assert tuple(learner.components_.shape) == (K, C)
    np.testing.assert_allclose(served["decoding"] @ learner.components_.numpy().T, np.eye(K), atol=1e-3)

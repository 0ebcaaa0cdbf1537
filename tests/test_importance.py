"""Concept importance by Sobol total-order indices (CRAFT's estimator) against closed forms, the
C-Del / C-Ins of both concept orderings recomputed independently, and DeepLift attributions against
DeepLift's known results (issue 12)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptlens.precompute.checks import attribution_pixels, concept_curves
from conceptlens.precompute.evaluate import single_class_explainer
from conceptlens.precompute.importance import (halton_ab, jansen_total_order, replicated_design,
                                               sobol_total_order)
from conceptlens.precompute.learners.attribution import (AttributionNMF, attribution_method, deeplift_feature_map,
                                                         reference_features, reference_image)
from conceptlens.precompute.learners.contrast import filter_pixels


def linear_total_order(codes: np.ndarray, basis: np.ndarray, w: np.ndarray, cid: int) -> np.ndarray:
    """The exact total-order indices for a GAP+linear head and independent U(0, 1) masks.

    The image's logit under masks m is f(m) = sum_j m_j u_j + const, u_j = mean_p S[p, j] (P_j . W[y]).
    The masks are independent, so Var f = sum_j u_j^2 Var(m_j) = sum_j u_j^2 / 12, and with every mask
    but m_j fixed the variance left is u_j^2 / 12: ST_j = u_j^2 / sum_l u_l^2 (no interactions, so it
    is also the first-order index). The class's importance is the mean over the images."""
    u = codes.astype(np.float64).mean(axis=1) * (basis.astype(np.float64) @ w[cid].astype(np.float64))
    return (u ** 2 / (u ** 2).sum(axis=1, keepdims=True)).mean(axis=0)


def random_case(n=8, hw=(3, 3), k=5, c=6, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    h, w = hw
    codes = (rng.uniform(0, 1, (n, h * w, k)) * rng.uniform(0.2, 3.0, k)).astype(np.float32)
    basis = rng.uniform(0, 1, (k, c)).astype(np.float32)
    head_w = rng.normal(size=(classes, c)).astype(np.float32)
    return codes, basis, head_w, (c, h, w)


# ---- the estimator ---------------------------------------------------------------------------------

def test_replicated_design_layout():
    a, b = halton_ab(3, 8, seed=1)
    m = replicated_design(a, b)
    assert m.shape == (8 * 5, 3) and (m >= 0).all() and (m < 1).all()
    np.testing.assert_array_equal(m[:8], a)
    np.testing.assert_array_equal(m[8:16], b)
    for j in range(3):
        cj = m[16 + 8 * j:16 + 8 * (j + 1)]
        np.testing.assert_array_equal(cj[:, j], b[:, j])
        np.testing.assert_array_equal(np.delete(cj, j, axis=1), np.delete(a, j, axis=1))
    # scrambled: every coordinate spreads over [0, 1] even for high prime bases
    a, _ = halton_ab(10, 32, seed=0)
    assert a.max(axis=0).min() > 0.8


def test_jansen_on_an_additive_function_with_known_indices():
    """f(m) = 4 m_0 + 2 m_1 + 0 m_2: ST = (16, 4, 0) / 20, by the estimator alone."""
    n = 4096
    m = replicated_design(*halton_ab(3, n, seed=3))
    st = jansen_total_order(m @ np.array([4.0, 2.0, 0.0]), n, 3)
    np.testing.assert_allclose(st, [0.8, 0.2, 0.0], atol=0.01)
    with pytest.raises(ValueError):
        jansen_total_order(np.zeros(10), n, 3)


def test_sobol_linear_head_matches_closed_form():
    codes, basis, head_w, shape = random_case()
    exact = linear_total_order(codes, basis, head_w, cid=1)
    est = sobol_total_order(codes, basis, head_w, 1, shape, n_designs=4096, seed=0)
    np.testing.assert_allclose(est, exact, atol=0.01)
    assert np.argsort(-est).tolist() == np.argsort(-exact).tolist()
    # CRAFT's 32 designs: close, not exact
    np.testing.assert_allclose(sobol_total_order(codes, basis, head_w, 1, shape), exact, atol=0.15)


def test_sobol_head_function_path_equals_linear_path():
    """The general path (perturbed activations through a head function) on the same masks."""
    codes, basis, head_w, shape = random_case(n=4, seed=2)
    bias = np.arange(4, dtype=np.float32)
    fn = lambda a: a.mean(axis=(2, 3)) @ head_w.T + bias  # noqa: E731
    for nd in (8, 64):
        np.testing.assert_allclose(sobol_total_order(codes, basis, fn, 2, shape, n_designs=nd, seed=5),
                                   sobol_total_order(codes, basis, (head_w, bias), 2, shape, n_designs=nd, seed=5),
                                   rtol=1e-4, atol=1e-6)


def test_sobol_of_an_absent_concept_is_zero_and_seeded():
    codes, basis, head_w, shape = random_case(seed=4)
    codes[:, :, 3] = 0
    fn = lambda a: a.mean(axis=(2, 3)) @ head_w.T  # noqa: E731
    for head in (head_w, fn):
        st = sobol_total_order(codes, basis, head, 0, shape, n_designs=16)
        assert st[3] == pytest.approx(0.0, abs=1e-9) and (st[[0, 1, 2, 4]] > 0).all()
    a = sobol_total_order(codes, basis, head_w, 0, shape, seed=7)
    np.testing.assert_array_equal(a, sobol_total_order(codes, basis, head_w, 0, shape, seed=7))
    assert not np.array_equal(a, sobol_total_order(codes, basis, head_w, 0, shape, seed=8))
    assert sobol_total_order(codes[:0], basis, head_w, 0, shape).tolist() == [0.0] * 5


def test_sobol_non_linear_head_interaction():
    """f = relu(u_0 m_0 + u_1 m_1 - 1) per image: m_1 alone cannot lift the logit, but it interacts
    with m_0, so its total-order index is positive and below concept 0's."""
    codes = np.zeros((1, 1, 3), np.float32)
    codes[0, 0] = [2.0, 0.5, 0.0]
    basis = np.eye(3, dtype=np.float32)
    fn = lambda a: np.maximum(a[:, :, 0, 0] @ np.ones((3, 1), np.float32) - 1.0, 0)  # noqa: E731
    st = sobol_total_order(codes, basis, fn, 0, (3, 1, 1), n_designs=2048)
    assert st[0] > st[1] > 0.05 and st[2] == 0.0


# ---- C-Del / C-Ins of both orderings ---------------------------------------------------------------

def ordering_case(seed=0):
    """Concept 0 dominates the logit of a third of the images (large mean contribution), concept 1
    carries the logit of the other two thirds (smaller mean, larger Sobol importance), concept 2 is
    small everywhere. Linear head over 3 channels = 3 concepts; class 0 wins when the kept
    concepts' presence sums above 0.5 (class 1's constant logit)."""
    rng = np.random.default_rng(seed)
    n, h, w = 30, 2, 2
    s = np.zeros((n, 3))
    big = np.arange(n) < n // 3
    s[big] = [10.0, 0.0, 0.3]
    s[~big] = [0.1, 1.0, 0.3]
    s *= rng.uniform(0.95, 1.05, s.shape)
    jitter = rng.uniform(0.5, 1.5, (n, h * w, 3))
    codes = (s[:, None, :] * jitter / jitter.mean(axis=1, keepdims=True)).astype(np.float32)  # mean over pixels = s
    basis = np.eye(3, dtype=np.float32)
    head_w = np.array([[1, 1, 1], [0, 0, 0]], np.float32)
    head_b = np.array([0.0, 0.5], np.float32)
    return codes, basis, head_w, head_b, (n, 3, h, w)


def independent_curves(codes, head_w, head_b, order):
    """Deletion / insertion accuracies, C-Del, C-Ins for an order, from presences and the head alone."""
    s = codes.astype(np.float64).mean(axis=1)  # (N, k); basis = identity
    k = s.shape[1]

    def acc(keep):
        logits = (s * keep) @ head_w.T.astype(np.float64) + head_b
        return float((logits.argmax(axis=1) == 0).mean())

    dele = [acc(np.isin(np.arange(k), order[:i], invert=True)) for i in range(k + 1)]
    ins = [acc(np.isin(np.arange(k), order[:i])) for i in range(k + 1)]
    return dele, ins, sum(dele[0] - a for a in dele) / (k + 1), float(np.mean(ins[1:]))


@pytest.mark.parametrize("chosen", ["contribution", "sobol"])
def test_concept_curves_both_orderings(chosen):
    codes, basis, head_w, head_b, shape = ordering_case()
    n, c, h, w = shape
    feats = np.zeros(shape, np.float32)  # only its shape is used: the codes are given
    weights = basis @ head_w[0]
    ex = single_class_explainer(["a", "b"], 0, basis, weights, head_w, head_b)
    out = concept_curves(ex, 0, feats, head_w, head_b, None, codes, importance=chosen)

    contribution = (codes.mean(axis=1) * weights).mean(axis=0)
    sobol = linear_total_order(codes, basis, head_w, 0)
    orders = {"contribution": np.argsort(-contribution), "sobol": np.argsort(-sobol)}
    assert orders["contribution"].tolist() == [0, 1, 2] and orders["sobol"].tolist() == [1, 0, 2]
    np.testing.assert_allclose(out["contribution_importance"], contribution, rtol=1e-5)
    np.testing.assert_allclose(out["sobol_importance"], sobol, atol=0.1)  # 32 designs
    assert np.argsort(-np.array(out["sobol_importance"])).tolist() == [1, 0, 2]
    for name, order in orders.items():
        dele, ins, c_del, c_ins = independent_curves(codes, head_w, head_b, order)
        assert out[f"deletion_curve_{name}"] == dele and out[f"insertion_curve_{name}"] == ins
        assert out[f"c_del_{name}"] == pytest.approx(c_del) and out[f"c_ins_{name}"] == pytest.approx(c_ins)
    # the two orderings give different scores here: Sobol's order deletes faster and inserts faster
    assert out["c_del_sobol"] > out["c_del_contribution"] and out["c_ins_sobol"] > out["c_ins_contribution"]
    # the unsuffixed keys are the chosen ordering's
    assert out["importance_kind"] == chosen
    assert out["importance"] == out[f"{chosen}_importance"]
    assert out["c_del"] == out[f"c_del_{chosen}"] and out["c_ins"] == out[f"c_ins_{chosen}"]
    assert out["deletion_curve"] == out[f"deletion_curve_{chosen}"]
    assert out["insertion_curve"] == out[f"insertion_curve_{chosen}"]
    assert out["gini"] == out[f"gini_{chosen}"] and out["accuracy_reconstructed"] == 1.0
    assert 0 < out["sparsity"] <= 1


def test_concept_curves_generic_head_and_bad_importance():
    codes, basis, head_w, head_b, shape = ordering_case(seed=1)
    weights = basis @ head_w[0]
    fn = lambda a: a.mean(axis=(2, 3)) @ head_w.T + head_b  # noqa: E731
    feats = np.zeros(shape, np.float32)
    ex = single_class_explainer(["a", "b"], 0, basis, weights, head_w, head_b)
    lin = concept_curves(ex, 0, feats, head_w, head_b, None, codes, importance="sobol")
    gen = concept_curves(ex, 0, feats, None, None, fn, codes, importance="sobol")
    np.testing.assert_allclose(gen["sobol_importance"], lin["sobol_importance"], rtol=1e-4, atol=1e-6)
    for key in ("c_del_sobol", "c_ins_sobol", "c_del_contribution", "c_ins_contribution"):
        assert gen[key] == pytest.approx(lin[key])
    with pytest.raises(ValueError, match="importance"):
        concept_curves(ex, 0, feats, head_w, head_b, None, codes, importance="shap")


# ---- DeepLift --------------------------------------------------------------------------------------

def test_attribution_pixels_deeplift_linear_head():
    """DeepLift of a linear model is gradient x (input - baseline): here W[y, c] (a - a0) / (H W)."""
    pytest.importorskip("captum")
    rng = np.random.default_rng(0)
    feats = rng.uniform(0, 2, (5, 8, 4, 4)).astype(np.float32)
    head_w = rng.normal(size=(3, 8)).astype(np.float32)
    ref = rng.uniform(0, 1, (8, 4, 4)).astype(np.float32)
    expected_map = np.maximum(np.einsum("nchw,c->nhw", feats - ref, head_w[2]) / (8 * 16), 0)
    np.testing.assert_allclose(deeplift_feature_map(torch.from_numpy(feats), head_w, 2, ref).numpy(), expected_map,
                               rtol=1e-5, atol=1e-7)
    expected = filter_pixels(torch.from_numpy(feats), torch.from_numpy(expected_map), 0.25).numpy()
    got = attribution_pixels(feats, head_w, 2, max_pixels=10_000, seed=0, method="deeplift", reference=ref)
    assert len(got) > 0
    np.testing.assert_array_equal(got, expected)
    # a zero reference: DeepLift of a linear head is gradient x activation
    np.testing.assert_allclose(attribution_pixels(feats, head_w, 2, 10_000, 0, method="deeplift"),
                               attribution_pixels(feats, head_w, 2, 10_000, 0, method="gradxact"))
    np.testing.assert_array_equal(attribution_pixels(feats, head_w, 2, 10_000, 0, method="grad_x_act"),
                                  attribution_pixels(feats, head_w, 2, 10_000, 0))
    with pytest.raises(ValueError, match="attribution"):
        attribution_pixels(feats, head_w, 2, 10, 0, method="lime")


def test_deeplift_rescale_rule_through_a_relu_head():
    """GAP -> Linear -> ReLU -> Linear: each hidden unit's multiplier is (relu(z) - relu(z0)) / (z - z0)
    (DeepLift's rescale rule), and the attributions sum to f(a) - f(a0) (summation to delta)."""
    pytest.importorskip("captum")
    torch.manual_seed(0)
    c, m, k = 6, 5, 3
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, m),
                               torch.nn.ReLU(), torch.nn.Linear(m, k)).eval()
    a = torch.rand(4, c, 3, 3) * 2
    a0 = torch.rand(c, 3, 3)
    w1, b1, w2 = head[2].weight.detach(), head[2].bias.detach(), head[4].weight.detach()
    z, z0 = a.mean(dim=(2, 3)) @ w1.T + b1, a0.mean(dim=(1, 2)) @ w1.T + b1  # (N, m), (m,)
    dz = z - z0
    rescale = torch.where(dz.abs() > 1e-6, (z.clamp(min=0) - z0.clamp(min=0)) / dz.where(dz.abs() > 1e-6, 1.0),
                          (z > 0).float())
    mult = (w2[1] * rescale) @ w1 / 9  # (N, C): d-lift multiplier of each feature pixel
    attr = (a - a0) * mult[:, :, None, None]
    with torch.no_grad():
        delta = head(a)[:, 1] - head(a0[None])[0, 1]
    torch.testing.assert_close(attr.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(deeplift_feature_map(a, head, 1, a0), attr.mean(1).clamp(min=0), rtol=1e-4, atol=1e-6)


def test_attribution_learner_accepts_both_spellings_and_deeplift():
    pytest.importorskip("captum")
    rng = np.random.default_rng(1)
    feats = rng.uniform(0, 1, (12, 8, 3, 3)).astype(np.float32)
    head_w = rng.uniform(0, 1, (3, 8)).astype(np.float32)
    head_b = np.zeros(3, np.float32)

    def fit(params):
        return AttributionNMF.fit_class(feats, k=2, class_id=0, head_weight=head_w, head_bias=head_b, seed=0,
                                        device="cpu", params=params).components_

    plain = fit({})
    torch.testing.assert_close(fit({"attribution": "grad_x_act"}), plain)
    torch.testing.assert_close(fit({"attribution": "gradxact"}), plain)
    torch.testing.assert_close(fit({"attribution": "deeplift"}), plain, rtol=1e-4, atol=1e-5)  # zero reference
    ref = np.full((8, 3, 3), 0.3, np.float32)
    assert not torch.allclose(fit({"attribution": "deeplift", "deeplift_reference": ref}), plain)
    assert attribution_method("grad_x_act") == "gradxact" and attribution_method(None) == "gradxact"
    with pytest.raises(ValueError):
        AttributionNMF(2, method="saliency")


def test_reference_features_of_the_constant_image():
    img = reference_image(16)
    assert img.shape == (1, 3, 16, 16) and (img == 1.0).all()
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU()).eval()
    got = reference_features(features, 16)
    with torch.no_grad():
        want = features(torch.ones(1, 3, 16, 16))[0].numpy()
    np.testing.assert_allclose(got, want)
    np.testing.assert_allclose(reference_features(lambda x: (features(torch.from_numpy(x)).detach().numpy(), None), 16),
                               want)

"""Concept learners on synthetic activations with known answers (planted non-negative directions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from conceptlens.precompute.learners import LEARNERS, NMF, AttributionNMF, DirectionPairs, FACE
from conceptlens.precompute.learners.attribution import attribution_map, deeplift_map
from conceptlens.precompute.learners.contrast import (contrast_concepts, filter_pixels, fit_hyperplane,
                                                      shift_curve, shift_test)
from conceptlens.precompute.learners.face import (NNLSCodes, _FaceObjective, nnls_codes, reference_face_adam,
                                                  served_metrics, sweep_lambda)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def directions(k: int, c: int, seed: int, density: float = 0.35, channels: slice = slice(None)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.zeros(k, c)
    sub = d[:, channels]
    sub += torch.rand(sub.shape, generator=g) * (torch.rand(sub.shape, generator=g) < density)
    return d / d.norm(dim=1, keepdim=True)


def codes(n: int, k: int, seed: int) -> torch.Tensor:
    """Mostly one concept per pixel (amplitude 0.5-2), a weaker second one on 30 %, 10 % empty."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(n, k)
    rows = torch.arange(n)
    first, second = torch.randint(k, (n,), generator=g), torch.randint(k, (n,), generator=g)
    amp = 0.5 + 1.5 * torch.rand(n, generator=g)
    s[rows, first] = amp
    s[rows, second] += amp * 0.3 * torch.rand(n, generator=g) * (torch.rand(n, generator=g) < 0.3)
    return s * (torch.rand(n, 1, generator=g) > 0.1)


def planted(n_img: int = 40, hw: int = 16, c: int = 64, k: int = 5, seed: int = 0, noise: float = 0.01):
    """acts (N, HW, C) = codes @ D + noise, and the planted D (k, C)."""
    d = directions(k, c, seed=100)
    g = torch.Generator().manual_seed(seed + 1)
    acts = codes(n_img * hw, k, seed) @ d + noise * torch.rand(n_img * hw, c, generator=g)
    return acts.reshape(n_img, hw, c), d


def matched_cosines(learned, truth) -> np.ndarray:
    a = torch.nn.functional.normalize(torch.as_tensor(learned, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(truth, dtype=torch.float64), dim=1)
    cos = (a @ b.T).numpy()
    r, c = linear_sum_assignment(-cos)
    return cos[r, c]


# ---- (a) planted directions are recovered -----------------------------------------------------------

def _fit(name: str, acts: torch.Tensor, head_w: torch.Tensor, k: int) -> torch.Tensor:
    n, hw, c = acts.shape
    if name == "nmf":
        return NMF(k).fit(acts.reshape(-1, c)).components_
    if name == "face":
        return FACE(k, lam=0.1, max_iter=50).fit(acts, head_w, torch.zeros(head_w.shape[0])).components_
    if name == "attribution":
        grid = acts.reshape(n, 4, 4, c).permute(0, 3, 1, 2)
        return AttributionNMF(k).fit(grid, head_w, None, class_id=0).components_
    return DirectionPairs(k).fit(acts.reshape(-1, c)).components_


@pytest.mark.parametrize("name", ["nmf", "face", "attribution", "directions"])
def test_recovers_planted_directions(name):
    acts, d = planted()
    g = torch.Generator().manual_seed(7)
    head_w = torch.cat([torch.ones(1, 64), torch.randn(4, 64, generator=g)])  # class 0 likes every concept
    basis = _fit(name, acts, head_w, k=5)
    assert basis.shape == (5, 64) and (basis >= 0).all()
    assert matched_cosines(basis, d).min() > 0.95


def test_registry():
    assert set(LEARNERS) == {"nmf", "face", "attribution", "directions", "seminmf"}
    assert LEARNERS["face"] is FACE


def test_nnls_codes_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 12, generator=g, dtype=torch.float64)
    v = torch.rand(30, 12, generator=g, dtype=torch.float64) * (torch.rand(30, 12, generator=g) < 0.5)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)

    def loss(p):
        s = NNLSCodes.apply(v @ p.T, p @ p.T, None)
        return (s * weights).sum() + s.square().sum()

    p.requires_grad_(True)
    loss(p).backward()
    num = torch.zeros_like(p)
    with torch.no_grad():
        for i in range(p.shape[0]):
            for j in range(p.shape[1]):
                e = torch.zeros_like(p)
                e[i, j] = 1e-6
                num[i, j] = (loss(p + e) - loss(p - e)) / 2e-6
    torch.testing.assert_close(p.grad, num, atol=1e-5, rtol=1e-4)
    s = nnls_codes(v @ p.detach().T, p.detach() @ p.detach().T)
    from conceptlens.service.nnls import NNLSProjector
    served = NNLSProjector.from_basis(p.detach().numpy()).project(v.numpy())
    np.testing.assert_allclose(s.numpy(), served, atol=1e-3)


def test_face_objective_gradient_matches_autograd_through_nnls():
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(5, 6, 12, generator=g, dtype=torch.float64) * (torch.rand(5, 6, 12, generator=g) < 0.6)
    w, b = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    p = torch.rand(4, 12, generator=g, dtype=torch.float64)
    loss, grad, _ = _FaceObjective(acts, w, b, lam=0.7, class_id=None)(p)

    p.requires_grad_(True)
    v = acts.reshape(-1, 12)
    s = NNLSCodes.apply(v @ p.T, p @ p.T, None)
    logp = torch.log_softmax(acts.mean(1) @ w.T + b, 1)
    logq = torch.log_softmax(s.view(5, 6, 4).mean(1) @ (p @ w.T) + b, 1)
    ref = torch.nn.functional.mse_loss(s @ p, v) + 0.7 * (logp.exp() * (logp - logq)).sum() / 5
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(grad, p.grad, atol=1e-7, rtol=1e-6)


# ---- (b) NMF parity with scikit-learn ----------------------------------------------------------------

def test_nmf_matches_sklearn_reconstruction():
    from sklearn.decomposition import NMF as SkNMF

    acts, _ = planted(n_img=60, noise=0.05)
    x = acts.reshape(-1, 64).double().numpy()
    sk = SkNMF(n_components=5, init="nndsvda", solver="cd", max_iter=200, tol=1e-4, random_state=0)
    w = sk.fit_transform(x)
    err_sk = np.linalg.norm(x - w @ sk.components_) / np.linalg.norm(x)
    ours = NMF(5, dtype=torch.float64)
    codes_ = ours.fit_transform(torch.from_numpy(x))
    err_ours = float((torch.from_numpy(x) - codes_ @ ours.components_).norm() / np.linalg.norm(x))
    assert abs(err_ours - err_sk) <= 0.01 * err_sk


# ---- (c) FACE: held-out fidelity where NMF loses the head's signal ----------------------------------

def fidelity_data(n_img: int, seed: int, hw: int = 16, c: int = 64):
    """6 strong concepts the head ignores (channels 0-47) and 2 weak ones (48-63) that decide the class.

    NMF with k = 6 spends its components on the strong ones, so the served projection loses the class.
    """
    d = torch.cat([directions(6, c, 1234, 0.3, slice(0, 48)), directions(2, c, 4321, 0.5, slice(48, None))])
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n_img, hw, 8, generator=g) * (torch.rand(n_img, hw, 8, generator=g) < 0.3)
    s[..., :6] *= 2.0
    cls = torch.randint(0, 2, (n_img,), generator=g)
    weak = s[..., 6:] * 0.08
    weak[torch.arange(n_img), :, cls] *= 5
    s[..., 6:] = weak
    acts = s @ d + 0.01 * torch.rand(n_img, hw, c, generator=g)
    return acts, 30 * d[6:], torch.zeros(2)


def test_face_improves_heldout_logit_fidelity_over_nmf():
    acts, w, b = fidelity_data(100, seed=0)
    acts_val, _, _ = fidelity_data(100, seed=1)
    nmf_basis = NMF(6).fit(acts.reshape(-1, 64)).components_
    face = FACE(6, lam=1.0, max_iter=100).fit(acts, w, b, init=nmf_basis)
    m_nmf = served_metrics(acts_val, nmf_basis, w, b)
    m_face = served_metrics(acts_val, face.components_, w, b)
    assert m_face["logit_err"] < 0.5 * m_nmf["logit_err"]
    assert m_face["top1"] > m_nmf["top1"] + 0.2
    assert m_face["kl"] < m_nmf["kl"]
    assert m_face["mse"] > m_nmf["mse"]  # the price: reconstruction


def test_sweep_lambda_picks_by_heldout_fidelity():
    acts, w, b = fidelity_data(60, seed=0)
    acts_val, _, _ = fidelity_data(60, seed=1)
    best, rows = sweep_lambda(acts, acts_val, (w, b), [0.0, 1.0], n_components=6, max_iter=60)
    assert [r["lam"] for r in rows] == [0.0, 1.0]
    assert best == 1.0 and rows[1]["val_logit_err"] < rows[0]["val_logit_err"]


def test_face_takes_a_model_head_without_touching_it():
    acts, _ = planted(n_img=10)
    fc = torch.nn.Linear(64, 3)
    face = FACE(5, lam=0.5, max_iter=5).fit(acts, fc.weight, fc.bias)
    assert fc.weight.grad is None and fc.bias.grad is None
    assert served_metrics(acts, face.components_, fc.weight, fc.bias)["top1"] >= 0
    assert attribution_map(acts.reshape(10, 4, 4, 64).permute(0, 3, 1, 2), fc.weight, 0).requires_grad is False


def test_reference_face_adam_runs_the_reference_rule():
    acts, d = planted(n_img=10)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    res = reference_face_adam(acts, w, torch.zeros(3), n_components=5, lam=1.0, max_steps=30)
    assert res.components.shape == (5, 64) and res.codes.shape == (160, 5)
    assert (res.components >= 0).all() and (res.codes >= 0).all()
    assert res.steps == len(res.losses) <= 30


# ---- attribution -------------------------------------------------------------------------------------

def test_attribution_closed_form_matches_autograd():
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(3, 8, 4, 4, generator=g)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    closed = attribution_map(acts, w, class_id=2)
    auto = attribution_map(acts, lambda a: a.mean(dim=(2, 3)) @ w.T + b, class_id=2)
    assert closed.shape == (3, 4, 4)
    torch.testing.assert_close(closed, auto)


def test_attribution_nmf_ignores_concepts_against_the_class():
    """5 concepts support class 0 (channels 0-47), 3 oppose it (48-63) in pixels of their own."""
    k_pos, k_neg, n_img = 5, 3, 40
    d_pos, d_neg = directions(k_pos, 64, 11, 0.35, slice(0, 48)), directions(k_neg, 64, 12, 0.5, slice(48, None))
    n = n_img * 16
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(n, 1, generator=g) < 0.6
    x = torch.where(pos, codes(n, k_pos, 1) @ d_pos, 1.5 * codes(n, k_neg, 2) @ d_neg)
    acts = x.reshape(n_img, 4, 4, 64).permute(0, 3, 1, 2).contiguous()
    w = torch.cat([torch.ones(48), -torch.ones(16)])[None].repeat(2, 1)
    basis = AttributionNMF(k_pos).fit(acts, w, None, class_id=0).components_
    assert matched_cosines(basis, d_pos).min() > 0.95
    plain = NMF(k_pos).fit(x).components_
    assert matched_cosines(plain, d_pos).min() < 0.9  # plain NMF spends components on the others


def test_deeplift_map_shape():
    pytest.importorskip("captum")
    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.ReLU())
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4))
    maps = deeplift_map(torch.randn(2, 3, 16, 16), features, head, class_id=1)
    assert maps.shape == (2, 8, 8) and (maps >= 0).all()


# ---- directions --------------------------------------------------------------------------------------

def test_direction_pairs_signal_vectors():
    acts, d = planted(n_img=60)
    x = acts.reshape(-1, 64)
    dp = DirectionPairs(5).fit(x)
    assert torch.allclose(dp.decoding_.norm(dim=1), torch.ones(5))
    assert dp.encoding_.shape == (5, 64) and dp.labels_.shape == (x.shape[0],)
    assert matched_cosines(dp.encoding_, d).min() > 0.9
    again = DirectionPairs(5).fit(x)
    assert torch.equal(again.decoding_, dp.decoding_)  # seeded


# ---- (d) contrast ------------------------------------------------------------------------------------

def contrast_data(n_img: int, seed: int):
    """Class 0 images: concepts 0-2 + shared 6-7; class 1: concepts 3-5 + shared. acts (N, C, 4, 4)."""
    d = directions(8, 64, 21)
    g = torch.Generator().manual_seed(seed)
    out = []
    for own in (slice(0, 3), slice(3, 6)):
        s = torch.zeros(n_img * 16, 8)
        s[:, own] = codes(n_img * 16, 3, seed + own.start)
        s[:, 6:] = 0.7 * codes(n_img * 16, 2, seed + 10 + own.start)
        x = s @ d + 0.01 * torch.rand(n_img * 16, 64, generator=g)
        out.append(x.reshape(n_img, 4, 4, 64).permute(0, 3, 1, 2).contiguous())
    w = torch.stack([d[0:3].sum(0) + 0.5 * d[6:].sum(0), d[3:6].sum(0) + 0.5 * d[6:].sum(0), d[6:].sum(0)]) * 4
    return out[0], out[1], d, w, torch.zeros(3)


def test_hyperplane_separates_and_shift_moves_prediction():
    acts_a, acts_b, d, w, b = contrast_data(30, seed=0)
    pix_a = filter_pixels(acts_a, attribution_map(acts_a, w, 0))
    pix_b = filter_pixels(acts_b, attribution_map(acts_b, w, 1))
    assert pix_a.shape[1] == 64 and 0 < len(pix_a) < acts_a.shape[0] * 16
    normal, offset = fit_hyperplane(pix_a, pix_b)
    test_a, test_b, *_ = contrast_data(10, seed=5)
    za = test_a.permute(0, 2, 3, 1).reshape(-1, 64) @ normal + offset
    zb = test_b.permute(0, 2, 3, 1).reshape(-1, 64) @ normal + offset
    # pixels carrying a class-specific concept are told apart (shared-only pixels are ambiguous)
    own_a = test_a.permute(0, 2, 3, 1).reshape(-1, 64) @ d[0:3].T
    own_b = test_b.permute(0, 2, 3, 1).reshape(-1, 64) @ d[3:6].T
    assert (za[own_a.max(1).values > 0.5] > 0).float().mean() > 0.95
    assert (zb[own_b.max(1).values > 0.5] < 0).float().mean() > 0.95

    curve = shift_curve(acts_b, normal, (w, b), target_class=0)
    assert curve[0] < 0.1 and shift_test(acts_b, normal, offset, (w, b), target_class=0) > 0.9

    # L-BFGS reaches a lower loss than the reference's 100 SGD epochs
    def bce(nrm, off):
        z = torch.cat([pix_a, pix_b]) @ nrm + off
        y = torch.cat([torch.ones(len(pix_a)), torch.zeros(len(pix_b))])
        return float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))

    assert bce(normal, offset) < bce(*fit_hyperplane(pix_a, pix_b, method="sgd"))

    basis = contrast_concepts(acts_a.permute(0, 2, 3, 1).reshape(-1, 64), normal, offset, k=3)
    assert basis.shape == (3, 64) and (basis >= 0).all()
    assert matched_cosines(basis, d[0:3]).min() > 0.9  # A's own concepts, not the shared ones


def test_fit_basis_dispatches_every_registered_learner():
    """The job's one entry point reaches each learner of the registry and checks what it needs."""
    from conceptlens.precompute.fit import fit_basis

    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((12, 16, 3, 3))).astype(np.float32)
    w = rng.standard_normal((4, 16)).astype(np.float32)
    b = np.zeros(4, np.float32)
    for method, learner in LEARNERS.items():
        basis = fit_basis(method, feats, k=3, class_id=1, head_weight=w, head_bias=b, seed=0,
                          device=torch.device("cpu"), max_iter=20)
        assert basis.shape == (3, 16) and basis.dtype == np.float32, method
        assert method == "seminmf" or (basis >= 0).all(), method  # semi-NMF's directions are signed
        if learner.needs_linear_head:
            with pytest.raises(ValueError, match="global average pooling"):
                fit_basis(method, feats, k=3, class_id=1, head_weight=None, head_bias=None, seed=0,
                          device=torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown method 'pca'"):
        fit_basis("pca", feats, k=3, class_id=1, head_weight=w, head_bias=b, seed=0, device=torch.device("cpu"))

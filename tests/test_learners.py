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
from conceptlens.precompute.learners.face import NNLSCodes, _FaceObjective, nnls_codes
from conceptlens.precompute.learners.face_reference import reference_face_adam, served_metrics, sweep_lambda


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
    assert basis.shape == (5, 64)
    assert name == "directions" or (basis >= 0).all()  # directions serves encoding directions: signed
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
    before = (fc.weight.detach().clone(), fc.bias.detach().clone())
    face = FACE(5, lam=0.5, max_iter=5).fit(acts, fc.weight, fc.bias)
    assert fc.weight.grad is None and fc.bias.grad is None
    assert torch.equal(fc.weight, before[0]) and torch.equal(fc.bias, before[1])  # the head left as it was
    # the parameters and plain tensors of the same head give the same served metrics
    assert served_metrics(acts, face.components_, fc.weight, fc.bias) == \
        served_metrics(acts, face.components_, before[0], before[1])
    assert attribution_map(acts.reshape(10, 4, 4, 64).permute(0, 3, 1, 2), fc.weight, 0).requires_grad is False


def test_reference_face_adam_runs_the_reference_rule():
    acts, d = planted(n_img=10)
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    res = reference_face_adam(acts, w, torch.zeros(3), n_components=5, lam=1.0, max_steps=30)
    assert res.components.shape == (5, 64) and res.codes.shape == (160, 5)
    assert (res.components >= 0).all() and (res.codes >= 0).all()
    assert res.steps == len(res.losses) <= 30


# ---- FACE's speed-ups (issue 12): warm start, stop rule, NNLS warm start, preconditioner --------------

def test_face_warm_start_never_ends_above_the_nmf_basis():
    """FACE starts from the NMF learner's basis (same k, seed) and never ends with a higher objective
    than that basis has under FACE's objective."""
    from conceptlens.precompute.learners import face as face_mod

    acts, w, b = fidelity_data(40, seed=0)
    nmf_basis = NMF(6, seed=0).fit(acts.reshape(-1, 64)).components_
    for lam in (0.1, 1.0, 10.0):
        start = _FaceObjective(acts, w, b, lam, None)(nmf_basis)[0]
        for second in (False, "auto"):  # here "auto" adds the head-weighted start (NMF loses the head's signal)
            face_mod._NMF_STARTS.clear()
            face = FACE(6, lam=lam, max_iter=40, head_weighted_start=second).fit(acts, w, b)
            if second is False:
                assert face.start_ == "nmf" and face.start_loss_ == pytest.approx(start, rel=1e-5)  # started there
            final = _FaceObjective(acts, w, b, lam, None)(face.components_)[0]  # re-scored from scratch
            assert final <= start * (1 + 1e-6) and face.loss_ == pytest.approx(final, rel=1e-4)
            assert final < 0.99 * start  # and it moved
    assert face.start_ == "head_weighted"


def test_face_stop_rule_stops_early_on_a_converged_problem():
    acts, _ = planted(n_img=30, noise=0.05)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    b = torch.zeros(4)
    kw = dict(lam=1.0, max_iter=200, head_weighted_start=False)
    first = FACE(5, tol=1e-5, **kw).fit(acts, w, b)
    assert first.n_iter_ < 200  # the relative-decrease rule ended it, not the cap
    again = FACE(5, window=5, **kw).fit(acts, w, b, init=first.components_)
    assert again.n_iter_ <= 6 and again.loss_ <= first.loss_ * (1 + 1e-4)  # (codes re-solved from cold)
    assert FACE(5, **kw).fit(acts, w, b).n_iter_ < first.n_iter_  # the default tol ends sooner


def test_face_reuses_the_nmf_start_across_a_lambda_sweep(monkeypatch):
    from conceptlens.precompute.learners import face as face_mod

    face_mod._NMF_STARTS.clear()
    fits = []
    real_fit = NMF.fit
    monkeypatch.setattr(NMF, "fit", lambda self, x: fits.append(1) or real_fit(self, x))
    acts, w, b = fidelity_data(20, seed=0)
    kw = dict(max_iter=5, head_weighted_start=False)
    bases = [FACE(6, lam=lam, **kw).fit(acts, w, b).components_ for lam in (0.0, 0.1, 1.0)]
    assert len(fits) == 1 and all(torch.isfinite(p).all() for p in bases)
    FACE(6, lam=1.0, seed=1, **kw).fit(acts, w, b)  # other settings: a fresh NMF
    FACE(6, lam=1.0, **kw).fit(acts * 1.01, w, b)  # other data: a fresh NMF
    assert len(fits) == 3


@pytest.mark.parametrize("per_row", [False, True])  # True: the CUDA path (one batched inverse per row)
def test_nnls_warm_start_by_block_pivoting_matches_a_cold_solve(per_row):
    from conceptlens.precompute.learners.face import _nnls

    g_ = torch.Generator().manual_seed(3)
    p = torch.rand(6, 40, generator=g_, dtype=torch.float64)
    v = torch.rand(500, 40, generator=g_, dtype=torch.float64) * (torch.rand(500, 40, generator=g_) < 0.4)
    cold, _ = _nnls(v @ p.T, p @ p.T, None, 2000, 1e-12, per_row=per_row)
    for scale in (0.01, 0.3):  # a nearby basis (the optimizer's next step) and a far one
        p2 = (p + scale * torch.rand(p.shape, generator=g_, dtype=torch.float64)).clamp(min=0)
        b2, g2 = v @ p2.T, p2 @ p2.T
        warm, solver = _nnls(b2, g2, cold, 500, 1e-9, per_row=per_row)
        ref, _ = _nnls(b2, g2, None, 5000, 1e-13, per_row=per_row)
        assert (warm >= 0).all()
        torch.testing.assert_close(warm, ref, atol=1e-8, rtol=1e-6)
        # the solver returned serves the implicit gradient: G_FF^-1 on each row's support
        torch.testing.assert_close(solver.apply(b2).clamp(min=0), warm, atol=1e-8, rtol=1e-6)


def test_two_loop_in_inner_products_matches_the_classic_recursion():
    import numpy as np_

    from conceptlens.precompute.learners.face import _two_loop

    g_ = torch.Generator().manual_seed(0)
    n, m = 30, 6
    s, y = torch.randn(m, n, generator=g_, dtype=torch.float64), torch.randn(m, n, generator=g_, dtype=torch.float64)
    y = y + 3 * s  # s^T y > 0
    free = (torch.rand(1, n, generator=g_) > 0.3).to(torch.float64)
    g = torch.randn(1, n, generator=g_, dtype=torch.float64) * free
    rho = 1.0 / (s * y).sum(1).numpy()
    h0 = lambda q: 0.7 * q  # noqa: E731
    q = g.clone()
    alphas = []
    for i in range(m - 1, -1, -1):
        a = rho[i] * float((s[i] * free * q).sum())
        q = q - a * y[i] * free
        alphas.append(a)
    r = h0(q)
    for i, a in zip(range(m), reversed(alphas)):
        r = r + (a - rho[i] * float((y[i] * free * r).sum())) * s[i] * free
    torch.testing.assert_close(_two_loop(s, y, np_.asarray(rho), g, free, h0), r * free)


def test_channel_block_preconditioner_inverts_its_blocks():
    from conceptlens.precompute.learners.face import _ChannelBlocks

    g_ = torch.Generator().manual_seed(1)
    k, c = 4, 12
    s = torch.rand(50, k, generator=g_, dtype=torch.float64)
    a, sb = s.T @ s, 0.3 * (s[:10].T @ s[:10])
    fisher = torch.rand(c, generator=g_, dtype=torch.float64)
    p = torch.rand(k, c, generator=g_, dtype=torch.float64)
    q = torch.randn(k, c, generator=g_, dtype=torch.float64)
    pre = _ChannelBlocks(a, sb, fisher, p, span_beta=1.0)
    expect = torch.stack([torch.linalg.solve(a + fisher[j] * sb, q[:, j]) for j in range(c)], 1)
    torch.testing.assert_close(pre(q), expect, rtol=1e-4, atol=1e-8)
    shrunk = _ChannelBlocks(a, sb, fisher, p, span_beta=0.1)
    assert float((q * shrunk(q)).sum()) > float((q * pre(q)).sum()) > 0  # SPD, larger steps within span(P)


# ---- the shared base ------------------------------------------------------------------------------------

def _registry_inputs():
    """Features (12, 16, 3, 3) >= 0 and a GAP+linear head (W (4, 16), b = 0) every learner of LEARNERS accepts."""
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((12, 16, 3, 3))).astype(np.float32)
    return feats, rng.standard_normal((4, 16)).astype(np.float32), np.zeros(4, np.float32)


def test_every_registered_learner_exposes_the_base_attributes_after_fit_class():
    feats, w, b = _registry_inputs()
    for method, learner_cls in LEARNERS.items():
        learner = learner_cls.fit_class(feats, k=3, class_id=1, head_weight=w, head_bias=b, seed=0,
                                        device=torch.device("cpu"), max_iter=20, tol=1e-4, params={})
        assert learner.n_components == 3, method
        assert learner.device == torch.device("cpu"), method
        assert tuple(learner.components_.shape) == (3, 16), method
        assert isinstance(learner, torch.nn.Module) and "components_" in dict(learner.named_buffers()), method


def test_base_class_contract():
    from conceptlens.precompute.learners.base import ConceptLearner
    from conceptlens.precompute.learners.seminmf import SemiNMF

    for cls in (NMF, SemiNMF, FACE):
        assert issubclass(cls, ConceptLearner)
    assert FACE.needs_linear_head and not NMF.needs_linear_head
    with pytest.raises(ValueError, match="at least 1"):
        NMF(0)
    base = ConceptLearner(2, device="cpu")
    assert base.device == torch.device("cpu") and base.components_.numel() == 0
    with pytest.raises(NotImplementedError):
        base.fit(torch.zeros(3, 2))
    nmf = NMF(2).fit(torch.rand(20, 5))
    torch.testing.assert_close(nmf.decode(nmf.encode(torch.rand(4, 5))).shape, torch.Size([4, 5]))


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
    assert torch.allclose(dp.centroids_.norm(dim=1), torch.ones(5))  # the directional clusters
    # decoding directions: the dual basis of the clusters (each reads its own, ignores the others)
    assert torch.allclose(dp.decoding_ @ dp.centroids_.T, torch.eye(5), atol=1e-2)
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
    # the linear head's pooled shortcut against shifting every map and running the head on it
    generic = shift_curve(acts_b, normal, lambda x: x.mean(dim=(2, 3)) @ w.T + b, target_class=0)
    torch.testing.assert_close(curve, generic, rtol=1e-5, atol=1e-7)

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

    feats, w, b = _registry_inputs()
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


def test_nmf_sweep_shares_one_start_and_fits_as_well_as_each_k_alone():
    """NMF.sweep: one SVD for every k; the largest k's start is the one a fit alone makes (same SVD
    size), so its basis is identical; each smaller k reconstructs within 1 % of its own fit."""
    from conceptlens.precompute.learners.base import pixel_rows

    d, c = directions(6, 48, seed=3), codes(600, 6, seed=4)
    feats = (c @ d).reshape(24, 25, 48).permute(0, 2, 1).reshape(24, 48, 5, 5).numpy()
    fit_k = NMF.sweep(feats, (3, 5, 8), seed=0, device="cpu")
    x = torch.from_numpy(pixel_rows(feats))
    for k in (3, 5, 8):
        swept = fit_k(k)
        alone = NMF.fit_class(feats, k=k, seed=0, device="cpu")
        if k == 8:
            torch.testing.assert_close(swept.components_, alone.components_)
        err = [float((x - m.encode(x) @ m.components_).square().sum()) for m in (swept, alone)]
        assert err[0] <= 1.01 * err[1] + 1e-6, (k, err)

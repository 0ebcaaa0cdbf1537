"""Semi-NMF learner (--method seminmf) on planted signed activations, checked against independent
computations: the planted directions, scipy's NNLS for the codes, and the served NNLS projection."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, nnls

from conceptlens.precompute.fit import fit_basis
from conceptlens.precompute.learners import LEARNERS, SemiNMF
from conceptlens.service.nnls import NNLSProjector

K, C, N = 4, 16, 2000


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def planted(noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """X (N, C) = S0 P0 + noise: S0 >= 0 sparse (each code non-zero with probability 0.35, uniform
    [0, 1)), P0 (K, C) signed unit rows."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(K, C, generator=g)
    p0 = p0 / p0.norm(dim=1, keepdim=True)
    s0 = torch.rand(N, K, generator=g) * (torch.rand(N, K, generator=g) < 0.35)
    return s0 @ p0 + noise * torch.randn(N, C, generator=g), p0


def matched_cosines(learned, truth) -> np.ndarray:
    a = torch.nn.functional.normalize(torch.as_tensor(learned, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(truth, dtype=torch.float64), dim=1)
    cos = (a @ b.T).numpy()
    r, c = linear_sum_assignment(-cos)
    return cos[r, c]


def as_feats(x: torch.Tensor, n_img: int = 20, h: int = 10, w: int = 10) -> np.ndarray:
    """Rows (n_img*h*w, C) as feature maps (n_img, C, h, w), pixel (i, y, x) = row (i*h + y)*w + x."""
    return np.ascontiguousarray(x.numpy().reshape(n_img, h, w, -1).transpose(0, 3, 1, 2))


def nnls_objective(p: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """scipy's NNLS: argmin_{s >= 0} ||x - s P|| in float64, and its squared residual."""
    s, r = nnls(p.T.astype(np.float64), x.astype(np.float64))
    return s, r * r


def test_registered():
    assert LEARNERS["seminmf"] is SemiNMF
    assert SemiNMF.needs_linear_head is False


def test_planted_signed_directions_recovered():
    x, p0 = planted(noise=0.003)
    m = SemiNMF(K, seed=0, device="cpu")
    s = m.fit_transform(x)
    p = m.components_
    assert s.shape == (N, K) and p.shape == (K, C) and p.dtype == torch.float32
    assert (s >= 0).all()
    assert (p < 0).any()  # a signed basis, not a clipped one
    assert float((x - s @ p).norm() / x.norm()) < 0.05
    assert matched_cosines(p, p0).min() >= 0.95
    assert torch.allclose(p.norm(dim=1), torch.ones(K), atol=1e-5)
    assert np.isclose(m.loss_, float((x - s @ p).square().sum() / 2), rtol=1e-4)


def test_codes_are_the_nnls_optimum_of_the_learned_basis():
    # noisy, so every row keeps a residual and the objectives compare at a meaningful scale
    x, _ = planted(noise=0.2, seed=1)
    m = SemiNMF(K, seed=0, device="cpu")
    s = m.fit_transform(x).numpy()
    p = m.components_.numpy()
    rows = np.random.default_rng(0).choice(N, 50, replace=False)
    enc = m.encode(x[rows]).numpy()
    assert (s >= 0).all() and (enc >= 0).all()
    xs = x.numpy().astype(np.float64)
    for codes in (s[rows], enc):
        for code, i in zip(codes, rows):
            _, best = nnls_objective(p, xs[i])
            ours = float(np.square(xs[i] - code.astype(np.float64) @ p).sum())
            assert ours <= best * (1 + 1e-3) + 1e-9, (i, ours, best)


def test_served_projection_with_signed_basis():
    x, _ = planted(noise=0.003)
    p = SemiNMF(K, seed=0, device="cpu").fit(x).components_.numpy()
    assert (p < 0).any()
    proj = NNLSProjector.from_basis(p)
    v = np.random.default_rng(1).standard_normal((200, C)).astype(np.float32)  # signed pixels
    codes = proj.project(v)
    assert codes.shape == (200, K) and codes.dtype == np.float32
    assert (codes >= 0).all()
    binding = 0
    for code, vi in zip(codes, v):
        ref, best = nnls_objective(p, vi)
        ours = float(np.square(vi.astype(np.float64) - code.astype(np.float64) @ p).sum())
        assert ours <= best * (1 + 1e-4) + 1e-8
        np.testing.assert_allclose(code, ref, atol=2e-3)
        binding += int((ref == 0).any())
    assert binding > 0  # the constraint binds on some pixels: not just the unconstrained solution


def test_fit_basis_entry_point():
    x, p0 = planted(noise=0.003)
    basis = fit_basis("seminmf", as_feats(x), k=K, class_id=0, head_weight=None, head_bias=None, seed=0,
                      device=torch.device("cpu"))
    assert basis.shape == (K, C) and basis.dtype == np.float32
    assert (basis < 0).any()
    assert matched_cosines(basis, p0).min() >= 0.95  # the (N, C, H, W) -> rows layout is the right one


def test_same_seed_same_basis():
    x, _ = planted(noise=0.05, seed=2)
    a = SemiNMF(K, seed=3, device="cpu").fit(x).components_
    b = SemiNMF(K, seed=3, device="cpu").fit(x.clone()).components_
    assert torch.equal(a, b)


def test_more_components_than_concepts_stays_finite():
    x, p0 = planted(noise=0.003)
    m = SemiNMF(K + 3, seed=0, device="cpu")
    s = m.fit_transform(x)
    assert torch.isfinite(m.components_).all() and torch.isfinite(s).all()
    assert torch.allclose(m.components_.norm(dim=1), torch.ones(K + 3), atol=1e-5)
    assert float((x - s @ m.components_).norm() / x.norm()) < 0.05


def test_dead_direction_reseeded_with_worst_fitted_row():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g)
    st = torch.rand(3, 100, generator=g)
    st[1] = 0.0  # direction 1 has no codes left
    p, revived = SemiNMF(3, device="cpu")._update_basis(x, st.clone(), st @ x, st @ st.T)
    assert revived
    ls = torch.linalg.lstsq(st.T.double(), x.double()).solution  # rows 0, 2 of the least-squares basis
    assert torch.allclose(p[[0, 2]].double(), ls[[0, 2]], atol=1e-4)
    resid = (x.double() - st.T.double() @ ls).square().sum(dim=1)
    assert torch.equal(p[1], x[int(resid.argmax())])


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        SemiNMF(0)
    with pytest.raises(ValueError):
        SemiNMF(K, device="cpu").fit(torch.zeros(N, C))  # no non-zero row to seed a direction
    with pytest.raises(ValueError):
        SemiNMF(K, device="cpu").fit(torch.ones(2, 3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_and_is_deterministic():
    x, p0 = planted(noise=0.003)
    a = SemiNMF(K, seed=0, device="cuda").fit(x).components_
    b = SemiNMF(K, seed=0, device="cuda").fit(x).components_
    assert a.device.type == "cuda" and a.dtype == torch.float32
    assert torch.equal(a, b)
    cpu = SemiNMF(K, seed=0, device="cpu").fit(x).components_
    assert matched_cosines(a.cpu(), cpu).min() >= 0.99
    assert matched_cosines(a.cpu(), p0).min() >= 0.95

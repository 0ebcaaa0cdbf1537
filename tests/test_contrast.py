"""Class contrast on the serving path (service/contrast.py), numpy only.

The hyperplane separates planted clusters and matches scikit-learn's logistic regression; the
contrast basis is non-negative and reconstructs A's weighted pixels; the store serves precomputed
pairs, computes missing ones from the bundle's samples once (also under concurrent requests) and
keeps them; and through the real gRPC server a pair that was not precomputed is answered as
"contrast-on-request", with the identity exact, and computed only once.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from service_conftest import TINY_C, ServerThread, assert_identity, jpeg_bytes, write_tiny_bundle

from conceptlens.service.bundle import load_bundle
from conceptlens.service.client import ExplainClient
from conceptlens.service.config import ServerConfig
from conceptlens.service.contrast import (METHOD_ON_REQUEST, METHOD_PRECOMPUTED, ContrastStore, contrast_basis,
                                          contrast_weights, fit_hyperplane)
from conceptlens.service.explain import Explainer
from conceptlens.service.metrics import metric_value
from conceptlens.service.nnls import NNLSProjector


def planted_clusters(n: int, m: int, c: int, seed: int = 0, shift: float = 1.0):
    """Two overlapping non-negative clusters: a shared background plus a class-specific direction."""
    rng = np.random.default_rng(seed)
    da, db = np.abs(rng.standard_normal((2, c)))
    xa = np.abs(rng.standard_normal((n, c))) * 0.8 + shift * rng.uniform(0.5, 1.5, (n, 1)) * da
    xb = np.abs(rng.standard_normal((m, c))) * 0.8 + shift * rng.uniform(0.5, 1.5, (m, 1)) * db
    return xa.astype(np.float32), xb.astype(np.float32)


def cosine(u, v) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


# -- (a) the hyperplane ------------------------------------------------------------------------
@pytest.mark.parametrize("n,m,c,l2", [(300, 120, 40, 1e-3), (200, 200, 64, 1e-2), (80, 60, 200, 1e-3)])
def test_hyperplane_separates_planted_clusters_and_matches_sklearn(n, m, c, l2):
    from sklearn.linear_model import LogisticRegression

    xa, xb = planted_clusters(n, m, c, seed=n + c)
    w, b = fit_hyperplane(xa, xb, l2=l2)
    assert w.shape == (c,) and w.dtype == np.float32 and isinstance(b, float)
    accuracy = 0.5 * (np.mean(xa @ w + b > 0) + np.mean(xb @ w + b < 0))
    assert accuracy > 0.95
    # the same objective: balanced mean BCE + l2/2 ||w||^2  <=>  C = 1 / (l2 N), class_weight balanced
    x = np.concatenate([xa, xb]).astype(np.float64)
    y = np.r_[np.ones(n), np.zeros(m)]
    ref = LogisticRegression(C=1.0 / (l2 * (n + m)), class_weight="balanced", tol=1e-10, max_iter=10000).fit(x, y)
    assert cosine(w, ref.coef_[0]) > 0.99
    assert np.linalg.norm(w - ref.coef_[0]) <= 0.02 * np.linalg.norm(ref.coef_[0])
    assert b == pytest.approx(float(ref.intercept_[0]), rel=0.02, abs=0.02)


def test_hyperplane_is_deterministic_and_points_towards_a():
    xa, xb = planted_clusters(150, 90, 30, seed=3)
    w1, b1 = fit_hyperplane(xa, xb)
    w2, b2 = fit_hyperplane(xa.copy(), xb.copy())
    assert np.array_equal(w1, w2) and b1 == b2
    wr, br = fit_hyperplane(xb, xa)  # B rather than A: the same plane, flipped
    assert cosine(w1, -wr) > 0.999 and b1 == pytest.approx(-br, rel=1e-3, abs=1e-3)


def test_hyperplane_rejects_bad_input():
    xa, xb = planted_clusters(10, 10, 5)
    with pytest.raises(ValueError):
        fit_hyperplane(xa, xb[:, :4])
    with pytest.raises(ValueError):
        fit_hyperplane(xa, xb[:0])
    with pytest.raises(ValueError):
        fit_hyperplane(xa, xb, l2=0.0)


# -- (b) the contrast basis --------------------------------------------------------------------
def test_contrast_basis_is_non_negative_and_reconstructs_the_weighted_pixels():
    rng = np.random.default_rng(5)
    k, c = 3, 30
    planted = np.abs(rng.standard_normal((k, c))) * (rng.random((k, c)) < 0.4) + 0.01  # sparse-ish, >= 0
    xa = (rng.exponential(1.0, (400, k)) * (rng.random((400, k)) < 0.6)) @ planted
    xa = (xa + 0.01 * np.abs(rng.standard_normal(xa.shape))).astype(np.float32)
    xb = np.abs(rng.standard_normal((300, c))).astype(np.float32) * 0.5
    w, b = fit_hyperplane(xa, xb)
    basis = contrast_basis(xa, w, b, k, seed=0)
    assert basis.shape == (k, c) and basis.dtype == np.float32 and (basis >= 0).all()
    z = contrast_weights(xa, w, b)
    weighted = xa[z > 0] * z[z > 0, None]
    codes = NNLSProjector.from_basis(basis).project(weighted)
    err = np.linalg.norm(weighted - codes @ basis) / np.linalg.norm(weighted)
    assert err < 0.05
    # the planted directions are recovered (cosine after matching)
    sims = np.array([[cosine(p, q) for q in basis] for p in planted])
    assert sims.max(axis=1).min() > 0.95
    assert np.array_equal(basis, contrast_basis(xa, w, b, k, seed=0))  # deterministic


def test_blas_products_where_blas_is_single_threaded_give_the_same_pair():
    """In a process whose BLAS runs on one thread (the servers) the products are BLAS's, elsewhere
    einsum's: the same hyperplane (still scikit-learn's) and the same contrast basis either way."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from conceptlens.service.contrast import blas_single_threaded

    xa, xb = planted_clusters(300, 200, 120, seed=11)
    with threadpool_limits(limits=1, user_api="blas"):
        assert blas_single_threaded()
        w1, b1 = fit_hyperplane(xa, xb)
        basis1 = contrast_basis(xa, w1, b1, 4, seed=0)
        assert np.array_equal(basis1, contrast_basis(xa, w1, b1, 4, seed=0))  # deterministic
    x = np.concatenate([xa, xb]).astype(np.float64)
    ref = LogisticRegression(C=1.0 / (1e-3 * len(x)), class_weight="balanced", tol=1e-10, max_iter=10000).fit(
        x, np.r_[np.ones(len(xa)), np.zeros(len(xb))])
    assert np.linalg.norm(w1 - ref.coef_[0]) <= 0.02 * np.linalg.norm(ref.coef_[0])
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_single_threaded():
            pytest.skip("this process's BLAS cannot run on two threads")
        w2, b2 = fit_hyperplane(xa, xb)
        basis2 = contrast_basis(xa, w2, b2, 4, seed=0)
    assert cosine(w1, w2) > 0.9999 and b1 == pytest.approx(b2, rel=1e-3, abs=1e-4)
    assert min(cosine(p, q) for p, q in zip(basis1, basis2)) > 0.999  # same rows, same order


def test_float16_samples_convert_exactly():
    from conceptlens.service.contrast import as_float32

    bits = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(256, 256)[:, ::3]  # strided
    got = as_float32(bits)
    assert got.dtype == np.float32 and np.array_equal(got, bits.astype(np.float32), equal_nan=True)
    assert as_float32(np.ones((2, 2), np.float64)).dtype == np.float32


def test_contrast_basis_needs_pixels_on_a_side():
    xa = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="too few"):
        contrast_basis(xa, -np.ones(4, np.float32), 0.0, 3)


# -- bundles with samples and contrast tensors -------------------------------------------------
SAMPLED = (1, 3)  # classes with samples/<cid>
PRECOMPUTED = (5, 6)  # the one precomputed pair


def class_pixels(cid: int, n: int, seed: int = 0) -> np.ndarray:
    """Non-negative 8-channel pixels whose mix depends on the class."""
    rng = np.random.default_rng(100 + cid + seed)
    mix = np.abs(rng.standard_normal(TINY_C)) + 2.0 * (np.arange(TINY_C) % 4 == cid % 4)
    return (np.abs(rng.standard_normal((n, TINY_C))) * mix).astype(np.float16)


def write_contrast_bundle(out: Path) -> Path:
    """The tiny bundle of service_conftest (classes 0-7 with 3 concepts) plus samples and one pair."""
    def extra(rng) -> dict:
        tensors = {f"samples/{cid}": class_pixels(cid, 200) for cid in SAMPLED}
        a, b = PRECOMPUTED
        tensors[f"contrast/{a}_{b}/basis"] = np.abs(rng.standard_normal((4, TINY_C))).astype(np.float32)
        tensors[f"contrast/{a}_{b}/normal"] = rng.standard_normal(TINY_C).astype(np.float32)
        tensors[f"contrast/{a}_{b}/offset"] = np.array([0.25], np.float32)
        return tensors
    return write_tiny_bundle(out, 0, extra_tensors=extra)


@pytest.fixture(scope="module")
def contrast_bundle(tmp_path_factory) -> Path:
    return write_contrast_bundle(tmp_path_factory.mktemp("contrast") / "bundle")


# -- (c) the store -----------------------------------------------------------------------------
def test_store_serves_a_precomputed_pair_from_the_bundle(contrast_bundle):
    bundle = load_bundle(contrast_bundle)
    store = ContrastStore(bundle)
    assert store.precomputed_pairs == [PRECOMPUTED] and store.sampled_classes == list(SAMPLED)
    basis, method = store.get(*PRECOMPUTED)
    assert method == METHOD_PRECOMPUTED
    np.testing.assert_array_equal(basis, bundle.tensors["contrast/5_6/basis"])
    pair = store.pair(*PRECOMPUTED)
    np.testing.assert_array_equal(pair.normal, bundle.tensors["contrast/5_6/normal"])
    assert pair.offset == pytest.approx(0.25)
    assert store.get(*PRECOMPUTED) is store.get(*PRECOMPUTED) and store.compute_count == 0


def test_store_computes_a_missing_pair_once_and_keeps_it(contrast_bundle):
    bundle = load_bundle(contrast_bundle)
    seen = []
    store = ContrastStore(bundle, on_compute=lambda a, b, s: seen.append((a, b, s)))
    first = store.get(1, 3)
    assert first is not None
    basis, method = first
    assert method == METHOD_ON_REQUEST and basis.shape == (bundle.classes[1].k, TINY_C) and (basis >= 0).all()
    assert store.get(1, 3) is first and store.compute_count == 1
    assert [(a, b) for a, b, _ in seen] == [(1, 3)] and seen[0][2] > 0
    assert store.pair(1, 3).seconds == seen[0][2] == store.last_compute_seconds == store.compute_seconds_total
    # what was computed is what the functions give on the bundle's samples
    xa, xb = (bundle.tensors[f"samples/{c}"].astype(np.float32) for c in (1, 3))
    w, b = fit_hyperplane(xa, xb)
    pair = store.pair(1, 3)
    np.testing.assert_array_equal(pair.normal, w)
    np.testing.assert_array_equal(basis, contrast_basis(xa, w, b, 3))
    # the reverse is another pair
    assert store.get(3, 1)[1] == METHOD_ON_REQUEST and store.compute_count == 2
    assert sorted(store.cached_pairs()) == [(1, 3), (3, 1)]


def test_store_returns_none_without_samples(contrast_bundle):
    store = ContrastStore(load_bundle(contrast_bundle))
    assert store.get(0, 1) is None  # class 0 has no samples
    assert store.get(1, 0) is None  # class 0 has no samples
    assert store.get(6, 5) is None  # only (5, 6) was precomputed, and neither has samples
    assert store.get(1, 1) is None
    assert store.compute_count == 0


def test_store_remembers_a_pair_it_cannot_compute_and_ignores_bad_samples(contrast_bundle, caplog):
    bundle = load_bundle(contrast_bundle)
    bundle.tensors["samples/2"] = class_pixels(2, 2)  # 2 pixels: too few for 3 concepts
    bundle.tensors["samples/4"] = class_pixels(4, 50)
    bundle.tensors["samples/7"] = np.ones((10, TINY_C + 1), np.float16)  # wrong channel count
    store = ContrastStore(bundle)
    assert store.sampled_classes == [1, 2, 3, 4]
    assert store.get(2, 4) is None and store.get(2, 4) is None
    assert store.compute_count == 1 and "could not be computed" in caplog.text
    assert store.get(4, 2)[1] == METHOD_ON_REQUEST  # the other way round has enough pixels
    assert store.get(7, 1) is None and store.compute_count == 2


class _CountingInflight(dict):
    """The store's in-flight table, counting the callers that found a computation under way."""

    def __init__(self):
        super().__init__()
        self.joined = 0
        self.changed = threading.Condition()

    def get(self, key, default=None):
        found = super().get(key, default)
        if found is not None:
            with self.changed:
                self.joined += 1
                self.changed.notify_all()
        return found


def test_store_computes_once_under_concurrent_requests(contrast_bundle):
    """8 callers of one missing pair: the first computes it, held until the 7 others have found its
    computation under way (events, no sleep: they all really overlap it), then all get its result."""
    store = ContrastStore(load_bundle(contrast_bundle))
    compute = store._compute
    started, release = threading.Event(), threading.Event()
    inflight = store._inflight = _CountingInflight()

    def held(a, b):  # the first computation waits until the test lets it go
        started.set()
        assert release.wait(30)
        return compute(a, b)
    store._compute = held
    results = [None] * 8

    def worker(i):
        results[i] = store.get(3, 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    threads[0].start()
    assert started.wait(30)  # the first caller is computing
    for t in threads[1:]:
        t.start()
    with inflight.changed:  # the 7 others are waiting for that computation, not computing their own
        assert inflight.changed.wait_for(lambda: inflight.joined == 7, timeout=30), inflight.joined
    assert store.compute_count == 0 and all(r is None for r in results)
    release.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert results[0] is not None and all(r is results[0] for r in results)
    assert store.compute_count == 1 and store.cached_pairs() == [(3, 1)]


def test_store_lru_is_bounded(contrast_bundle):
    store = ContrastStore(load_bundle(contrast_bundle), max_pairs=1)
    first = store.get(1, 3)
    store.get(3, 1)
    assert store.cached_pairs() == [(3, 1)]
    again = store.get(1, 3)  # evicted: computed again, to the same values
    assert again is not first and store.compute_count == 3
    np.testing.assert_array_equal(again[0], first[0])


def test_explainer_uses_the_store(contrast_bundle):
    bundle = load_bundle(contrast_bundle)
    store = ContrastStore(bundle)
    explainer = Explainer(bundle, contrast_projectors=store.projector)
    rng = np.random.default_rng(0)
    features = np.abs(rng.standard_normal((TINY_C, 7, 7))).astype(np.float32)
    logits = features.mean(axis=(1, 2)) @ bundle.head_weight.T + bundle.head_bias
    for (a, b), method in (((1, 3), METHOD_ON_REQUEST), (PRECOMPUTED, METHOD_PRECOMPUTED), ((2, 4), "nmf")):
        ex = explainer.explain(features, logits, a, contrast=b)
        assert ex.method == method and ex.contrast_class == b
        assert ex.target == pytest.approx(float(logits[a] - logits[b]), abs=1e-5)
        assert ex.identity_error <= 1e-4 * max(1.0, abs(ex.target))
    assert store.compute_count == 1


# -- (d) through the real gRPC server ----------------------------------------------------------
@pytest.fixture(scope="module")
def contrast_server(contrast_bundle):
    srv = ServerThread(ServerConfig(bundle=str(contrast_bundle), port=0, metrics_port=0, workers=2))
    yield srv
    srv.stop()


def test_on_request_contrast_through_the_server(contrast_server):
    store = contrast_server.server.model.contrasts
    assert store.compute_count == 0 and store.cached_pairs() == []
    with ExplainClient(contrast_server.target) as client:
        first = client.explain(jpeg_bytes(11, (96, 80)), classes=["thing1"], contrast="thing3", num_predictions=10)
        (x,) = first.explanations
        assert x.method == METHOD_ON_REQUEST
        assert x.contrast_class_id == 3 and x.contrast_class_name == "thing3"
        assert x.num_concepts == 3 and len(x.concepts) == 3
        logits = {p.class_id: p.logit for p in first.predictions}
        assert x.logit == pytest.approx(logits[1] - logits[3], abs=1e-4)  # logit_A - logit_B
        assert_identity(first)
        assert store.compute_count == 1 and store.cached_pairs() == [(1, 3)]

        # another image (no answer-cache hit): the pair is not computed again
        second = client.explain(jpeg_bytes(12, (64, 64)), classes=["thing1"], contrast="thing3", max_concepts=2)
        (y,) = second.explanations
        assert not second.cache_hit
        assert y.method == METHOD_ON_REQUEST and len(y.concepts) == 2 and y.omitted_contribution != 0
        assert_identity(second)
        assert store.compute_count == 1

        # the precomputed pair, and a pair without samples (the class basis with contrast weights)
        precomputed = client.explain(jpeg_bytes(13), classes=[5], contrast=6)
        (p,) = precomputed.explanations
        assert p.method == METHOD_PRECOMPUTED and p.num_concepts == 4
        assert_identity(precomputed)
        fallback = client.explain(jpeg_bytes(13), classes=[2], contrast=4)
        (f,) = fallback.explanations
        assert f.method == "nmf" and f.num_concepts == 3
        assert_identity(fallback)
        assert store.compute_count == 1
    text = contrast_server.metrics_text()
    assert metric_value(text, "conceptlens_stage_duration_seconds_count", stage="contrast") == 1


def test_serving_path_imports_neither_torch_nor_scipy():
    import subprocess
    import sys

    code = ("import sys, conceptlens.service.contrast, conceptlens.service.server; "
            "bad = [m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""Class contrast on the serving path, "why A rather than B" (Herdt & Otero Baguer), numpy only.

Precompute stores the hyperplanes and contrast concepts of the most confused pairs, and bounded
per-class samples of attribution-filtered pixel activations; any other pair is computed here on
request from those samples, then kept in a bounded in-process LRU:

1. :func:`fit_hyperplane`: logistic regression between A's pixels (label 1) and B's (label 0), mean
   binary cross-entropy with each class weighted to half of the loss, plus ``l2/2 ||w||^2`` on the
   raw activations (the intercept is not penalized). The normal points from B towards A:
   ``w . a + b > 0`` on A's side. Solved by a preconditioned Newton-CG with a backtracking line
   search on an exact reparametrization (features centred at the balanced mean and scaled by the
   square root of the Hessian's diagonal at the start; the penalty is carried through, so the
   optimum is that of the raw problem).
2. :func:`contrast_basis`: NMF (HALS, NNDSVDa init) of A's pixels scaled by ``max(w . a + b, 0)``.
3. :class:`ContrastStore`: the bundle's precomputed pairs, and the pairs computed on request; its
   ``projector`` is what :class:`~conceptlens.service.explain.Explainer` takes as ``contrast_projectors``.

No torch, no scipy: this runs inside the gRPC server (in its worker threads, never on the event
loop) and inside the TorchServe handler. The products with the (n, C) pixel matrices go to BLAS
when numpy's BLAS runs on one thread in this process, as it does in the servers
(:func:`~conceptlens.service.runtime.single_threaded_blas`): one-thread sgemv and sgemm are 2-4x
faster than einsum here (EfficientNet-Lite0 pixels, C = 1280: a pair on request fell from ~70 to
~35 ms). Elsewhere (precompute, a library caller) they are numpy's own single-threaded einsum
loops, immune to BLAS threads: a multi-threaded gemv on a busy or CPU-limited machine waits for its
threads on each of the ~150 calls, which was measured 10-40x slower.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .bundle import Bundle
from .nnls import NNLSProjector

log = logging.getLogger(__name__)

EPS = 1e-12
METHOD_PRECOMPUTED = "contrast"
METHOD_ON_REQUEST = "contrast-on-request"
_PAIR_TENSOR = re.compile(r"^contrast/(\d+)_(\d+)/(basis|normal|offset)$")
_SAMPLES_TENSOR = re.compile(r"^samples/(\d+)$")


# -- products without BLAS threads --------------------------------------------------------------
_blas_libs: list | None = None  # threadpoolctl's controllers of numpy's BLAS, found once


def blas_single_threaded() -> bool:
    """True when every BLAS library of this process runs on one thread right now (the servers set
    that at start); asked on each product (a call into the library, under a microsecond)."""
    global _blas_libs
    if _blas_libs is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # no threadpoolctl, or a library it cannot query: einsum it is
            _blas_libs = []
    try:
        return bool(_blas_libs) and all(lib.num_threads == 1 for lib in _blas_libs)
    except Exception:
        return False


def _mv(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """a (n, C) @ v (C,), both float32."""
    return a @ v if blas_single_threaded() else np.einsum("ij,j->i", a, v)


def _rmv(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """a (n, C)^T @ r (n,), both float32."""
    return r @ a if blas_single_threaded() else np.einsum("ij,i->j", a, r)


def _rows_mv(a: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """vs (q, C) @ a^T -> (q, n): one sgemm, or row by row."""
    vs = np.ascontiguousarray(vs, np.float32)
    if blas_single_threaded():  # (a @ vs^T)^T: OpenBLAS is twice as fast this way round
        return np.ascontiguousarray((a @ vs.T).T)
    return np.stack([np.einsum("ij,j->i", a, v) for v in vs])


def _rows_rmv(a: np.ndarray, rs: np.ndarray) -> np.ndarray:
    """rs (q, n) @ a -> (q, C): one sgemm, or row by row."""
    rs = np.ascontiguousarray(rs, np.float32)
    if blas_single_threaded():
        return rs @ a
    return np.stack([np.einsum("ij,i->j", a, r) for r in rs])


_F16_TO_F32: np.ndarray | None = None  # every float16 bit pattern as float32, made once


def as_float32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32; float16 (the bundle's samples) through a table of all 65536 values, the
    same numbers as numpy's conversion (NaN, infinities and subnormals included) in a third of its
    time, which on a pair of 512 x 1280 samples is ~2 ms of a request."""
    global _F16_TO_F32
    x = np.asarray(x)
    if x.dtype != np.float16:
        return np.asarray(x, np.float32)
    if _F16_TO_F32 is None:
        _F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    return np.take(_F16_TO_F32, np.ascontiguousarray(x).view(np.uint16))


# -- the hyperplane ----------------------------------------------------------------------------
def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # stable for any t


def fit_hyperplane(pixels_a: np.ndarray, pixels_b: np.ndarray, l2: float = 1e-3, max_iter: int = 50,
                   tol: float = 1e-6, max_cg: int = 250) -> tuple[np.ndarray, float]:
    """Logistic regression of pixels_a (n, C) (label 1) against pixels_b (m, C) (label 0).

    Minimizes ``0.5 mean_A BCE + 0.5 mean_B BCE + l2/2 ||w||^2`` (BCE with logits ``w . x + b``)
    on the raw activations; returns (normal w (C,) float32, offset b). Deterministic.

    ``max_iter`` Newton steps at most, ``max_cg`` conjugate-gradient steps each and four times that in
    all (a bound on the latency); stops once the gradient's largest entry (in the solver's
    preconditioned coordinates) is below ``tol`` times its value at the start. ``l2`` must be
    positive: it keeps separable pairs (the usual case with C > n + m) finite.
    Equivalent to scikit-learn's ``LogisticRegression(C=1 / (l2 * (n + m)), class_weight="balanced")``.
    """
    xa = np.asarray(pixels_a, dtype=np.float32)
    xb = np.asarray(pixels_b, dtype=np.float32)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1]:
        raise ValueError(f"pixels must be (n, C) and (m, C) with the same C; got {xa.shape} and {xb.shape}")
    na, nb = len(xa), len(xb)
    if na == 0 or nb == 0:
        raise ValueError("both classes need at least one pixel")
    if not l2 > 0:
        raise ValueError("l2 must be positive")
    c = xa.shape[1]
    # balanced sample weights, summing to 1
    s = np.concatenate([np.full(na, 0.5 / na), np.full(nb, 0.5 / nb)])
    y = np.concatenate([np.ones(na), np.zeros(nb)])
    mu = 0.5 * xa.mean(axis=0, dtype=np.float64) + 0.5 * xb.mean(axis=0, dtype=np.float64)  # (C,)
    z = np.concatenate([xa, xb])  # (N, C) float32, our own copy
    z -= mu.astype(np.float32)
    # w = v / d: d_j^2 = the Hessian's diagonal at w = 0 (p = 1/2) in w's coordinates
    z2 = z * z
    var = _rmv(z2, s.astype(np.float32))  # (C,)
    d = np.sqrt(0.25 * var.astype(np.float64) + l2)
    z /= d.astype(np.float32)
    z2 /= (d * d).astype(np.float32)  # the squares of the scaled features, for the preconditioner
    pen = l2 / (d * d)  # penalty on v: sum_j pen_j v_j^2 / 2

    def logits(v: np.ndarray, b: float) -> np.ndarray:
        return _mv(z, v.astype(np.float32)).astype(np.float64) + b

    def objective(t: np.ndarray, v: np.ndarray) -> float:
        return float(s @ (np.logaddexp(0.0, t) - y * t) + 0.5 * (pen * v * v).sum())

    v, b = np.zeros(c), 0.0
    t = logits(v, b)
    f = objective(t, v)
    g0 = None
    cg_left = 4 * max_cg
    for _ in range(max_iter):
        p = _sigmoid(t)
        r = s * (p - y)
        gv = _rmv(z, r.astype(np.float32)).astype(np.float64) + pen * v
        gb = float(r.sum())
        gmax = max(float(np.abs(gv).max()), abs(gb))
        if g0 is None:
            g0 = max(gmax, EPS)
        if gmax <= max(tol * g0, 1e-9) or cg_left <= 0:  # (1e-9: below float32 products' noise)
            break
        sq = s * p * (1.0 - p)  # (N,) Hessian weights
        sq32 = sq.astype(np.float32)
        mv = _rmv(z2, sq32).astype(np.float64) + pen  # diagonal preconditioner
        mb = max(float(sq.sum()), EPS)

        def hess(dv: np.ndarray, db: float) -> tuple[np.ndarray, float]:
            u = sq * (_mv(z, dv.astype(np.float32)).astype(np.float64) + db)
            return _rmv(z, u.astype(np.float32)).astype(np.float64) + pen * dv, float(u.sum())

        # preconditioned CG on H [dv; db] = -[gv; gb], truncated (Eisenstat-Walker forcing term)
        gnorm = float(np.sqrt(gv @ gv + gb * gb))
        cg_tol = min(0.5, np.sqrt(gnorm)) * gnorm
        dv, db = np.zeros(c), 0.0
        rv, rb = -gv, -gb
        qv, qb = rv / mv, rb / mb
        pv, pb = qv.copy(), qb
        rq = float(rv @ qv + rb * qb)
        for _ in range(min(max_cg, cg_left)):
            cg_left -= 1
            hv, hb = hess(pv, pb)
            curv = float(pv @ hv + pb * hb)
            if curv <= 0:
                break
            alpha = rq / curv
            dv += alpha * pv
            db += alpha * pb
            rv -= alpha * hv
            rb -= alpha * hb
            if np.sqrt(rv @ rv + rb * rb) <= cg_tol:
                break
            qv, qb = rv / mv, rb / mb
            rq_new = float(rv @ qv + rb * qb)
            beta = rq_new / rq
            rq = rq_new
            pv = qv + beta * pv
            pb = qb + beta * pb
        if not dv.any() and db == 0.0:  # CG made no progress: steepest descent
            dv, db = -gv / mv, -gb / mb
        # backtracking (Armijo) from the full Newton step
        slope = float(gv @ dv + gb * db)
        step, dt = 1.0, logits(dv, db)  # the logits move along z @ dv + db
        accepted = False
        for _ in range(30):
            t_new = t + step * dt
            v_new = v + step * dv
            f_new = objective(t_new, v_new)
            if f_new <= f + 1e-4 * step * slope:
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        v, b, t, f = v_new, b + step * db, t_new, f_new
    w = v / d
    offset = b - float(w @ mu)
    return w.astype(np.float32), float(offset)


# -- the contrast concepts ---------------------------------------------------------------------
def _orthonormal_rows(y: np.ndarray) -> np.ndarray:
    """Orthonormal rows (q, n) float64 spanning those of y: modified Gram-Schmidt, twice (or
    LAPACK's QR where BLAS is single-threaded, 10x faster); a row that adds no new direction is 0.
    QR's rows may differ from Gram-Schmidt's in sign, which nothing downstream depends on (the
    NNDSVD below is invariant to the signs of the range basis)."""
    if blas_single_threaded():
        qm, r = np.linalg.qr(np.asarray(y, dtype=np.float64).T)
        return np.where(np.abs(np.diag(r))[:, None] > EPS, qm.T, 0.0)
    q = np.array(y, dtype=np.float64)
    for i in range(len(q)):
        for _ in range(2):
            if i:
                q[i] -= np.einsum("i,in->n", np.einsum("in,n->i", q[:i], q[i]), q[:i])
        norm = float(np.sqrt(np.einsum("n,n->", q[i], q[i])))
        q[i] = q[i] / norm if norm > EPS else 0.0
    return q


def _nndsvda(x: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """NNDSVD with zeros replaced by the mean of X (randomized SVD): W^T (k, n), H (k, C), >= 0."""
    n, c = x.shape
    q = min(k + 10, n, c)
    omega = rng.standard_normal((q, c)).astype(np.float32)
    qt = _orthonormal_rows(_rows_mv(x, omega))  # (q, n): Q^T, an orthonormal basis of X's range
    for _ in range(4):  # power iterations, re-orthonormalized
        qt = _orthonormal_rows(_rows_mv(x, _rows_rmv(x, qt)))
    # SVD of the small wide B = Q^T X (q, C) through the eigenvectors of B B^T (q, q): LAPACK's QR and
    # SVD of even these small matrices spend most of their time synchronizing threads on a busy machine
    bt = _rows_rmv(x, qt).astype(np.float64)  # (q, C)
    ev, ub = np.linalg.eigh(np.einsum("ic,jc->ij", bt, bt))
    order = np.argsort(-ev)[:k]
    sv = np.sqrt(np.maximum(ev[order], 0))
    ub = ub[:, order]
    vt = np.einsum("iq,ic->qc", ub, bt) / np.maximum(sv, EPS)[:, None]
    u = np.einsum("qn,qj->nj", qt, ub)
    wt = np.zeros((k, n))
    h = np.zeros((k, c))
    wt[0] = np.sqrt(sv[0]) * np.abs(u[:, 0])
    h[0] = np.sqrt(sv[0]) * np.abs(vt[0])
    for j in range(1, len(sv)):
        a, bb = u[:, j], vt[j]
        ap, an, bp, bn = np.maximum(a, 0), np.maximum(-a, 0), np.maximum(bb, 0), np.maximum(-bb, 0)
        apn, bpn, ann, bnn = (float(np.linalg.norm(t)) for t in (ap, bp, an, bn))
        if apn * bpn >= ann * bnn:
            uu, vv, sigma = ap / (apn + EPS), bp / (bpn + EPS), apn * bpn
        else:
            uu, vv, sigma = an / (ann + EPS), bn / (bnn + EPS), ann * bnn
        lam = np.sqrt(sv[j] * sigma)
        wt[j] = lam * uu
        h[j] = lam * vv
    avg = float(x.mean())
    wt[wt == 0] = avg / 100
    h[h == 0] = avg / 100
    return wt, h


def _gram(m: np.ndarray) -> np.ndarray:
    return np.einsum("in,jn->ij", m, m)


def _hals_sweeps(m: np.ndarray, lin: np.ndarray, gram: np.ndarray, max_sweeps: int, delta: float = 0.1) -> None:
    """In place: coordinate sweeps on the rows of M (k, *) minimizing 1/2 <M^T M, gram> - <lin, M>, M >= EPS.

    Stops after ``max_sweeps`` or once a sweep changes M by less than ``delta`` times the first.
    """
    first = None
    diag = np.maximum(np.diag(gram), EPS)
    blas = blas_single_threaded()
    for _ in range(max_sweeps):
        change = 0.0
        for j in range(m.shape[0]):  # new row = max(m_j + (lin_j - gram_j M) / gram_jj, EPS), in place
            new = gram[j] @ m if blas else np.einsum("i,in->n", gram[j], m)
            np.subtract(lin[j], new, out=new)
            new /= diag[j]
            new += m[j]
            np.maximum(new, EPS, out=new)
            row = m[j]
            row -= new  # the change, in the old row's place
            change += float(row @ row)
            m[j] = new
        if first is None:
            first = change
        elif change <= delta * delta * first:
            break


def nmf_hals(x: np.ndarray, k: int, max_iter: int = 40, tol: float = 1e-4, inner: int = 10,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NMF X (n, C) >= 0 ~ W (n, k) H (k, C) by accelerated HALS from NNDSVDa; returns (W, H) float32.

    Stops after ``max_iter`` outer iterations or when the loss decreases by less than ``tol`` (relative).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"NMF of a {x.shape} matrix into {k} components")
    if (x < 0).any():
        raise ValueError("NMF input must be non-negative")
    wt, h = _nndsvda(x, k, np.random.default_rng(seed))
    norm_x = float(np.square(x, dtype=np.float64).sum()) if x.size else 0.0
    prev = None
    for _ in range(max_iter):
        hxt = _rows_mv(x, h).astype(np.float64)  # H X^T (k, n)
        _hals_sweeps(wt, hxt, _gram(h), inner)
        wtx = _rows_rmv(x, wt).astype(np.float64)  # W^T X (k, C)
        wtw = _gram(wt)
        _hals_sweeps(h, wtx, wtw, inner)
        loss = max(norm_x - 2 * float((wtx * h).sum()) + float((wtw * _gram(h)).sum()), 0.0) / 2
        if prev is not None and prev - loss <= tol * prev:
            break
        prev = loss
    return wt.T.astype(np.float32), h.astype(np.float32)


def contrast_weights(pixels: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """max(w . a + b, 0) per pixel (n,): how far each pixel lies on A's side of the hyperplane."""
    x = np.ascontiguousarray(pixels, np.float32)
    return np.maximum(_mv(x, np.ascontiguousarray(normal, np.float32)) + np.float32(offset), 0)


def contrast_basis(pixels_a: np.ndarray, normal: np.ndarray, offset: float, k: int, seed: int = 0,
                   max_iter: int = 40) -> np.ndarray:
    """Basis (k, C) float32 >= 0 of "A rather than B": NMF of A's pixels (n, C) scaled by max(w . a + b, 0).

    Pixels on B's side (weight 0) are left out; ValueError if fewer than ``k`` remain.
    """
    x = np.asarray(pixels_a, dtype=np.float32)
    z = contrast_weights(x, normal, offset)
    keep = z > 0
    if int(keep.sum()) < k:
        raise ValueError(f"{int(keep.sum())} pixels on A's side of the hyperplane are too few for {k} concepts")
    _, h = nmf_hals(x[keep] * z[keep, None], k, max_iter=max_iter, seed=seed)
    return np.maximum(h, 0)


# -- the store ---------------------------------------------------------------------------------
@dataclass
class ContrastPair:
    """A pair's contrast: the basis, the hyperplane, how it was obtained and what it cost."""

    a: int
    b: int
    basis: np.ndarray  # (k, C) float32 >= 0
    normal: np.ndarray | None  # (C,) float32
    offset: float | None
    method: str
    seconds: float = 0.0  # compute time (0 for a precomputed pair)
    result: tuple[np.ndarray, str] = field(init=False, repr=False)  # what ContrastStore.get returns
    projection: tuple[NNLSProjector, str] = field(init=False, repr=False)  # what ContrastStore.projector returns

    def __post_init__(self):
        self.result = (self.basis, self.method)
        self.projection = (NNLSProjector.from_basis(self.basis), self.method)


def compute_pair(a: int, b: int, pixels_a: np.ndarray, pixels_b: np.ndarray, k: int, l2: float = 1e-3,
                 seed: int = 0, method: str = METHOD_ON_REQUEST) -> ContrastPair | None:
    """Hyperplane and ``k`` contrast concepts of "a rather than b" from pixels (m, C) of each class;
    None (logged) when the pixels cannot give them (e.g. too few on A's side of the hyperplane)."""
    xa, xb = as_float32(pixels_a), as_float32(pixels_b)
    try:
        normal, offset = fit_hyperplane(xa, xb, l2=l2)
        basis = contrast_basis(xa, normal, offset, k, seed=seed)
    except ValueError as e:
        log.warning("contrast %d rather than %d could not be computed: %s", a, b, e)
        return None
    return ContrastPair(a, b, basis, normal, offset, method)


class ContrastStore:
    """Contrast bases by ordered pair (A, B): precomputed ones from the bundle, others on request.

    ``get(a, b)`` is thread-safe: the first caller of a missing pair computes it (in its own
    thread), concurrent callers of the same pair wait for that result, and the pair is then kept in
    an LRU of ``max_pairs`` entries. A pair that cannot be computed (e.g. too few pixels on A's side
    of the hyperplane) is remembered as None as well, so it is not retried on every request.
    ``on_compute(a, b, seconds)`` is called after each computation (metrics); the log has it too.
    """

    def __init__(self, bundle: Bundle, max_pairs: int = 256, l2: float = 1e-3, seed: int = 0,
                 on_compute: Callable[[int, int, float], None] | None = None):
        self.bundle = bundle
        self.max_pairs = max(1, int(max_pairs))
        self.l2, self.seed = l2, seed
        self.on_compute = on_compute
        channels = int(bundle.feature_shape[0])
        self._precomputed: dict[tuple[int, int], ContrastPair] = {}
        self._samples: dict[int, np.ndarray] = {}
        parts: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        for name, tensor in bundle.tensors.items():
            if m := _PAIR_TENSOR.match(name):
                parts.setdefault((int(m[1]), int(m[2])), {})[m[3]] = tensor
            elif m := _SAMPLES_TENSOR.match(name):
                if tensor.ndim != 2 or len(tensor) == 0 or (channels and tensor.shape[1] != channels):
                    log.warning("bundle tensor %s has shape %s, not (m, %s); ignored", name, tensor.shape, channels)
                    continue
                self._samples[int(m[1])] = tensor  # float16 as stored; converted per computation
        for (a, b), t in sorted(parts.items()):
            basis = t.get("basis")
            if basis is None or basis.ndim != 2 or (channels and basis.shape[1] != channels):
                log.warning("bundle has no usable contrast/%d_%d/basis; that pair is ignored", a, b)
                continue
            normal = np.ascontiguousarray(t["normal"], np.float32).reshape(-1) if "normal" in t else None
            offset = float(np.asarray(t["offset"]).reshape(-1)[0]) if "offset" in t else None
            self._precomputed[(a, b)] = ContrastPair(a, b, np.ascontiguousarray(basis, np.float32),
                                                     normal, offset, METHOD_PRECOMPUTED)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], ContrastPair | None] = OrderedDict()
        self._inflight: dict[tuple[int, int], Future] = {}
        self.compute_count = 0  # pairs computed on request (successfully or not) since start
        self.compute_seconds_total = 0.0
        self.last_compute_seconds = 0.0

    # --- queries ---
    @property
    def precomputed_pairs(self) -> list[tuple[int, int]]:
        return sorted(self._precomputed)

    @property
    def sampled_classes(self) -> list[int]:
        return sorted(self._samples)

    def can_compute(self, a: int, b: int) -> bool:
        return a != b and a in self._samples and b in self._samples

    def cached_pairs(self) -> list[tuple[int, int]]:
        """Pairs computed on request and still kept, least recently used first."""
        with self._lock:
            return [k for k, v in self._cache.items() if v is not None]

    def get(self, a: int, b: int) -> tuple[np.ndarray, str] | None:
        """(basis (k, C), method) for "a rather than b", or None when the bundle cannot give one.

        The same tuple object is returned for as long as the pair is kept.
        """
        pair = self.pair(a, b)
        return None if pair is None else pair.result

    def projector(self, a: int, b: int) -> tuple[NNLSProjector, str] | None:
        """(NNLS projector of the basis, method) for "a rather than b", or None; kept with the pair,
        so the explainer needs no cache of its own."""
        pair = self.pair(a, b)
        return None if pair is None else pair.projection

    def pair(self, a: int, b: int) -> ContrastPair | None:
        """The full :class:`ContrastPair` (hyperplane included), computed on request if needed."""
        key = (int(a), int(b))
        found = self._precomputed.get(key)
        if found is not None:
            return found
        if not self.can_compute(*key):
            return None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                future = self._inflight[key] = Future()
        if not owner:  # another thread is computing this pair: wait for its result
            return future.result()
        try:
            result = self._compute(*key)
        except BaseException as e:
            with self._lock:
                del self._inflight[key]
            future.set_exception(e)
            raise
        with self._lock:
            self._cache[key] = result
            while len(self._cache) > self.max_pairs:
                self._cache.popitem(last=False)
            del self._inflight[key]
        future.set_result(result)
        return result

    # --- computing ---
    def _k(self, a: int) -> int:
        """Concepts of a contrast basis: as many as the class basis of ``a`` has."""
        cc = self.bundle.classes.get(a)
        if cc is not None:
            return cc.k
        k = self.bundle.manifest.method.params.get("concepts")
        return int(k) if isinstance(k, int) and k > 0 else 5

    def _compute(self, a: int, b: int) -> ContrastPair | None:
        start = time.perf_counter()
        xa, xb = self._samples[a], self._samples[b]
        # None when the bundle's samples cannot give this pair (not the client's fault): the class
        # basis of a is used instead
        pair = compute_pair(a, b, xa, xb, self._k(a), l2=self.l2, seed=self.seed)
        seconds = time.perf_counter() - start
        if pair is not None:
            pair.seconds = seconds
        with self._lock:
            self.compute_count += 1
            self.compute_seconds_total += seconds
            self.last_compute_seconds = seconds
        log.info("contrast %d rather than %d computed on request in %.3f s (%d and %d samples)",
                 a, b, seconds, len(xa), len(xb))
        if self.on_compute is not None:
            try:
                self.on_compute(a, b, seconds)
            except Exception:  # metrics must never fail a request
                log.exception("contrast on_compute hook failed")
        return pair

"""Prototype mining: each concept's top crops over a pool of images, for every class of a learn
shard in one streamed pass.

The pool is the crop grid of every kept image (:mod:`.windows`: 2x2-cell windows, a 3x3 grid of a
7x7 map), read in blocks of whole classes (:meth:`.feature_store.FeatureStore.window_blocks`), never
held whole. Each block's window means V (rows, C) meet all the shard's concept directions in one
product P = V U^T (U: unit directions, as many classes at a time as ``CLASS_GROUP_CELLS``
allows); the rankings of a crop for concept j come from it:

- ``cosine``: cosine similarity of the window's mean activation to the concept direction (Herdt &
  Otero Baguer's ranking, made for ImageNet models on ImageNet data). It ignores how much of the
  concept is there: a near-black crop whose few activations point the right way can top it.
- ``code``: the concept's code in the window as the explain core serves it: the NNLS projection of
  the window's mean activation onto the class basis (the same projection as a served image's
  presence), i.e. how much of the concept the crop holds, next to the other concepts. The NNLS
  solver takes the correlations V B^T, which are P scaled by the basis norms: no second product.
- ``evidence`` (the default): the code times the probability the model's head gives the class on
  the window's mean activation, softmax(h(v))_y: a crop that holds much of the concept *and* that
  the model, there, reads as the class (a concept's crops from another class's image, where the
  same part is evidence for that other class, drop down). Like relevance-chosen references
  (zennit-crp) rather than activation-chosen ones. It needs the head on window means
  (``window_logits``); without it mining has the other two rankings only.

Each concept keeps its top ``m`` crops, at most one per source image, for each ranking and each
variant (all pool images, or only those the model does not predict as the class): per block the
best ``m x G`` candidates (G windows per image: m distinct images are always among them) are merged
into a running top of the same size, ties broken by image key and window. The blocks are the same
whatever the sharding (whole classes in class order, images in key order), so a sharded run mines
exactly what a single run mines.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .feature_store import ImageRef, WindowBlock
from .features import Record
from .windows import window_means

RANKINGS = ("evidence", "code", "cosine")
DEFAULT_RANKING = "evidence"  # chosen by the stitched test over the three (README: Prototypes; bench/faithfulness.py)
WindowLogits = Callable[[np.ndarray], np.ndarray]  # window means (rows, C) -> the head's logits (rows, K)
BLOCK_IMAGES = 1024  # images per streamed block (whole classes): rows = images x windows
CLASS_GROUP_CELLS = 1 << 23  # rows x directions of one product (P and its scores: ~32 MB float32 each)


@dataclass(frozen=True)
class Crop:
    """One mined crop: its source image, its window (index into the grid) and its score; ``box``:
    the view pixels (x0, y0, x1, y1) to cut where fitted to the concept (:func:`fit_boxes`), else
    the window's."""

    ref: ImageRef
    window: int
    score: float
    cosine: float
    box: tuple[int, int, int, int] | None = None


class RecordPool:
    """A pool of records held in memory (tests, benches), streamed like a :class:`FeatureStore`
    (records in the given order, one block of ``block`` images at a time)."""

    def __init__(self, records: list[Record], cells: int = 2, block: int = 256):
        self.records, self.cells, self.block = records, cells, block
        self.images = [ImageRef(-1, -1, i, r.key, r.predicted, r.label) for i, r in enumerate(records)]

    def window_blocks(self, block_images: int = BLOCK_IMAGES) -> Iterator[WindowBlock]:
        for i in range(0, len(self.records), self.block):
            recs = self.records[i:i + self.block]
            yield WindowBlock(i, window_means(np.stack([r.features for r in recs]), self.cells))

    def view_jpeg(self, ref: ImageRef) -> bytes:
        return self.records[ref.row].view_jpeg

    def view_features(self, ref: ImageRef) -> np.ndarray:
        return np.asarray(self.records[ref.row].features, np.float32)


class _RunningTop:
    """For one ranking and variant, the running top ``cap`` crops of every concept column:
    score, image (pool index), window, cosine: each (cap, J)."""

    def __init__(self, cap: int, columns: int):
        self.cap = cap
        self.score = np.full((cap, columns), -np.inf, np.float32)
        self.image = np.full((cap, columns), -1, np.int64)
        self.window = np.zeros((cap, columns), np.int64)
        self.cosine = np.zeros((cap, columns), np.float32)

    def offer(self, cols: slice, scores: np.ndarray, cosines: np.ndarray, first_image: int, windows: int,
              key_rank: np.ndarray) -> None:
        """Merge a block's scores (rows, J_g) for columns ``cols``: rows are (image, window) pairs of
        images first_image.. in pool order; masked rows carry -inf."""
        rows = scores.shape[0]
        top = min(self.cap, rows)
        idx = np.argpartition(-scores, top - 1, axis=0)[:top] if top < rows else \
            np.broadcast_to(np.arange(rows)[:, None], scores.shape)
        cand_score = np.take_along_axis(scores, idx, axis=0)
        cand_cos = np.take_along_axis(cosines, idx, axis=0)
        score = np.concatenate([self.score[:, cols], cand_score])
        image = np.concatenate([self.image[:, cols], first_image + idx // windows])
        window = np.concatenate([self.window[:, cols], idx % windows])
        cosine = np.concatenate([self.cosine[:, cols], cand_cos])
        rank = np.where(image >= 0, key_rank[np.maximum(image, 0)], np.iinfo(np.int64).max)
        # best score first; ties by image key, then window: the same whatever the blocks' order
        order = np.lexsort((window.T, rank.T, -score.T), axis=-1).T[:self.cap]
        for name, arr in (("score", score), ("image", image), ("window", window), ("cosine", cosine)):
            getattr(self, name)[:, cols] = np.take_along_axis(arr, order, axis=0)

    def crops(self, col: int, m: int, images: list[ImageRef]) -> list[Crop]:
        """The column's top ``m`` crops, one per source image, best first."""
        chosen, used = [], set()
        for score, image, window, cos in zip(self.score[:, col], self.image[:, col], self.window[:, col],
                                             self.cosine[:, col]):
            if image < 0 or not np.isfinite(score) or image in used:
                continue
            chosen.append(Crop(images[image], int(window), float(score), float(cos)))
            used.add(image)
            if len(chosen) == m:
                break
        return chosen


def mine_classes(pool, bases: dict[int, np.ndarray], m: int, rankings: tuple[str, ...] = RANKINGS,
                 block_images: int = BLOCK_IMAGES, window_logits: WindowLogits | None = None,
                 logit_rows: dict[int, np.ndarray] | None = None, logit_weight: float = 0.0
                 ) -> dict[int, dict[tuple[str, bool], list[list[Crop]]]]:
    """Top ``m`` crops per concept of each class's basis (``bases``: class -> (k, C)) over ``pool``
    (streamed once for all the classes), for each ranking and both variants:
    class -> ``(ranking, exclude_class)`` -> [concept][rank] :class:`Crop`; with ``exclude_class``
    no crop comes from an image the model predicts as the class. ``window_logits``: the head on
    window means, for the ``evidence`` ranking (dropped from ``rankings`` without it). ``logit_rows``
    (class -> the head's row (C,)) and ``logit_weight``: the served projection's codes are logit-aware
    (service/nnls.py), and so are the ``code`` and ``evidence`` scores."""
    from ..service.nnls import NNLSProjector

    if window_logits is None:
        rankings = tuple(r for r in rankings if r != "evidence")

    classes = sorted(bases)
    ks = [int(bases[c].shape[0]) for c in classes]
    offsets = np.concatenate([[0], np.cumsum(ks)]).astype(int)
    col_class = np.repeat(np.asarray(classes, np.int64), ks)
    basis_all = np.concatenate([np.asarray(bases[c], np.float32) for c in classes]) if classes else \
        np.zeros((0, 1), np.float32)
    norms = np.linalg.norm(basis_all, axis=1).astype(np.float32) + np.float32(1e-12)
    units = basis_all / norms[:, None]
    projectors = {c: NNLSProjector.from_basis(bases[c], (logit_rows or {}).get(c), logit_weight) for c in classes}
    images = pool.images
    key_rank = np.empty(len(images), np.int64)
    key_rank[sorted(range(len(images)), key=lambda i: images[i].key)] = np.arange(len(images))
    predicted = np.asarray([r.predicted for r in images], np.int64)
    tops: dict[tuple[str, bool], _RunningTop] = {}
    for block in pool.window_blocks(block_images):
        n, g, c = block.vectors.shape
        if not tops:
            tops = {(r, ex): _RunningTop(max(1, m * g), len(col_class)) for r in rankings for ex in (False, True)}
        v = block.vectors.reshape(n * g, c)
        vnorm = np.linalg.norm(v, axis=1, keepdims=True) + np.float32(1e-12)
        pred_rows = np.repeat(predicted[block.first:block.first + n], g)
        per_group = max(1, CLASS_GROUP_CELLS // max(1, n * g * max(ks, default=1)))
        lse = logits = None  # the head's logits on the block's windows (rows, K) and their log-sum-exp
        for gi in range(0, len(classes), per_group):
            lo, hi = offsets[gi], offsets[min(gi + per_group, len(classes))]
            cols = slice(lo, hi)
            proj = v @ units[lo:hi].T  # (rows, J_g): v . u_j
            scores = {"cosine": proj / vnorm}
            if "code" in rankings or "evidence" in rankings:
                code = np.empty_like(proj)
                for ci in range(gi, min(gi + per_group, len(classes))):
                    a, b = offsets[ci] - lo, offsets[ci + 1] - lo
                    pr = projectors[classes[ci]]
                    code[:, a:b] = pr.project_from_correlations(pr.correlations(v, plain=proj[:, a:b] * norms[lo + a:lo + b]))
                scores["code"] = code
            if "evidence" in rankings:
                if logits is None:
                    logits = np.asarray(window_logits(v), np.float32)
                    lse = log_sum_exp(logits)
                scores["evidence"] = code * np.exp(logits[:, col_class[lo:hi]] - lse)
            own = pred_rows[:, None] == col_class[None, lo:hi]  # rows of images predicted as the column's class
            for (ranking, exclude), top in tops.items():
                s = np.where(own, -np.inf, scores[ranking]).astype(np.float32) if exclude else scores[ranking]
                top.offer(cols, s, scores["cosine"], block.first, g, key_rank)
    out = {}
    for ci, cls in enumerate(classes):
        cols = range(offsets[ci], offsets[ci + 1])
        out[cls] = {key: [top.crops(j, m, images) for j in cols] for key, top in tops.items()} if tops else \
            {(r, ex): [[] for _ in cols] for r in rankings for ex in (False, True)}  # an empty pool
    return out


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """log sum_k exp(z_k) of each row of logits (rows, K), as (rows, 1), stably: softmax(z)_y is
    then exp(z_y - lse) for any column y without forming the whole softmax."""
    top = logits.max(axis=1, keepdims=True)
    return top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def head_on_windows(head_weight: np.ndarray | None, head_bias: np.ndarray | None, head_fn=None,
                    grid: tuple[int, int] = (1, 1), chunk: int = 256) -> WindowLogits:
    """The head on window means (rows, C) -> logits (rows, K): W v + b for a linear head; for
    another head (a function of feature maps (N, C, H, W)), each window mean spread over a whole
    ``grid`` map (the map whose every cell is the window), in chunks of ``chunk`` rows."""
    if head_weight is not None:
        w, b = np.asarray(head_weight, np.float32), np.asarray(head_bias, np.float32)
        return lambda v: v @ w.T + b
    h, wd = grid

    def logits(v: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(head_fn(np.ascontiguousarray(np.broadcast_to(
            v[s:s + chunk, :, None, None], (len(v[s:s + chunk]), v.shape[1], h, wd)))), np.float32)
            for s in range(0, len(v), chunk)])
    return logits


def crop_jpeg(view_jpeg: bytes, box, quality: int = 90) -> bytes:
    """The box (x0, y0, x1, y1) of a view (JPEG bytes) as JPEG bytes."""
    view = Image.open(io.BytesIO(view_jpeg)).convert("RGB")
    buf = io.BytesIO()
    view.crop(tuple(int(v) for v in box)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


FITTED = "fitted"  # the suffix of a ranking whose crops are fitted to the concept's extent: "code/fitted"
BOXES = (FITTED, "window")  # --prototype-box


def fit_boxes(mined: dict, basis: np.ndarray, pool, grid: tuple[int, int], cells: int, view_size: int,
              logit_row: np.ndarray | None = None, logit_weight: float = 0.0) -> dict:
    """``mined`` ((ranking, exclude) -> [concept][rank] crops) with, for each key, a second entry
    ``(f"{ranking}/fitted", exclude)``: the same crops, each cut to its concept's extent in its source
    image (:func:`.windows.fitted_cells` on the concept's served code map over the image's feature
    cells, ``basis`` (k, C) the class's concepts, ``logit_row`` and ``logit_weight`` its served
    projection's, service/nnls.py) instead of the fixed window."""
    import dataclasses

    from ..service.nnls import NNLSProjector
    from .windows import cells_box, fitted_cells

    h, w = grid
    proj = NNLSProjector.from_basis(np.asarray(basis, np.float32), logit_row, logit_weight)
    code_maps: dict = {}

    def maps_of(ref) -> np.ndarray:  # (k, H, W): every concept's code map of one source image
        if ref not in code_maps:
            f = pool.view_features(ref)
            code_maps[ref] = proj.project(f.reshape(f.shape[0], -1).T).T.reshape(-1, h, w)
        return code_maps[ref]

    out = dict(mined)
    for (ranking, exclude), per_concept in mined.items():
        out[(f"{ranking}/{FITTED}", exclude)] = [
            [dataclasses.replace(c, box=tuple(cells_box(fitted_cells(maps_of(c.ref)[j], c.window, cells), h, w,
                                                        view_size))) for c in crops]
            for j, crops in enumerate(per_concept)]
    return out

"""Prototype mining: each concept's top crops over a pool of images, streamed with a bounded top-m.

The pool is the crop grid of every kept image (:mod:`.windows`: 2x2-cell windows, a 3x3 grid of a
7x7 map), read one block at a time (:meth:`.feature_store.FeatureStore.window_chunks`), never held
whole. Two rankings of a crop for concept j:

- ``cosine``: cosine similarity of the window's mean activation to the concept direction (Herdt &
  Otero Baguer's ranking, made for ImageNet models on ImageNet data). It ignores how much of the
  concept is there: a near-black crop whose few activations point the right way can top it.
- ``code``: the concept's code in the window as the explain core serves it: the NNLS projection of
  the window's mean activation onto the class basis (the same projection as a served image's
  presence), i.e. how much of the concept the crop holds, next to the other concepts.

Each concept keeps its top ``m`` crops, at most one per source image, for each ranking and each
variant (all pool images, or only those the model does not predict as the class): per block the
best ``m x G`` candidates (G windows per image: m distinct images are always among them) are merged
into a running top of the same size.
"""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .feature_store import ImageRef, WindowChunk
from .features import Record
from .windows import window_means

RANKINGS = ("code", "cosine")
DEFAULT_RANKING = "code"  # chosen by the stitched test over both (README: Prototypes; bench/faithfulness.py)


@dataclass(frozen=True)
class Crop:
    """One mined crop: its source image, its window (index into the grid) and its score."""

    ref: ImageRef
    window: int
    score: float
    cosine: float


class RecordPool:
    """A pool of records held in memory (tests, benches), streamed like a :class:`FeatureStore`."""

    def __init__(self, records: list[Record], cells: int = 2, block: int = 256):
        self.records, self.cells, self.block = records, cells, block

    def window_chunks(self) -> Iterator[WindowChunk]:
        for i in range(0, len(self.records), self.block):
            recs = self.records[i:i + self.block]
            refs = [ImageRef(-1, -1, i + j, r.key, r.predicted, r.label) for j, r in enumerate(recs)]
            yield WindowChunk(window_means(np.stack([r.features for r in recs]), self.cells), refs)

    def view_jpeg(self, ref: ImageRef) -> bytes:
        return self.records[ref.row].view_jpeg


def crop_scores(vectors: np.ndarray, basis: np.ndarray, projector=None) -> dict[str, np.ndarray]:
    """Both rankings' scores (n, k) of window mean activations ``vectors`` (n, C) for ``basis`` (k, C).

    ``projector``: the class's :class:`~conceptlens.service.nnls.NNLSProjector` (built once a class)."""
    from ..service.nnls import NNLSProjector

    vectors = np.asarray(vectors, np.float32)
    dirs = basis / (np.linalg.norm(basis, axis=1, keepdims=True) + 1e-12)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    projector = projector or NNLSProjector.from_basis(basis)
    return {"cosine": (vectors @ dirs.T) / norms, "code": projector.project(vectors)}


class TopCrops:
    """A bounded running top of ``m x windows`` crops per concept for one ranking and variant."""

    def __init__(self, k: int, m: int, windows: int):
        self.m, self.cap = m, max(1, m * windows)
        self.scores = [np.zeros(0, np.float32) for _ in range(k)]
        self.crops: list[list[tuple]] = [[] for _ in range(k)]

    def offer(self, scores: np.ndarray, cosines: np.ndarray, allowed: np.ndarray, refs: list[ImageRef],
              windows: int) -> None:
        """scores, cosines (n * G, k) of one block; allowed (n * G,) bool; refs (n,) source images."""
        for j in range(scores.shape[1]):
            col = np.where(allowed, scores[:, j], -np.inf)
            top = min(self.cap, int(allowed.sum()))
            if top == 0:
                continue
            idx = np.argpartition(-col, top - 1)[:top] if top < len(col) else np.flatnonzero(allowed)
            new = [(float(col[i]), refs[i // windows], int(i % windows), float(cosines[i, j])) for i in idx]
            merged = sorted(self.crops[j] + new, key=lambda t: (-t[0], t[1].key, t[2]))[:self.cap]
            self.crops[j] = merged

    def result(self) -> list[list[Crop]]:
        """Per concept, the top ``m`` crops, one per source image, best first."""
        out = []
        for cands in self.crops:
            chosen, used = [], set()
            for score, ref, window, cos in cands:
                if ref.key in used:
                    continue
                chosen.append(Crop(ref, window, score, cos))
                used.add(ref.key)
                if len(chosen) == self.m:
                    break
            out.append(chosen)
        return out


def mine(pool, basis: np.ndarray, m: int, cls: int, rankings: tuple[str, ...] = RANKINGS
         ) -> dict[tuple[str, bool], list[list[Crop]]]:
    """Top ``m`` crops per concept of ``basis`` (k, C) over ``pool`` (streamed), for each ranking and
    both variants: ``(ranking, exclude_class)`` -> [concept][rank] :class:`Crop`; with
    ``exclude_class`` no crop comes from an image the model predicts as ``cls``."""
    from ..service.nnls import NNLSProjector

    k = basis.shape[0]
    projector = NNLSProjector.from_basis(basis)
    tops: dict[tuple[str, bool], TopCrops] = {}
    for chunk in pool.window_chunks():
        n, g, c = chunk.vectors.shape
        if not tops:
            tops = {(r, ex): TopCrops(k, m, g) for r in rankings for ex in (False, True)}
        flat = chunk.vectors.reshape(n * g, c)
        scores = crop_scores(flat, basis, projector)
        other = np.repeat(np.array([ref.predicted != cls for ref in chunk.images]), g)
        for (ranking, exclude), top in tops.items():
            top.offer(scores[ranking], scores["cosine"], other if exclude else np.ones(n * g, bool), chunk.images, g)
    if not tops:
        return {(r, ex): [[] for _ in range(k)] for r in rankings for ex in (False, True)}
    return {key: top.result() for key, top in tops.items()}


def crop_jpeg(view_jpeg: bytes, box, quality: int = 90) -> bytes:
    """The box (x0, y0, x1, y1) of a view (JPEG bytes) as JPEG bytes."""
    view = Image.open(io.BytesIO(view_jpeg)).convert("RGB")
    buf = io.BytesIO()
    view.crop(tuple(int(v) for v in box)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()

"""Prototype mining: each concept's top crops over a pool of images.

The feature map is average-pooled over windows of ``cells`` x ``cells`` cells with stride
``cells`` (7x7 -> a 3x3 grid for cells=2, as in Herdt & Otero Baguer); a crop's score for a
concept is the cosine similarity of the window's mean activation to the concept direction. Each
concept keeps its top ``m`` crops, at most one per source image, optionally excluding images the
model predicts as the class.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .features import Record


@dataclass
class CropPool:
    """All windows of all pool images: mean activations and where they came from."""

    vectors: np.ndarray  # (n_crops, C) float32, unit norm
    image: np.ndarray  # (n_crops,) index into records
    boxes: np.ndarray  # (n_crops, 4) x0, y0, x1, y1 in view pixels
    records: list[Record]

    @functools.cached_property
    def predicted(self) -> np.ndarray:
        """(n_images,) the model's predicted class of each pool image."""
        return np.array([r.predicted for r in self.records])

    @classmethod
    def build(cls, records: list[Record], cells: int = 2, view_size: int = 224, margin: float = 0.15) -> "CropPool":
        if not records:
            return cls(np.zeros((0, 0), np.float32), np.zeros(0, int), np.zeros((0, 4), int), [])
        c, h, w = records[0].features.shape
        cells = max(1, min(cells, h, w))
        gh, gw = h // cells, w // cells
        chunks = []
        for i in range(0, len(records), 256):  # bounded float32 temporaries
            feats = np.stack([r.features[:, :gh * cells, :gw * cells] for r in records[i:i + 256]])
            win = feats.reshape(len(feats), c, gh, cells, gw, cells).mean(axis=(3, 5), dtype=np.float32)
            chunks.append(win.transpose(0, 2, 3, 1).reshape(-1, c))  # (n*gh*gw, C)
        vec = np.concatenate(chunks)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True) + 1e-12
        sy, sx = view_size / h, view_size / w
        boxes = []
        for gy in range(gh):
            for gx in range(gw):
                y0, x0 = gy * cells * sy, gx * cells * sx
                y1, x1 = y0 + cells * sy, x0 + cells * sx
                my, mx = (y1 - y0) * margin, (x1 - x0) * margin
                boxes.append([max(0, round(x0 - mx)), max(0, round(y0 - my)),
                              min(view_size, round(x1 + mx)), min(view_size, round(y1 + my))])
        boxes = np.tile(np.asarray(boxes, int), (len(records), 1))
        image = np.repeat(np.arange(len(records)), gh * gw)
        return cls(vec, image, boxes, records)


def crop_scores(pool: CropPool, basis: np.ndarray) -> np.ndarray:
    """(n_crops, k) cosine similarity of every crop of the pool to each concept (rows of ``basis``
    (k, C)). The one expensive product of prototype mining: computed once per class, shared by the
    prototypes and the stitched tests."""
    if pool.vectors.size == 0:
        return np.zeros((0, basis.shape[0]), np.float32)
    dirs = basis / (np.linalg.norm(basis, axis=1, keepdims=True) + 1e-12)
    return pool.vectors @ dirs.T


def top_crops(pool: CropPool, scores: np.ndarray, m: int, exclude_class: int | None = None) -> list[list[int]]:
    """Per concept (columns of ``scores``, from :func:`crop_scores`), indices of its top ``m``
    crops, one per source image."""
    k = scores.shape[1]
    if pool.vectors.size == 0:
        return [[] for _ in range(k)]
    allowed = np.ones(len(pool.image), bool)
    if exclude_class is not None:
        allowed = pool.predicted[pool.image] != exclude_class
    out = []
    per_image = max(1, int(np.bincount(pool.image).max()))
    for j in range(k):
        col = np.where(allowed, scores[:, j], -np.inf)
        # m distinct images are among the top m * (crops per image) crops: partial sort only those.
        top = min(len(col), m * per_image)
        cand = np.argpartition(-col, top - 1)[:top] if top < len(col) else np.arange(len(col))
        order = cand[np.argsort(-col[cand], kind="stable")]
        chosen, used = [], set()
        for idx in order:
            if not allowed[idx] or pool.image[idx] in used:
                continue
            chosen.append(int(idx))
            used.add(pool.image[idx])
            if len(chosen) == m:
                break
        out.append(chosen)
    return out


def crop_jpeg(record: Record, box, quality: int = 90) -> bytes:
    """The box of the record's view as JPEG bytes."""
    view = Image.open(io.BytesIO(record.view_jpeg)).convert("RGB")
    buf = io.BytesIO()
    view.crop(tuple(int(v) for v in box)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def cosine_scores(scores: np.ndarray, crops: list[list[int]]) -> list[list[float]]:
    """The :func:`crop_scores` of each concept's chosen crops."""
    return [[float(scores[i, j]) for i in idx] for j, idx in enumerate(crops)]

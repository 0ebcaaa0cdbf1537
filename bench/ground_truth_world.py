"""The ground-truth benchmark's world and metrics (``bench/ground_truth.py``), importable without work.

The world: 64x64 RGB images of a noisy, smoothly tinted background with small planted parts at
random, non-overlapping places. Each class is a pair of *class parts*, in a 2x2 design so that
every class part is shared by two classes and only the pair identifies the class (a model must
use both parts of a class to tell it from the two classes that share one of them):

    disc_stripe    red disc      + blue stripe
    disc_cross     red disc      + green cross
    checker_stripe orange checker + blue stripe
    checker_cross  orange checker + green cross

Two *distractors* appear in any image with probability 1/2 each, whatever its class: a white
ring, and a red square of the disc's very colour (only its shape tells it from the disc, so a
concept of "red" would mix a used part with an unused look-alike). Every sample keeps its
background and each part's pixels and mask, so a part can be erased exactly (its pixels replaced
by the background under it), and each part's pixel mask is the ground truth for the heatmaps.

Metrics (all on the model's input crop, heatmaps upsampled bilinearly from the feature grid):

- ``part_drops``: the class logit's drop when one part is erased, and the class's whole evidence
  (all parts erased); a part is *used* when its drop is a real share of that evidence.
- ``concept_part_shares``: per concept, the share of its heatmap mass inside each part's region
  (the part's mask dilated by a tolerance of half a feature cell) and on the background.
- ``recovery``: share of used parts with a concept of their own (a concept whose best region is
  that part, with at least ``RECOVERY_SHARE`` of its mass there).
- ``purity``: per concept, the share of its mass on its best region (a part or the background).
- ``pointing``: share of images where the argmax pixel of a map (the top concept's heatmap, or
  the class activation map W[y] . A) lies in the region of a used part.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SIZE = 64  # image side, pixels
BACKGROUND = "background"


# --- the world ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartKind:
    name: str
    shape: str  # disc, stripe, cross, checker, ring, square
    color: tuple[int, int, int]
    size: int  # nominal extent in pixels (diameter or side)


PARTS: dict[str, PartKind] = {p.name: p for p in (
    PartKind("red disc", "disc", (215, 40, 40), 14),
    PartKind("blue stripe", "stripe", (40, 70, 225), 18),
    PartKind("green cross", "cross", (40, 190, 60), 15),
    PartKind("orange checker", "checker", (240, 140, 20), 14),
    PartKind("white ring", "ring", (235, 235, 235), 15),
    PartKind("purple square", "square", (140, 50, 190), 12),
    PartKind("red square", "square", (215, 40, 40), 12),
)}

CLASSES: dict[str, tuple[str, ...]] = {
    "disc_stripe": ("red disc", "blue stripe"),
    "disc_cross": ("red disc", "green cross"),
    "checker_stripe": ("orange checker", "blue stripe"),
    "checker_cross": ("orange checker", "green cross"),
}
DISTRACTORS: tuple[str, ...] = ("white ring", "red square")
DISTRACTOR_P = 0.5
GAP = 8  # minimum free pixels between the bounding boxes of two parts (one feature cell)


@dataclass
class PlacedPart:
    name: str
    mask: np.ndarray  # (S, S) bool
    paint: np.ndarray  # (n, 3) uint8: the part's pixels, in mask order
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


@dataclass
class Sample:
    label: int
    background: np.ndarray  # (S, S, 3) uint8
    parts: list[PlacedPart] = field(default_factory=list)

    def image(self, without: tuple[str, ...] | set[str] = ()) -> np.ndarray:
        """(S, S, 3) uint8: the background with every part painted on but those ``without``."""
        img = self.background.copy()
        for p in self.parts:
            if p.name not in without:
                img[p.mask] = p.paint
        return img

    def part(self, name: str) -> PlacedPart | None:
        return next((p for p in self.parts if p.name == name), None)

    @property
    def part_names(self) -> list[str]:
        return [p.name for p in self.parts]


def _shape_mask(kind: PartKind, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) bool mask of one part, size jittered by about +-15 %."""
    s = max(6, int(round(kind.size * rng.uniform(0.85, 1.15))))
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    c = s / 2.0
    r = np.hypot(yy - c, xx - c)
    if kind.shape == "disc":
        return r <= c
    if kind.shape == "ring":
        return (r <= c) & (r >= c * 0.55)
    if kind.shape == "square":
        return np.ones((s, s), bool)
    if kind.shape == "cross":
        arm = max(3, s // 3)
        lo = (s - arm) // 2
        m = np.zeros((s, s), bool)
        m[lo:lo + arm, :] = True
        m[:, lo:lo + arm] = True
        return m
    if kind.shape == "stripe":
        m = np.ones((max(4, s // 3), s), bool)
        return m if rng.random() < 0.5 else m.T
    if kind.shape == "checker":
        return np.ones((s, s), bool)
    raise ValueError(f"unknown shape {kind.shape}")


def _paint(kind: PartKind, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(h, w, 3) uint8 colours of a part: its colour jittered, a little pixel noise; the checker
    alternates its colour with a dark one in 3-pixel squares."""
    h, w = mask.shape
    color = np.clip(np.asarray(kind.color, np.float32) + rng.uniform(-20, 20, 3), 0, 255)
    img = np.broadcast_to(color, (h, w, 3)).copy()
    if kind.shape == "checker":
        yy, xx = np.mgrid[0:h, 0:w]
        dark = ((yy // 3 + xx // 3) % 2).astype(bool)
        img[dark] = color * 0.25
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey-brown tint, smooth low-frequency colour blobs and pixel noise."""
    base = rng.uniform(80, 160) + rng.uniform(-20, 20, 3)
    coarse = rng.normal(0, 22, (4, 4, 3)).astype(np.float32)
    # bilinear upsampling of the 4x4 blobs to the image (separable)
    u = _upsample_matrix(4, size)
    blobs = np.einsum("ha,abc,wb->hwc", u, coarse, u)
    img = base + blobs + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class World:
    """Classes as tuples of class parts, distractors shared by all classes; seeded sampling."""

    classes: tuple[tuple[str, tuple[str, ...]], ...] = tuple(CLASSES.items())
    distractors: tuple[str, ...] = DISTRACTORS
    distractor_p: float = DISTRACTOR_P
    size: int = SIZE
    part_scale: float = 1.0  # every part's nominal extent times this (worlds of other part sizes)

    @property
    def class_names(self) -> list[str]:
        return [c for c, _ in self.classes]

    def class_parts(self, label: int) -> tuple[str, ...]:
        return self.classes[label][1]

    def sample(self, label: int, rng: np.random.Generator) -> Sample:
        names = list(self.class_parts(label)) + [d for d in self.distractors if rng.random() < self.distractor_p]
        for _ in range(100):  # rejection: no two boxes closer than GAP
            s = Sample(label, _background(rng, self.size))
            boxes: list[tuple[int, int, int, int]] = []
            ok = True
            for name in rng.permutation(names):
                kind = PARTS[str(name)]
                if self.part_scale != 1.0:
                    kind = replace(kind, size=max(4, round(kind.size * self.part_scale)))
                m = _shape_mask(kind, rng)
                h, w = m.shape
                for _ in range(50):
                    y, x = int(rng.integers(1, self.size - h)), int(rng.integers(1, self.size - w))
                    box = (x, y, x + w, y + h)
                    if all(box[0] >= b[2] + GAP or b[0] >= box[2] + GAP or box[1] >= b[3] + GAP
                           or b[1] >= box[3] + GAP for b in boxes):
                        break
                else:
                    ok = False
                    break
                boxes.append(box)
                full = np.zeros((self.size, self.size), bool)
                full[y:y + h, x:x + w] = m
                paint = _paint(kind, m, rng)[m]
                s.parts.append(PlacedPart(kind.name, full, paint, box))
            if ok:
                s.parts.sort(key=lambda p: names.index(p.name))
                return s
        raise RuntimeError("could not place the parts; the image is too small for them")

    def samples(self, n_per_class: int, seed: int) -> list[Sample]:
        """``n_per_class`` samples of every class, interleaved by class, from one seeded generator."""
        rng = np.random.default_rng(seed)
        return [self.sample(c, rng) for _ in range(n_per_class) for c in range(len(self.classes))]


def write_image_folder(samples: list[Sample], class_names: list[str], root: Path, prefix: str = "img") -> Path:
    """PNGs in ``root/<class name>/<prefix>_<i>.png`` (an ImageFolder)."""
    from PIL import Image

    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        Image.fromarray(s.image()).save(root / class_names[s.label] / f"{prefix}_{i:05d}.png")
    return root


def png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --- geometry ----------------------------------------------------------------------------------------
def _upsample_matrix(n: int, size: int) -> np.ndarray:
    """(size, n) bilinear interpolation weights, align_corners=False with edge clamping (what
    torch's ``interpolate(mode="bilinear")`` and Pillow's resize of a coarse grid do)."""
    pos = (np.arange(size) + 0.5) * n / size - 0.5
    pos = np.clip(pos, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    t = pos - lo
    u = np.zeros((size, n), np.float64)
    u[np.arange(size), lo] += 1 - t
    u[np.arange(size), hi] += t
    return u


def upsample(grid: np.ndarray, size: int = SIZE) -> np.ndarray:
    """(h, w) map on the feature grid -> (size, size) bilinear, on the model's input crop."""
    h, w = grid.shape
    return _upsample_matrix(h, size) @ np.asarray(grid, np.float64) @ _upsample_matrix(w, size).T


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a bool mask by ``r`` pixels."""
    if r <= 0:
        return mask.copy()
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            out[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)] |= src
    return out


def regions(sample: Sample, tolerance: int) -> dict[str, np.ndarray]:
    """Each part's region (its mask dilated by ``tolerance``) and the background (the rest)."""
    out = {p.name: dilate(p.mask, tolerance) for p in sample.parts}
    rest = np.ones_like(sample.background[..., 0], bool)
    for m in out.values():
        rest &= ~m
    out[BACKGROUND] = rest
    return out


def tolerance_for(grid: int, size: int = SIZE) -> int:
    """Half a feature cell in pixels: a heatmap's peak can only sit at a cell centre, and every
    part dilated by half a cell contains one."""
    return max(1, size // grid // 2)


# --- metrics -----------------------------------------------------------------------------------------
def part_drops(logit_fn, samples: list[Sample], class_id: int, parts: list[str]) -> dict:
    """The class logit's drop when each part is erased, over the class's ``samples``.

    ``logit_fn(images (N, S, S, 3) uint8) -> (N, K) logits``. Returns ``{"evidence": mean of
    logit(x) - logit(x with every part erased), "drop": {part: mean drop over the images that have
    it}, "relative": {part: drop / evidence}}``.
    """
    full = logit_fn(np.stack([s.image() for s in samples]))[:, class_id]
    bare = logit_fn(np.stack([s.background for s in samples]))[:, class_id]
    evidence = float(np.mean(full - bare))
    drop, rel = {}, {}
    for name in parts:
        idx = [i for i, s in enumerate(samples) if s.part(name) is not None]
        if not idx:
            continue
        erased = logit_fn(np.stack([samples[i].image(without=(name,)) for i in idx]))[:, class_id]
        drop[name] = float(np.mean(full[idx] - erased))
        rel[name] = drop[name] / evidence if evidence > 0 else float("nan")
    return {"evidence": evidence, "drop": drop, "relative": rel}


def concept_part_shares(heatmaps: list[np.ndarray], samples: list[Sample], tolerance: int) -> dict[str, np.ndarray]:
    """Per concept, the share of its heatmap mass in each region, pooled over the images.

    ``heatmaps``: per sample, (k, h, w) non-negative codes on the feature grid. Returns
    ``{region: (k,) share}`` with the regions of every part seen and the background; the shares of
    a concept sum to 1 (0 for a concept that never fires)."""
    k = heatmaps[0].shape[0]
    mass: dict[str, np.ndarray] = {}
    total = np.zeros(k)
    for hm, s in zip(heatmaps, samples):
        up = np.stack([upsample(np.maximum(m, 0), s.background.shape[0]) for m in hm])  # (k, S, S)
        total += up.sum(axis=(1, 2))
        for name, region in regions(s, tolerance).items():
            mass.setdefault(name, np.zeros(k))
            mass[name] += up[:, region].sum(axis=1)
    return {name: np.divide(m, total, out=np.zeros(k), where=total > 0) for name, m in mass.items()}


def assign_concepts(shares: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """Per concept: (its best region, the share of its mass there) — the share is its purity."""
    names = list(shares)
    mat = np.stack([shares[n] for n in names])  # (regions, k)
    best = mat.argmax(axis=0)
    return [(names[b], float(mat[b, j])) for j, b in enumerate(best)]


def recovery(assigned: list[tuple[str, float]], used: list[str], min_share: float) -> tuple[float, list[str]]:
    """(share of ``used`` parts that have a concept of their own, the parts recovered): a concept
    whose best region is the part with at least ``min_share`` of its mass there."""
    found = [p for p in used if any(r == p and s >= min_share for r, s in assigned)]
    return (len(found) / len(used) if used else float("nan")), found


def points_at(grid_map: np.ndarray, sample: Sample, parts: list[str], tolerance: int) -> bool:
    """Whether the argmax pixel of the upsampled map lies in the region of one of ``parts``."""
    up = upsample(grid_map, sample.background.shape[0])
    y, x = np.unravel_index(int(np.argmax(up)), up.shape)
    reg = regions(sample, tolerance)
    return any(bool(reg[p][y, x]) for p in parts if p in reg)


def class_activation_map(features: np.ndarray, head_weight: np.ndarray, class_id: int) -> np.ndarray:
    """CAM of a GAP+linear head: W[y] . A per cell, (h, w)."""
    return np.tensordot(head_weight[class_id], features, axes=(0, 0))

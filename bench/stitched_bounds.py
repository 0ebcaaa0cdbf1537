"""What the stitched-prototype test can reach on a crop pool, whatever the concepts.

Herdt & Otero Baguer's test stitches the top crop of each of a class's 4 concepts into one image and
asks whether the model calls it the class. Its pass rate mixes two things: how well the concepts'
prototypes show the class, and what the pool of crops and the stitch layout allow. This bench
measures the second with the model itself choosing the crops (no concepts at all), on the same pool
and the same 2 x 2 layout as ``precompute`` (``checks.stitch``; crops are the mining windows, 3 x 3
windows of 2 x 2 feature cells with a 15 % margin):

- ``whole images``: four of the class's own images, each shrunk to a tile (the layout alone);
- ``random own crops``: four random windows of the class's images (mean over ``--draws``);
- ``oracle``: the four windows whose crop, alone, the model gives the highest probability of the
  class; allowing every pool image, and excluding images the model predicts as the class (the
  test's two variants);
- ``greedy oracle``: crops picked one by one, each the window (of the ``--candidates`` best by the
  oracle's score) that most raises the class's probability of the stitched image so far;
- ``any crop called the class``: share of classes for which at least one window of an excluded
  image is, alone, classified as the class.

An oracle's rate bounds what prototypes chosen from this pool in this layout can pass; a class no
crop of another image is called can pass the excluding variant only through a combination.

    python bench/stitched_bounds.py [--every 10] [--draws 10] [--candidates 24] [--seed 0]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import lite0_onnx  # noqa: E402
from faithfulness import imagenet_folder  # noqa: E402


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def main(argv=None) -> int:
    from conceptlens.precompute.checks import stitch
    from conceptlens.precompute.models import load_model
    from conceptlens.precompute.windows import window_boxes
    from conceptlens.service.explain import softmax
    from conceptlens.service.preprocess import normalize, resize_crop
    from conceptlens.service.runtime import OnnxRuntime, run_any_batch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=10, help="every n-th ImageNet class (10: the 100 of faithfulness.py)")
    ap.add_argument("--draws", type=int, default=10, help="random draws of the random-crops row")
    ap.add_argument("--candidates", type=int, default=24, help="windows the greedy oracle tries at each step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    pre = load_model("efficientnet-lite0").preprocessing
    runtime = OnnxRuntime(lite0_onnx(), device="auto")
    root = imagenet_folder(args.every)
    classes, views = [], []
    for d in sorted(root.iterdir(), key=lambda p: int(p.name)):
        for f in sorted(d.glob("*.jpg")):
            view = Image.fromarray(np.ascontiguousarray(resize_crop(Image.open(f).convert("RGB"), pre)))
            views.append(Image.open(io.BytesIO(jpeg(view))).convert("RGB"))  # the pool keeps views as JPEG
            classes.append(int(d.name))
    classes = np.asarray(classes)
    size = pre.crop

    def logits_of(images: list[Image.Image]) -> np.ndarray:
        out = []
        for s in range(0, len(images), 32):
            x = np.stack([normalize(np.asarray(im.resize((size, size), Image.BILINEAR)), pre)
                          for im in images[s:s + 32]])
            out.append(run_any_batch(runtime, x)[1])
        return np.concatenate(out)

    def stitched_probs(crop_sets: list[list[Image.Image]]) -> np.ndarray:
        images = [stitch([jpeg(c) for c in crops], size) for crops in crop_sets]
        return softmax(logits_of(images))

    whole_pred = logits_of(views).argmax(1)
    grid = run_any_batch(runtime, normalize(np.asarray(views[0]), pre)[None])[0].shape[2:]
    boxes = window_boxes(grid[0], grid[1], 2, size)
    crops = [v.crop(tuple(int(b) for b in box)) for v in views for box in boxes]
    g = len(boxes)
    print(f"{len(set(classes))} classes, {len(views)} images, {len(crops)} windows; model top-1 on the images "
          f"{float((whole_pred == classes).mean()):.2f}", file=sys.stderr, flush=True)
    crop_probs = softmax(logits_of(crops))  # (images x windows, K)
    crop_img = np.repeat(np.arange(len(views)), g)
    rng = np.random.default_rng(args.seed)

    rows: dict[str, list[bool]] = {k: [] for k in ("whole images", "random own crops", "oracle, allowing",
                                                   "oracle, excluding", "greedy oracle, allowing",
                                                   "greedy oracle, excluding", "any crop called the class, excluding")}
    cls_list = sorted(set(classes.tolist()))
    for n, c in enumerate(cls_list):
        own = np.flatnonzero(classes == c)
        p = stitched_probs([[views[i] for i in own[:4]]])[0]
        rows["whole images"].append(int(p.argmax()) == c)
        own_windows = np.flatnonzero(np.isin(crop_img, own))
        draws = [[crops[i] for i in rng.choice(own_windows, 4, replace=False)] for _ in range(args.draws)]
        rows["random own crops"].append(float(np.mean(stitched_probs(draws).argmax(1) == c)))
        for variant, allowed in (("allowing", np.ones(len(crops), bool)),
                                 ("excluding", whole_pred[crop_img] != c)):
            idx = np.flatnonzero(allowed)
            order = idx[np.argsort(-crop_probs[idx, c], kind="stable")]
            p = stitched_probs([[crops[i] for i in order[:4]]])[0]
            rows[f"oracle, {variant}"].append(int(p.argmax()) == c)
            picked: list[int] = []
            for _ in range(4):
                cands = [i for i in order[:args.candidates] if i not in picked]
                ps = stitched_probs([[crops[j] for j in picked + [i]] for i in cands])[:, c]
                picked.append(cands[int(np.argmax(ps))])
            p = stitched_probs([[crops[i] for i in picked]])[0]
            rows[f"greedy oracle, {variant}"].append(int(p.argmax()) == c)
            if variant == "excluding":
                rows["any crop called the class, excluding"].append(bool((crop_probs[idx].argmax(1) == c).any()))
        if (n + 1) % 10 == 0:
            print(f"  {n + 1}/{len(cls_list)} classes, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"\n### Stitched test bounds: ImageNet samples, every {args.every}th class ({len(cls_list)} classes), "
          f"EfficientNet-Lite0, 2 x 2 layout\n")
    print("| crops stitched | share of classes passing |")
    print("|---|---|")
    for name, vals in rows.items():
        print(f"| {name} | {float(np.mean(vals)):.2f} |")
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

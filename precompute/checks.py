"""Faithfulness metrics and tests of a class basis, beyond reconstruction (issue 4).

All of them score the basis through the served projection (the explain core's NNLS codes):
- concept deletion / insertion (FACE): accuracy on reconstructions with the top-i concepts (by
  mean contribution, and by CRAFT's Sobol total-order importance as FACE orders them) removed /
  kept; C-Del = sum_i (acc_0 - acc_i) / (k + 1), C-Ins = mean of the insertion curve over
  i = 1..k; C-Gini of the importances; U-Spr, the share of non-zero codes;
- stability: mean cosine between the basis and bases fitted on folds, after Hungarian matching;
- the stitched-prototype test (Herdt & Otero Baguer): each concept's top crop stitched into one
  image, which the model should classify as the class (a grid rather than the paper's vertical
  strip, so that the whole stitch fits the model's square input);
- the hyperplane shifting test: images of the most confused class B moved along the A-vs-B
  hyperplane's normal, A' = ReLU(A + |o| normal); the largest mean p(A) over the offsets.
"""
from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
from PIL import Image

from ..service.explain import Explainer, softmax
from .evaluate import served_codes


def gini(x: np.ndarray) -> float:
    """Gini coefficient of |x| (0: all equal, towards 1: one dominates)."""
    a = np.sort(np.abs(np.asarray(x, np.float64)))
    if a.sum() <= 0:
        return 0.0
    n = len(a)
    return float((2 * np.arange(1, n + 1) - n - 1) @ a / (n * a.sum()))


ORDERINGS = ("contribution", "sobol")


def concept_curves(explainer: Explainer, cid: int, feats: np.ndarray, head_weight, head_bias,
                   head_fn: Callable | None, codes: np.ndarray | None = None, importance: str = "contribution",
                   n_designs: int = 32, seed: int = 0) -> dict:
    """Deletion/insertion curves, C-Del, C-Ins, C-Gini, U-Spr and accuracy on reconstructions
    (``codes``: the served codes (N, HW, k) of ``feats`` when already at hand).

    Concepts are ordered two ways, and the curves are computed for both: by mean contribution
    (mean over the images of s_j w_j) and by CRAFT's Sobol total-order importance
    (:func:`.importance.sobol_total_order`, ``n_designs`` and ``seed``; FACE's order). ``importance``
    picks the ordering behind the unsuffixed keys: ``importance`` (k,) and ``gini`` (of those
    values), ``deletion_curve`` / ``insertion_curve`` (k + 1 accuracies each), ``c_del`` and
    ``c_ins``; ``importance_kind`` names it. Both orderings' results: ``c_del_<o>``, ``c_ins_<o>``,
    ``gini_<o>``, ``deletion_curve_<o>``, ``insertion_curve_<o>`` for o in contribution and sobol,
    and the per-concept values ``contribution_importance`` and ``sobol_importance`` (k,).
    """
    from .importance import sobol_total_order

    if importance not in ORDERINGS:
        raise ValueError(f"unknown concept importance {importance!r}: choose {' or '.join(ORDERINGS)}")
    if len(feats) == 0:
        return {}
    feats = feats.astype(np.float32)
    proj = explainer.projector(cid)
    if codes is None:
        codes = served_codes(explainer, cid, feats)  # (N, HW, k)
    n, c, h, w = feats.shape
    k = codes.shape[2]
    weights = explainer.bundle.classes[cid].weights
    values = {"contribution": (codes.mean(axis=1) * weights).mean(axis=0),  # mean contribution (k,)
              "sobol": sobol_total_order(codes, proj.basis, head_weight if head_weight is not None else head_fn,
                                         cid, (c, h, w), n_designs=n_designs, seed=seed)}

    if head_weight is not None:  # GAP + linear: the logits are linear in the image's mean codes
        mean_codes = codes.mean(axis=1)  # (N, k)
        concept_logits = proj.basis @ head_weight.T  # (k, K): each concept direction's logits

    def accuracy(mask: np.ndarray) -> float:
        if head_weight is not None:
            logits = (mean_codes * mask) @ concept_logits + head_bias
        else:
            masked = codes * mask
            recon = (masked @ proj.basis).transpose(0, 2, 1).reshape(n, c, h, w)
            logits = head_fn(recon.astype(np.float32))
        return float((logits.argmax(axis=1) == cid).mean())

    out = {"sparsity": float((codes > 1e-6 * max(float(codes.max(initial=0)), 1e-12)).mean())}
    for name, imp in values.items():
        order = np.argsort(-imp, kind="stable")
        deletion, insertion = [], []
        for i in range(k + 1):
            drop = np.ones(k, np.float32)
            drop[order[:i]] = 0
            deletion.append(accuracy(drop))
            insertion.append(accuracy(1 - drop))
        out.update({f"deletion_curve_{name}": deletion, f"insertion_curve_{name}": insertion,
                    f"c_del_{name}": float(sum(deletion[0] - a for a in deletion) / (k + 1)),
                    f"c_ins_{name}": float(np.mean(insertion[1:])) if k else float("nan"),
                    f"gini_{name}": gini(imp), f"{name}_importance": [float(v) for v in imp]})
    out["accuracy_reconstructed"] = out["deletion_curve_contribution"][0]
    out.update({"importance_kind": importance, "importance": out[f"{importance}_importance"],
                "deletion_curve": out[f"deletion_curve_{importance}"],
                "insertion_curve": out[f"insertion_curve_{importance}"], "c_del": out[f"c_del_{importance}"],
                "c_ins": out[f"c_ins_{importance}"], "gini": out[f"gini_{importance}"]})
    return out


def matched_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine of rows of a (k, C) and b (k, C) after Hungarian matching."""
    from scipy.optimize import linear_sum_assignment

    an = a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-12)
    bn = b / (np.linalg.norm(b, axis=1, keepdims=True) + 1e-12)
    sim = an @ bn.T
    r, c = linear_sum_assignment(-sim)
    return float(sim[r, c].mean())


def stability(fit: Callable[[np.ndarray], np.ndarray], feats: np.ndarray, basis: np.ndarray, folds: int,
              seed: int = 0) -> float | None:
    """Mean matched cosine between ``basis`` and bases fitted on ``folds`` disjoint subsets of images."""
    if folds < 2 or len(feats) < 2 * folds:
        return None
    idx = np.random.default_rng(seed).permutation(len(feats))
    return float(np.mean([matched_cosine(basis, fit(feats[part])) for part in np.array_split(idx, folds)]))


def stitch(crops: list[bytes], size: int) -> Image.Image:
    """Crops (JPEG bytes) tiled on a size x size canvas, ceil(sqrt(n)) columns."""
    cols = max(1, math.ceil(math.sqrt(len(crops))))
    rows = max(1, math.ceil(len(crops) / cols))
    cw, ch = size // cols, size // rows
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    for i, data in enumerate(crops):
        img = Image.open(io.BytesIO(data)).convert("RGB").resize((cw, ch), Image.BILINEAR)
        canvas.paste(img, ((i % cols) * cw, (i // cols) * ch))
    return canvas


STITCH_CONCEPTS = 4  # the paper's n: the class's 4 most important concepts, one top crop each


def stitch_picks(per_concept: list[list], concepts: list[int], n: int) -> list:
    """The ``n`` crops to stitch: the top crop of each concept in ``concepts`` (most important
    first); a class with fewer than ``n`` concepts fills the other places with its concepts' next
    crops in the same order (rank 2 of the first, of the second, ...), so every class is tested on
    ``n`` crops: an empty place would be a black tile, itself an input the model reads."""
    picks, rank = [], 0
    while len(picks) < n:
        row = [per_concept[j][rank] for j in concepts if len(per_concept[j]) > rank]
        if not row:
            break
        picks.extend(row[:n - len(picks)])
        rank += 1
    return picks


def stitched_test(mined: dict, importance_order: list[int], crop_bytes: Callable, cid: int, forward,
                  normalize: Callable, size: int, class_names: list[str], ranking: str,
                  n: int = STITCH_CONCEPTS) -> dict:
    """Herdt & Otero Baguer's test: the top crop of each of the class's ``n`` most important concepts
    (``importance_order``: concept indices, most important first; :func:`stitch_picks` where the
    class has fewer than ``n``) stitched into one image, which the
    model should classify as ``cid``; both variants: crops from any pool image (``pass``), and only
    from images the model does not predict as ``cid`` (``pass_excluding_class``).

    ``mined``: :func:`.prototypes.mine`'s (ranking, exclude) -> [concept][rank] crops; every ranking
    in it is tested (``by_ranking``), ``ranking``'s result is the unsuffixed keys.
    ``crop_bytes(crop) -> JPEG bytes``."""
    concepts = list(importance_order)[:n]
    tested = [(rank_name, exclude, picks) for (rank_name, exclude), per_concept in mined.items()
              if (picks := stitch_picks(per_concept, concepts, n))]
    by_ranking: dict[str, dict] = {}
    if tested:  # every stitched image in one forward
        x = np.stack([normalize(stitch([crop_bytes(p) for p in picks], size)) for _, _, picks in tested])
        _, logits = forward(np.ascontiguousarray(x))
        for (rank_name, exclude, _), z in zip(tested, logits):
            label = "_excluding_class" if exclude else ""
            pred = int(z.argmax())
            r = by_ranking.setdefault(rank_name, {"concepts": [int(j) for j in concepts]})
            r[f"pass{label}"] = pred == cid
            r[f"predicted{label}"] = pred
            r[f"predicted_name{label}"] = class_names[pred]
            r[f"probability{label}"] = float(softmax(z)[cid])
    out = dict(by_ranking.get(ranking, {}))
    out.update({"ranking": ranking, "n": n, "by_ranking": by_ranking})
    return out


def most_confused(logits: np.ndarray, cid: int, candidates: set[int]) -> int | None:
    """The class (among ``candidates``) with the most second-place finishes on the class's images."""
    second = np.argsort(-logits, axis=1)[:, 1]
    counts = {}
    for s in second:
        if int(s) != cid and int(s) in candidates:
            counts[int(s)] = counts.get(int(s), 0) + 1
    return max(counts, key=counts.get) if counts else None


def attribution_pixels(feats: np.ndarray, head, cid: int, max_pixels: int, seed: int,
                       frac: float = 0.25, method: str = "gradxact", reference: np.ndarray | None = None
                       ) -> np.ndarray:
    """Pixels (m, C) whose channel-mean attribution for ``cid`` exceeds ``frac`` x the image's max
    (Herdt & Otero Baguer's contrast data), at most ``max_pixels``, seeded subsample.

    ``head``: W (K, C) of a linear head (numpy), or the torch head module (autograd). ``method``:
    "gradxact" (gradient x activation; "grad_x_act" also accepted) or "deeplift" (captum's DeepLift
    at the features against ``reference``, the reference image's features (C, H, W) from
    :func:`.learners.attribution.reference_features`; zero activations when None, where DeepLift of a
    linear head equals gradient x activation).
    """
    import torch

    from .learners.attribution import attribution_map, attribution_method, deeplift_feature_map
    from .learners.contrast import filter_pixels

    method = attribution_method(method)
    acts = torch.from_numpy(np.ascontiguousarray(feats, np.float32))
    if method == "deeplift":
        maps = deeplift_feature_map(acts, head, cid, reference)
    else:
        maps = attribution_map(acts, torch.from_numpy(head) if isinstance(head, np.ndarray) else head, cid)
    px = filter_pixels(acts, maps, frac).numpy()
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    return px


def class_flags(metrics: dict, images: int, min_images: int) -> list[str]:
    """Evaluation flags the service passes on: reasons not to trust a class's explanation."""
    flags = []
    if metrics.get("stitched") and metrics["stitched"].get("pass") is False:
        flags.append("failed_stitched_prototype_test")
    for pair in (metrics.get("shift") or {}).get("pairs", []):
        if pair["max_probability"] < 0.5:
            flags.append("failed_hyperplane_shift_test")
    ho = metrics.get("held_out") or metrics.get("train") or {}
    if ho.get("ice_fidelity", 0.0) > 0.3:
        flags.append("low_fidelity")
    if ho.get("top1_agreement", 1.0) < 0.8:
        flags.append("low_top1_agreement")
    if not metrics.get("held_out"):
        flags.append("no_held_out_images")
    return flags



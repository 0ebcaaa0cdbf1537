"""C-Del / C-Ins / C-Gini of the same bases under two protocols: the one we serve and FACE's own.

FACE's table (C-Del 0.891 on ImageNet / ResNet-34) comes from its repository's ``metrics.py`` and
notebook (github dipkamal/FACE, ``FACE_church.ipynb``), which differ from how conceptlens scores a
basis in three ways:

- codes: FACE projects an image's global-average-pooled activation a (C,) onto the basis W (k, C) by
  least squares, u = a Wᵀ (W Wᵀ)⁺, codes that may be negative; we serve per-pixel NNLS codes;
- images: FACE scores the images the basis was fitted on; we score held-out images;
- formulas: FACE's C-Del divides the deletion curve's summed drop by k + 2 (``len(curve) + 1``),
  its C-Ins is the trapezoid area of the insertion curve over 0..k divided by k; ours divide by
  k + 1 and average the insertion curve over 1..k.

Everything else is shared: CRAFT's Sobol total-order importance (32 designs) on the class's logit
orders the concepts, deletion zeroes the top-i codes and keeps no residual, accuracy is the share
of the class's images whose argmax over all classes on the reconstruction is the class, C-Gini is
the Gini of the importances.

This bench runs ``bench/faithfulness.py``'s precompute jobs (cached: the same bundles as its table),
reads each class's images back from the job's extraction parts with the job's train / held-out
split, and scores each basis under three protocols on both splits, all with FACE's formulas:
``served`` (per-pixel NNLS, as the service explains), ``image NNLS`` (NNLS of the pooled activation)
and ``FACE`` (least squares of the pooled activation), so that what moves the figure is one change
at a time. The ``served``, held-out row's C-Del with our formula is also printed: it equals
``bench/faithfulness.py``'s column.

    python bench/face_protocol.py [--datasets imagenet,cifar] [--methods nmf,face]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE  # noqa: E402
from faithfulness import bundle_tag, dataset_config, run_method  # noqa: E402

PROTOCOLS = ("served", "image NNLS", "FACE")
SPLITS = {"train": "fitted", "held_out": "held out", "train_predicted": "fitted, predicted as the class"}


def least_squares_codes(pooled: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """FACE's projection: codes (N, k) = a Wᵀ (W Wᵀ)⁺ of pooled activations a (N, C) on basis W (k, C)."""
    w = basis.astype(np.float64)
    return (pooled.astype(np.float64) @ w.T @ np.linalg.pinv(w @ w.T)).astype(np.float32)


def face_c_del(deletion: list[float]) -> float:
    """FACE's ``compute_deletion_score``: sum_i (acc_0 - acc_i) / (len(curve) + 1), i = 0..k."""
    d = np.asarray(deletion, np.float64)
    return float((d[0] - d).sum() / (len(d) + 1))


def face_c_ins(insertion: list[float]) -> float:
    """FACE's ``compute_insertion_auc``: trapezoid area of the insertion curve over 0..k, divided by k."""
    a = np.asarray(insertion, np.float64)
    return float(np.trapezoid(a) / (len(a) - 1)) if len(a) > 1 else float("nan")


def protocol_curves(explainer, cid: int, feats: np.ndarray, head_weight, head_bias, protocol: str) -> dict:
    """``concept_curves`` (Sobol order) of class ``cid`` on ``feats`` (N, C, H, W) with the codes of
    ``protocol``; the image-level protocols score the pooled activation as a 1 x 1 map."""
    from conceptlens.precompute.checks import concept_curves
    from conceptlens.precompute.evaluate import served_codes

    if protocol == "served":
        return concept_curves(explainer, cid, feats, head_weight, head_bias, None,
                              codes=served_codes(explainer, cid, feats), importance="sobol")
    pooled = feats.mean(axis=(2, 3))  # (N, C)
    proj = explainer.projector(cid)
    codes = proj.project(pooled) if protocol == "image NNLS" else least_squares_codes(pooled, proj.basis)
    return concept_curves(explainer, cid, pooled[:, :, None, None], head_weight, head_bias, None,
                          codes=codes[:, None, :], importance="sobol")


def score_bundle(manifest_dir: Path, work_dir: Path, base: dict) -> dict:
    """Mean over the bundle's classes of acc_0, C-Del, C-Ins, C-Gini per (protocol, split)."""
    from conceptlens.precompute.class_pipeline import split_indices
    from conceptlens.precompute.config import PrecomputeConfig
    from conceptlens.precompute.feature_store import FeatureStore
    from conceptlens.service.bundle import load_bundle
    from conceptlens.service.explain import Explainer

    bundle = load_bundle(manifest_dir)
    if bundle.head_weight is None:
        raise SystemExit(f"{manifest_dir}: FACE's protocol needs a GAP + linear head")
    cfg = PrecomputeConfig(**base, out="unused")
    parts = sorted((work_dir / "features").glob("part-*.safetensors"))
    store = FeatureStore(parts, cfg.max_images, cfg.seed)
    explainer = Explainer(bundle)
    rows: dict[tuple[str, str], list[dict]] = {}
    for cid in sorted(bundle.classes):
        recs = store[cid]
        feats = np.stack([r.features for r in recs]).astype(np.float32)
        train, held = split_indices(len(recs), cid, cfg.seed, cfg.held_out)
        predicted = np.array([i for i in train if recs[i].predicted == cid], int)  # FACE's filtered images
        for split, idx in (("train", train), ("held_out", held), ("train_predicted", predicted)):
            if not len(idx):
                continue
            for protocol in PROTOCOLS:
                c = protocol_curves(explainer, cid, feats[idx], bundle.head_weight, bundle.head_bias, protocol)
                rows.setdefault((protocol, split), []).append(
                    {"acc0": c["deletion_curve"][0], "acc1": c["deletion_curve"][1] if c["importance"] else np.nan,
                     "c_del": face_c_del(c["deletion_curve"]),
                     "c_ins": face_c_ins(c["insertion_curve"]), "c_gini": c["gini"], "c_del_ours": c["c_del"]})
    return {f"{p}|{s}": {key: float(np.mean([r[key] for r in rs])) for key in rs[0]} | {"classes": len(rs)}
            for (p, s), rs in rows.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="imagenet,cifar")
    ap.add_argument("--methods", default="nmf,face")
    ap.add_argument("--ranking", default="evidence", help="the bundles' prototype ranking (as faithfulness.py's)")
    ap.add_argument("--concepts", default="auto", help="k per class, or auto (as faithfulness.py's)")
    ap.add_argument("--logit-weight", type=float, default=None, help="the served projection's alpha (as faithfulness.py's)")
    ap.add_argument("--work", default=str(CACHE / "faithfulness"), help="faithfulness.py's work directory")
    ap.add_argument("--json", default=None, help="write the scores here")
    args = ap.parse_args(argv)
    work = Path(args.work)
    results = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        base = dataset_config(dataset, work)
        print(f"\n### {dataset}\n")
        print("| method | codes | images | acc. on recon. | acc., top concept removed | C-Del | C-Ins | C-Gini "
              "| C-Del, our formula |")
        print("|---|---|---|---|---|---|---|---|---|")
        for method in [m for m in args.methods.split(",") if m]:
            run_method(dataset, method, base, work, args.ranking, concepts=args.concepts, logit_weight=args.logit_weight)
            tag = bundle_tag(dataset, method, args.ranking, concepts=args.concepts, logit_weight=args.logit_weight)
            scores = score_bundle(work / "bundles" / tag, work / "work" / tag, base)
            results[f"{dataset}/{method}"] = scores
            for key, s in sorted(scores.items(), key=lambda kv: (PROTOCOLS.index(kv[0].split("|")[0]),
                                                                 list(SPLITS).index(kv[0].split("|")[1]))):
                protocol, split = key.split("|")
                print(f"| {method} | {protocol} | {SPLITS[split]} ({s['classes']} cl.) "
                      f"| {s['acc0']:.3f} | {s['acc1']:.3f} | {s['c_del']:.3f} | {s['c_ins']:.3f} | {s['c_gini']:.3f} "
                      f"| {s['c_del_ours']:.3f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

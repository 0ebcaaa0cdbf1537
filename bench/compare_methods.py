"""Every concept method's metrics side by side: same classes, same images, same k or k chosen per
class (``--k auto``), FACE's lambda fixed or chosen (``--face-lambda auto``).

EfficientNet-Lite0 over CIFAR-10 training images from ../shared/data, grouped by the model's
prediction; each class's images split into train / held-out exactly as precompute does; each
method's basis scored on the held-out images through the served NNLS projection. Concept deletion
and insertion are scored with the concepts in two orders: by mean contribution and by CRAFT's Sobol
total-order importance (FACE's order); both are printed.

    python bench/compare_methods.py [--images 1500] [--k 5|auto] [--face-lambda 1|auto] [--min-images 30]
                                    [--importance contribution|sobol]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import subset_shard  # noqa: E402

METHODS = ("nmf", "face", "attribution", "directions")
COLUMNS = ("ice_fidelity", "top1_agreement", "accuracy_reconstructed", "c_del", "c_ins", "gini", "recon_error",
           "k", "lambda")
ORDER_COLUMNS = ("c_del_contribution", "c_ins_contribution", "c_del_sobol", "c_ins_sobol", "gini_sobol")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500)
    ap.add_argument("--k", default="5", help="concepts per class: a number, or auto (chosen per class)")
    ap.add_argument("--min-images", type=int, default=30)
    ap.add_argument("--max-images", type=int, default=120)
    ap.add_argument("--face-lambda", default="1.0", help="FACE's lambda: a number, or auto (chosen per class)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--importance", choices=("contribution", "sobol"), default="contribution",
                    help="the concept order of the c_del, c_ins and gini columns")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from conceptlens.precompute.checks import concept_curves
    from conceptlens.precompute.evaluate import evaluate_class, served_codes
    from conceptlens.precompute.job import Job, PrecomputeConfig

    k = args.k if args.k == "auto" else int(args.k)
    lam = args.face_lambda if args.face_lambda == "auto" else float(args.face_lambda)
    work = Path(tempfile.gettempdir()) / f"conceptlens-compare-{args.images}-{args.max_images}-k{args.k}"
    cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(subset_shard(args.images)), out=str(work / "b"),
                           work=str(work), min_images=args.min_images, max_images=args.max_images, device="cpu",
                           concepts=k)
    job = Job(cfg)
    job.extract()
    records, _ = job.load_records()
    job.method = job.resolve_method(records)  # the layer's default learner; each method below replaces it
    classes = job.eligible_classes(records)
    hw, hb = job.model.head_weight, job.model.head_bias
    names = job.model.class_names
    print(f"EfficientNet-Lite0, {args.images} CIFAR-10 images grouped by prediction, {len(classes)} classes with "
          f">= {args.min_images} images, k = {args.k}, held-out 20 %, FACE lambda = {args.face_lambda}; "
          f"scored on the held-out images through the served projection (the method's own)")
    rows: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    fit_time: dict[str, float] = {m: 0.0 for m in args.methods}
    for method in args.methods:
        job.method = method
        job.cfg.method_params = {"face_lambda": lam} if method == "face" else {}
        pipe = job.pipeline(records, pool=None)
        for cls in classes:
            data = pipe.split(cls)
            t = time.perf_counter()
            fit = pipe.fit(data)  # k (and lambda) chosen here when auto, exactly as precompute does
            fit_time[method] += time.perf_counter() - t
            ex, held = fit.explainer, data.held_feats
            codes = served_codes(ex, cls, held)  # projected once, for both
            m = evaluate_class(ex, cls, held, hw, hb, codes=codes)
            m.update(concept_curves(ex, cls, held, hw, hb, None, codes, importance=args.importance))
            m["k"] = len(fit.basis)
            m["lambda"] = (fit.selection.get("lambda") or {}).get("chosen", lam if method == "face" else float("nan"))
            rows[method][cls] = m
    header = f"{'class':<22}{'method':<12}" + "".join(f"{c:>24}" for c in COLUMNS)
    print(f"(c_del, c_ins, gini: concepts ordered by {args.importance})")
    print(header)
    for cls in classes:
        for method in args.methods:
            m = rows[method][cls]
            print(f"{names[cls][:21]:<22}{method:<12}" + "".join(f"{m.get(c, float('nan')):>24.3f}" for c in COLUMNS))
    print("\nmean over classes (lower is better: ice_fidelity, recon_error; higher: the rest)")
    for method in args.methods:
        means = [np.mean([rows[method][c].get(col, np.nan) for c in classes]) for col in COLUMNS]
        print(f"{'':<22}{method:<12}" + "".join(f"{v:>24.3f}" for v in means)
              + f"   fit {fit_time[method]:.1f} s ({fit_time[method] / len(classes):.1f} s a class)")
    print("\nconcept deletion / insertion by concept order (held-out; higher is better), per class")
    print(f"{'class':<22}{'method':<12}" + "".join(f"{c:>20}" for c in ORDER_COLUMNS) + f"{'same order':>12}")
    for cls in classes:
        for method in args.methods:
            m = rows[method][cls]
            same = (np.argsort(-np.array(m["contribution_importance"]), kind="stable").tolist()
                    == np.argsort(-np.array(m["sobol_importance"]), kind="stable").tolist())
            print(f"{names[cls][:21]:<22}{method:<12}"
                  + "".join(f"{m.get(c, float('nan')):>20.3f}" for c in ORDER_COLUMNS) + f"{'yes' if same else 'no':>12}")
    print("\nmean over classes")
    print(f"{'':<22}{'method':<12}" + "".join(f"{c:>20}" for c in ORDER_COLUMNS))
    for method in args.methods:
        means = [np.mean([rows[method][c].get(col, np.nan) for c in classes]) for col in ORDER_COLUMNS]
        print(f"{'':<22}{method:<12}" + "".join(f"{v:>20.3f}" for v in means))
    for method in args.methods:
        wins = sum(rows[method][c]["c_del_sobol"] > rows[method][c]["c_del_contribution"] + 1e-12 for c in classes)
        ties = sum(bool(np.isclose(rows[method][c]["c_del_sobol"], rows[method][c]["c_del_contribution"]))
                   for c in classes)
        print(f"{method}: C-Del by Sobol order above C-Del by contribution order in {wins} of {len(classes)} "
              f"classes ({ties} ties)")
    if "face" in rows and "nmf" in rows:
        for col, better in (("accuracy_reconstructed", np.greater), ("c_del", np.greater),
                            ("ice_fidelity", np.less)):
            wins = sum(bool(better(rows["face"][c][col], rows["nmf"][c][col])) for c in classes)
            ties = sum(bool(np.isclose(rows["face"][c][col], rows["nmf"][c][col])) for c in classes)
            print(f"FACE better than NMF on {col}: {wins} of {len(classes)} classes ({ties} ties)")


if __name__ == "__main__":
    main()

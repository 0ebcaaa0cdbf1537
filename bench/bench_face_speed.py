"""FACE's fitting cost against plain NMF's, class by class, on the same features (issue 12: goal <= 5x).

    python bench/bench_face_speed.py [--classes 4] [--k 5] [--face-lambda 1] [--threads 0] [--repeats 3]

Data: as ``compare_methods.py``: EfficientNet-Lite0 over the first ``--images`` CIFAR-10 training images,
grouped by the model's prediction, each class's images split into train / held-out as precompute does;
the first ``--classes`` classes with at least ``--min-images`` images. Per class, both learners are fitted
through the job's entry (``precompute.fit.fit_learner``, default settings: the NMF learner, and FACE at
λ = ``--face-lambda``, warm-started from that NMF) on the same train features and timed (wall and
process CPU seconds; ``--repeats``: the fastest of that many fits, each FACE fit with its own NMF
start), then scored on the held-out images through the served projection (``precompute.evaluate``:
ICE fidelity, the relative logit error of the class). Prints the FACE/NMF time ratio per class and its
median, measured in this one run.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parse_torch_args  # noqa: E402
from compare_methods import subset_shard  # noqa: E402


def timed(fn, repeats: int):
    """(result of the fastest run, wall seconds, process CPU seconds) of ``repeats`` runs of fn()."""
    best = None
    for _ in range(max(1, repeats)):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[1]:
            best = (out, wall, cpu)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500, help="CIFAR-10 images to extract (as compare_methods.py)")
    ap.add_argument("--classes", type=int, default=4, help="classes to fit (the first eligible ones)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--min-images", type=int, default=30)
    ap.add_argument("--max-images", type=int, default=120)
    ap.add_argument("--face-lambda", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3, help="fits per learner and class; the fastest is kept")
    args = parse_torch_args(ap)
    logging.basicConfig(level=logging.WARNING)
    from conceptlens.precompute.evaluate import evaluate_class, single_class_explainer
    from conceptlens.precompute.fit import fit_learner
    from conceptlens.precompute.job import Job, PrecomputeConfig
    from conceptlens.precompute.learners import face as face_module

    work = Path(tempfile.gettempdir()) / f"conceptlens-compare-{args.images}-{args.max_images}"
    cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(subset_shard(args.images)), out=str(work / "b"),
                           work=str(work), min_images=args.min_images, max_images=args.max_images, device="cpu")
    job = Job(cfg)
    job.extract()
    records, _ = job.load_records()
    classes = job.eligible_classes(records)[: args.classes]
    hw, hb = job.model.head_weight, job.model.head_bias
    names = job.model.class_names
    device = torch.device(args.device)
    print(f"EfficientNet-Lite0, {args.images} CIFAR-10 images grouped by prediction, {len(classes)} classes, "
          f"k = {args.k}, FACE λ = {args.face_lambda}, device {device}, {torch.get_num_threads()} torch threads")

    def fit(method: str, cls: int, feats: np.ndarray):
        return fit_learner(method, feats, k=args.k, class_id=cls, head_weight=hw, head_bias=hb, seed=cfg.seed,
                           device=device, max_iter=cfg.nmf_max_iter, tol=cfg.nmf_tol,
                           params={"face_lambda": args.face_lambda})

    def fidelity(method: str, cls: int, basis: np.ndarray, train: np.ndarray, held: np.ndarray) -> float:
        ex = single_class_explainer(names, cls, basis, job.model.head.concept_weights(basis, cls), hw, hb, None,
                                    method)
        return evaluate_class(ex, cls, held, hw, hb)["ice_fidelity"]

    def fresh_face(cls: int, feats: np.ndarray):
        face_module._NMF_STARTS.clear()  # FACE keeps its NMF start for a λ sweep: time it with its NMF
        return fit("face", cls, feats)

    # warm-up on a few images, so one-time costs (lazy imports, allocator, kernels) land in no timing
    first = np.stack([r.features for r in records[classes[0]][:4]]).astype(np.float32)
    fit("nmf", classes[0], first)
    fit("face", classes[0], first)

    head = (f"{'class':<22}{'train':>6}{'held':>5}{'NMF s':>8}{'FACE s':>8}{'ratio':>7}{'cpu ratio':>10}"
            f"{'FACE it/ev':>11}{'ICE nmf':>9}{'ICE face':>9}")
    print(head)
    ratios, cpu_ratios, ice = [], [], {"nmf": [], "face": []}
    for cls in classes:
        recs = records[cls]
        order = np.random.default_rng(cfg.seed + cls).permutation(len(recs))
        n_held = int(round(len(recs) * cfg.held_out))
        held_idx, train_idx = order[:n_held], order[n_held:]
        feats = np.stack([r.features for r in recs]).astype(np.float32)
        train, held = feats[train_idx], feats[held_idx]
        nmf, t_nmf, c_nmf = timed(lambda: fit("nmf", cls, train), args.repeats)
        face, t_face, c_face = timed(lambda: fresh_face(cls, train), args.repeats)
        scores = {m: fidelity(m, cls, learner.components_.detach().cpu().numpy().astype(np.float32), train, held)
                  for m, learner in (("nmf", nmf), ("face", face))}
        for m, v in scores.items():
            ice[m].append(v)
        ratios.append(t_face / t_nmf)
        cpu_ratios.append(c_face / max(c_nmf, 1e-9))
        print(f"{names[cls][:21]:<22}{len(train):>6}{len(held):>5}{t_nmf:>8.2f}{t_face:>8.2f}{ratios[-1]:>6.1f}x"
              f"{cpu_ratios[-1]:>9.1f}x{f'{face.n_iter_}/{face.n_evals_}':>11}{scores['nmf']:>9.4f}"
              f"{scores['face']:>9.4f}")
    med = statistics.median(ratios)
    print(f"\nFACE / NMF fit time: median {med:.1f}x (per class {', '.join(f'{r:.1f}' for r in ratios)}), "
          f"CPU time median {statistics.median(cpu_ratios):.1f}x; goal <= 5x: {'met' if med <= 5 else 'NOT met'}")
    print(f"held-out ICE fidelity (lower is better), mean over classes: nmf {np.mean(ice['nmf']):.4f}, "
          f"face {np.mean(ice['face']):.4f}; FACE better in "
          f"{sum(f < n for f, n in zip(ice['face'], ice['nmf']))} of {len(classes)} classes")


if __name__ == "__main__":
    main()

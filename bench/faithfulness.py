"""One faithfulness benchmark: a table per data set and method, from real precompute runs.

Data sets (``--datasets``):
- ``fashion``: the README demo's model (EfficientNet-Lite0 with a linear head fine-tuned on
  Fashion-MNIST, service/demo.py), its images grouped by label;
- ``cifar``: EfficientNet-Lite0's ImageNet head over CIFAR-10 training images, grouped by prediction;
- ``imagenet``: the paper's setting: ImageNet images (../shared/data/imagenet-samples, 8 flipped
  and shifted crops of the one sample per class) of every tenth class (100 classes, as the paper's
  Table 1/2), grouped by label.

Each method runs ``conceptlens precompute``'s job with its defaults (``--concepts auto``, FACE's
``--face-lambda auto``) and the columns are read from the bundle's evaluation (held-out images,
scored through the served projection):

- ICE fidelity: ICE's relative error of the class's own logit, mean over held-out images of
  |logit_y - reconstructed logit_y| / |mean logit_y| (lower is better; ICE scores only the
  ground-truth class's output);
- C-Del, C-Ins, C-Gini with FACE's definitions: concepts ordered by CRAFT's Sobol total-order
  importance; accuracy = share of held-out images whose argmax on the reconstruction (codes with
  the top-i concepts zeroed, or only they kept) is the class; C-Del = sum_i (acc_0 - acc_i)/(k+1)
  over i = 0..k, C-Ins = mean over i = 1..k of the insertion accuracy, C-Gini = Gini of the Sobol
  importances; per class, then the mean over classes;
- stitched: share of classes passing Herdt & Otero Baguer's test (top crop of each of the 4 most
  important concepts, stitched), allowing / excluding crops of images predicted as the class, for
  each prototype ranking (``evidence``: the served NNLS code times the head's probability of the
  class on the crop, the default; ``code``: the code alone; ``cosine``: the paper's), with the
  crop fitted to the concept's extent (``/fitted``) and, for ``cosine``, the mined window as the
  paper cuts it; and the served
  prototypes' (``--prototype-ranking`` and ``--prototype-box``) rates over the "predicted classes"
  only, those the model predicts for most of their images (grouped by label, a class the model
  calls otherwise has little of it to show);
- shift: mean over classes of the hyperplane shifting test's max p(target) on the most confused class.

A PNG figure of the mean deletion / insertion curves per method (``--plot``).

    python bench/faithfulness.py [--datasets fashion,cifar,imagenet] [--methods nmf,face,attribution,directions]
                                 [--plot faithfulness.png]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, DATA, subset_shard  # noqa: E402

METHODS = ("nmf", "face", "attribution", "directions")


def imagenet_folder(every: int, per_class: int = 8) -> Path:
    """ImageFolder ``<class index>/<i>.jpg``: ``per_class`` flipped and shifted 224-px crops of the one
    sample of every ``every``-th class."""
    from PIL import Image, ImageOps

    root = CACHE / f"faith-imagenet-every{every}-x{per_class}"
    if root.is_dir():
        return root
    tmp = root.with_suffix(".tmp")
    files = sorted((DATA / "imagenet-samples").glob("*.jpg"))
    for f in files:
        idx = int(f.name.split("_")[0])
        if idx % every:
            continue
        img = Image.open(f).convert("RGB")
        w, h = img.size
        d = tmp / str(idx)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            dx, dy = [(0, 0), (16, 0), (0, 16), (16, 16)][i % 4]
            x0 = max(0, min(w - 224, (w - 224) // 2 + dx - 8))
            y0 = max(0, min(h - 224, (h - 224) // 2 + dy - 8))
            crop = img.crop((x0, y0, x0 + min(224, w), y0 + min(224, h)))
            if i >= 4:
                crop = ImageOps.mirror(crop)
            crop.save(d / f"{i}.jpg", quality=92)
    tmp.rename(root)
    return root


def dataset_config(name: str, work: Path) -> dict:
    if name == "cifar":
        return dict(model="efficientnet-lite0", data=str(subset_shard(1500)), group_by="predicted", min_images=30,
                    max_images=120)
    if name == "imagenet":
        return dict(model="efficientnet-lite0", data=str(imagenet_folder(10)), group_by="label", min_images=5,
                    max_images=8)
    if name == "fashion":
        from conceptlens.service.demo import fine_tune_head, write_fashion_shard

        d = work / "fashion"
        d.mkdir(parents=True, exist_ok=True)
        data = d / "data" / "fashion-train.tar"
        if not data.is_file():
            data = write_fashion_shard(d / "data", 1500)
        weights, labels = d / "fashion-lite0.pth", d / "labels.txt"
        if not weights.is_file():
            weights, labels, _ = fine_tune_head(data, d)
        return dict(model="efficientnet-lite0", weights=str(weights), labels=str(labels), data=str(data),
                    group_by="label", min_images=25, max_images=150)
    raise SystemExit(f"unknown data set {name!r}")


def bundle_tag(dataset: str, method: str, ranking: str, cells: int = 2, concepts: str = "auto",
               face_lambda: str = "auto", logit_weight: float | None = None) -> str:
    """The cache name of a run's bundle and work directory (the settings that differ from the defaults)."""
    from conceptlens.precompute.job import PrecomputeConfig

    default_alpha = PrecomputeConfig.__dataclass_fields__["logit_weight"].default
    return (f"{dataset}-{method}-{ranking}" + (f"-cells{cells}" if cells != 2 else "")
            + (f"-k{concepts}" if concepts != "auto" else "")
            + (f"-lambda{face_lambda}" if method == "face" and face_lambda != "auto" else "")
            + (f"-alpha{logit_weight:g}" if logit_weight is not None and logit_weight != default_alpha else ""))


def run_method(dataset: str, method: str, base: dict, work: Path, ranking: str, cells: int = 2,
               concepts: str = "auto", face_lambda: str = "auto", logit_weight: float | None = None
               ) -> tuple[dict, float]:
    from conceptlens.precompute.job import PrecomputeConfig, run

    tag = bundle_tag(dataset, method, ranking, cells, concepts, face_lambda, logit_weight)
    out = work / "bundles" / tag
    params = {"face_lambda": face_lambda if face_lambda == "auto" else float(face_lambda)} if method == "face" else {}
    cfg = PrecomputeConfig(**base, out=str(out), work=str(work / "work" / tag), method=method, method_params=params,
                           device="cpu", prototype_ranking=ranking, prototype_cells=cells, examples=0,
                           concepts=concepts if concepts == "auto" else int(concepts),
                           **({} if logit_weight is None else {"logit_weight": logit_weight}))
    t = time.perf_counter()
    if not (out / "manifest.json").is_file():
        run(cfg)
    return json.loads((out / "manifest.json").read_text()), time.perf_counter() - t


def summarize(manifest: dict) -> dict:
    rows = []
    for entry in manifest["classes"].values():
        m = entry["metrics"]
        ho = m.get("held_out") or m.get("train")
        st = m.get("stitched") or {}
        row = {"ice_fidelity": ho.get("ice_fidelity"), "c_del": ho.get("c_del_sobol"), "c_ins": ho.get("c_ins_sobol"),
               "c_gini": ho.get("gini_sobol"), "k": entry["k"],
               "del_curve": ho.get("deletion_curve_sobol"), "ins_curve": ho.get("insertion_curve_sobol")}
        for r, res in (st.get("by_ranking") or {}).items():
            row[f"stitched_{r}"] = res.get("pass")
            row[f"stitched_{r}_excl"] = res.get("pass_excluding_class")
        row["stitched_served"] = st.get("pass")  # the served ranking and crops
        row["stitched_served_excl"] = st.get("pass_excluding_class")
        if m.get("predicted_as_class", 1.0) >= 0.5:  # the model predicts the class for most of its images
            row["stitched_served_predicted"] = st.get("pass")
            row["stitched_served_excl_predicted"] = st.get("pass_excluding_class")
        pairs = (m.get("shift") or {}).get("pairs") or []
        row["shift"] = pairs[0]["max_probability"] if pairs else None
        rows.append(row)

    def mean(key):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")
    keys = {k for r in rows for k in r if k.startswith("stitched_")}
    out = {key: mean(key) for key in ("ice_fidelity", "c_del", "c_ins", "c_gini", "k", "shift", *sorted(keys))}
    out["classes_predicted"] = sum(r.get("stitched_served_predicted") is not None for r in rows)
    out["classes"] = len(rows)
    out["curves"] = [r["del_curve"] for r in rows if r["del_curve"]], [r["ins_curve"] for r in rows if r["ins_curve"]]
    return out


COLUMNS = (("ice_fidelity", "ICE fid."), ("c_del", "C-Del"), ("c_ins", "C-Ins"), ("c_gini", "C-Gini"), ("k", "k"),
           ("stitched_served", "stitch served"), ("stitched_served_excl", "served excl."),
           ("stitched_evidence/fitted", "evidence fitted"), ("stitched_evidence/fitted_excl", "evidence fitted excl."),
           ("stitched_code/fitted", "code fitted"), ("stitched_code/fitted_excl", "code fitted excl."),
           ("stitched_cosine/fitted", "cos fitted"), ("stitched_cosine/fitted_excl", "cos fitted excl."),
           ("stitched_cosine", "cos window"), ("stitched_cosine_excl", "cos window excl."),
           ("stitched_served_predicted", "served, predicted classes"),
           ("stitched_served_excl_predicted", "excl., predicted classes"), ("shift", "shift"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(9, 3.2 * len(results)), squeeze=False)
    for row, (dataset, by_method) in enumerate(results.items()):
        for col, (label, which) in enumerate((("deletion", 0), ("insertion", 1))):
            ax = axes[row][col]
            for method, s in by_method.items():
                curves = s["curves"][which]
                if not curves:
                    continue
                n = max(len(c) for c in curves)
                grid = np.linspace(0, 1, n)  # concepts removed / kept as a share of k, classes of any k
                ys = np.mean([np.interp(grid, np.linspace(0, 1, len(c)), c) for c in curves], axis=0)
                ax.plot(grid, ys, marker=".", label=method)
            ax.set_title(f"{dataset}: {label} (Sobol order)")
            ax.set_xlabel(f"share of concepts {'removed' if which == 0 else 'kept'}")
            ax.set_ylabel("accuracy on reconstruction")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="fashion,cifar,imagenet")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ranking", default="evidence", help="the served prototype ranking (all are tested)")
    ap.add_argument("--prototype-cells", type=int, default=2, help="crop windows of this many feature cells a side")
    ap.add_argument("--concepts", default="auto", help="k per class, or auto (the default's selection)")
    ap.add_argument("--face-lambda", default="auto", help="FACE's lambda, or auto")
    ap.add_argument("--logit-weight", type=float, default=None,
                    help="the served projection's alpha (precompute's --logit-weight; default: its default)")
    ap.add_argument("--work", default=str(CACHE / "faithfulness"))
    ap.add_argument("--plot", default="faithfulness.png")
    ap.add_argument("--json", default=None, help="write the summaries here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    results: dict[str, dict[str, dict]] = {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        base = dataset_config(dataset, work)
        results[dataset] = {}
        for method in [m for m in args.methods.split(",") if m]:
            manifest, secs = run_method(dataset, method, base, work, args.ranking, args.prototype_cells,
                                         args.concepts, args.face_lambda, args.logit_weight)
            s = summarize(manifest)
            s["seconds"] = secs
            results[dataset][method] = s
            print(f"  {dataset} {method}: {s['classes']} classes, {secs:.0f} s", file=sys.stderr, flush=True)
        print(f"\n### {dataset} ({next(iter(results[dataset].values()))['classes']} classes)\n")
        print("| method | " + " | ".join(h for _, h in COLUMNS) + " |")
        print("|---|" + "---|" * len(COLUMNS))
        for method, s in results[dataset].items():
            print(f"| {method} | " + " | ".join(f"{s.get(c, float('nan')):.3f}" if c != "k" else f"{s[c]:.1f}"
                                                for c, _ in COLUMNS) + " |")
    if args.plot:
        plot(results, Path(args.plot))
        print(f"\ndeletion / insertion curves: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({d: {m: {k: v for k, v in s.items() if k != "curves"}
                                                   for m, s in r.items()} for d, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

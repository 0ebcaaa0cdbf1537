"""Serving at ImageNet scale: a 1000-class bundle against a 10-class bundle of the same model, side by side.

Both bundles are built here from the real EfficientNet-Lite0 (its ImageNet weights, exported to ONNX
with two outputs, features and logits) and its activations on ../shared/data/imagenet-samples (one
image per class), the way precompute would build them, only without its evaluation:

  * a class's samples (``samples/<cls>``, float16, what contrast on request fits): the pixels of the
    class's images whose channel-mean gradient x activation for the class exceeds a quarter of the
    image's maximum (precompute's filter), at most --samples; "the class's images" are --class-images
    views of its sample image (its centre crop, then random resized crops and flips), so no two
    classes share an image, as with precompute's grouping (an earlier draft took each class's
    highest-scoring sample images instead: a third of random pairs then shared images, which made
    their hyperplanes 3-8x slower to fit, up to 300 ms);
  * its basis: k non-negative directions (1280-d), NMF of those samples (the service's own HALS);
    weights = basis @ W[y];
  * --prototypes tiny JPEGs per concept: the 64-px window around the sample pixel with the largest code.

The 10-class bundle holds the classes of 10 test images (their top-1 prediction), with tensors equal
to the 1000-class bundle's for those classes, so an Explain of a test image does the same work in
both servers. Then, with one real server process per bundle (`conceptlens serve --cache-size 0`, no
Redis) over gRPC:

  * load: seconds from the process's start to SERVING, resident memory after load (and at the end);
  * Explain latency, top_k = 1, the same test images (fresh bytes each request), interleaved one
    request to each server in turn; p50, p90 and the ratio 1000 / 10 (goal <= 1.05);
  * ListClasses and GetClassConcepts latency;
  * contrast on request: Explain of class A against a contrast B, for random pairs of the 1000, each
    pair new to the server (goal <= 50 ms, client wall time; the server's explain stage beside);
  * /metrics after explaining every class once: bytes, lines, series with a class label, classes
    labelled (per-class series are bounded by --concept-metrics-classes; the rest report "other").

    .venv/bin/python bench/serve_scale.py [--workdir .cache/serve-scale] [--requests 100] [--pairs 60]
        [--server-flags "--concept-metrics-classes 1000"] [--json out.json]

The build (16,000 views through the model, 1000 NMFs, a bundle of about 1 GB; ~3 min on 2 cores) is
cached under --workdir; later runs only measure (~30 s). Servers and client share this machine's cores.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, lite0_onnx, rss_mib  # noqa: E402

IMAGES = Path(os.environ.get("CONCEPTLENS_BENCH_IMAGES", DATA / "imagenet-samples"))
MODEL = "efficientnet-lite0"


# -- the model on the sample images ------------------------------------------------------------
def sample_logits(workdir: Path, files: list[Path], pre, runtime) -> np.ndarray:
    """The model's logits (N, 1000) of the sample images (centre crop), cached."""
    path = workdir / f"logits-{len(files)}.npy"
    if path.is_file():
        return np.load(path)
    from conceptlens.service.preprocess import preprocess_bytes

    out = []
    for i in range(0, len(files), 16):
        xs = [preprocess_bytes(f.read_bytes(), pre)[0] for f in files[i:i + 16]]
        out.append(runtime.run(np.stack(xs))[1])
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(path, np.concatenate(out))
    return np.load(path)


def class_views(image: bytes, pre, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` (crop, crop, 3) uint8 views of an image: the model's own centre crop, then random
    resized crops (a quarter of the area to all of it, aspect 3:4 to 4:3) and flips, as training
    augmentation makes them."""
    from PIL import Image

    from conceptlens.service.preprocess import decode_rgb, resize_crop

    pixels, _ = decode_rgb(image)
    img = Image.fromarray(pixels)
    views = [resize_crop(img, pre)]
    w, h = img.size
    while len(views) < n:
        area = w * h * rng.uniform(0.25, 1.0)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if not (0 < cw <= w and 0 < ch <= h):
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        view = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((pre.crop, pre.crop), Image.BILINEAR)
        if rng.random() < 0.5:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        views.append(np.asarray(view))
    return views


# -- one class, as precompute would give it -----------------------------------------------------
def class_tensors(cls: int, image: bytes, runtime, pre, head_w: np.ndarray, args) -> dict:
    """samples (m, C), the NMF basis (k, C), its weights and prototypes of class ``cls``, learned
    from --class-images views of its sample image (its images: disjoint from every other class's)."""
    from conceptlens.service.contrast import nmf_hals
    from conceptlens.service.nnls import NNLSProjector
    from conceptlens.service.preprocess import normalize

    rng = np.random.default_rng(cls)
    views = class_views(image, pre, args.class_images, rng)
    a = np.concatenate([runtime.run(np.stack([normalize(v, pre) for v in views[i:i + 16]]))[0]
                        for i in range(0, len(views), 16)])  # (n, C, H, W)
    n, c, h, w = a.shape
    maps = np.einsum("nchw,c->nhw", a, head_w[cls]) / c  # channel-mean gradient x activation
    top = maps.reshape(n, -1).max(axis=1)
    keep = (maps > 0.25 * top[:, None, None]) & (top[:, None, None] > 0)  # precompute's filter
    where = np.argwhere(keep)  # (m, 3): view, row, column
    if len(where) > args.samples:
        where = where[np.sort(rng.choice(len(where), args.samples, replace=False))]
    px = np.ascontiguousarray(a[where[:, 0], :, where[:, 1], where[:, 2]], np.float32)  # (m, C)
    _, basis = nmf_hals(px, args.k, seed=cls)
    basis = (basis / np.maximum(np.linalg.norm(basis, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    codes = NNLSProjector.from_basis(basis).project(px)
    recon = float(np.linalg.norm(px - codes @ basis) / max(np.linalg.norm(px), 1e-12))
    cos = (px @ basis.T) / np.maximum(np.linalg.norm(px, axis=1, keepdims=True), 1e-12)
    protos, jpegs = [], {}
    for j in range(args.k):
        refs = []
        for r, s in enumerate(np.argsort(-codes[:, j], kind="stable")[:args.prototypes]):
            view, row, col = (int(v) for v in where[s])
            box = crop_box(row, col, h, pre.crop)
            rel = f"prototypes/{cls}/{j}_{r}.jpg"
            jpegs[rel] = jpeg_crop(views[view], box)
            refs.append({"file": rel, "source": f"imagenet-samples/{cls:04d}/view{view}", "box": list(box),
                         "score": float(cos[s, j])})
        protos.append(refs)
    return {"samples": px.astype(np.float16), "basis": basis,
            "weights": (basis @ head_w[cls]).astype(np.float32), "prototypes": protos, "jpegs": jpegs,
            "metrics": {"train": {"recon_error": recon, "samples": len(px), "images": int(n)}}}


def crop_box(row: int, col: int, grid: int, size: int, window: int = 64) -> tuple[int, int, int, int]:
    """A ``window``-px box of the model's input around feature cell (row, col) of a grid x grid map."""
    cell = size / grid
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    x0 = int(min(max(cx - window / 2, 0), size - window))
    y0 = int(min(max(cy - window / 2, 0), size - window))
    return x0, y0, x0 + window, y0 + window


def jpeg_crop(view: np.ndarray, box) -> bytes:
    from PIL import Image

    x0, y0, x1, y1 = box
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(view[y0:y1, x0:x1])).save(out, format="JPEG", quality=85)
    return out.getvalue()


def build_bundle(out: Path, classes: list[int], per_class, model, onnx_path: Path, args) -> Path:
    """A real bundle of ``classes`` (write_bundle, as precompute's merge writes it), cached."""
    if (out / "manifest.json").is_file():
        return out
    from conceptlens.precompute.bundle_writer import write_bundle
    from conceptlens.service.manifest import ClassEntry, MethodCard

    entries, tensors, protos, jpegs = {}, {}, {}, {}
    for cls in classes:
        t = per_class(cls)
        tensors[f"basis/{cls}"], tensors[f"weights/{cls}"] = t["basis"], t["weights"]
        tensors[f"samples/{cls}"] = t["samples"]
        protos[cls] = t["prototypes"]
        jpegs.update(t["jpegs"])
        entries[cls] = ClassEntry(name=model.class_names[cls], k=args.k, method="nmf",
                                  images=t["metrics"]["train"]["images"], metrics=t["metrics"])
    t0 = time.perf_counter()
    write_bundle(out, model_onnx=onnx_path, model=model.card(), class_names=model.class_names,
                 preprocessing=model.preprocessing, head_weight=model.head_weight, head_bias=model.head_bias,
                 head_onnx=None, classes=entries, tensors=tensors, prototypes=protos, prototype_jpegs=jpegs,
                 method=MethodCard("nmf", {"concepts": args.k, "contrast_samples": args.samples}),
                 data={"path": str(IMAGES)})
    print(f"bundle {out.name}: {len(classes)} classes written in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def build(args) -> tuple[Path, Path, list[bytes], list[int]]:
    """(1000-class bundle, 10-class bundle, test images, their classes)."""
    from conceptlens.precompute.models import load_model
    from conceptlens.service.runtime import OnnxRuntime

    workdir = Path(args.workdir)
    files = sorted(IMAGES.glob("*.jpg"))
    labels = [int(f.name.split("_")[0]) for f in files]
    if sorted(labels) != list(range(1000)):
        raise SystemExit(f"{IMAGES} must hold one JPEG per ImageNet class (NNNN_wnid.jpg)")
    model = load_model(MODEL)
    pre = model.preprocessing
    runtime = OnnxRuntime(lite0_onnx(), device="cpu")
    pred = sample_logits(workdir, files, pre, runtime).argmax(axis=1)
    right = [i for i in range(len(files)) if pred[i] == labels[i]]
    test = sorted(random.Random(args.seed).sample(right, args.test_images))
    test_classes = [labels[i] for i in test]
    head_w = np.asarray(model.head_weight, np.float32)
    memo: dict[int, dict] = {}

    def per_class(cls: int) -> dict:
        if cls not in memo:
            memo[cls] = class_tensors(cls, files[labels.index(cls)].read_bytes(), runtime, pre, head_w, args)
        return memo[cls]

    tag = f"k{args.k}-s{args.samples}-v{args.class_images}-p{args.prototypes}"
    small = build_bundle(workdir / f"lite0-10cls-{tag}-seed{args.seed}", sorted(test_classes), per_class,
                         model, lite0_onnx(), args)
    big_dir = workdir / f"lite0-1000cls-{tag}"
    if not (big_dir / "manifest.json").is_file():
        t = time.perf_counter()
        for cls in range(len(model.class_names)):  # the views, features and NMFs, with progress
            per_class(cls)
            if cls % 100 == 99:
                print(f"  {cls + 1} classes learned, {time.perf_counter() - t:.0f} s", flush=True)
    big = build_bundle(big_dir, list(range(len(model.class_names))), per_class, model, lite0_onnx(), args)
    runtime.close()
    return big, small, [files[i].read_bytes() for i in test], test_classes


# -- measuring ---------------------------------------------------------------------------------
def unique(image: bytes) -> bytes:
    """The same JPEG with a nonce after its end marker: decodes the same, hashes differently."""
    return image + b"\xff\xfe" + uuid.uuid4().bytes


def pct(xs, q: float) -> float:
    """The q-th percentile of ``xs`` (seconds) in ms."""
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def timed(call, *a, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    out = call(*a, **kw)
    return time.perf_counter() - t, out


class Server:
    """A `conceptlens serve` of one bundle: its load time, memory and a blocking client."""

    def __init__(self, bundle: Path, flags: list[str]):
        from conceptlens.service.client import ExplainClient
        from conceptlens.service.serve_process import ServeProcess

        t = time.perf_counter()
        self.proc = ServeProcess(bundle, "--cache-size", "0", *flags, log_level="WARNING")
        self.proc.wait_ready(600)
        self.load_s = time.perf_counter() - t
        self.rss_loaded = rss_mib(self.proc.proc.pid)
        self.client = ExplainClient(self.proc.target, timeout=120)

    def rss(self) -> float:
        return rss_mib(self.proc.proc.pid)

    def stop(self) -> None:
        self.client.close()
        self.proc.stop()


def metrics_figures(text: str) -> dict:
    """Size of a /metrics scrape and how much of it is per class."""
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    per_class = [ln for ln in lines if 'class_id="' in ln]
    ids = {ln.split('class_id="', 1)[1].split('"', 1)[0] for ln in per_class}
    return {"bytes": len(text.encode()), "series": len(lines), "class_series": len(per_class),
            "classes_labelled": len(ids - {"other"}), "other": "other" in ids}


def measure(big: Path, small: Path, images: list[bytes], classes: list[int], args) -> dict:
    from conceptlens.v1 import explain_service_pb2 as pb
    from conceptlens.service.client import make_options

    flags = shlex.split(args.server_flags)
    res: dict = {"flags": flags}
    servers = {}
    try:
        for name, bundle in (("10", small), ("1000", big)):  # one at a time: loads do not share the cores
            print(f"starting the {name}-class server ...", flush=True)
            servers[name] = Server(bundle, flags)
        for name, bundle in (("10", small), ("1000", big)):
            s = servers[name]
            res[f"load_s_{name}"], res[f"rss_loaded_mib_{name}"] = s.load_s, s.rss_loaded
            res[f"bundle_mib_{name}"] = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2 ** 20
        opts = make_options(top_k=1)
        req = lambda i: pb.ExplainRequest(image=unique(images[i % len(images)]), options=opts)  # noqa: E731
        for s in servers.values():  # warm: connections, first answers
            for i in range(5):
                s.client.stub.Explain(req(i))
        print(f"Explain, {args.requests} requests to each, interleaved ...", flush=True)
        lat = {"10": [], "1000": []}
        explain_stage = {"10": [], "1000": []}
        for i in range(args.requests):
            order = ("10", "1000") if i % 2 == 0 else ("1000", "10")
            for name in order:
                seconds, resp = timed(servers[name].client.stub.Explain, req(i))
                assert resp.explanations and resp.explanations[0].class_id == classes[i % len(classes)], \
                    "the test image's top class must be explained in both bundles"
                lat[name].append(seconds)
                explain_stage[name].append(resp.timings.explain_seconds)
        for name in lat:
            res[f"explain_p50_ms_{name}"], res[f"explain_p90_ms_{name}"] = pct(lat[name], 50), pct(lat[name], 90)
            res[f"explain_stage_p50_ms_{name}"] = pct(explain_stage[name], 50)
        res["explain_paired_ratio"] = statistics.median(b / a for a, b in zip(lat["10"], lat["1000"]))

        print("ListClasses and GetClassConcepts ...", flush=True)
        rng = random.Random(args.seed)
        for name, s in servers.items():
            lc = [timed(s.client.list_classes)[0] for _ in range(args.list_requests)]
            res[f"list_p50_ms_{name}"], res[f"list_p90_ms_{name}"] = pct(lc, 50), pct(lc, 90)
            res[f"list_bytes_{name}"] = s.client.list_classes().ByteSize()
            ids = classes if name == "10" else list(range(1000))
            gc = [timed(s.client.class_concepts, rng.choice(ids))[0] for _ in range(args.list_requests)]
            res[f"concepts_p50_ms_{name}"], res[f"concepts_p90_ms_{name}"] = pct(gc, 50), pct(gc, 90)

        print(f"contrast on request, {args.pairs} new random pairs of the 1000 ...", flush=True)
        s = servers["1000"]
        pairs, seen = [], set()
        while len(pairs) < args.pairs:
            a, b = rng.sample(range(1000), 2)
            if (a, b) not in seen:
                seen.add((a, b))
                pairs.append((a, b))
        wall, stage, plain = [], [], []
        for i, (a, b) in enumerate(pairs):
            image = images[i % len(images)]
            plain.append(timed(s.client.stub.Explain, pb.ExplainRequest(
                image=unique(image), options=make_options(classes=[a])))[0])
            seconds, resp = timed(s.client.stub.Explain, pb.ExplainRequest(
                image=unique(image), options=make_options(classes=[a], contrast=b)))
            x = resp.explanations[0]
            assert x.contrast_class_id == b, (a, b)
            if x.method != "contrast-on-request":
                print(f"  pair {a} rather than {b}: {x.method} (not computed on request)", flush=True)
            wall.append(seconds)
            stage.append(resp.timings.explain_seconds)
        again = [timed(s.client.stub.Explain, pb.ExplainRequest(
            image=unique(images[i % len(images)]), options=make_options(classes=[a], contrast=b)))[0]
            for i, (a, b) in enumerate(pairs[:20])]
        res.update(contrast_p50_ms=pct(wall, 50), contrast_p90_ms=pct(wall, 90), contrast_max_ms=pct(wall, 100),
                   contrast_stage_p50_ms=pct(stage, 50), contrast_stage_p90_ms=pct(stage, 90),
                   contrast_stage_max_ms=pct(stage, 100), contrast_plain_p50_ms=pct(plain, 50),
                   contrast_again_p50_ms=pct(again, 50))

        print("/metrics after explaining every class once ...", flush=True)
        for name, s in servers.items():
            ids = sorted(set(classes)) if name == "10" else list(range(1000))
            for i in range(0, len(ids), 32):
                s.client.stub.Explain(pb.ExplainRequest(image=unique(images[0]), options=make_options(
                    classes=ids[i:i + 32], top_k=0, num_predictions=0)))
            seconds, text = timed(s.proc.metrics)
            res[f"metrics_{name}"] = {**metrics_figures(text), "scrape_ms": seconds * 1e3}
            res[f"rss_end_mib_{name}"] = s.rss()
    finally:
        for s in servers.values():
            s.stop()
    return res


def report(r: dict, args) -> str:
    def row(label, a, b, ratio="", goal=""):
        return f"| {label} | {a} | {b} | {ratio} | {goal} |"

    f = lambda v, d=1: f"{v:.{d}f}"  # noqa: E731
    m10, m1k = r["metrics_10"], r["metrics_1000"]
    lines = [f"conceptlens serving at scale, EfficientNet-Lite0: 10 vs 1000 classes — {os.cpu_count()} CPUs, "
             f"k = {args.k}, {args.samples} samples a class, server flags: --cache-size 0 "
             f"{' '.join(r['flags'])}".rstrip(), "",
             "| figure | 10 classes | 1000 classes | 1000 / 10 | goal |", "|---|---:|---:|---:|---|",
             row("bundle on disk (MiB)", f(r["bundle_mib_10"]), f(r["bundle_mib_1000"]),
                 f(r["bundle_mib_1000"] / r["bundle_mib_10"], 0)),
             row("load: process start to SERVING (s)", f(r["load_s_10"], 2), f(r["load_s_1000"], 2),
                 f(r["load_s_1000"] / r["load_s_10"], 2)),
             row("server RSS after load (MiB)", f(r["rss_loaded_mib_10"], 0), f(r["rss_loaded_mib_1000"], 0),
                 f(r["rss_loaded_mib_1000"] / r["rss_loaded_mib_10"], 2)),
             row("server RSS at the end (MiB)", f(r["rss_end_mib_10"], 0), f(r["rss_end_mib_1000"], 0),
                 f(r["rss_end_mib_1000"] / r["rss_end_mib_10"], 2)),
             row(f"Explain top_k=1 p50 (ms, {args.requests} req.)", f(r["explain_p50_ms_10"], 2),
                 f(r["explain_p50_ms_1000"], 2), f(r["explain_p50_ms_1000"] / r["explain_p50_ms_10"], 3), "<= 1.05"),
             row("Explain top_k=1 p90 (ms)", f(r["explain_p90_ms_10"], 2), f(r["explain_p90_ms_1000"], 2),
                 f(r["explain_p90_ms_1000"] / r["explain_p90_ms_10"], 3), "<= 1.05"),
             row("Explain, paired median ratio", "", "", f(r["explain_paired_ratio"], 3), "<= 1.05"),
             row("Explain: server's explain stage p50 (ms)", f(r["explain_stage_p50_ms_10"], 3),
                 f(r["explain_stage_p50_ms_1000"], 3),
                 f(r["explain_stage_p50_ms_1000"] / max(r["explain_stage_p50_ms_10"], 1e-9), 2)),
             row("ListClasses p50 / p90 (ms)", f"{f(r['list_p50_ms_10'], 2)} / {f(r['list_p90_ms_10'], 2)}",
                 f"{f(r['list_p50_ms_1000'], 2)} / {f(r['list_p90_ms_1000'], 2)}",
                 f(r["list_p50_ms_1000"] / r["list_p50_ms_10"], 2)),
             row("ListClasses answer (bytes)", r["list_bytes_10"], r["list_bytes_1000"]),
             row("GetClassConcepts p50 / p90 (ms)",
                 f"{f(r['concepts_p50_ms_10'], 2)} / {f(r['concepts_p90_ms_10'], 2)}",
                 f"{f(r['concepts_p50_ms_1000'], 2)} / {f(r['concepts_p90_ms_1000'], 2)}",
                 f(r["concepts_p50_ms_1000"] / r["concepts_p50_ms_10"], 2)),
             row(f"contrast on request, {args.pairs} new pairs: p50 / p90 / max (ms, client)", "",
                 f"{f(r['contrast_p50_ms'])} / {f(r['contrast_p90_ms'])} / {f(r['contrast_max_ms'])}", "",
                 "<= 50"),
             row("  the server's explain stage of those: p50 / p90 / max (ms)", "",
                 f"{f(r['contrast_stage_p50_ms'])} / {f(r['contrast_stage_p90_ms'])} / "
                 f"{f(r['contrast_stage_max_ms'])}"),
             row("  same class without contrast / the pair again, p50 (ms)", "",
                 f"{f(r['contrast_plain_p50_ms'], 2)} / {f(r['contrast_again_p50_ms'], 2)}"),
             row("/metrics after explaining every class: bytes", m10["bytes"], m1k["bytes"],
                 f(m1k["bytes"] / m10["bytes"], 1)),
             row("  series / series with a class label", f"{m10['series']} / {m10['class_series']}",
                 f"{m1k['series']} / {m1k['class_series']}", f(m1k["class_series"] / max(m10["class_series"], 1), 1)),
             row("  classes with their own label (+ 'other')",
                 f"{m10['classes_labelled']}{' + other' if m10['other'] else ''}",
                 f"{m1k['classes_labelled']}{' + other' if m1k['other'] else ''}"),
             row("  scrape time (ms)", f(m10["scrape_ms"]), f(m1k["scrape_ms"]))]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "serve-scale"))
    p.add_argument("--k", type=int, default=5, help="concepts a class")
    p.add_argument("--samples", type=int, default=512, help="contrast samples a class (precompute's "
                                                            "--contrast-samples default)")
    p.add_argument("--class-images", type=int, default=16, help="augmented views of its sample image a class's "
                                                                "pixels come from")
    p.add_argument("--prototypes", type=int, default=1, help="prototype JPEGs a concept")
    p.add_argument("--test-images", type=int, default=10, help="test images (the 10-class bundle's classes)")
    p.add_argument("--requests", type=int, default=100, help="Explain requests to each server")
    p.add_argument("--list-requests", type=int, default=50, help="ListClasses and GetClassConcepts calls")
    p.add_argument("--pairs", type=int, default=60, help="contrast pairs computed on request")
    p.add_argument("--server-flags", default="", help="extra `conceptlens serve` flags for both servers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    big, small, images, classes = build(args)
    if args.build_only:
        return 0
    res = measure(big, small, images, classes, args)
    print()
    print(report(res, args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

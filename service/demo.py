"""``make demo``: build a bundle for EfficientNet-Lite0 over real images, serve it, explain a few
held-out images through the gRPC service and write an HTML page of the answers.

Images: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (``--data`` for any other
ImageFolder, tar shards or folder of images). Classes are the model's own predictions (ImageNet
classes), since Fashion-MNIST's labels are not ImageNet classes.

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

    step(1, 4, "data")
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

    step(2, 4, "precompute: EfficientNet-Lite0 features, per-class NMF concepts, prototypes, evaluation")
    from ..precompute.job import PrecomputeConfig, run

    bundle = out / "bundle"
    cfg = PrecomputeConfig(model="efficientnet-lite0", data=str(data), out=str(bundle), group_by="predicted",
                           concepts=args.concepts, min_images=25, max_images=150, prototypes=4)
    run(cfg)
    if not held:  # explain a few images of the data itself
        from ..precompute.datasets import open_dataset

        held = [(s.key, s.data) for _, s in zip(range(args.explain), open_dataset(data))]

    step(3, 4, "serve the bundle over gRPC and explain the held-out images")
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

    step(4, 4, "HTML")
    items = "\n".join(f'<li><a href="{html.escape(p)}">{html.escape(n)}</a>: predicted {html.escape(c)}</li>'
                      for n, p, c in pages)
    (out / "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>conceptlens demo</title>"
                                    f"<h1>conceptlens demo</h1><p>Bundle: {html.escape(str(bundle))}</p>"
                                    f"<ul>{items}</ul>")
    print(f"done in {time.monotonic() - t0:.0f} s: open {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``conceptlens precompute``: learn concept bases from a model and images, write a bundle."""
from __future__ import annotations

import argparse

from ..service.cli import CLIError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="efficientnet-lite0, torchvision:NAME, timm:NAME, onnx:PATH or torchscript:PATH")
    p.add_argument("--weights", help="weights of a torch source (efficientnet-lite0, torchvision, timm): a state "
                                     "dict (.pth/.pt, read with weights_only=True) or .safetensors")
    p.add_argument("--layer", help="layer to explain: a module name (torch, TorchScript) or a tensor/node name "
                                   "(ONNX); default: the input of the last global pooling")
    p.add_argument("--labels", help="class names in the model's output order: one per line, or a JSON list")
    p.add_argument("--resize", type=int, help="resize the short side to N pixels (default: the source's)")
    p.add_argument("--crop", type=int, help="center crop N x N (default: the source's)")
    p.add_argument("--mean", type=_triple, help="normalisation mean a,b,c on the 0..1 scale (default: the source's)")
    p.add_argument("--std", type=_triple, help="normalisation std a,b,c (default: the source's)")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest"),
                   help="resize interpolation (default: the source's)")
    p.add_argument("--data", required=True, help="ImageFolder directory, tar shards (KEY.jpg + KEY.cls), "
                                                  "or a folder of images")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--work", help="work directory for shards and resume (default: OUT.work)")
    p.add_argument("--group-by", choices=("label", "predicted"), default="predicted",
                   help="group images by their label or by the model's prediction")
    p.add_argument("--method", choices=("auto", "nmf", "seminmf", "face", "attribution", "directions"),
                   default="auto", help="concept learner; auto: nmf on a non-negative layer, seminmf on a signed one")
    p.add_argument("--concepts", type=_int_or_auto, default="auto",
                   help="concepts per class (k), or auto: k per class by validation fidelity and stability, "
                        "split concepts merged")
    p.add_argument("--classes", nargs="*", help="only these classes (ids or names)")
    p.add_argument("--min-images", type=int, default=20, help="skip classes with fewer images")
    p.add_argument("--max-images", type=int, default=200, help="reservoir size per class (bounds memory)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of each class's images kept for evaluation")
    p.add_argument("--prototypes", type=int, default=5, help="prototype crops per concept")
    p.add_argument("--prototype-cells", type=int, default=2, help="crop window in feature-map cells")
    p.add_argument("--logit-weight", type=float, default=30.0,
                   help="how much more the served NNLS projection weighs the error along the head's row of the "
                        "explained class (alpha, service/nnls.py): the codes then keep each pixel's logit; 0 is "
                        "plain NNLS; a GAP + linear head only (0 is used for any other)")
    p.add_argument("--prototype-ranking", choices=("evidence", "code", "cosine"), default="evidence",
                   help="how a concept's crops are ranked: evidence (the default: its served NNLS code in the crop "
                        "times the head's probability of the class on the crop's activation; passes the stitched "
                        "test most often), code (the code alone) or cosine (Herdt & Otero Baguer's cosine similarity)")
    p.add_argument("--prototype-box", choices=("window", "fitted"), default="fitted",
                   help="a crop's extent: fitted to the concept's code map in the source image (the default: the "
                        "blob around its peak, 1 to 2 windows a side; passes the stitched test more often) or its "
                        "mined window (cells x cells feature cells)")
    p.add_argument("--prototypes-exclude-class", action="store_true",
                   help="mine prototypes only from images not predicted as the class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nmf-max-iter", type=int, default=200)
    p.add_argument("--nmf-tol", type=float, default=1e-4)
    p.add_argument("--face-lambda", type=_float_or_auto, default="auto",
                   help="FACE's weight of the KL term (--method face), or auto: per class by validation fidelity")
    p.add_argument("--importance", choices=("contribution", "sobol"), default="contribution",
                   help="concept order of the deletion/insertion curves (the report shows both)")
    p.add_argument("--attribution", choices=("gradxact", "deeplift"), default="gradxact",
                   help="attribution of --method attribution and of the contrast pixel filter")
    p.add_argument("--stability-folds", type=int, default=3, help="folds for the stability metric (0: off)")
    p.add_argument("--contrast-samples", type=int, default=512,
                   help="attribution-filtered pixels kept per class for contrasts on request (0: no contrasts)")
    p.add_argument("--examples", type=int, default=2, help="example images with heatmaps per class for the report")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--extract-memory-mib", type=int, default=256,
                   help="feature maps an extract shard holds in memory before it writes them out (spill files; "
                        "the result is the same whatever the budget); a shard's peak is about 1.5 GiB (the model) "
                        "+ 3-4x this (writing a file copies the maps twice)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--shard", default="0/1", help="I/N: this process's share (data for extract, classes for learn)")
    p.add_argument("--stage", choices=("all", "extract", "learn", "merge"), default="all")


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of concepts or auto, got {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError("--concepts must be at least 1")
    return k


def _float_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers a,b,c, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers a,b,c (R, G, B), got {len(values)}")
    return values


def config_from_args(args: argparse.Namespace):
    from .job import PrecomputeConfig, parse_shard

    pre = {k: getattr(args, k) for k in ("resize", "crop", "mean", "std", "interpolation")
           if getattr(args, k) is not None}
    return PrecomputeConfig(
        model=args.model, weights=args.weights, layer=args.layer, labels=args.labels, preprocessing=pre,
        data=args.data, out=args.out, work=args.work,
        group_by=args.group_by, method=args.method, concepts=args.concepts, classes=args.classes,
        min_images=args.min_images, max_images=args.max_images, held_out=args.held_out,
        prototypes=args.prototypes, prototype_cells=args.prototype_cells,
        prototypes_exclude_class=args.prototypes_exclude_class, prototype_ranking=args.prototype_ranking,
        prototype_box=args.prototype_box, seed=args.seed, nmf_max_iter=args.nmf_max_iter,
        nmf_tol=args.nmf_tol, stability_folds=args.stability_folds, contrast_samples=args.contrast_samples,
        examples=args.examples, method_params={"face_lambda": args.face_lambda} if args.method == "face" else {},
        importance=args.importance, attribution=args.attribution, logit_weight=args.logit_weight,
        batch_size=args.batch_size, extract_memory_mib=args.extract_memory_mib, device=args.device, shard=parse_shard(args.shard))


def write_error(e: OSError, out: str) -> str:
    """One line for a file-system error of the job (ENOSPC, EACCES, EROFS, ...)."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    return (f"cannot write {out}: {e.strerror or e}{where}; nothing partial was published and an existing "
            f"bundle there is unchanged; finished work is kept in the work directory, so a rerun resumes")


def run(args: argparse.Namespace) -> int:
    from .datasets import DataError
    from .job import JobError, run as run_job
    from .models import ModelError

    try:
        out = run_job(config_from_args(args), stage=args.stage)
    except (JobError, DataError, ModelError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # a full disk, a read-only directory: nothing partial is published (staged writes)
        raise CLIError(write_error(e, args.out)) from None
    if out is not None:
        print(f"bundle written: {out}")
    return 0

"""``conceptlens torchserve-archive --bundle DIR --out MODEL_STORE``: a TorchServe model archive.

The .mar holds the conceptlens handler (``conceptlens_handler.py``), the whole bundle under
``bundle/`` (the ONNX model with its features and logits outputs, the head, the concept bases,
the prototype index and crops, and the manifest whose checksums the worker verifies at load) and
``model-config.yaml`` with TorchServe's batch settings and the handler's own settings. No pickle:
ONNX, safetensors, JSON and JPEG only. It is built with ``torch-model-archiver``.

``--ts-config FILE`` also writes a TorchServe config.properties from the production template
(``handlers/config.properties``: token authorization on) for this model store and archive.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..service.bundle import MANIFEST, BundleError, load_bundle
from ..service.cli import CLIError

HERE = Path(__file__).resolve().parent
HANDLER_FILE = HERE / "conceptlens_handler.py"
PLAIN_HANDLER = HERE / "plain_handler.py"
CONFIG_TEMPLATE = HERE / "config.properties"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory written by `conceptlens precompute`")
    parser.add_argument("--out", required=True, help="TorchServe model store (created if missing)")
    parser.add_argument("--model-name", default="conceptlens", help="TorchServe model name (default: conceptlens)")
    parser.add_argument("--model-version", default="1.0", help="archive version (default: 1.0)")
    parser.add_argument("--batch-size", type=int, default=8, help="TorchServe batchSize (default: 8)")
    parser.add_argument("--max-batch-delay-ms", type=int, default=5,
                        help="TorchServe maxBatchDelay: longest wait for a batch to fill (default: 5)")
    parser.add_argument("--workers", type=int, default=1, help="workers per model (default: 1)")
    parser.add_argument("--response-timeout-s", type=int, default=120, help="TorchServe responseTimeout (default: 120)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: the GPU TorchServe gives a worker, else the CPU (default: auto)")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="ONNX Runtime threads per operator in a worker (0: one per physical core)")
    parser.add_argument("--default-prototypes", type=int, default=3,
                        help="prototypes per concept when a request does not say (default: 3, as the service)")
    parser.add_argument("--default-predictions", type=int, default=5,
                        help="top predictions when a request does not say (default: 5, as the service)")
    parser.add_argument("--ts-config", default=None,
                        help="also write a TorchServe config.properties (production template) here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing archive")


def model_config(args: argparse.Namespace) -> str:
    """model-config.yaml: TorchServe's batch settings and the handler's section."""
    lines = [
        "# TorchServe settings of this model (written by conceptlens torchserve-archive)",
        f"minWorkers: {args.workers}",
        f"maxWorkers: {args.workers}",
        f"batchSize: {args.batch_size}",
        f"maxBatchDelay: {args.max_batch_delay_ms}",
        f"responseTimeout: {args.response_timeout_s}",
    ]
    if args.device != "auto":
        lines.append(f"deviceType: {'gpu' if args.device == 'cuda' else 'cpu'}")
    lines += [
        "handler:",
        f"  device: {args.device}",
        f"  intra_op_threads: {args.intra_op_threads}",
        "  inter_op_threads: 1",
        f"  default_prototypes: {args.default_prototypes}",
        f"  default_predictions: {args.default_predictions}",
        "  verify_bundle: true",
        "  warmup: true",
    ]
    return "\n".join(lines) + "\n"


def stage_bundle(bundle_dir: Path, dest: Path) -> list[str]:
    """Copy the manifest and every file it lists (nothing else) to ``dest``; returns the names."""
    bundle = load_bundle(bundle_dir, verify=True)
    names = [MANIFEST, *sorted(bundle.manifest.files)]
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle_dir / name, target)
    return names


def build_archive(args: argparse.Namespace, handler: Path = HANDLER_FILE) -> Path:
    """Build ``OUT/MODEL_NAME.mar``; raises CLIError for bad input, RuntimeError if the archiver fails.

    ``handler``: another handler file for the same layout (the bench packs ``plain_handler.py``)."""
    for name in ("batch_size", "workers", "response_timeout_s"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_batch_delay_ms < 0:
        raise CLIError("--max-batch-delay-ms must not be negative")
    bundle_dir, out = Path(args.bundle), Path(args.out)
    mar = out / f"{args.model_name}.mar"
    if mar.exists() and not args.force:
        raise CLIError(f"{mar} exists; pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="conceptlens-mar-") as tmp:
        stage = Path(tmp)
        try:
            stage_bundle(bundle_dir, stage / "extra" / "bundle")
        except BundleError as e:
            raise CLIError(str(e)) from None
        shutil.copy2(handler, stage / handler.name)
        (stage / "model-config.yaml").write_text(model_config(args))
        (stage / "tmp").mkdir()
        cmd = [sys.executable, "-m", "model_archiver.model_packaging",
               "--model-name", args.model_name, "--version", args.model_version,
               "--handler", str(stage / handler.name), "--extra-files", str(stage / "extra"),
               "--config-file", str(stage / "model-config.yaml"), "--export-path", str(out),
               "--archive-format", "default", "--force"]
        # The archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps builds apart.
        env = dict(os.environ, TMPDIR=str(stage / "tmp"))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not mar.is_file():
            raise RuntimeError(f"torch-model-archiver failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return mar


def write_ts_config(path: Path, model_store: Path, mar: Path) -> None:
    """config.properties from the production template, for this model store and archive."""
    lines = []
    for line in CONFIG_TEMPLATE.read_text().splitlines():
        if line.startswith("model_store="):
            line = f"model_store={model_store.resolve()}"
        elif line.startswith("load_models="):
            line = f"load_models={mar.name}"
        lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run(args: argparse.Namespace) -> int:
    try:
        mar = build_archive(args)
    except RuntimeError as e:
        raise CLIError(str(e)) from None
    print(f"wrote {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    if args.ts_config:
        write_ts_config(Path(args.ts_config), Path(args.out), mar)
        print(f"wrote {args.ts_config} (token authorization on)")
        print(f"start: torchserve --start --ncs --model-store {args.out} --ts-config {args.ts_config}")
    else:
        print(f"start: torchserve --start --ncs --model-store {args.out} --models {mar.name} "
              f"--ts-config CONFIG  (template: {CONFIG_TEMPLATE})")
    return 0

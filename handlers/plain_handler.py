"""A minimal plain TorchServe image classifier on a conceptlens archive: the baseline of the bench.

The same bundle, ONNX model, ONNX Runtime session settings and image decoding as the conceptlens
handler, and nothing else: one forward pass per batch, the top 5 classes as
``{class name: probability}`` per image (the answer of TorchServe's stock ``image_classifier``).
``bench/bench_torchserve.py`` packs it with ``build_archive(..., handler=PLAIN_HANDLER)`` to measure
what explaining adds to a plain prediction in TorchServe on the same runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conceptlens.handlers.worker_runtime import WorkerOnnxRuntime
from conceptlens.service.bundle import load_bundle
from conceptlens.service.explain import softmax
from conceptlens.service.preprocess import preprocess_bytes

TOP = 5
_STATE: dict = {}


def _initialize(context) -> None:
    props = context.system_properties
    bundle = load_bundle(Path(props["model_dir"]) / "bundle")
    settings = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
    _STATE.update(bundle=bundle, runtime=WorkerOnnxRuntime(
        bundle.model_path, device=str(settings.get("device", "auto")), gpu_id=props.get("gpu_id"),
        intra_op_threads=int(settings.get("intra_op_threads", 0))))


def handle(data, context):
    """TorchServe entry: ``handle(None, context)`` loads; then one answer per request."""
    if not _STATE:
        _initialize(context)
    if data is None:
        return None
    bundle, runtime = _STATE["bundle"], _STATE["runtime"]
    out, inputs, where = [None] * len(data), [], []
    for i, row in enumerate(data):
        image = row.get("data") or row.get("body")
        try:
            inputs.append(preprocess_bytes(bytes(image), bundle.preprocessing)[0])
            where.append(i)
        except (ValueError, TypeError) as e:
            context.set_response_status(400, str(e), i)
            out[i] = json.dumps({"code": 400, "type": "InvalidArgument", "message": str(e)})
    if inputs:
        _, logits = runtime.run(np.stack(inputs))
        probs = softmax(logits)
        for i, p in zip(where, probs):
            top = np.argsort(-p)[:TOP]
            out[i] = json.dumps({bundle.class_names[c]: float(p[c]) for c in top})
    return out

"""TorchServe handler: conceptlens explanations served from inside TorchServe.

Packed into a model archive by ``conceptlens torchserve-archive`` with the bundle under ``bundle/``
(checksums verified at load) and a ``model-config.yaml`` with TorchServe's batch settings. It runs
in a TorchServe worker and needs only the installed ``conceptlens`` package there.

It is the gRPC service's request pipeline, not a copy of it: options are validated and resolved by
``ServingModel.plan``, images decoded by ``ServingModel.decode``, the batch run by
``ServingModel.infer`` and each answer built by ``ServingModel.answer`` (the ``Explainer`` core and
the same protobuf encoding), so an answer is the gRPC ``ExplainResponse`` of the same image and
options, as JSON (``json_format.MessageToDict`` with proto field names; bytes as base64).

A TorchServe batch holds requests of different clients. Each request's own options (classes, top k,
contrast, max concepts, heatmaps, prototypes, predictions) are honoured; one forward pass runs for
the whole batch. A request that cannot be served (bad image, bad options, unknown class) gets its
own error status (400, 404; 500 with a log reference) and JSON body ``{"code", "type", "message"}``;
the others in the batch are answered and the worker keeps serving. Over REST the status is the
HTTP status; TorchServe 0.12's gRPC ``Predictions`` drops a handler's per-request status, so there
the call is OK and the answer is that JSON body (check for ``"code"``). See ``ts_requests`` for the
three request kinds (explain, features, describe) and how inputs are sent over REST and gRPC:

    curl -H 'X-Conceptlens-Options: {"top_k": 2, "heatmap_format": "HEATMAP_FORMAT_RAW"}' \
         -H 'Content-Type: application/octet-stream' --data-binary @cat.jpg \
         http://127.0.0.1:8080/predictions/conceptlens

Settings, from the ``handler:`` section of the archive's model-config.yaml:
``device`` (auto | cpu | cuda), ``intra_op_threads``, ``inter_op_threads``, ``default_prototypes``,
``default_predictions``, ``max_pixels``, ``verify_bundle``, ``warmup``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from conceptlens.handlers.ts_requests import error_body, npy_bytes, parse_row
from conceptlens.handlers.worker_runtime import WorkerOnnxRuntime
from conceptlens.service.bundle import load_bundle
from conceptlens.service.config import ServerConfig
from conceptlens.service.runtime import single_threaded_blas
from conceptlens.service.errors import status_for
from conceptlens.service.serving_model import ServingModel
from conceptlens.v1 import explain_service_pb2 as pb

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"  # where the archive keeps the bundle, relative to the model directory
JSON = "application/json"
NPY = "application/octet-stream"
OPTIONS_HEADER = "x-conceptlens-options"


HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 503, grpc.StatusCode.UNAVAILABLE: 503,
               grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class ConceptLensHandler:
    """One per worker: the bundle, its ONNX Runtime session and the service's ServingModel."""

    def __init__(self):
        self.model: ServingModel | None = None
        self.initialized = False
        self.describe_json = ""

    def initialize(self, context) -> None:
        props = context.system_properties
        single_threaded_blas()
        settings = dict((getattr(context, "model_yaml_config", None) or {}).get("handler") or {})
        model_dir = Path(props["model_dir"])
        bundle = load_bundle(model_dir / BUNDLE_DIR, verify=bool(settings.get("verify_bundle", True)))
        runtime = WorkerOnnxRuntime(
            bundle.model_path, device=str(settings.get("device", "auto")), gpu_id=props.get("gpu_id"),
            intra_op_threads=int(settings.get("intra_op_threads", 0)),
            inter_op_threads=int(settings.get("inter_op_threads", 1)))
        batch_size = max(1, int(props.get("batch_size") or 1))
        defaults = ServerConfig()
        config = ServerConfig(
            bundle=str(bundle.root), device=str(settings.get("device", "auto")), max_batch_size=batch_size,
            default_prototypes=int(settings.get("default_prototypes", defaults.default_prototypes)),
            default_predictions=int(settings.get("default_predictions", defaults.default_predictions)),
            max_pixels=int(settings.get("max_pixels", defaults.max_pixels)))
        self.model = ServingModel(bundle, runtime, config)
        if settings.get("warmup", True):
            self.model.warmup(batch_size)
        self.describe_json = json.dumps(json_format.MessageToDict(
            self.model.model_info, preserving_proto_field_name=True))
        self.initialized = True
        log.info("conceptlens handler: bundle %s, %d classes with concepts, %s, batch <= %d",
                 bundle.bundle_id, len(bundle.classes), ",".join(runtime.providers), batch_size)

    # -- one TorchServe batch ------------------------------------------------------------------
    def handle(self, data: list, context) -> list:
        """TorchServe's entry: one answer per request, in order (str JSON or bytes)."""
        start = time.perf_counter()
        model = self.model
        crop = model.bundle.preprocessing.crop
        out: list = [None] * len(data)
        pending = []  # (index, kind, inputs (n, 3, S, S), plan, image info, decode seconds)
        for i, raw in enumerate(data):
            try:
                row = parse_row(raw, crop, _header(context, i, OPTIONS_HEADER))
                if row.kind == "describe":
                    out[i] = self._ok(context, i, self.describe_json, JSON)
                elif row.kind == "features":
                    pending.append((i, "features", row.tensor, None, None, 0.0))
                else:
                    plan = model.plan(row.options)
                    t = time.perf_counter()
                    x, info = model.decode(row.image)
                    pending.append((i, "explain", x[None], plan, info, time.perf_counter() - t))
            except Exception as e:
                out[i] = self._error(context, i, e)
        if not pending:
            return out
        inputs = [x for p in pending for x in p[2]]  # views, one per image
        t = time.perf_counter()
        outputs = model.infer(inputs)
        t_infer = time.perf_counter() - t
        row = 0
        for i, kind, x, plan, info, t_decode in pending:
            mine = outputs[row:row + len(x)]
            row += len(x)
            try:
                if kind == "features":
                    body = npy_bytes(np.stack([f for f, _ in mine]), np.stack([lg for _, lg in mine]))
                    out[i] = self._ok(context, i, body, NPY)
                    continue
                features, logits = mine[0]
                answer, t_explain, t_encode = model.answer_message(features, logits, plan, info)
                answer.timings.CopyFrom(pb.Timings(
                    decode_seconds=t_decode, inference_seconds=t_infer, explain_seconds=t_explain,
                    encode_seconds=t_encode, total_seconds=time.perf_counter() - start, batch_size=len(inputs)))
                text = json.dumps(json_format.MessageToDict(answer, preserving_proto_field_name=True),
                                  separators=(",", ":"))
                out[i] = self._ok(context, i, text, JSON)
            except Exception as e:
                out[i] = self._error(context, i, e)
        return out

    @staticmethod
    def _ok(context, i: int, body, content_type: str):
        context.set_response_content_type(i, content_type)
        return body

    @staticmethod
    def _error(context, i: int, exc: BaseException) -> str:
        """Status and JSON body for a request that failed; never a stack trace to the client.

        The service's own mapping (:func:`status_for`) decides, in HTTP terms."""
        status, message = status_for(exc)
        code = HTTP_STATUS.get(status, 500)
        phrase = " ".join(message.split())[:200].encode("ascii", "replace").decode()  # one HTTP reason line
        context.set_response_status(code, phrase, i)
        context.set_response_content_type(i, JSON)
        return error_body(code, message)


def _header(context, i: int, name: str):
    """Request header ``name`` (lower case) of request ``i``, any case as sent; None if absent."""
    try:
        headers = context.get_all_request_header(i)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    for key, value in (headers or {}).items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, (str, bytes)):
            return value
    return None


_HANDLER = ConceptLensHandler()


def handle(data, context):
    """TorchServe entry point: ``handle(None, context)`` loads the model, later calls answer a batch."""
    if not _HANDLER.initialized:
        _HANDLER.initialize(context)
    if data is None:
        return None
    return _HANDLER.handle(data, context)

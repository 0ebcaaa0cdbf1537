"""The Open Inference Protocol (KServe v2, Triton's "inference" API) for plain predictions, over
REST (aiohttp) and gRPC (grpc.aio), so stock clients (``tritonclient.http``/``tritonclient.grpc``,
KServe's) can ask conceptlens for a model's logits and probabilities.

A request carries ONE input tensor, recognised by its datatype (its name is free; the metadata
calls them ``image``, ``pixels`` and ``rgb``):

- ``BYTES`` [N] (any shape; one image per element): encoded JPEG/PNG/WebP images. Each goes
  through the Explain pipeline (cache, admission, batching, the same decode) with predictions only.
- ``FP32`` [N, 3, S, S]: the model's normalized input (S = the bundle's crop), as precompute's
  ``preprocess`` makes it.
- ``UINT8`` [N, H, W, 3]: raw RGB pixels, resized, cropped and normalized here with the bundle's
  preprocessing.

Outputs: ``logits`` and ``probabilities`` (softmax), FP32 [N, K]; ``outputs`` in the request
selects them. Extensions: binary tensor data (REST: ``binary_data_size``/``binary_data``/
``binary_data_output`` and the ``Inference-Header-Content-Length`` header; BYTES elements are a
4-byte little-endian length, then the bytes) and classification (``classification``: k on a
requested output returns BYTES [N, k] of "value:index:label", highest first). BYTES inputs sent as
JSON are UTF-8 strings, or base64 with the input parameter ``content_type: "base64"`` (MLServer's
convention). Not served: shared memory, sequences, model repository control, statistics, traces.

gRPC: the protocol's service ``inference.GRPCInferenceService`` (messages from
``proto/conceptlens/oip/v2/grpc_predict_v2.proto``, same field numbers as the spec).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from .. import __version__
from ..oip.v2 import grpc_predict_v2_pb2 as oip
from ..v1 import explain_service_pb2 as pb
from .errors import HTTP_STATUS, InvalidInputError, ModelNotFoundError, UnavailableError, status_for

SERVICE_NAME = "inference.GRPCInferenceService"  # the protocol's name on the wire (see the .proto)
SERVER_NAME = "conceptlens"
PLATFORM = "conceptlens-onnx"
EXTENSIONS = ["binary_tensor_data", "classification"]
OUTPUTS = ("logits", "probabilities")
MAX_IMAGES = 256  # BYTES elements (images) per request
DEFAULT_MAX_BODY = 64 << 20  # REST body limit when the server has no max_message_bytes
HEADER_LENGTH = "Inference-Header-Content-Length"

# datatype -> numpy dtype (little-endian, as the protocol's binary data is)
DTYPES = {"BOOL": np.dtype(np.bool_), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"),
          "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"),
          "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
          "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


# -- tensors ------------------------------------------------------------------------------------
@dataclass
class Tensor:
    """A named tensor: ``data`` is a numpy array of ``shape``, or for BYTES a flat list of bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # REST only: None = the request's binary_data_output
    classification: int = 0


@dataclass
class InferResult:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]  # logits, probabilities: (N, K) float32
    class_names: list[str]


def _count(shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"the input shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def parse_bytes_elements(raw: bytes | memoryview) -> list[bytes]:
    """The elements of a BYTES tensor in binary form: each a 4-byte little-endian length, then bytes."""
    mv, out, i, n = memoryview(raw), [], 0, len(raw)
    while i < n:
        if i + 4 > n:
            raise InvalidInputError(f"BYTES tensor data is truncated: {n - i} bytes where a 4-byte length "
                                    f"prefix was expected")
        (length,) = struct.unpack_from("<I", mv, i)
        i += 4
        if i + length > n:
            raise InvalidInputError(f"BYTES tensor data is truncated: an element of {length} bytes, "
                                    f"{n - i} left")
        out.append(bytes(mv[i:i + length]))
        i += length
    return out


def serialize_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview,
                    parameters: dict | None = None) -> Tensor:
    """A tensor from its binary (raw) data."""
    n = _count(shape)
    if datatype == "BYTES":
        elements = parse_bytes_elements(raw)
        if len(elements) != n:
            raise InvalidInputError(f"input {name!r}: shape {shape} has {n} elements, the data {len(elements)}")
        return Tensor(name, datatype, shape, elements, parameters or {})
    dtype = _dtype(name, datatype)
    if len(raw) != n * dtype.itemsize:
        raise InvalidInputError(f"input {name!r}: shape {shape} of {datatype} needs {n * dtype.itemsize} bytes, "
                                f"got {len(raw)}")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype).reshape(shape), parameters or {})


def _dtype(name: str, datatype: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise InvalidInputError(f"input {name!r}: unknown datatype {datatype!r}") from None


def _flatten(data) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _decode_bytes_element(e, base64_encoded: bool, name: str) -> bytes:
    if not isinstance(e, str):
        raise InvalidInputError(f"input {name!r}: BYTES data must be strings, got {type(e).__name__}")
    if base64_encoded:
        try:
            return base64.b64decode(e, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInputError(f"input {name!r}: an element is not valid base64") from None
    return e.encode("utf-8")


# -- the core, shared by both transports ----------------------------------------------------------
def parse_version(version: str | int | None) -> int:
    """The protocol's version string -> the server's version number (0: the server's choice)."""
    if version in (None, "", 0):
        return 0
    try:
        v = int(version)
    except (TypeError, ValueError):
        v = -1
    if v < 1:
        raise ModelNotFoundError(f"model version {version!r} is not found: versions are positive integers")
    return v


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits, in float64, returned as float32."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


async def _gather(coros) -> list:
    """asyncio.gather that cancels the others when one fails."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
            t.add_done_callback(_retrieve)  # a second bad image: no "exception never retrieved"
        raise


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


async def infer(server, model: str, version: str | int, inputs: list[Tensor],
                deadline: float | None = None) -> InferResult:
    """Logits and probabilities (N, K) for the one input tensor of a request (see the module doc)."""
    loaded = server.resolve(model, parse_version(version))
    serving = loaded.model
    names = list(serving.names)
    k = len(names)
    pre = serving.bundle.preprocessing
    if len(inputs) != 1:
        raise InvalidInputError(f"expected exactly one input tensor (BYTES images, FP32 [N,3,{pre.crop},{pre.crop}] "
                                f"or UINT8 [N,H,W,3]), got {len(inputs)}")
    x = inputs[0]
    if x.datatype == "BYTES":
        images = x.data
        if not images:
            raise InvalidInputError(f"input {x.name!r} has no images")
        if len(images) > MAX_IMAGES:
            raise InvalidInputError(f"at most {MAX_IMAGES} images per request, got {len(images)}")
        answers = await _gather(
            server.explain_bytes(pb.ExplainRequest(image=img, model=loaded.name, version=loaded.version,
                                                   options=pb.ExplainOptions(top_k=0, num_predictions=k)),
                                 deadline)
            for img in images)
        logits = np.empty((len(images), k), np.float32)
        for i, body in enumerate(answers):
            predictions = pb.ExplainResponse.FromString(body).predictions
            if len(predictions) != k:  # num_predictions = K: every class comes back
                raise RuntimeError(f"the Explain pipeline returned {len(predictions)} predictions for {k} classes")
            for p in predictions:
                logits[i, p.class_id] = p.logit  # float32 logits widened to double: exact back
    else:
        batch = await _model_inputs(server, x, pre)
        outputs = await server.predict(loaded.name, loaded.version, batch)
        logits = np.stack([np.asarray(o[1], np.float32).reshape(-1) for o in outputs]) if outputs \
            else np.zeros((0, k), np.float32)
    return InferResult(loaded.name, str(loaded.version),
                       {"logits": logits, "probabilities": softmax(logits)}, names)


async def _model_inputs(server, x: Tensor, pre) -> list[np.ndarray]:
    """A FP32 [N,3,S,S] or UINT8 [N,H,W,3] tensor -> N model inputs (3, S, S) float32."""
    s = pre.crop
    a = x.data
    if x.datatype == "FP32":
        if a.ndim != 4 or a.shape[1:] != (3, s, s):
            raise InvalidInputError(f"input {x.name!r}: a FP32 input must be the model's normalized input "
                                    f"[N, 3, {s}, {s}], got {list(a.shape)}")
        a = a.astype(np.float32, copy=False)
        return [np.ascontiguousarray(a[i]) for i in range(a.shape[0])]
    if x.datatype == "UINT8":
        if a.ndim != 4 or a.shape[3] != 3 or a.shape[1] < 1 or a.shape[2] < 1:
            raise InvalidInputError(f"input {x.name!r}: a UINT8 input must be RGB pixels [N, H, W, 3], "
                                    f"got {list(a.shape)}")
        max_pixels = getattr(getattr(server, "config", None), "max_pixels", None)
        if max_pixels and a.shape[1] * a.shape[2] > max_pixels:
            raise InvalidInputError(f"input {x.name!r}: {a.shape[2]}x{a.shape[1]} pixels per image, more than "
                                    f"the limit of {max_pixels}")
        from .preprocess import normalize, resize_crop

        def prepare() -> list[np.ndarray]:
            return [normalize(resize_crop(np.ascontiguousarray(a[i]), pre), pre) for i in range(a.shape[0])]
        return await asyncio.get_running_loop().run_in_executor(None, prepare)
    raise InvalidInputError(f"input {x.name!r}: datatype {x.datatype} is not accepted; send BYTES (encoded images), "
                            f"FP32 [N, 3, {s}, {s}] (normalized) or UINT8 [N, H, W, 3] (RGB pixels)")


def select_outputs(result: InferResult, requested: list[RequestedOutput]) -> list[tuple[RequestedOutput, Tensor]]:
    """The requested outputs (all, when none is named), classification applied."""
    wanted = requested or [RequestedOutput(name) for name in OUTPUTS]
    out = []
    for r in wanted:
        if r.name not in result.outputs:
            raise InvalidInputError(f"unknown output {r.name!r}; the outputs are {', '.join(OUTPUTS)}")
        a = result.outputs[r.name]
        if r.classification:
            if r.classification < 0:
                raise InvalidInputError(f"output {r.name!r}: classification must be positive")
            top = min(r.classification, a.shape[1])
            order = np.argsort(-a, axis=1, kind="stable")[:, :top]
            elements = [f"{a[i, j]:f}:{j}:{result.class_names[j]}".encode()
                        for i in range(a.shape[0]) for j in order[i]]
            out.append((r, Tensor(r.name, "BYTES", [a.shape[0], top], elements)))
        else:
            out.append((r, Tensor(r.name, "FP32", list(a.shape), a)))
    return out


def model_metadata(server, model: str, version: str | int) -> dict:
    loaded = server.resolve(model, parse_version(version))
    s, k = loaded.model.bundle.preprocessing.crop, len(loaded.model.names)
    versions = [str(loaded.version)]
    try:
        for m in server.list_models().models:
            if m.name == loaded.name:
                versions = [str(v.version) for v in m.versions if v.state == "READY"] or versions
    except Exception:  # list_models is informative only
        pass
    return {
        "name": loaded.name, "versions": versions, "platform": PLATFORM,
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                   {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, s, s]},
                   {"name": "rgb", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
        "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, k]} for name in OUTPUTS],
    }


def _model_ready(server, model: str, version: str | int) -> bool:
    """Raises ModelNotFoundError for an unknown model; False while it loads or drains."""
    v = parse_version(version)
    if server.model_ready(model, v):
        return True
    try:
        server.resolve(model, v)  # unknown -> ModelNotFoundError
    except UnavailableError:
        return False
    return False


# -- REST ----------------------------------------------------------------------------------------
def add_routes(app, server) -> None:
    """Add the protocol's REST routes (``/v2/...``) to an aiohttp application."""
    from aiohttp import web

    def error(exc: BaseException) -> web.Response:
        code, message = status_for(exc)
        return web.json_response({"error": message}, status=HTTP_STATUS.get(code, 500))

    def guarded(fn):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except web.HTTPException:
                raise
            except Exception as e:  # CancelledError (client gone) propagates
                return error(e)
        return handler

    def model_version(request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def live(request):
        return web.json_response({"live": True})

    async def ready(request):
        ok = bool(server.ready())
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def server_metadata(request):
        return web.json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def metadata(request):
        return web.json_response(model_metadata(server, *model_version(request)))

    async def model_ready(request):
        name, version = model_version(request)
        ok = _model_ready(server, name, version)
        return web.json_response({"name": name, "ready": ok}, status=200 if ok else 503)

    async def infer_route(request):
        limit = getattr(getattr(server, "config", None), "max_message_bytes", None) or DEFAULT_MAX_BODY
        body = await _read_body(request, limit)
        if body is None:
            return web.json_response({"error": f"the request body is larger than the limit of {limit} bytes"},
                                     status=413)
        inputs, requested, binary_default, request_id, deadline = parse_rest_request(body, request.headers.get(HEADER_LENGTH))
        name, version = model_version(request)
        result = await infer(server, name, version, inputs, deadline)
        return rest_response(result, select_outputs(result, requested), binary_default, request_id)

    # route names as the RPCs' (http_api's middleware counts "HTTP <name>"; "-version" is dropped)
    routes = [("GET", "/v2", server_metadata, "ServerMetadata"), ("GET", "/v2/health/live", live, "ServerLive"),
              ("GET", "/v2/health/ready", ready, "ServerReady")]
    for prefix, suffix in (("/v2/models/{model}", ""), ("/v2/models/{model}/versions/{version}", "-version")):
        routes += [("GET", prefix, metadata, "ModelMetadata" + suffix),
                   ("GET", prefix + "/ready", model_ready, "ModelReady" + suffix),
                   ("POST", prefix + "/infer", infer_route, "ModelInfer" + suffix)]
    for method, path, fn, name in routes:
        app.router.add_route(method, path, guarded(fn), name=name)


async def _read_body(request, limit: int) -> bytes | None:
    """The whole body (decompressed by aiohttp), or None past ``limit`` bytes. Read from the stream
    so the application's own (1 MiB default) client_max_size does not cap tensors."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_rest_request(body: bytes, header_length: str | None
                       ) -> tuple[list[Tensor], list[RequestedOutput], bool, str | None, float | None]:
    """(inputs, requested outputs, binary_data_output, id, deadline) of a REST infer request body."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInputError(f"{HEADER_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise InvalidInputError(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"the request is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InvalidInputError("the request must be a JSON object with an \"inputs\" list")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInputError("\"parameters\" must be an object")
    inputs, offset = [], 0
    for spec in req["inputs"]:
        if not isinstance(spec, dict):
            raise InvalidInputError("each input must be an object with name, datatype, shape and data")
        name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list) \
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInputError("each input needs a string name, a string datatype and an integer shape")
        p = spec.get("parameters") or {}
        if not isinstance(p, dict):
            raise InvalidInputError(f"input {name!r}: \"parameters\" must be an object")
        if any(key.startswith("shared_memory") for key in p):
            raise InvalidInputError(f"input {name!r}: shared memory is not supported by this server")
        size = p.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInputError(f"input {name!r}: binary_data_size {size} does not fit the "
                                        f"{len(binary) - offset} binary bytes left in the body")
            inputs.append(tensor_from_raw(name, datatype, shape, binary[offset:offset + size], p))
            offset += size
            continue
        if "data" not in spec:
            raise InvalidInputError(f"input {name!r} has neither data nor binary_data_size")
        flat, n = _flatten(spec["data"]), _count(shape)
        if len(flat) != n:
            raise InvalidInputError(f"input {name!r}: shape {shape} has {n} elements, the data {len(flat)}")
        if datatype == "BYTES":
            b64 = str(p.get("content_type", "")).lower() in ("base64", "b64")
            inputs.append(Tensor(name, datatype, shape, [_decode_bytes_element(e, b64, name) for e in flat], p))
        else:
            dtype = _dtype(name, datatype)
            try:
                a = np.asarray(flat, dtype=dtype).reshape(shape)
            except (TypeError, ValueError, OverflowError) as e:
                raise InvalidInputError(f"input {name!r}: data is not {datatype}: {e}") from None
            inputs.append(Tensor(name, datatype, shape, a, p))
    if offset != len(binary):
        raise InvalidInputError(f"{len(binary) - offset} bytes of binary data after the last binary input")
    requested = []
    for spec in req.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInputError("each requested output must be an object with a name")
        p = spec.get("parameters") or {}
        if any(key.startswith("shared_memory") for key in p):
            raise InvalidInputError(f"output {spec['name']!r}: shared memory is not supported by this server")
        binary_flag = p.get("binary_data")
        requested.append(RequestedOutput(spec["name"], None if binary_flag is None else bool(binary_flag),
                                         _int_param(p.get("classification", 0), "classification")))
    timeout_us = params.get("timeout")
    deadline = time.monotonic() + _int_param(timeout_us, "timeout") / 1e6 if timeout_us else None
    request_id = req.get("id")
    return inputs, requested, bool(params.get("binary_data_output", False)), \
        (str(request_id) if request_id is not None else None), deadline


def _int_param(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidInputError(f"parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def rest_response(result: InferResult, outputs: list[tuple[RequestedOutput, Tensor]], binary_default: bool,
                  request_id: str | None):
    from aiohttp import web

    head: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if request_id is not None:
        head["id"] = request_id
    described, blobs = [], []
    for r, t in outputs:
        d: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        binary = binary_default if r.binary is None else r.binary
        if binary:
            blob = serialize_bytes_elements(t.data) if t.datatype == "BYTES" else \
                np.ascontiguousarray(t.data, DTYPES[t.datatype]).tobytes()
            d["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            d["data"] = [e.decode("utf-8", "replace") for e in t.data] if t.datatype == "BYTES" \
                else np.asarray(t.data).ravel().tolist()
        described.append(d)
    head["outputs"] = described
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=b"".join([text, *blobs]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(text))})


# -- gRPC ----------------------------------------------------------------------------------------
def _param_value(p: oip.InferParameter):
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


TYPED_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def parse_grpc_request(request: oip.ModelInferRequest) -> tuple[list[Tensor], list[RequestedOutput]]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
                                f"send all inputs raw or none")
    inputs = []
    for i, spec in enumerate(request.inputs):
        shape, params = list(spec.shape), {k: _param_value(v) for k, v in spec.parameters.items()}
        if any(k.startswith("shared_memory") for k in params):
            raise InvalidInputError(f"input {spec.name!r}: shared memory is not supported by this server")
        if raw:
            inputs.append(tensor_from_raw(spec.name, spec.datatype, shape, raw[i], params))
            continue
        field_name = TYPED_CONTENTS.get(spec.datatype)
        if field_name is None:
            raise InvalidInputError(f"input {spec.name!r}: datatype {spec.datatype!r} has no typed contents; "
                                    f"send it in raw_input_contents")
        values = getattr(spec.contents, field_name)
        n = _count(shape)
        if len(values) != n:
            raise InvalidInputError(f"input {spec.name!r}: shape {shape} has {n} elements, the contents {len(values)}")
        if spec.datatype == "BYTES":
            inputs.append(Tensor(spec.name, "BYTES", shape, list(values), params))
            continue
        dtype = DTYPES[spec.datatype]
        a = np.asarray(values)
        if dtype.kind in "iu" and a.size and (a.min() < np.iinfo(dtype).min or a.max() > np.iinfo(dtype).max):
            raise InvalidInputError(f"input {spec.name!r}: values out of the range of {spec.datatype}")
        inputs.append(Tensor(spec.name, spec.datatype, shape, a.astype(dtype).reshape(shape), params))
    requested = []
    for spec in request.outputs:
        params = {k: _param_value(v) for k, v in spec.parameters.items()}
        if any(k.startswith("shared_memory") for k in params):
            raise InvalidInputError(f"output {spec.name!r}: shared memory is not supported by this server")
        requested.append(RequestedOutput(spec.name, True,
                                         _int_param(params.get("classification") or 0, "classification")))
    return inputs, requested


def grpc_response(result: InferResult, outputs: list[tuple[RequestedOutput, Tensor]],
                  request_id: str) -> oip.ModelInferResponse:
    resp = oip.ModelInferResponse(model_name=result.model_name, model_version=result.model_version, id=request_id)
    for _, t in outputs:
        resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        resp.raw_output_contents.append(serialize_bytes_elements(t.data) if t.datatype == "BYTES" else
                                        np.ascontiguousarray(t.data, DTYPES[t.datatype]).tobytes())
    return resp


def grpc_handler(server) -> grpc.GenericRpcHandler:
    """The protocol's gRPC service, ``inference.GRPCInferenceService``, for a grpc.aio server."""

    async def server_live(request, context):
        return oip.ServerLiveResponse(live=True)

    async def server_ready(request, context):
        return oip.ServerReadyResponse(ready=bool(server.ready()))

    async def model_ready(request, context):
        try:
            return oip.ModelReadyResponse(ready=_model_ready(server, request.name, request.version))
        except ModelNotFoundError:  # as tritonclient expects: an unknown model is not ready
            return oip.ModelReadyResponse(ready=False)

    async def server_metadata(request, context):
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def model_metadata_rpc(request, context):
        m = model_metadata(server, request.name, request.version)
        tm = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"],
                                         inputs=[tm(**t) for t in m["inputs"]],
                                         outputs=[tm(**t) for t in m["outputs"]])

    async def model_infer(request, context):
        inputs, requested = parse_grpc_request(request)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        result = await infer(server, request.model_name, request.model_version, inputs, deadline)
        return grpc_response(result, select_outputs(result, requested), request.id)

    def method(fn, request_type, response_type):
        async def call(request, context):
            try:
                return await fn(request, context)
            except Exception as e:  # CancelledError propagates
                code, message = status_for(e)
            await context.abort(code, message)
        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "ServerLive": method(server_live, oip.ServerLiveRequest, oip.ServerLiveResponse),
        "ServerReady": method(server_ready, oip.ServerReadyRequest, oip.ServerReadyResponse),
        "ModelReady": method(model_ready, oip.ModelReadyRequest, oip.ModelReadyResponse),
        "ServerMetadata": method(server_metadata, oip.ServerMetadataRequest, oip.ServerMetadataResponse),
        "ModelMetadata": method(model_metadata_rpc, oip.ModelMetadataRequest, oip.ModelMetadataResponse),
        "ModelInfer": method(model_infer, oip.ModelInferRequest, oip.ModelInferResponse),
    })

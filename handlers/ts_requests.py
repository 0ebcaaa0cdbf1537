"""What a TorchServe request row carries, for the conceptlens handler.

TorchServe hands a handler one dict per request, its inputs by name: the REST body as ``body``
(or ``data``), multipart form fields and query parameters by their names, and the entries of the
gRPC ``PredictionsRequest.input`` map by their keys. The worker has already turned JSON inputs
into dicts and ``text/*`` inputs into str; everything else arrives as bytes.

One row is one of three kinds:

- ``explain`` (the default): an image (``data``/``body``, or ``image`` in a JSON body, base64) and
  optional options, an ``ExplainOptions`` in the protobuf JSON mapping, e.g.
  ``{"classes": [{"name": "tabby"}], "top_k": 2, "heatmap_format": "HEATMAP_FORMAT_RAW"}``
  (snake_case or camelCase, enums by name or number). Unset options mean what they mean in the
  gRPC API. Options travel as the ``options`` input (gRPC input map entry, multipart form field,
  or ``options`` in a JSON body) or, with a raw image body, in the ``X-Conceptlens-Options``
  header (TorchServe 0.12 does not pass query parameters of ``/predictions`` to handlers).
- ``features``: ``tensor``, a float32 ``.npy`` array (N, 3, S, S) of decoded, normalized images;
  the answer is two ``.npy`` arrays back to back, features (N, C, H, W) and logits (N, K). This is
  what ``conceptlens serve --runtime torchserve`` sends.
- ``describe``: any ``describe`` input; the answer is the model info (GetModelInfoResponse as JSON).
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass

import numpy as np
from google.protobuf import json_format

from ..service.errors import InvalidInputError
from ..v1 import explain_service_pb2 as pb

MAX_TENSOR_ROWS = 64  # images per feature request (the service sends its batches, 8 by default)


class RequestError(InvalidInputError):
    """A request that cannot be served as sent: answered 400 with this message."""


@dataclass
class Row:
    kind: str  # "explain" | "features" | "describe"
    image: bytes = b""
    options: pb.ExplainOptions | None = None
    tensor: np.ndarray | None = None  # (N, 3, S, S) float32 for "features"


def _as_bytes(value, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):  # base64 text (a text/plain form field or a JSON string)
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{what} is text but not base64") from None
    raise RequestError(f"{what} must be bytes or base64 text, not {type(value).__name__}")


def parse_options(value) -> pb.ExplainOptions:
    """``options`` as sent (dict, JSON text or JSON bytes) -> ExplainOptions; RequestError if bad."""
    if value is None or value == b"" or value == "":
        return pb.ExplainOptions()
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("options must be UTF-8 JSON") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise RequestError(f"options are not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError("options must be a JSON object (ExplainOptions in the protobuf JSON mapping)")
    try:
        return json_format.ParseDict(value, pb.ExplainOptions())
    except json_format.ParseError as e:
        raise RequestError(f"options: {e}") from None


def parse_tensor(value, crop: int) -> np.ndarray:
    """A float32 ``.npy`` array (N, 3, crop, crop) without pickles; RequestError otherwise."""
    data = _as_bytes(value, "tensor")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/... for a bad header
        raise RequestError(f"tensor is not a .npy array: {e}") from None
    if arr.dtype != np.float32 or arr.ndim != 4 or arr.shape[1:] != (3, crop, crop):
        raise RequestError(f"tensor must be float32 (N, 3, {crop}, {crop}), got {arr.dtype} {arr.shape}")
    if not 1 <= arr.shape[0] <= MAX_TENSOR_ROWS:
        raise RequestError(f"tensor must hold 1 to {MAX_TENSOR_ROWS} images, got {arr.shape[0]}")
    return np.ascontiguousarray(arr)


def parse_row(row, crop: int, header_options=None) -> Row:
    """One TorchServe request row -> Row; RequestError with a clear message when it is unusable.

    ``header_options``: the X-Conceptlens-Options header of the request, used when the row itself
    carries no options."""
    if not isinstance(row, dict):
        raise RequestError("empty request")
    if "describe" in row:
        return Row("describe")
    if "tensor" in row:
        return Row("features", tensor=parse_tensor(row["tensor"], crop))
    body = row.get("data")
    if body is None:
        body = row.get("body")
    options = row.get("options")
    if isinstance(body, dict):  # a JSON body: {"image": base64, "options": {...}}
        if options is None:
            options = body.get("options")
        body = body.get("image")
    if options is None:
        options = header_options
    if body is None:
        raise RequestError("no image: send it as the body, as input 'data', or as 'image' (base64) in a JSON body")
    return Row("explain", image=_as_bytes(body, "image"), options=parse_options(options))


def npy_bytes(*arrays: np.ndarray) -> bytes:
    """The arrays as ``.npy`` files back to back (read them with :func:`read_npys`)."""
    out = io.BytesIO()
    for a in arrays:
        np.save(out, np.ascontiguousarray(a), allow_pickle=False)
    return out.getvalue()


def read_npys(data: bytes, count: int) -> list[np.ndarray]:
    """``count`` arrays written by :func:`npy_bytes`."""
    buf = io.BytesIO(data)
    return [np.load(buf, allow_pickle=False) for _ in range(count)]


def error_body(code: int, message: str) -> str:
    """The JSON answer of a failed request: {"code": HTTP status, "type": ..., "message": ...}."""
    kind = {400: "InvalidArgument", 404: "NotFound"}.get(code, "InternalServerError")
    return json.dumps({"code": code, "type": kind, "message": message})

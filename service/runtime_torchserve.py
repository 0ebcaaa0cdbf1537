"""TorchServe as the service's model runtime (``conceptlens serve --runtime torchserve``).

The service decodes and batches as usual, then sends each batch to a TorchServe model built by
``conceptlens torchserve-archive`` over TorchServe's gRPC inference API
(``org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions``, port 7070 by default):
one request per batch, input ``tensor`` = the batch (N, 3, S, S) float32 as ``.npy``; the handler
answers with features (N, C, H, W) and logits (N, K) as two ``.npy`` arrays back to back. The
explanations are then computed here, as with ONNX Runtime.

The service batches already, so the TorchServe model it uses is best registered with batch size 1
(no TorchServe batch delay per request): ``conceptlens torchserve-archive --bundle B --out STORE
--model-name conceptlens-features --batch-size 1`` and ``--torchserve-model conceptlens-features``;
``--max-concurrent-batches`` 2 or more overlaps the round trips.

At start the runtime asks the TorchServe model to describe itself (input ``describe``) and
refuses a model that serves another bundle than the service loaded: features from one model
explained with another's bases would be silently wrong.

The gRPC messages are declared here from TorchServe's ``inference.proto`` (the fields used;
field numbers as in TorchServe 0.12.0) in a private descriptor pool, so neither protoc nor
generated code is needed at run time.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import numpy as np

from ..handlers.ts_requests import npy_bytes, read_npys
from .runtime import RuntimeSetupError


PACKAGE = "org.pytorch.serve.grpc.inference"
PREDICTIONS = f"/{PACKAGE}.InferenceAPIsService/Predictions"
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20


def inference_messages():
    """(PredictionsRequest, PredictionResponse) classes of TorchServe's inference.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="conceptlens/torchserve/inference.proto",
                                             package=PACKAGE, syntax="proto3")
    req = fdp.message_type.add(name="PredictionsRequest")
    req.field.add(name="model_name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    req.field.add(name="model_version", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry = req.nested_type.add(name="InputEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    entry.options.map_entry = True
    req.field.add(name="input", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                  type_name=f".{PACKAGE}.PredictionsRequest.InputEntry")
    resp = fdp.message_type.add(name="PredictionResponse")
    resp.field.add(name="prediction", number=1, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()  # private: no clash with generated TorchServe stubs
    pool.Add(fdp)
    return tuple(message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
                 for name in ("PredictionsRequest", "PredictionResponse"))


class TorchServeRuntime:
    """Runs the model in TorchServe: batch (N, 3, S, S) float32 -> (features, logits)."""

    name = "torchserve"

    def __init__(self, address: str, model_name: str = "conceptlens", token: str | None = None,
                 bundle_id: str | None = None, timeout_s: float = 60.0, wait_s: float = 60.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        """``address``: TorchServe's gRPC inference address HOST:PORT; ``token``: its inference key
        when token authorization is on; ``bundle_id``: the bundle the TorchServe model must serve;
        ``wait_s``: how long to wait for TorchServe and the model to come up."""
        if not address:
            raise RuntimeSetupError("--runtime torchserve needs --torchserve-address HOST:PORT "
                                    "(TorchServe's gRPC inference address, port 7070 by default)")
        self.address, self.model_name, self.timeout_s = address, model_name, timeout_s
        self._request_cls, response_cls = inference_messages()
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self._predict = self._channel.unary_unary(PREDICTIONS, request_serializer=self._request_cls.SerializeToString,
                                                  response_deserializer=response_cls.FromString)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        try:
            self.info = self._describe(wait_s)
        except BaseException:
            self._channel.close()
            raise
        if bundle_id and self.info.get("bundle_id") != bundle_id:
            self._channel.close()
            raise RuntimeSetupError(f"TorchServe model {model_name!r} at {address} serves bundle "
                                    f"{self.info.get('bundle_id')!r}, but this service loaded bundle {bundle_id!r}")
        self.providers = [f"torchserve://{address}/{model_name}", *self.info.get("providers", [])]
        self.max_batch_size = None

    def _call(self, inputs: dict[str, bytes], timeout: float) -> bytes:
        request = self._request_cls(model_name=self.model_name, input=inputs)
        return self._predict(request, timeout=timeout, metadata=self._metadata).prediction

    def _describe(self, wait_s: float) -> dict:
        """The TorchServe model's GetModelInfo as a dict, waiting for TorchServe to be up."""
        deadline = time.monotonic() + wait_s
        delay = 0.2
        while True:
            try:
                return json.loads(self._call({"describe": b"1"}, timeout=min(self.timeout_s, 10.0)))
            except grpc.RpcError as e:
                retry = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
                    e.code() == grpc.StatusCode.NOT_FOUND and "model" in (e.details() or "").lower())
                if not retry or time.monotonic() + delay > deadline:
                    raise RuntimeSetupError(f"TorchServe model {self.model_name!r} at {self.address}: "
                                            f"{e.code().name}: {e.details()}") from None
            except ValueError as e:
                raise RuntimeSetupError(f"TorchServe model {self.model_name!r} at {self.address} is not a "
                                        f"conceptlens archive (describe answered: {e})") from None
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """batch (N, 3, S, S) float32 -> (features (N, C, H, W) float32, logits (N, K) float32)."""
        if batch.dtype != np.float32 or not batch.flags.c_contiguous:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        try:
            body = self._call({"tensor": npy_bytes(batch)}, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise RuntimeError(f"TorchServe {self.address}/{self.model_name}: {e.code().name}: {e.details()}") from None
        if body[:1] == b"{":  # the handler's error answer (TorchServe's gRPC API drops its status)
            try:
                message = json.loads(body).get("message", "")
            except ValueError:
                message = body[:200].decode("utf-8", "replace")
            raise RuntimeError(f"TorchServe {self.address}/{self.model_name}: {message}")
        features, logits = read_npys(body, 2)
        if len(features) != len(batch) or len(logits) != len(batch):
            raise RuntimeError(f"TorchServe answered {len(features)} rows for a batch of {len(batch)}")
        return features, logits

    def close(self) -> None:
        self._channel.close()


def create(model_path, torchserve_address: str | None = None, torchserve_model: str = "conceptlens",
           torchserve_token_file: str | None = None, torchserve_timeout_s: float = 60.0, bundle_id: str | None = None,
           **_) -> TorchServeRuntime:
    """The ``torchserve`` runtime factory (settings named as the ``conceptlens serve`` flags;
    ``bundle_id``: the bundle the server loaded, which the TorchServe model must serve).

    ``torchserve_token_file``: TorchServe's key_file.json (its inference key is used) or a file
    holding just the key.
    """
    token = read_token(torchserve_token_file) if torchserve_token_file else None
    return TorchServeRuntime(torchserve_address, model_name=torchserve_model, token=token,
                             bundle_id=bundle_id, timeout_s=torchserve_timeout_s)


def read_token(path: str | os.PathLike) -> str:
    """The inference key from TorchServe's key_file.json, or the whole (stripped) file."""
    text = Path(path).read_text().strip()
    try:
        keys = json.loads(text)
    except ValueError:
        return text
    if isinstance(keys, dict) and isinstance(keys.get("inference"), dict) and keys["inference"].get("key"):
        return str(keys["inference"]["key"])
    raise RuntimeSetupError(f"{path}: no inference key in this key file")


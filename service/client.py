"""A small Python client of the explanation service (synchronous, one channel).

    with ExplainClient("localhost:50051") as client:
        answer = client.explain(Path("cat.jpg").read_bytes(), classes=["tabby"], heatmaps="raw")
        for x in answer.explanations:
            print(x.class_name, x.logit, identity_gap(x))
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import grpc
import numpy as np

from ..v1 import explain_service_pb2 as pb
from ..v1 import explain_service_pb2_grpc as pb_grpc

HEATMAPS = {"none": pb.HEATMAP_FORMAT_NONE, "raw": pb.HEATMAP_FORMAT_RAW, "png": pb.HEATMAP_FORMAT_PNG_OVERLAY}
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


def class_ref(key: int | str) -> pb.ClassRef:
    """A ClassRef from an id (int or digit string) or a name."""
    if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
        return pb.ClassRef(id=int(key))
    return pb.ClassRef(name=str(key))


def make_options(classes: Sequence[int | str] = (), top_k: int | None = None, contrast: int | str | None = None,
                 max_concepts: int = 0, heatmaps: str = "none", prototypes: int | None = None,
                 prototype_jpeg: bool = False, num_predictions: int | None = None) -> pb.ExplainOptions:
    """ExplainOptions from plain arguments (heatmaps: none | raw | png)."""
    if heatmaps not in HEATMAPS:
        raise ValueError(f"heatmaps must be one of {', '.join(HEATMAPS)}")
    opts = pb.ExplainOptions(classes=[class_ref(c) for c in classes], max_concepts=max_concepts,
                             heatmap_format=HEATMAPS[heatmaps],
                             prototype_format=pb.PROTOTYPE_FORMAT_JPEG if prototype_jpeg else pb.PROTOTYPE_FORMAT_REFERENCE)
    if top_k is not None:
        opts.top_k = top_k
    if contrast is not None:
        opts.contrast.CopyFrom(class_ref(contrast))
    if prototypes is not None:
        opts.prototypes_per_concept = prototypes
    if num_predictions is not None:
        opts.num_predictions = num_predictions
    return opts


def heatmap_array(heatmap: pb.Heatmap) -> np.ndarray:
    """The (H, W) float32 codes of a RAW heatmap."""
    if heatmap.format != pb.HEATMAP_FORMAT_RAW:
        raise ValueError("only RAW heatmaps decode to a grid")
    grid = np.frombuffer(heatmap.data, np.uint8).reshape(heatmap.height, heatmap.width)
    return grid.astype(np.float32) * np.float32(heatmap.scale)


def identity_gap(x: pb.ClassExplanation) -> float:
    """|sum of contributions + omitted + residual + bias - logit|: 0 up to float rounding."""
    total = sum(c.contribution for c in x.concepts) + x.omitted_contribution + x.residual + x.bias
    return abs(total - x.logit)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, token: str):
        self.token = token

    def __call__(self, context, callback):
        callback((("authorization", f"Bearer {self.token}"),), None)


class ExplainClient:
    """Blocking client. ``tls_ca`` (or ``tls=True`` for the system roots) switches TLS on; ``tls_cert`` and
    ``tls_key`` add a client certificate (mutual TLS); ``token`` sends a bearer token."""

    def __init__(self, target: str, *, token: str | None = None, tls: bool = False, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, timeout: float | None = 30.0):
        options = channel_options(max_message_bytes)
        self.timeout = timeout
        self._metadata: tuple = ()
        if tls or tls_ca or tls_cert:
            creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_Bearer(token)))
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
            if token:  # call credentials need TLS; plain metadata works on an insecure channel
                self._metadata = (("authorization", f"Bearer {token}"),)
        self.stub = pb_grpc.ExplainServiceStub(self.channel)

    def __enter__(self) -> "ExplainClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _kw(self, timeout):
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self._metadata}

    def explain(self, image: bytes | str | os.PathLike, *, timeout: float | None = None, model: str = "",
                version: int = 0, **options) -> pb.ExplainResponse:
        """Explain one image (bytes or a path) with ``model`` (default: the server's default model)
        at ``version`` (0: the newest); ``options`` are those of :func:`make_options`."""
        data = image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()
        request = pb.ExplainRequest(image=bytes(data), options=make_options(**options), model=model, version=version)
        return self.stub.Explain(request, **self._kw(timeout))

    def explain_many(self, images: Iterable[tuple[str, bytes]], *, timeout: float | None = None, model: str = "",
                     version: int = 0, **options) -> Iterator[pb.ExplainStreamResponse]:
        """Stream (item_id, image bytes) pairs; yields answers as they finish (check .status.code)."""
        opts = make_options(**options)
        requests = (pb.ExplainStreamRequest(item_id=item_id, request=pb.ExplainRequest(
            image=data, options=opts, model=model, version=version)) for item_id, data in images)
        return self.stub.ExplainStream(requests, **self._kw(timeout))

    def class_concepts(self, cls: int | str, *, prototypes: int | None = None, jpeg: bool = False,
                       timeout: float | None = None, model: str = "", version: int = 0) -> pb.GetClassConceptsResponse:
        request = pb.GetClassConceptsRequest(class_ref=class_ref(cls), prototype_format=pb.PROTOTYPE_FORMAT_JPEG
                                             if jpeg else pb.PROTOTYPE_FORMAT_REFERENCE, model=model, version=version)
        if prototypes is not None:
            request.prototypes_per_concept = prototypes
        return self.stub.GetClassConcepts(request, **self._kw(timeout))

    def list_classes(self, with_concepts_only: bool = False, timeout: float | None = None, model: str = "",
                     version: int = 0) -> pb.ListClassesResponse:
        return self.stub.ListClasses(pb.ListClassesRequest(with_concepts_only=with_concepts_only, model=model,
                                                           version=version), **self._kw(timeout))

    def model_info(self, timeout: float | None = None, model: str = "", version: int = 0) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(model=model, version=version), **self._kw(timeout))

    def list_models(self, timeout: float | None = None) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), **self._kw(timeout))

    def reload_models(self, timeout: float | None = None) -> pb.ReloadModelsResponse:
        return self.stub.ReloadModels(pb.ReloadModelsRequest(), **self._kw(timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, ... of the standard health service."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    def wait_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING; TimeoutError otherwise. ``service``: a model's name (the
        server as a whole is SERVING as soon as any one model is ready)."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(service, timeout=1.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{service or 'the server'} did not become SERVING in time")
            time.sleep(0.1)

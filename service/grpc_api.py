"""The gRPC transport of the ExplainService API: thin handlers over the server's core calls."""
from __future__ import annotations

import asyncio
import time

import grpc

from ..v1 import explain_service_pb2 as pb
from .errors import status_for

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExplainService"].full_name  # conceptlens.v1.ExplainService


def _serialize(message) -> bytes:
    """Response serializer that passes already-serialized bytes through."""
    return message if isinstance(message, (bytes, bytearray)) else message.SerializeToString()


def _length_delimited(field_number: int, payload: bytes) -> bytes:
    """Protobuf wire encoding of a bytes/message field (to embed serialized answers without parsing)."""
    n, out = len(payload), bytearray([(field_number << 3) | 2])
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes(out) + payload


def _deadline(context) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


class ExplainServicer:
    """conceptlens.v1.ExplainService over an ExplainServer."""

    def __init__(self, server):
        self.server = server

    def handler(self) -> grpc.GenericRpcHandler:
        def uu(fn, req):
            return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=req.FromString,
                                                       response_serializer=_serialize)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Explain": uu(self.Explain, pb.ExplainRequest),
            "ExplainStream": grpc.stream_stream_rpc_method_handler(
                self.ExplainStream, request_deserializer=pb.ExplainStreamRequest.FromString,
                response_serializer=_serialize),
            "GetClassConcepts": uu(self.GetClassConcepts, pb.GetClassConceptsRequest),
            "ListClasses": uu(self.ListClasses, pb.ListClassesRequest),
            "GetModelInfo": uu(self.GetModelInfo, pb.GetModelInfoRequest),
            "ListModels": uu(self.ListModels, pb.ListModelsRequest),
            "ReloadModels": uu(self.ReloadModels, pb.ReloadModelsRequest),
        })

    async def Explain(self, request: pb.ExplainRequest, context) -> bytes:
        return await self.server.explain_bytes(request, _deadline(context))

    async def ExplainStream(self, request_iterator, context):
        """Items run concurrently (at most stream_concurrency at once) and are answered as they finish."""
        server = self.server
        if not server.ready():
            server.resolve()  # raises the reason (loading, draining)
        deadline = _deadline(context)
        limit = server.config.stream_concurrency
        slots = asyncio.Semaphore(limit)
        out: asyncio.Queue = asyncio.Queue(maxsize=limit)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def one(item: pb.ExplainStreamRequest):
            try:
                try:
                    body = await server.explain_bytes(item.request, deadline)
                    msg = pb.ExplainStreamResponse(item_id=item.item_id, status=pb.ItemStatus(code=0))
                    msg = msg.SerializeToString() + _length_delimited(3, body)
                except Exception as e:
                    code, text = status_for(e)
                    msg = pb.ExplainStreamResponse(item_id=item.item_id,
                                                   status=pb.ItemStatus(code=code.value[0], message=text))
                await out.put(msg)
            finally:
                slots.release()

        async def read():
            try:
                async for item in request_iterator:
                    await slots.acquire()
                    task = asyncio.get_running_loop().create_task(one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
                await out.put(done)
            except BaseException as e:
                await out.put(e)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                msg = await out.get()
                if msg is done:
                    return
                if isinstance(msg, BaseException):
                    raise msg
                yield msg
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def GetClassConcepts(self, request: pb.GetClassConceptsRequest, context):
        return await self.server.class_concepts(request)

    async def ListClasses(self, request: pb.ListClassesRequest, context):
        return self.server.resolve(request.model, request.version).model.list_classes(request.with_concepts_only)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        return self.server.resolve(request.model, request.version).model.model_info

    async def ListModels(self, request: pb.ListModelsRequest, context):
        return self.server.list_models()

    async def ReloadModels(self, request: pb.ReloadModelsRequest, context):
        return await self.server.reload()

"""gRPC server interceptors: every exception mapped to a status code (service/errors.py) and counted,
and bearer-token authentication (compared in constant time)."""
from __future__ import annotations

import asyncio
import hmac
import inspect
import time

import grpc

from .errors import status_for
from .metrics import Metrics


def _context_code(context) -> grpc.StatusCode:
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    for c in grpc.StatusCode:  # some versions return the int value
        if code is not None and c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


def _rebuild(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    kind = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return kind(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps every exception of every RPC to a status code with a clear message, and counts RPCs
    by method and code. Wrapped handlers are kept per method, so the wrapping costs nothing per call."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner = _behavior(handler)
        record = self.metrics.rpc

        async def guarded(request, context, produce):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return await produce(request, context)
            except grpc.aio.AbortError:
                code = _context_code(context)
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:
                code, message = status_for(e)
                await context.abort(code, message)
            finally:
                record(method, code.name, time.perf_counter() - start)

        if not handler.response_streaming:
            async def produce_unary(request, context):
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

            async def unary(request, context):
                return await guarded(request, context, produce_unary)
            return _rebuild(handler, unary)

        async def produce_stream(request, context):
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    await context.write(item)
            elif inspect.isawaitable(result):
                await result
            else:  # a plain iterator
                for item in result:
                    await context.write(item)

        async def streaming(request, context):
            await guarded(request, context, produce_stream)
        return _rebuild(handler, streaming)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every RPC except health checks."""

    EXEMPT = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        if details.method.startswith(self.EXEMPT):
            return await continuation(details)
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else bytes(got)
        handler = await continuation(details)
        if handler is None or hmac.compare_digest(got, self._expected):
            return handler

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return _rebuild(handler, deny)

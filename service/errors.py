"""Typed serving errors and their status codes, in one place for every transport.

A client error is raised as one of these types; ``status_for`` maps it to a gRPC status code and
``HTTP_STATUS`` that code to an HTTP status. Anything else, a ``ValueError`` from deep inside
numpy included, is INTERNAL: the client gets an id and the server log has the traceback.
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import grpc

from .batcher import CancelledItemError, ClosedError, DeadlineExpiredError, QueueFullError

log = logging.getLogger(__name__)


class InvalidInputError(ValueError):
    """The request itself is wrong: a bad image, bad options, a contrast equal to the class."""


class ClassNotFoundError(LookupError):
    """An unknown class, or a class without concepts in the bundle."""


class ModelNotFoundError(LookupError):
    """No such model, or no such version of it, in the repository."""


class UnavailableError(Exception):
    """The server or the model is loading or draining."""


HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-facing message for an exception raised while serving."""
    if isinstance(exc, (ClassNotFoundError, ModelNotFoundError)):
        return grpc.StatusCode.NOT_FOUND, str(exc.args[0]) if exc.args else "not found"
    if isinstance(exc, InvalidInputError):  # ImageError included
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (UnavailableError, ClosedError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, CancelledItemError):
        return grpc.StatusCode.CANCELLED, str(exc)
    if isinstance(exc, (DeadlineExpiredError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the answer was ready"
    ref = uuid.uuid4().hex[:12]
    log.error("internal error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"

"""The one place where domain errors become gRPC statuses: a server interceptor wraps every handler
(unary and streaming), so no servicer method carries its own try/except.

Each status carries a `google.rpc.ErrorInfo` detail (reason, domain, metadata) for callers that branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import errors, memory
from .rpc_handlers import rewrap

_logger = logging.getLogger(__name__)

ERROR_DOMAIN = "backup.aperture.dev"

#: Domain error → status code. Order matters: the first matching class wins (subclasses first).
STATUS_CODES: tuple[tuple[type[errors.BackupError], grpc.StatusCode], ...] = (
    (errors.JobRunning, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Aborted, grpc.StatusCode.ABORTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Internal, grpc.StatusCode.INTERNAL),
    (errors.BackupError, grpc.StatusCode.INTERNAL),
)


def status_code(error: errors.BackupError) -> grpc.StatusCode:
    return next(code for cls, code in STATUS_CODES if isinstance(error, cls))


def to_status(error: errors.BackupError) -> grpc.Status:
    code = status_code(error)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=str(error), details=[detail])
    )
    return status


def _abort(context: grpc.ServicerContext, error: errors.BackupError) -> None:
    code = status_code(error)
    # Client mistakes are not server errors: log them below ERROR. Refused callers are logged by the
    # authentication interceptor itself, at most once a minute per peer, so a scanner cannot flood the log.
    if code is grpc.StatusCode.INTERNAL:
        level = logging.ERROR
    elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        level = logging.DEBUG
    else:
        level = logging.INFO
    _logger.log(level, "request failed with %s: %s", code.name, error)
    context.abort_with_status(to_status(error))


def _wrap_unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except errors.BackupError as error:
            _abort(context, error)

    return wrapper


def _wrap_stream(
    behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(request, context)
        except errors.BackupError as error:
            _abort(context, error)
        finally:
            memory.release_free_memory()

    return wrapper


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns BackupError raised by any handler into its status, with ErrorInfo details; the one place that
    wraps handlers, so it also lets their responses come already encoded, and hands the memory a streaming
    RPC freed back to the system when it ends (memory.py)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        # Handlers may yield messages already encoded (StreamDownload does: aperture_backup_client.wire).
        return rewrap(
            handler,
            unary=_wrap_unary,
            stream=_wrap_stream,
            response_serializer=pass_encoded(handler.response_serializer),
        )


def pass_encoded(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that leaves messages already encoded (bytes) as they are."""
    if serializer is None:
        return None
    encode = serializer

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else encode(message)

    return serialize

"""One way to wrap a gRPC method handler: the interceptors (errors, authentication, metrics) each put a
function around the servicer's behaviour, and only this module knows the four kinds of handler gRPC has."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Behavior", "rewrap"]

#: A handler's behaviour: (request or request iterator, context) -> response or response iterator.
Behavior = Callable[[Any, grpc.ServicerContext], Any]


def rewrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    unary: Callable[[Behavior], Behavior],
    stream: Callable[[Behavior], Behavior],
    response_serializer: Callable[[Any], bytes] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` whose behaviour is wrapped by `unary` (single response) or
    `stream` (streamed responses); the serializers are kept unless `response_serializer` is given."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": response_serializer or handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **serializers)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **serializers)
    return handler

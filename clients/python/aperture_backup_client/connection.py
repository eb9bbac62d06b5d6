"""Channels to the service: plaintext or TLS (mutual TLS with a client certificate), and the bearer token
sent with every call.

The token travels as per-call metadata added by a client interceptor rather than as gRPC call credentials,
because gRPC refuses call credentials on plaintext channels and a token over loopback without TLS is a
supported setup.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import grpc

__all__ = ["ChannelSettings", "PemSource", "open_channel"]

#: PEM material: the bytes themselves, or a path to a file holding them.
PemSource = bytes | str | os.PathLike[str]


class ChannelSettings(TypedDict, total=False):
    """How to reach the service, as `open_channel` and `BackupClient` take it."""

    token: str | None
    tls: bool
    ca_cert: PemSource | None
    client_cert: PemSource | None
    client_key: PemSource | None
    server_name: str | None


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    target: str,
    *,
    token: str | None = None,
    tls: bool = False,
    ca_cert: PemSource | None = None,
    client_cert: PemSource | None = None,
    client_key: PemSource | None = None,
    server_name: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A channel to `target`. TLS is used when `tls` is true or any certificate is given (`ca_cert`
    verifies the server, the system's roots when omitted; `client_cert` and `client_key` answer a server
    that asks for mutual TLS); `server_name` overrides the name the server's certificate must carry."""
    settings = list(options or [])
    if (client_cert is None) != (client_key is None):
        raise ValueError("mutual TLS needs both a client certificate and its key")
    if tls or ca_cert is not None or client_cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(ca_cert), private_key=_pem(client_key), certificate_chain=_pem(client_cert)
        )
        if server_name:
            settings.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(target, credentials, options=settings)
    else:
        channel = grpc.insecure_channel(target, options=settings)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel

"""Who may call: bearer tokens, two roles, and the one server interceptor that checks them.

Every BackupService call must carry `authorization: Bearer <token>` metadata once a token is configured.
The admin token may call everything; the read-only token only the RPCs in `READ_ONLY_METHODS`. gRPC health
checking and server reflection stay open, so orchestrators and `grpcurl list/describe` work without one.

The interceptor sits inside `rpc_errors.ErrorInterceptor`, so a refusal is a domain error like any other
and reaches the caller with its status code and `ErrorInfo` reason. A call it lets through runs with its
caller (role and address) known to the domain (callers.py), for the job history.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import Any

import grpc

from aperture.backup.v1 import backup_pb2

from .callers import Caller, acting_for, address_of
from .errors import BackupError, PermissionDenied, Unauthenticated
from .rpc_handlers import Behavior, rewrap

_logger = logging.getLogger(__name__)

_SERVICE = backup_pb2.DESCRIPTOR.services_by_name["BackupService"]
SERVICE_PREFIX = f"/{_SERVICE.full_name}/"

#: The RPCs the read-only role may call: they show and copy backups but change nothing. Verify is not
#: among them: it changes no backup, but each call loads a whole archive into the database server (CPU,
#: disk, index builds) and holds the job slot, so a read-only token could keep backups from running. Pin
#: and Unpin decide what retention deletes.
READ_ONLY_METHODS = frozenset({"List", "Get", "StreamDownload", "GetStatus", "GetRetention", "GetSchedule", "ListJobs"})
#: Services anyone may call: health for orchestrators, reflection for `grpcurl list/describe`. Neither
#: reveals a backup or changes anything.
OPEN_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
#: A refused peer is logged at most this often.
WARN_INTERVAL_SECONDS = 60.0
_MAX_REMEMBERED_PEERS = 4096


class Role(IntEnum):
    """What a caller may do; a higher role may do everything a lower one may."""

    READ_ONLY = 1
    ADMIN = 2

    @property
    def label(self) -> str:
        return "read-only" if self is Role.READ_ONLY else "admin"


def required_role(method: str) -> Role | None:
    """The role a full method path ("/aperture.backup.v1.BackupService/List") needs; None when it is open.
    Anything not known to be open needs admin, so a service added later is closed until decided."""
    service = method.lstrip("/").partition("/")[0]
    if service in OPEN_SERVICES:
        return None
    if method.startswith(SERVICE_PREFIX) and method.removeprefix(SERVICE_PREFIX) in READ_ONLY_METHODS:
        return Role.READ_ONLY
    return Role.ADMIN


def _digest(token: str) -> bytes:
    # Tokens are compared as digests: equal length, so the comparison's time says nothing about the token.
    return hashlib.sha256(token.encode()).digest()


class TokenAuthenticator:
    """Maps a call's metadata to the caller's role. With no token configured, every caller is admin (a
    loopback address, mutual TLS, or the explicit insecure switch; `Config.validate` decides)."""

    def __init__(self, admin_token: str | None, read_token: str | None = None):
        self._tokens: list[tuple[bytes, Role]] = []
        if admin_token is not None:
            self._tokens.append((_digest(admin_token), Role.ADMIN))
        if read_token is not None:
            self._tokens.append((_digest(read_token), Role.READ_ONLY))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def role_of(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Role:
        """The caller's role, or Unauthenticated saying what is wrong (never echoing what was sent)."""
        values = [value for key, value in metadata or () if key.lower() == "authorization"]
        if not values:
            raise Unauthenticated(
                "this service needs a token: send the metadata `authorization: Bearer <token>` "
                "(the CLI takes --token-file or APERTURE_BACKUP_TOKEN_FILE)",
                reason="TOKEN_MISSING",
            )
        if len(values) > 1:
            raise Unauthenticated("send exactly one authorization header", reason="TOKEN_INVALID")
        value = values[0].decode("ascii", "replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization header must be `Bearer <token>`", reason="TOKEN_INVALID")
        given = _digest(token.strip())
        role: Role | None = None
        for digest, candidate in self._tokens:
            # Compare with every token, always, so the time taken does not tell which one matched.
            if hmac.compare_digest(given, digest):
                role = candidate
        if role is None:
            raise Unauthenticated("the token is not valid for this service", reason="TOKEN_INVALID")
        return role


class _PeerWarnings:
    """Logs a refused peer at WARNING at most once per interval, so a scanner cannot flood the log."""

    def __init__(self, interval: float = WARN_INTERVAL_SECONDS, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def warn(self, peer: str, method: str, error: BackupError) -> None:
        host = _peer_host(peer)
        now = self._clock()
        with self._lock:
            last = self._last.get(host)
            if last is not None and now - last < self._interval:
                return
            if len(self._last) >= _MAX_REMEMBERED_PEERS:
                self._last = {h: t for h, t in self._last.items() if now - t < self._interval}
            self._last[host] = now
        _logger.warning("refused a call to %s from %s: %s (%s)", method, host, error.reason, error)


def _peer_host(peer: str) -> str:
    """ "ipv4:10.0.0.7:53412" → "10.0.0.7": one entry per address, whatever port a connection uses."""
    kind, _, address = peer.partition(":")
    if kind in {"ipv4", "ipv6"}:
        return address.rpartition(":")[0] or address
    return peer


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the caller's token against the role the method needs, before the servicer runs."""

    def __init__(self, authenticator: TokenAuthenticator, *, warnings: _PeerWarnings | None = None):
        self._auth = authenticator
        self._warnings = warnings or _PeerWarnings()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        needed = required_role(method)
        if needed is None:
            return continuation(handler_call_details)
        if not self._auth.enabled:
            return _with_caller(continuation(handler_call_details), "")
        error: BackupError
        try:
            role = self._auth.role_of(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            error = exc
        else:
            if role >= needed:
                return _with_caller(continuation(handler_call_details), role.label)
            name = method.rpartition("/")[2]
            error = PermissionDenied(
                f"{name} needs the {needed.label} role; this token has the {role.label} role "
                "(use the admin token, APERTURE_BACKUP_TOKEN)",
                reason="ROLE_INSUFFICIENT",
                metadata={"method": name, "required_role": needed.label, "role": role.label},
            )
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._refusal(handler, method, error)

    def _refusal(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, error: BackupError
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A handler of the same kind as the real one that runs nothing but the refusal (the peer's address
        is only known inside a call)."""

        def refuse(context: grpc.ServicerContext) -> None:
            self._warnings.warn(context.peer(), method, error)
            raise error

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            refuse(context)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            refuse(context)
            yield  # pragma: no cover - makes this a generator, as streaming handlers are

        return rewrap(handler, unary=lambda _behavior: unary, stream=lambda _behavior: stream)


def _with_caller(handler: grpc.RpcMethodHandler[Any, Any] | None, role: str) -> grpc.RpcMethodHandler[Any, Any] | None:
    """The handler, run with its caller set (callers.py). A streaming handler has it set around each step
    only, never across a `yield`: the generator may be closed from another thread, where resetting a
    context variable set here would fail."""
    if handler is None:
        return None

    def unary(behavior: Behavior) -> Behavior:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            with acting_for(Caller(role, address_of(context.peer()))):
                return behavior(request, context)

        return wrapper

    def stream(behavior: Behavior) -> Behavior:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = Caller(role, address_of(context.peer()))
            with acting_for(caller):
                responses = iter(behavior(request, context))
            try:
                while True:
                    with acting_for(caller):
                        try:
                            response = next(responses)
                        except StopIteration:
                            return
                    yield response
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()

        return wrapper

    return rewrap(handler, unary=unary, stream=stream)

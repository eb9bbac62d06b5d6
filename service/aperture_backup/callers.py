"""Who asked for what is being done: the caller of the RPC this thread serves, for the job history.

The auth interceptor (auth.py), which knows the caller's role, sets it for the length of each call; a job
made during that call keeps it (`Job.caller`), also in the thread the job runs in. Work nobody called for
(the schedule, the catch-up run) has no caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    #: "admin" or "read-only"; empty when the service checks no tokens (every caller may do everything).
    role: str
    #: The caller's address as gRPC saw it, "127.0.0.1:53412" or "[::1]:53412"; a Unix socket's path.
    address: str


_current: ContextVar[Caller | None] = ContextVar("aperture_backup_caller", default=None)


def current() -> Caller | None:
    """The caller of the RPC this thread serves, None outside an RPC."""
    return _current.get()


@contextlib.contextmanager
def acting_for(caller: Caller) -> Iterator[None]:
    token = _current.set(caller)
    try:
        yield
    finally:
        _current.reset(token)


def address_of(peer: str) -> str:
    """ "ipv4:10.0.0.7:53412" → "10.0.0.7:53412"; "ipv6:[::1]:53412" → "[::1]:53412"."""
    kind, sep, address = peer.partition(":")
    return address if sep and kind in {"ipv4", "ipv6", "unix"} else peer

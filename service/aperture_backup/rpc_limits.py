"""Bulk transfers must never starve the rest: a cap on concurrent uploads and downloads, and uploads that
stall are dropped after an idle timeout.

gRPC's Python server runs each call on a thread of one pool. A transfer holds its thread for as long as
the client keeps the stream open, so 16 clients that send one chunk and stall would leave no thread for
List, GetStatus or health checks. With the caps below, bulk transfers can take at most
twice `max_transfers` threads and every other call always finds one.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

from .errors import DeadlineExceeded, ResourceExhausted

T = TypeVar("T")

_END = object()


class TransferSlots:
    """At most `limit` transfers of one kind at a time; one more is refused at once (a queue would hold a
    thread just the same)."""

    def __init__(self, kind: str, limit: int):
        self._kind = kind
        self._limit = limit
        self._free = threading.BoundedSemaphore(limit)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(
                f"{self._limit} {self._kind}s are already running, the most this service runs at once; "
                "try again when one has finished (APERTURE_BACKUP_MAX_TRANSFERS raises the limit)",
                reason="TOO_MANY_TRANSFERS",
                metadata={"kind": self._kind, "limit": str(self._limit)},
            )
        try:
            yield
        finally:
            self._free.release()


def with_idle_timeout(source: Iterator[T], seconds: float, what: str) -> Iterator[T]:
    """The items of `source`, failing with DeadlineExceeded when none arrives for `seconds`.

    A helper thread waits on `source` (a gRPC request stream, whose `next` cannot be given a timeout), so
    the call's own thread can give up; once the call has ended with the error, gRPC ends the stream and
    the helper thread with it."""
    items: queue.Queue[object] = queue.Queue(maxsize=1)
    stopped = threading.Event()

    def hand_over(item: object) -> bool:
        while not stopped.is_set():
            try:
                items.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in source:
                if not hand_over(item):
                    return
            hand_over(_END)
        except BaseException as exc:  # re-raised in the call's thread
            hand_over(exc)

    threading.Thread(target=pump, name=f"{what}-reader", daemon=True).start()
    try:
        while True:
            try:
                item = items.get(timeout=seconds)
            except queue.Empty:
                raise DeadlineExceeded(
                    f"the {what} sent nothing for {seconds:g} s and was dropped; send the next chunk sooner or "
                    "start again (APERTURE_BACKUP_UPLOAD_IDLE_TIMEOUT sets the limit)",
                    reason="IDLE_TIMEOUT",
                ) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stopped.set()

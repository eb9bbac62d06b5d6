"""Silence: no successful backup for longer than `APERTURE_BACKUP_STALE_AFTER` (default 26 hours, a daily
schedule plus slack). A failure is told when it happens; silence is what a stopped schedule, a service that
was down, or a job that hangs look like, and only a clock notices it.

A thread looks every `interval` seconds, at a clock that tests inject. When backups have gone silent it
notifies, and again each further `stale_after` that passes without a success, so a long silence is
reminded, not repeated every minute. With no backup at all, silence counts from the service's start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from .backups import utc_now
from .model import Backup, State
from .notify import Notifier
from .retention import UNCOUNTED_TRIGGERS
from .storage import PerListing

_logger = logging.getLogger(__name__)

CHECK_INTERVAL_SECONDS = 60.0


class Listing(Protocol):
    """Where the backups are listed: the directory, or every location (`storage.catalog.Archives`)."""

    def listing(self) -> tuple[Backup, ...]: ...


def _newest_success(listing: tuple[Backup, ...]) -> Backup | None:
    # Uploads are not backups of this database; every other READY archive is.
    return next((b for b in listing if b.state is State.READY and b.trigger not in UNCOUNTED_TRIGGERS), None)


class SilenceWatch:
    def __init__(
        self,
        store: Listing,
        notifier: Notifier,
        stale_after: timedelta | None,
        *,
        clock: Callable[[], datetime] = utc_now,
        interval: float = CHECK_INTERVAL_SECONDS,
    ):
        self._store = store
        self._notifier = notifier
        self.stale_after = stale_after
        self._clock = clock
        self._interval = interval
        self._started = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The success the alarms are about (None: none yet) and how many were sent since it.
        self._episode: tuple[datetime, int] | None = None
        #: GetStatus asks at every call; one pass per listing, not one per call.
        self._newest_success_in = PerListing(_newest_success)

    def is_stale(self) -> bool:
        """Whether backups are silent now; notifies nobody (GetStatus asks this)."""
        if self.stale_after is None:
            return False
        _newest, _since, quiet = self._quiet()
        return quiet > self.stale_after

    def start(self) -> None:
        if self.stale_after is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="silence", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def check(self) -> bool:
        """Look now; notify when silent for another `stale_after`. Whether backups are silent."""
        if self.stale_after is None:
            return False
        newest, since, quiet = self._quiet()
        with self._lock:
            if self._episode is None or self._episode[0] != since:
                self._episode = (since, 0)
            alarms = self._episode[1]
            due = quiet > self.stale_after * (alarms + 1)
            if due:
                self._episode = (since, alarms + 1)
        if due:
            _logger.warning(
                "no successful backup for %.1f h (APERTURE_BACKUP_STALE_AFTER is %.1f h)",
                quiet.total_seconds() / 3600,
                self.stale_after.total_seconds() / 3600,
            )
            self._notifier.silence(newest, since, quiet, self.stale_after)
        return quiet > self.stale_after

    def _quiet(self) -> tuple[Backup | None, datetime, timedelta]:
        """The newest successful backup, when the silence began (it finished, or the service started), and
        how long it has lasted."""
        newest = self._newest_success()
        since = _finished(newest) if newest is not None else self._started
        return newest, since, self._clock() - since

    def _newest_success(self) -> Backup | None:
        return self._newest_success_in(self._store.listing())

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # the watch must outlive a bad moment of the store
                _logger.exception("the silence check failed")
            self._stop.wait(self._interval)


def _finished(backup: Backup) -> datetime:
    return backup.create_time + timedelta(seconds=backup.duration_seconds or 0.0)

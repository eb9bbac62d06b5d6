"""The daily backup: the `schedule` library in a daemon thread, in the configured time zone.

A failed run is recorded (a FAILED backup in the store, visible in List and GetStatus) and logged, and the
thread goes on to the next day. After start-up, one catch-up backup runs when the service was down at the
scheduled time, i.e. when the newest successful backup is more than a day old; and a fresh install, with no
successful backup at all, makes its first one `first_backup_delay` seconds after start-up (default 60, see
config.py) instead of leaving the database unprotected until the first scheduled time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import schedule

from .backups import BackupManager, wait_for
from .errors import BackupError, JobRunning
from .model import DEFAULT_KIND, Trigger
from .settings import SettingsStore

_logger = logging.getLogger(__name__)

CATCH_UP_AFTER = timedelta(days=1)
#: How often the thread looks at the clock. The run fires within this much of its time.
POLL_SECONDS = 1.0


class DailyScheduler:
    """Runs the scheduled backup; `reschedule()` after the settings change."""

    def __init__(
        self,
        manager: BackupManager,
        settings: SettingsStore,
        *,
        poll_seconds: float = POLL_SECONDS,
        after_backup: Callable[[], None] | None = None,
        first_backup_delay: float | None = None,
    ):
        self._manager = manager
        #: Runs in this thread after each successful scheduled backup (the verification, verify.py).
        self._after_backup = after_backup
        self._first_backup_delay = first_backup_delay
        self._settings = settings
        self._poll = poll_seconds
        self._scheduler = schedule.Scheduler()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.runs = 0

    def start(self, *, catch_up: bool = True) -> None:
        self.reschedule()
        self._thread = threading.Thread(target=self._loop, args=(catch_up,), name="scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running (it must survive failed runs)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def reschedule(self) -> None:
        current = self._settings.current.schedule
        with self._lock:
            self._scheduler.clear()
            if current.enabled:
                self._scheduler.every().day.at(current.time_of_day, current.time_zone).do(self._run_scheduled)
        if current.enabled:
            _logger.info(
                "daily backup at %s %s; next run %s", current.time_of_day, current.time_zone, self.next_run_time()
            )
        else:
            _logger.info("daily backup is off")

    def next_run_time(self) -> datetime | None:
        """When the next scheduled backup runs (aware, UTC), or None when the schedule is off."""
        with self._lock:
            jobs = self._scheduler.get_jobs()
            if not jobs or jobs[0].next_run is None:
                return None
            # schedule keeps next_run as a naive local time; astimezone() reads naive values as local.
            return jobs[0].next_run.astimezone(UTC)

    def _loop(self, catch_up: bool) -> None:
        if catch_up:
            self._catch_up()
        while not self._stop.is_set():
            # run_pending runs a due backup in this thread; reschedule() may swap the job list meanwhile,
            # which is safe because run_pending works on a sorted copy.
            self._scheduler.run_pending()
            self._stop.wait(self._poll)

    def _catch_up(self) -> None:
        current = self._settings.current.schedule
        if not (current.enabled and current.catch_up):
            return
        newest = self._manager.newest_ready()
        if newest is None:
            self._first_backup()
            return
        age = datetime.now(UTC) - newest.create_time
        if age > CATCH_UP_AFTER:
            _logger.info("newest successful backup is %s old; running a catch-up backup", age)
            self._run_scheduled()

    def _first_backup(self) -> None:
        """A fresh install: back up soon, not at the first scheduled time, which may be a day away."""
        if self._first_backup_delay is None:
            return
        _logger.info("no successful backup yet; the first one runs in %.0f s", self._first_backup_delay)
        if self._stop.wait(self._first_backup_delay):
            return
        if self._manager.newest_ready() is None:  # a caller may have made one meanwhile
            self._run_scheduled()

    def _run_scheduled(self) -> None:
        self.runs += 1
        try:
            backup = wait_for(self._manager.start_backup(DEFAULT_KIND, Trigger.SCHEDULED))
        except JobRunning as exc:
            _logger.warning("scheduled backup skipped: %s", exc)
        except BackupError as exc:
            _logger.error("scheduled backup failed: %s", exc)
        except Exception:  # the thread must survive to run tomorrow
            _logger.exception("scheduled backup failed unexpectedly")
        else:
            _logger.info("scheduled backup %s is ready", backup.id)
            if self._after_backup is not None:
                try:
                    self._after_backup()
                except Exception:  # the thread must survive to run tomorrow
                    _logger.exception("the work after the scheduled backup failed unexpectedly")

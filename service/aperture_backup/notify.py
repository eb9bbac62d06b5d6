"""Notifications that reach a person: through Apprise (ntfy, Discord, Slack, Telegram, e-mail, Matrix, a JSON
webhook, ...) to the URLs of `APERTURE_BACKUP_NOTIFY_URLS`.

Events: a backup, restore or verify that failed (a restore that succeeded too, since it replaced the
database), an offsite copy that keeps failing (`offsite_failing`), and silence (silence.py). With
`NOTIFY_ON=all`, every job that succeeds is told too, for dead-man's-switch services. Each message says
what failed, why, and what to do.

Delivery runs in a thread of its own: `send` only queues, so a slow or unreachable receiver never delays or
fails a job. A delivery that fails is logged and retried with growing delays, a bounded number of times;
each URL is retried on its own, so one broken receiver neither blocks nor duplicates the others.

The URLs hold secrets (webhook tokens, passwords), and Apprise's own log lines quote them: they are shown
here only as "#2 (discord)", and a filter on Apprise's logger replaces every URL it logs.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .config import ConfigError
from .errors import BackupError, FailedPrecondition, ResourceExhausted, Unauthenticated, Unavailable
from .jobs import Job
from .model import Backup

if TYPE_CHECKING:  # Apprise (a tenth of a second of imports) loads only when notifications are configured
    import apprise

_logger = logging.getLogger(__name__)

#: Seconds between the attempts of one delivery: a receiver down for a restart is reached on the second
#: try, one down for an hour before the last. Then the message is given up (and logged at ERROR).
RETRY_DELAYS = (10.0, 60.0, 300.0, 900.0, 3600.0)
#: Messages waiting for delivery, at most; beyond it the oldest is dropped (and logged).
MAX_PENDING = 200
#: How long `stop` tries to deliver what is due before the process ends.
STOP_FLUSH_SECONDS = 5.0

_URL_IN_TEXT = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*)://\S+")


def _redact(text: str) -> str:
    return _URL_IN_TEXT.sub(r"\1://…", text)


class _RedactUrls(logging.Filter):
    """Apprise logs the URL it could not load or send to, secrets and all; keep only the scheme."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_APPRISE_LOGGER = logging.getLogger("apprise")
if not any(isinstance(f, _RedactUrls) for f in _APPRISE_LOGGER.filters):
    _APPRISE_LOGGER.addFilter(_RedactUrls())


@dataclass(frozen=True)
class Target:
    """One notification URL, loaded by Apprise. `label` names it without its secrets."""

    label: str
    service: apprise.NotifyBase


def parse_targets(urls: Sequence[str], *, variable: str) -> list[Target]:
    """Load each URL with Apprise; ConfigError naming the entry (by position and scheme, never its text) when
    Apprise cannot use it."""
    targets = []
    for position, url in enumerate(urls, start=1):
        scheme = url.partition("://")[0] if "://" in url else ""
        label = f"#{position} ({scheme or 'no scheme'})"
        import apprise

        service = apprise.Apprise.instantiate(url)
        if service is None:
            hint = (
                "it has no scheme: write it as scheme://..., for example ntfy://my-topic or json://host/path"
                if not scheme
                else f"Apprise does not know the scheme {scheme}:// or cannot read the rest of the URL"
            )
            raise ConfigError(
                f"{variable}: notification URL {label} cannot be used: {hint} "
                "(see https://github.com/caronc/apprise/wiki for each service's URL format)"
            )
        targets.append(Target(label, service))
    return targets


@dataclass(frozen=True)
class Message:
    """A notification: `event` for machines (`backup_failed`), title and body for people."""

    event: str
    title: str
    body: str
    failure: bool


@dataclass(frozen=True)
class DeliveryStatus:
    """Where notifications stand, for GetStatus."""

    targets: int
    pending: int
    given_up: int
    last_delivered: datetime | None
    last_error: str
    last_error_time: datetime | None


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    target: int
    message: Message
    attempt: int = 0


def _what_to_do(error: BackupError | None, doing: str) -> str:
    """Advice by the kind of error; the reason itself is in the message already."""
    if isinstance(error, Unavailable):
        return (
            "check that the database server is running and that this service can reach it "
            f"(APERTURE_BACKUP_DATABASE_URL), then {doing}"
        )
    if isinstance(error, Unauthenticated) or (error is not None and error.reason in {"AUTHENTICATION_FAILED"}):
        return f"check the user name and password in APERTURE_BACKUP_DATABASE_URL, then {doing}"
    if isinstance(error, ResourceExhausted):
        return f"free space where the service writes (the backup directory), then {doing}"
    if isinstance(error, FailedPrecondition):
        return f"fix what the reason names, then {doing}"
    return f"read the service's log around this time for details, fix the cause, then {doing}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    hours, rest = divmod(seconds, 3600)
    if hours < 48:
        return f"{hours} h {rest // 60} min"
    return f"{hours // 24} days {hours % 24} h"


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


class Notifier:
    """Queues messages for every target and delivers them in a background thread. `job_ended` is a
    `JobSlot.on_end` listener; `offsite_failing` and `silence` are called by the code that sees those."""

    def __init__(
        self,
        targets: Sequence[Target],
        *,
        notify_on: str = "failure",
        database: str = "",
        retry_delays: Sequence[float] = RETRY_DELAYS,
        max_pending: int = MAX_PENDING,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.targets = list(targets)
        self.notify_on = notify_on
        self.database = database
        self._retry_delays = tuple(retry_delays)
        self._max_pending = max_pending
        self._now = now
        self._queue: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._offsite_failing: set[str] = set()
        self._given_up = 0
        self._last_delivered: datetime | None = None
        self._last_error = ""
        self._last_error_time: datetime | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="notify", daemon=True)
            self._thread.start()
            _logger.info(
                "notifications (%s) to %s", self.notify_on, ", ".join(t.label for t in self.targets) or "nobody"
            )

    def stop(self, timeout: float = STOP_FLUSH_SECONDS) -> None:
        """Deliver what is due now (within `timeout`), then stop; what waits for a retry is logged as lost."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cond:
            if self._queue:
                _logger.warning(
                    "%d notification(s) not delivered before the service stopped: %s",
                    len(self._queue),
                    "; ".join(sorted({d.message.title for d in self._queue})),
                )
                self._queue.clear()

    # -- events -----------------------------------------------------------------------------------------

    def job_ended(self, job: Job) -> None:
        """Tell a failed backup, restore or verify, and a finished restore (it replaced the database); with
        NOTIFY_ON=all, every success. Deletes and retention runs are in the job history, not notified, and
        a job cancelled by a caller is not a failure to tell (that caller knows)."""
        kind = job.kind.value
        if kind not in {"backup", "restore", "verify"}:
            return
        cancelled = job.error is not None and job.error.reason == "CANCELLED"
        if job.error is not None and not cancelled:
            self.send(self._failure(job, job.error))
        elif kind == "restore" and not cancelled:
            self.send(self._restored(job))
        elif self.notify_on == "all":
            self.send(self._succeeded(job, cancelled=cancelled))

    def offsite_failing(self, backup_id: str, reason: str) -> None:
        """The offsite copy of `backup_id` failed (and will be retried by its owner). Told once per backup
        until `offsite_recovered(backup_id)`, however often the copy is retried."""
        with self._cond:
            if backup_id in self._offsite_failing:
                return
            self._offsite_failing.add(backup_id)
        self.send(
            Message(
                event="offsite_failing",
                title=f"Offsite copy{self._of_database()} failing",
                body=(
                    f"Backup {backup_id} could not be copied to offsite storage: {reason}. The local archive is "
                    "intact, but a disk or machine loss now would lose it. What to do: check the offsite storage "
                    "settings, its credentials and that it can be reached from this service; the copy is "
                    "retried, and `aperture-backup status` shows what is still waiting."
                ),
                failure=True,
            )
        )

    def offsite_recovered(self, backup_id: str) -> None:
        """The offsite copy of `backup_id` succeeded after `offsite_failing`; with NOTIFY_ON=all, say so."""
        with self._cond:
            if backup_id not in self._offsite_failing:
                return
            self._offsite_failing.discard(backup_id)
        if self.notify_on == "all":
            self.send(
                Message(
                    event="offsite_recovered",
                    title=f"Offsite copy{self._of_database()} working again",
                    body=f"Backup {backup_id} is now copied to offsite storage.",
                    failure=False,
                )
            )

    def silence(
        self, last_success: Backup | None, quiet_since: datetime, quiet: timedelta, stale_after: timedelta
    ) -> None:
        """No successful backup since `quiet_since`, `quiet` ago, longer than `stale_after`: the last one is
        `last_success` (None: there has been none since the service started, at `quiet_since`)."""
        if last_success is not None:
            what = f"The newest successful backup is {last_success.id}, made {_when(last_success.create_time)}"
        else:
            what = f"There has been no successful backup since the service started, {_when(quiet_since)}"
        self.send(
            Message(
                event="backup_stale",
                title=f"No backup{self._of_database()} for {_duration(quiet.total_seconds())}",
                body=(
                    f"No successful backup{self._of_database()} for {_duration(quiet.total_seconds())}, longer "
                    f"than APERTURE_BACKUP_STALE_AFTER ({_duration(stale_after.total_seconds())}). {what}. "
                    "What to do: run `aperture-backup status` to see the schedule and the last failure, and "
                    "read the service's log: the schedule may be off, backups may be failing, or the service "
                    "may have been stopped. `aperture-backup create` makes a backup now."
                ),
                failure=True,
            )
        )

    # -- delivery ---------------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue `message` for every target; never blocks and never raises."""
        if not self.enabled:
            return
        _logger.info("notifying: %s", message.title)
        with self._cond:
            for index in range(len(self.targets)):
                heapq.heappush(self._queue, _Delivery(time.monotonic(), next(self._seq), index, message))
            while len(self._queue) > self._max_pending:
                dropped = min(self._queue, key=lambda d: d.seq)
                self._queue.remove(dropped)
                heapq.heapify(self._queue)
                self._given_up += 1
                _logger.error(
                    "too many notifications waiting; dropped %r to %s", dropped.message.title, self._label(dropped)
                )
            self._cond.notify_all()

    def status(self) -> DeliveryStatus:
        with self._cond:
            return DeliveryStatus(
                targets=len(self.targets),
                pending=len(self._queue),
                given_up=self._given_up,
                last_delivered=self._last_delivered,
                last_error=self._last_error,
                last_error_time=self._last_error_time,
            )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._queue and self._queue[0].due <= now:
                        delivery = heapq.heappop(self._queue)
                        break
                    if self._stopping:
                        return
                    self._cond.wait(self._queue[0].due - now if self._queue else None)
            self._deliver(delivery)

    def _deliver(self, delivery: _Delivery) -> None:
        import apprise  # loaded by parse_targets already, as every target is one of its services

        target = self.targets[delivery.target]
        message = delivery.message
        try:
            ok = bool(
                target.service.notify(
                    body=message.body,
                    title=message.title,
                    notify_type=apprise.NotifyType.FAILURE if message.failure else apprise.NotifyType.SUCCESS,
                )
            )
            problem = "the receiver did not accept it (Apprise's log above says why)"
        except Exception as exc:  # a plugin's bug must not end the delivery thread
            ok, problem = False, f"{type(exc).__name__}: {_redact(str(exc))}"
        with self._cond:
            if ok:
                self._last_delivered = self._now()
                return
            self._last_error = f"{message.title!r} to {target.label}: {problem}"
            self._last_error_time = self._now()
            if self._stopping or delivery.attempt >= len(self._retry_delays):
                self._given_up += 1
                _logger.error(
                    "gave up notifying %s of %r after %d attempts: %s",
                    target.label,
                    message.title,
                    delivery.attempt + 1,
                    problem,
                )
                return
            delay = self._retry_delays[delivery.attempt]
            _logger.warning(
                "could not notify %s of %r (attempt %d): %s; trying again in %s",
                target.label,
                message.title,
                delivery.attempt + 1,
                problem,
                _duration(delay),
            )
            delivery.attempt += 1
            delivery.due = time.monotonic() + delay
            heapq.heappush(self._queue, delivery)
            self._cond.notify_all()

    def _label(self, delivery: _Delivery) -> str:
        return self.targets[delivery.target].label

    # -- messages ---------------------------------------------------------------------------------------

    def _of_database(self) -> str:
        return f" of database {self.database}" if self.database else ""

    def _failure(self, job: Job, error: BackupError) -> Message:
        kind = job.kind.value
        subject = job.subject_id or job.backup_id
        took = _duration(job.elapsed())
        if kind == "backup":
            body = (
                f"The {job.trigger.value} backup{f' {subject}' if subject else ''}{self._of_database()} failed "
                f"after {took}: {error}. No archive was kept; the older backups are untouched. What to do: "
                + _what_to_do(error, "run `aperture-backup create` to check that a backup works again.")
            )
        elif kind == "restore":
            body = (
                f"The restore of {subject or 'a backup'} into database {self.database or '(the database)'} failed "
                f"after {took}: {error}. A failed restore is rolled back: the database is as it was before. "
                "What to do: " + _what_to_do(error, "try the restore again.")
            )
        else:
            body = (
                f"{job.description[:1].upper()}{job.description[1:]} failed after {took}: {error}. This "
                "archive may not restore. What to do: make a fresh backup (`aperture-backup create`) and verify "
                "it, and read the service's log for the check that failed."
            )
        return Message(
            event=f"{kind}_failed", title=f"{kind.capitalize()}{self._of_database()} failed", body=body, failure=True
        )

    def _restored(self, job: Job) -> Message:
        result = job.result
        safety = getattr(result, "safety_backup", None)
        subject = job.subject_id or job.backup_id
        safety_text = (
            f" The database as it was before is kept as the safety backup {safety.id}: restore that one to undo."
            if isinstance(safety, Backup)
            else " No safety backup was taken (the caller asked to skip it)."
        )
        return Message(
            event="restore_succeeded",
            title=f"Database {self.database or ''} restored from {subject}".replace("  ", " "),
            body=(
                f"The database {self.database or ''} was replaced by backup {subject} ({job.trigger.value} restore, "
                f"{_duration(job.elapsed())}).{safety_text} What to do: applications must reconnect; if this "
                "restore was not expected, find out who started it (`aperture-backup jobs`)."
            ).replace("  ", " "),
            failure=False,
        )

    def _succeeded(self, job: Job, *, cancelled: bool) -> Message:
        kind = job.kind.value
        subject = job.subject_id or job.backup_id
        if cancelled:
            return Message(
                event=f"{kind}_cancelled",
                title=f"{kind.capitalize()}{self._of_database()} cancelled",
                body=f"{job.description[:1].upper()}{job.description[1:]} was cancelled: {job.error}.",
                failure=False,
            )
        size = f", {job.backup.size_bytes} bytes" if kind == "backup" and job.backup else ""
        return Message(
            event=f"{kind}_succeeded",
            title=f"{kind.capitalize()}{self._of_database()} succeeded",
            body=(
                f"{job.description[:1].upper()}{job.description[1:]} succeeded: {subject or 'done'}"
                f"{size}, in {_duration(job.elapsed())}."
            ),
            failure=False,
        )

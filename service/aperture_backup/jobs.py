"""One job at a time: the in-process slot that backups and restores share, and the Job object that
carries a running job's progress to any number of watchers (the RPC that started it, GetStatus).

Jobs run in their own thread so that a caller who disconnects does not stop them. A job that cannot run
now is refused at once with JOB_RUNNING, naming the running job: a silent queue would let a restore wait
behind a long backup without anyone knowing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from . import callers, memory, priority
from .callers import Caller
from .errors import Aborted, BackupError, FailedPrecondition, Internal, InvalidArgument, JobRunning, NotFound
from .journal import JobJournal, JobRecord
from .model import Backup, Progress, Trigger

_logger = logging.getLogger(__name__)


class JobKind(StrEnum):
    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"
    #: Short jobs that do not take the slot (`JobSlot.inline`); they are in the job history.
    DELETE = "delete"
    RETENTION = "retention"


#: Why a job was asked to stop, for its error message.
SHUTTING_DOWN = "the service is shutting down"
CANCELLED_BY_CALLER = "a Cancel call asked for it"


class Cancellation(threading.Event):
    """Set when a job must stop; `reason` says why. Whatever a job runs (pg_dump, psql) watches it."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self._children: list[Cancellation] = []
        self._children_lock = threading.Lock()

    def request(self, reason: str) -> None:
        if not self.is_set():
            self.reason = reason
        self.set()
        with self._children_lock:
            children = list(self._children)
        for child in children:
            child.request(reason)

    def child(self) -> Cancellation:
        """The cancellation of one part of the job (a restore's safety backup, its load): set whenever this
        one is, with its reason, and also on its own, to stop that part alone."""
        child = Cancellation()
        with self._children_lock:
            self._children.append(child)
        if self.is_set():
            child.request(self.reason)
        return child

    def error(self, what: str) -> Aborted:
        """The error a job reports when it stopped because of this."""
        return Aborted(f"{what} was cancelled: {self.reason or SHUTTING_DOWN}", reason="CANCELLED")


@dataclass
class Job:
    """A running (or finished) job. Fields change under `_cond`; watchers wake on every change."""

    kind: JobKind
    trigger: Trigger
    description: str
    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_monotonic: float = field(default_factory=time.monotonic)
    progress: Progress = field(default_factory=lambda: Progress(phase="preparing"))
    backup: Backup | None = None
    #: For a restore: the backup being restored (`backup` is the safety backup while that one is made).
    subject: Backup | None = None
    result: object = None
    error: BackupError | None = None
    done: bool = False
    cancel: Cancellation = field(default_factory=Cancellation)
    #: Facts worth keeping should the process die during the job (journal.py), e.g. psql's session name.
    notes: dict[str, str] = field(default_factory=dict)
    on_note: Callable[[Job], None] | None = field(default=None, repr=False)
    #: Who asked for the job (the RPC's caller, callers.py); None for the schedule's own jobs.
    caller: Caller | None = field(default_factory=callers.current)
    #: One line of what the job did, for the job history ("deleted 2 archives: ...").
    summary: str = ""
    _version: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def elapsed(self) -> float:
        return time.monotonic() - self.started_monotonic

    def update(self, *, progress: Progress | None = None, backup: Backup | None = None) -> None:
        with self._cond:
            if progress is not None:
                self.progress = progress
            if backup is not None:
                self.backup = backup
            self._version += 1
            self._cond.notify_all()

    def note(self, key: str, value: str) -> None:
        self.notes[key] = value
        if self.on_note is not None:
            self.on_note(self)

    def record(self) -> JobRecord:
        return JobRecord(
            kind=self.kind.value,
            trigger=self.trigger.value,
            description=self.description,
            start_time=self.start_time,
            backup_id=self.subject_id or self.backup_id,
            notes=dict(self.notes),
            caller_role=self.caller.role if self.caller else "",
            caller_address=self.caller.address if self.caller else "",
        )

    def conclude(self, *, result: object = None, error: BackupError | None = None) -> None:
        """Set the outcome without ending the job yet (the `on_end` listeners run between the two)."""
        with self._cond:
            self.result = result
            self.error = error

    def finish(self, *, result: object = None, error: BackupError | None = None) -> None:
        with self._cond:
            self.result = result
            self.error = error
            self.done = True
            self._version += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def watch(self, heartbeat: float = 1.0) -> Iterator[Job]:
        """Yield the job at each change (at least every `heartbeat` seconds) until it is done; the last
        yield is the finished job."""
        seen = -1
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._changed_since, seen), heartbeat)
                seen = self._version
                done = self.done
            yield self
            if done:
                return

    def _changed_since(self, version: int) -> bool:
        return self._version != version or self.done

    @property
    def backup_id(self) -> str:
        return self.backup.id if self.backup else ""

    @property
    def subject_id(self) -> str:
        """The backup a restore restores, also while `backup` shows its safety backup."""
        return self.subject.id if self.subject else ""


class JobSlot:
    """The single place where a job may run in this process."""

    def __init__(self, journal: JobJournal | None = None) -> None:
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._threads: list[threading.Thread] = []
        self.journal = journal
        #: Called with each job once it has ended (metrics.py); their errors are logged, never raised.
        self.on_end: list[Callable[[Job], None]] = []

    @property
    def current(self) -> Job | None:
        with self._lock:
            return self._current if self._current and not self._current.done else None

    def ensure_free(self, description: str) -> None:
        """Raise JobRunning, naming the running job, when `description` could not start now."""
        with self._lock:
            self._ensure_free(description)

    def claim(self, job: Job) -> None:
        """Take the slot for `job`, or raise JobRunning naming the job that holds it."""
        with self._lock:
            self._ensure_free(job.description)
            self._current = job

    def _ensure_free(self, description: str) -> None:
        running = self._current
        if running is not None and not running.done:
            raise JobRunning(
                f"cannot start {description}: {running.description} is running "
                f"(started {running.start_time:%Y-%m-%d %H:%M:%S} UTC, backup {running.backup_id or 'pending'});"
                " try again when it has finished",
                metadata={"running_kind": running.kind.value, "running_backup_id": running.backup_id},
            )

    def start(self, job: Job, body: Callable[[Job], object], *, background: bool = False) -> Job:
        """Claim the slot and run `body(job)` in a thread; the job records its result or error. A
        `background` job (a backup, a verification) runs at lower CPU priority than the RPCs (priority.py)."""
        self.claim(job)
        journal = self.journal
        if journal is not None:
            journal.begin(job.record())
            job.on_note = lambda j: journal.begin(j.record())

        def run() -> None:
            if background:
                priority.lower_this_thread()
            result: object = None
            error: BackupError | None = None
            try:
                try:
                    result = body(job)
                except BackupError as exc:
                    _logger.warning("%s failed: %s", job.description, exc)
                    error = exc
                except Exception as exc:  # the thread must record every failure, or watchers hang
                    _logger.exception("%s failed unexpectedly", job.description)
                    error = Internal(f"{job.description} failed: {exc}")
                # The listeners see the outcome before the watchers do: a caller told that its job ended
                # finds it in the job history.
                job.conclude(result=result, error=error)
                if journal is not None:
                    journal.end(job.record())
                self._ended(job)
            finally:
                job.finish(result=result, error=error)
                memory.release_free_memory()

        thread = threading.Thread(target=run, name=f"job-{job.kind.value}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return job

    @contextlib.contextmanager
    def inline(self, job: Job) -> Iterator[Job]:
        """Run a short job (a delete, a retention run) in the caller's thread, without taking the slot (it may
        run beside a backup, or inside one), and tell the `on_end` listeners when it ends, like any job. An
        error is recorded on the job and raised on; the body may also `finish` the job itself."""
        try:
            yield job
        except BackupError as exc:
            job.finish(error=exc)
            raise
        except Exception as exc:
            job.finish(error=Internal(f"{job.description} failed: {exc}"))
            raise
        else:
            if not job.done:
                job.finish(result=job.result)
        finally:
            self._ended(job)

    def _ended(self, job: Job) -> None:
        for listener in self.on_end:
            try:
                listener(job)
            except Exception:
                _logger.exception("a listener of %s failed", job.description)

    def cancel(self, backup_id: str, *, timeout: float) -> Job:
        """Stop the running job whose backup is `backup_id` (a backup being made, or the one being restored)
        and wait up to `timeout` seconds for it to end; the job, done or still stopping."""
        if not backup_id:
            raise InvalidArgument(
                "backup_id is empty: pass the id of the backup being made or restored (GetStatus shows it)",
                reason="INVALID_BACKUP_ID",
            )
        job = self.current
        if job is None:
            raise FailedPrecondition("no backup or restore is running; there is nothing to cancel", reason="NO_JOB")
        ids = {job.backup_id, *((job.subject_id,) if job.subject_id else ())}
        if backup_id not in ids:
            raise NotFound(
                f"the running job is {job.description}, not one of {backup_id}; GetStatus shows the running job",
                reason="JOB_NOT_FOUND",
            )
        _logger.info("cancelling %s at a caller's request", job.description)
        job.cancel.request(CANCELLED_BY_CALLER)
        job.wait(timeout)
        return job

    def cancel_and_wait(self, timeout: float) -> None:
        """Shutdown: ask the running job to stop and wait for its thread to clean up."""
        job = self.current
        if job is not None:
            job.cancel.request(SHUTTING_DOWN)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

"""Backups: making them (by hand, on schedule, before a restore), listing, deleting, and retention.

This is the domain core; it knows the store, the database and the toolchain, and nothing of gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import callers, toolchain
from .callers import Caller
from .database import Database
from .dump import run_dump
from .encryption import AgeKeys
from .errors import BackupError, FailedPrecondition, Internal, InvalidArgument, JobRunning
from .jobs import Job, JobKind, JobSlot
from .model import DEFAULT_KIND, ArchiveKind, Backup, Compression, Format, Progress, State, Trigger
from .settings import SettingsStore
from .store import ArchiveStore, ArchiveWriter

_logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


#: Backups retention leaves alone (see `apply_retention`).
UNCOUNTED_TRIGGERS = frozenset({Trigger.UPLOADED})


def utc_now() -> datetime:
    return datetime.now(UTC)


def resolve_kind(fmt: Format | None, compression: Compression | None) -> ArchiveKind:
    """Fill in defaults (plain SQL, gzip) and refuse combinations that make no sense."""
    if fmt is None:
        fmt = DEFAULT_KIND.format
    if compression is None:
        compression = Compression.NONE if fmt is Format.CUSTOM else DEFAULT_KIND.compression
    if fmt is Format.CUSTOM and compression is not Compression.NONE:
        raise InvalidArgument(
            "custom-format archives are compressed by pg_dump itself; leave compression unset or NONE",
            reason="INVALID_FORMAT",
        )
    return ArchiveKind(fmt, compression)


@dataclass(frozen=True)
class Status:
    last_successful: Backup | None
    last_failed: Backup | None
    current_job: Job | None
    database_reachable: bool


class BackupManager:
    """Makes backups and keeps the directory within the retention policy."""

    def __init__(
        self,
        store: ArchiveStore,
        database: Database,
        settings: SettingsStore,
        slot: JobSlot,
        *,
        pg_bin_dir: Path | None = None,
        clock: Clock = utc_now,
        keys: AgeKeys | None = None,
    ):
        self.store = store
        #: With recipients, every new archive (manual, scheduled, safety backups) is encrypted to them.
        self.keys = keys or AgeKeys()
        self.database = database
        self.settings = settings
        self.slot = slot
        self.clock = clock
        self._pg_bin_dir = pg_bin_dir
        self._retention_lock = threading.Lock()

    # -- making backups --------------------------------------------------------------------------------

    def start_backup(self, kind: ArchiveKind, trigger: Trigger) -> Job:
        """Start a backup in its own thread; raises JobRunning when another job runs."""
        job = Job(kind=JobKind.BACKUP, trigger=trigger, description=f"a {trigger.value} backup")

        def body(job: Job) -> Backup:
            # Reserve the id first, so that a failure to even reach the database is recorded too.
            writer = self._reserve(job, kind, trigger)
            try:
                with self.database.job_lock(job.description):
                    backup = self._dump(job, kind, writer)
            except JobRunning:
                writer.discard()  # another replica is backing up: nothing ran here, nothing to record
                raise
            except BackupError as exc:
                if not writer.finished:
                    job.update(backup=writer.abort(str(exc)))
                raise
            self.apply_retention(trigger=trigger, caller=job.caller)
            job.summary = f"{backup.size_bytes} bytes"
            return backup

        return self.slot.start(job, body)

    def dump_into_store(self, job: Job, kind: ArchiveKind, trigger: Trigger) -> Backup:
        """Run one pg_dump into a new archive of the store, reporting progress on `job`. The caller holds
        the job slot and the database lock (a restore calls this for its safety backup)."""
        return self._dump(job, kind, self._reserve(job, kind, trigger))

    def _reserve(self, job: Job, kind: ArchiveKind, trigger: Trigger) -> ArchiveWriter:
        kind = kind.with_encryption(self.keys.encrypts)
        writer = self.store.begin(
            kind, trigger, now=self.clock(), database=self.database.name, age_recipients=self.keys.recipients
        )
        job.update(backup=writer.backup, progress=Progress(phase="preparing", elapsed_seconds=job.elapsed()))
        return writer

    def _dump(self, job: Job, kind: ArchiveKind, writer: ArchiveWriter) -> Backup:
        started = job.elapsed()
        try:
            info = self.database.server_info()
            toolset = toolchain.for_server(info.major, self._pg_bin_dir)
            tables_total = self.database.count_tables()
            writer.backup = writer.backup.replace(
                database=info.database, server_version=info.version, pg_dump_version=toolset.version
            )
            self.store.write_manifest(writer.backup)

            def on_progress(size: int, tables: int, table: str) -> None:
                job.update(
                    backup=writer.backup.replace(size_bytes=size),
                    progress=Progress(
                        phase="dumping",
                        bytes_done=size,
                        tables_done=tables,
                        tables_total=max(tables_total, tables),
                        elapsed_seconds=job.elapsed(),
                        message=f"dumping {table}" if table else "",
                    ),
                )

            result = run_dump(
                toolset,
                self.database,
                writer.backup.kind,
                writer,
                cancel=job.cancel,
                on_progress=on_progress,
                keys=self.keys,
            )
            job.update(
                progress=Progress(phase="finalizing", bytes_done=result.size_bytes, elapsed_seconds=job.elapsed())
            )
            backup = writer.commit(
                size_bytes=result.size_bytes, sha256=result.sha256, duration_seconds=job.elapsed() - started
            )
        except BackupError as exc:
            job.update(backup=writer.abort(str(exc)))
            raise
        except BaseException as exc:
            job.update(backup=writer.abort(f"internal error: {exc}"))
            raise
        _logger.info(
            "backup %s is ready: %d bytes, %d tables, %.1f s",
            backup.id,
            backup.size_bytes,
            result.tables,
            backup.duration_seconds or 0.0,
        )
        job.update(
            backup=backup,
            progress=Progress(
                phase="done",
                bytes_done=backup.size_bytes,
                tables_done=result.tables,
                tables_total=result.tables,
                elapsed_seconds=job.elapsed(),
            ),
        )
        return backup

    # -- reading and deleting --------------------------------------------------------------------------

    def list_backups(self) -> list[Backup]:
        return self._with_live_state(self.store.list_backups())

    def page(self, page_size: int, page_token: str) -> tuple[list[Backup], str]:
        backups, token = self.store.page(page_size, page_token)
        return self._with_live_state(backups), token

    def get(self, backup_id: str) -> Backup:
        return self._with_live_state([self.store.get(backup_id)])[0]

    def delete(self, backup_id: str) -> Backup:
        backup = self.get(backup_id)
        # From here on the backup exists: a refusal is worth a line in the job history, a typo is not.
        job = Job(kind=JobKind.DELETE, trigger=Trigger.MANUAL, description=f"deleting {backup.id}", backup=backup)
        with self.slot.inline(job):
            if backup.state is State.CREATING:
                raise FailedPrecondition(
                    f"backup {backup_id} is still being created; wait for it to finish", reason="BACKUP_IN_PROGRESS"
                )
            if self.store.is_pinned(backup_id):
                raise FailedPrecondition(
                    f"backup {backup_id} is being downloaded or restored; try again when that has finished",
                    reason="BACKUP_IN_USE",
                )
            deleted = self.store.delete(backup_id)
            job.summary = f"deleted a {backup.state.value} backup of {backup.size_bytes} bytes"
            job.finish(result=deleted)
        return deleted

    def _with_live_state(self, backups: list[Backup]) -> list[Backup]:
        """A CREATING manifest shows the running job's live size."""
        job = self.slot.current
        if job is None or job.backup is None:
            return backups
        live = job.backup
        return [live if b.id == live.id and b.state is State.CREATING else b for b in backups]

    # -- retention -------------------------------------------------------------------------------------

    def set_retention(self, keep: int, *, dry_run: bool = False) -> tuple[int, list[str]]:
        """Save and apply `keep`; with `dry_run`, only say what it would delete."""
        if dry_run:
            self.settings.check_keep(keep)
            return keep, self.apply_retention(keep=keep, dry_run=True)
        self.settings.set_keep(keep)
        return keep, self.apply_retention(trigger=Trigger.MANUAL, caller=callers.current(), always_record=True)

    def apply_retention(
        self,
        *,
        keep: int | None = None,
        dry_run: bool = False,
        trigger: Trigger = Trigger.SCHEDULED,
        caller: Caller | None = None,
        always_record: bool = False,
    ) -> list[str]:
        """Keep the newest N READY backups; delete older READY ones and FAILED entries older than the
        oldest kept one. Never delete the newest READY backup, anything CREATING, or an archive in use
        (being downloaded or restored, or the safety backup of a running restore).

        Uploads neither count nor are deleted: whoever uploads can upload many, and junk uploads must not
        push out the backups of this database. They stay until deleted by hand."""
        keep = self.settings.current.keep if keep is None else keep
        deleted: list[str] = []
        failures: list[str] = []
        started = Job(kind=JobKind.RETENTION, trigger=trigger, description=f"retention (keep {keep})", caller=caller)
        with self._retention_lock:
            backups = [b for b in self.store.list_backups() if b.trigger not in UNCOUNTED_TRIGGERS]
            ready = [b for b in backups if b.state is State.READY]
            kept, surplus = ready[:keep], ready[keep:]
            oldest_kept = kept[-1].create_time if kept else None
            failed = [
                b
                for b in backups
                if b.state is State.FAILED and oldest_kept is not None and b.create_time < oldest_kept
            ]
            for backup in surplus + failed:
                if self.store.is_pinned(backup.id):
                    _logger.info("retention keeps %s: it is in use", backup.id)
                    continue
                if dry_run:
                    deleted.append(backup.id)
                    continue
                try:
                    self.store.delete(backup.id)
                except OSError as exc:
                    _logger.warning("retention could not delete %s: %s", backup.id, exc)
                    failures.append(f"{backup.id} ({exc.strerror or exc})")
                    continue
                deleted.append(backup.id)
        if deleted and not dry_run:
            _logger.info("retention (keep %d) deleted %s", keep, ", ".join(deleted))
        if not dry_run and (deleted or failures or always_record):
            self._record_retention(started, deleted, failures)
        return deleted

    def _record_retention(self, job: Job, deleted: list[str], failures: list[str]) -> None:
        """A retention run that changed something (or was asked for) goes into the job history; one that
        could not delete an archive it should have is recorded as failed (the backup it follows is not)."""
        job.summary = f"deleted {len(deleted)} archive(s)" + (f": {', '.join(deleted)}" if deleted else "")
        incomplete = (
            Internal(f"retention could not delete {', '.join(failures)}", reason="RETENTION_INCOMPLETE")
            if failures
            else None
        )
        # Finished, not raised: what retention did delete stands, and the backup it follows is not failed.
        with self.slot.inline(job):
            job.finish(result=deleted, error=incomplete)

    # -- status ----------------------------------------------------------------------------------------

    def status(self) -> Status:
        backups = self.list_backups()
        last_ok = next((b for b in backups if b.state is State.READY), None)
        last_failed = next((b for b in backups if b.state is State.FAILED), None)
        if last_failed and last_ok and last_failed.create_time < last_ok.create_time:
            last_failed = None
        return Status(
            last_successful=last_ok,
            last_failed=last_failed,
            current_job=self.slot.current,
            database_reachable=self.database.ping(),
        )

    def newest_ready(self) -> Backup | None:
        return next((b for b in self.store.list_backups() if b.state is State.READY), None)


def wait_for(job: Job) -> Backup:
    """Block until a backup job ends; its Backup, or its error raised."""
    job.wait()
    if job.error is not None:
        raise job.error
    if not isinstance(job.result, Backup):
        raise Internal(f"{job.description} ended without a result")
    return job.result

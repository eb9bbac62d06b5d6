"""Backups: making them (by hand, on schedule, before a restore), listing, deleting, and retention.

This is the domain core; it knows the store, the database and the toolchain, and nothing of gRPC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import retention, toolchain
from .config import parse_time_zone
from .database import Database
from .dump import run_dump
from .encryption import AgeKeys
from .errors import BackupError, FailedPrecondition, Internal, InvalidArgument, JobRunning
from .jobs import Job, JobKind, JobSlot
from .model import DEFAULT_KIND, ArchiveKind, Backup, Compression, Format, Pin, Progress, State, Trigger
from .retention import Policy
from .settings import SettingsStore, check_policy
from .store import ArchiveStore, ArchiveWriter

_logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


#: How long the safety backup taken before a restore is pinned (kept from retention whatever its rules).
SAFETY_BACKUP_PIN = timedelta(days=7)


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
    #: The backup verified most recently, whatever the outcome.
    last_verified: Backup | None = None
    #: When a verification last passed.
    last_verify_success_time: datetime | None = None


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
            self.apply_retention()
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
                size_bytes=result.size_bytes,
                sha256=result.sha256,
                duration_seconds=job.elapsed() - started,
                contents=result.contents,
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
        if backup.state is State.CREATING:
            raise FailedPrecondition(
                f"backup {backup_id} is still being created; wait for it to finish", reason="BACKUP_IN_PROGRESS"
            )
        if self.store.is_in_use(backup_id):
            raise FailedPrecondition(
                f"backup {backup_id} is being downloaded or restored; try again when that has finished",
                reason="BACKUP_IN_USE",
            )
        return self.store.delete(backup_id)

    # -- pins ------------------------------------------------------------------------------------------

    def pin(self, backup_id: str, *, ttl: timedelta | None = None) -> Backup:
        """Keep a READY backup from retention, for `ttl` or until unpinned."""
        if ttl is not None and ttl <= timedelta(0):
            raise InvalidArgument(
                f"ttl must be positive, got {ttl.total_seconds():g} s; leave it unset to pin until Unpin",
                reason="INVALID_TTL",
            )

        def change(backup: Backup) -> Backup:
            if backup.state is not State.READY:
                raise FailedPrecondition(
                    f"backup {backup.id} is {backup.state.value.upper()}; only READY backups can be pinned",
                    reason="BACKUP_NOT_READY",
                )
            return backup.replace(pin=Pin(self.clock() + ttl if ttl is not None else None))

        pinned = self.store.update(backup_id, change)
        _logger.info(
            "pinned %s%s",
            backup_id,
            f" until {pinned.pin.expire_time}" if pinned.pin and pinned.pin.expire_time else "",
        )
        return pinned

    def unpin(self, backup_id: str) -> Backup:
        unpinned = self.store.update(backup_id, lambda b: b.replace(pin=None))
        _logger.info("unpinned %s", backup_id)
        return unpinned

    def _with_live_state(self, backups: list[Backup]) -> list[Backup]:
        """A CREATING manifest shows the running job's live size."""
        job = self.slot.current
        if job is None or job.backup is None:
            return backups
        live = job.backup
        return [live if b.id == live.id and b.state is State.CREATING else b for b in backups]

    # -- retention -------------------------------------------------------------------------------------

    def set_retention(self, policy: Policy, *, dry_run: bool = False) -> tuple[Policy, list[str]]:
        """Save and apply `policy`; with `dry_run`, only say what it would delete (nothing is saved)."""
        check_policy(policy)
        if dry_run:
            return policy, self.apply_retention(policy=policy, dry_run=True)
        self.settings.set_policy(policy)
        return policy, self.apply_retention()

    def retention_decisions(self, policy: Policy | None = None) -> list[retention.Decision]:
        """What the policy (by default the one in force) does with each backup of the store now, and why."""
        settings = self.settings.current
        zone = parse_time_zone(settings.schedule.time_zone, variable="time_zone")
        backups = self.store.list_backups()
        in_use = {b.id for b in backups if self.store.is_in_use(b.id)}
        return retention.decide(backups, policy or settings.policy, zone, now=self.clock(), in_use=in_use)

    def apply_retention(self, *, policy: Policy | None = None, dry_run: bool = False) -> list[str]:
        """Delete what the retention policy does not keep (retention.py decides); the ids deleted (with
        `dry_run`: that would be), newest first. A file that cannot be deleted is logged and skipped."""
        deleted: list[str] = []
        with self._retention_lock:
            for backup in retention.to_delete(self.retention_decisions(policy)):
                if dry_run:
                    deleted.append(backup.id)
                    continue
                # In use since the decision (a download that just began): keep it this time.
                if self.store.is_in_use(backup.id):
                    _logger.info("retention keeps %s: it is in use", backup.id)
                    continue
                try:
                    self.store.delete(backup.id)
                except (OSError, BackupError) as exc:
                    _logger.warning("retention could not delete %s: %s", backup.id, exc)
                    continue
                deleted.append(backup.id)
        if deleted and not dry_run:
            _logger.info("retention deleted %s", ", ".join(deleted))
        return deleted

    # -- status ----------------------------------------------------------------------------------------

    def status(self) -> Status:
        backups = self.list_backups()
        last_ok = next((b for b in backups if b.state is State.READY), None)
        last_failed = next((b for b in backups if b.state is State.FAILED), None)
        if last_failed and last_ok and last_failed.create_time < last_ok.create_time:
            last_failed = None
        verified = [b for b in backups if b.verification is not None]
        last_verified = max(
            verified, key=lambda b: b.verification.time if b.verification else b.create_time, default=None
        )
        passed = [b.verification.time for b in verified if b.verification is not None and b.verification.passed]
        return Status(
            last_successful=last_ok,
            last_failed=last_failed,
            current_job=self.slot.current,
            database_reachable=self.database.ping(),
            last_verified=last_verified,
            last_verify_success_time=max(passed, default=None),
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

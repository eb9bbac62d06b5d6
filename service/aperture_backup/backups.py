"""Backups: making them (by hand, on schedule, before a restore), listing, deleting, and retention.

This is the domain core; it knows the store, the database and the toolchain, and nothing of gRPC.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from . import callers, retention, toolchain
from .callers import Caller
from .config import parse_time_zone
from .database import ARCHIVE_LOCK_CLASS, BUCKET_RETENTION_LOCK_KEY, Database
from .dump import run_dump
from .encryption import AgeKeys
from .errors import BackupError, FailedPrecondition, Internal, InvalidArgument, JobRunning
from .jobs import Job, JobKind, JobSlot
from .model import DEFAULT_KIND, ArchiveKind, Backup, Compression, Format, Location, Pin, Progress, State, Trigger
from .offsite import Offsite
from .retention import Policy
from .settings import SettingsStore
from .storage import PerListing
from .storage.catalog import Archives
from .storage.local import ArchiveWriter

if TYPE_CHECKING:  # the S3 library loads only when a bucket is configured
    from .storage.bucket import GrowingUpload

_logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


#: How long the safety backup taken before a restore is pinned (kept from retention whatever its rules).
SAFETY_BACKUP_PIN = timedelta(days=7)

#: A scheduled backup another replica made less than this long ago is today's: a replica whose schedule
#: fires after it skips its own (one scheduled backup a day between the replicas).
REPLICA_SCHEDULE_WINDOW = timedelta(hours=12)


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
        archives: Archives,
        database: Database,
        settings: SettingsStore,
        slot: JobSlot,
        *,
        pg_bin_dir: Path | None = None,
        clock: Clock = utc_now,
        keys: AgeKeys | None = None,
        offsite: Offsite | None = None,
        bucket_keep: int | None = None,
    ):
        self.archives = archives
        #: New archives are written to the directory; `offsite` copies them to the bucket.
        self.store = archives.local
        self.offsite = offsite
        #: Retention in the bucket; None: the directory's keep (at least 1).
        self.bucket_keep = bucket_keep
        #: With recipients, every new archive (manual, scheduled, safety backups) is encrypted to them.
        self.keys = keys or AgeKeys()
        self.database = database
        self.settings = settings
        self.slot = slot
        self.clock = clock
        self._pg_bin_dir = pg_bin_dir
        self._retention_lock = threading.Lock()
        #: GetStatus's summary, one pass over the backups per listing rather than per call.
        self._summary = PerListing(_summarize)

    # -- making backups --------------------------------------------------------------------------------

    def start_backup(self, kind: ArchiveKind, trigger: Trigger) -> Job:
        """Start a backup in its own thread; raises JobRunning when another job runs."""
        job = Job(kind=JobKind.BACKUP, trigger=trigger, description=f"a {trigger.value} backup")

        def body(job: Job) -> Backup:
            # Reserve the id first, so that a failure to even reach the database is recorded too.
            writer = self._reserve(job, kind, trigger)
            try:
                with self.database.job_lock(job.description):
                    made_by_replica = self._replica_made_today(trigger)
                    if made_by_replica is not None:
                        writer.discard()
                        _logger.info("scheduled backup skipped: another replica made today's, %s", made_by_replica.id)
                        return made_by_replica
                    # The offsite copy goes up while the dump writes the archive, and is complete before the lock
                    # is released, so that a replica whose schedule fires next sees it in the bucket.
                    streaming = self.offsite.start_streaming(writer) if self.offsite is not None else None
                    try:
                        backup = self._dump(job, kind, writer)
                    except BaseException:
                        if streaming is not None:
                            streaming.abandon()
                        raise
                    self._copy_offsite(job, backup, streaming)
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

        # A backup is background work: the calls people wait on come first when the cores are busy.
        return self.slot.start(job, body, background=True)

    def _replica_made_today(self, trigger: Trigger) -> Backup | None:
        """With a shared bucket, the scheduled backup another replica made in this schedule's window."""
        if trigger is not Trigger.SCHEDULED or self.offsite is None:
            return None
        cutoff = self.clock() - REPLICA_SCHEDULE_WINDOW
        for backup in self.archives.bucket_backups(fresh=True):
            if (
                backup.trigger is Trigger.SCHEDULED
                and backup.create_time >= cutoff
                and backup.database == self.database.name
            ):
                return backup
        return None

    def _copy_offsite(self, job: Job, backup: Backup, streaming: GrowingUpload | None = None) -> None:
        if self.offsite is None or not self.offsite.wanted(backup):
            if streaming is not None:
                streaming.abandon()
            return
        bucket = self.offsite.bucket

        def on_progress(sent: int) -> None:
            job.update(
                progress=Progress(
                    phase="uploading",
                    bytes_done=sent,
                    bytes_total=backup.size_bytes,
                    elapsed_seconds=job.elapsed(),
                    message=f"copying to {bucket.address}",
                )
            )

        copied = streaming is not None and self.offsite.finish_streaming(streaming, backup, on_progress=on_progress)
        if not copied and bucket.unreachable:
            # Do not make the caller wait for the network's time-outs: the retry thread copies it.
            self.offsite.wake()
        elif not copied:
            # Not streamed, or that failed (a part the network lost for good): one copy of the whole archive
            # now, and if that fails too the retry thread goes on.
            copied = self.offsite.copy(backup, on_progress=on_progress)
        if copied:
            job.update(backup=backup.replace(locations=backup.locations | {Location.BUCKET}))

    def dump_into_store(
        self, job: Job, kind: ArchiveKind, trigger: Trigger, *, forget_when_cancelled: bool = False
    ) -> Backup:
        """Run one pg_dump into a new archive of the store, reporting progress on `job`. The caller holds
        the job slot and the database lock (a restore calls this for its safety backup). Its offsite copy is
        made in the background, beside the restore. With `forget_when_cancelled`, a dump stopped through
        `job.cancel` leaves nothing behind, not even a FAILED record (a safety backup the restore no longer
        needs); any other failure is recorded as usual."""
        writer = self._reserve(job, kind, trigger)
        backup = self._dump(job, kind, writer, forget_when_cancelled=forget_when_cancelled)
        if self.archives.on_stored is not None:
            self.archives.on_stored(backup)
        return backup

    def _reserve(self, job: Job, kind: ArchiveKind, trigger: Trigger) -> ArchiveWriter:
        kind = kind.with_encryption(self.keys.encrypts)
        writer = self.store.begin(
            kind, trigger, now=self.clock(), database=self.database.name, age_recipients=self.keys.recipients
        )
        job.update(backup=writer.backup, progress=Progress(phase="preparing", elapsed_seconds=job.elapsed()))
        return writer

    def _dump(
        self, job: Job, kind: ArchiveKind, writer: ArchiveWriter, *, forget_when_cancelled: bool = False
    ) -> Backup:
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
                # A safety backup shares the cores with the restore it guards: the restore's time matters
                # more than a few percent of its size.
                fast=writer.backup.trigger is Trigger.PRE_RESTORE,
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
        except BaseException as exc:
            if forget_when_cancelled and job.cancel.is_set() and not writer.finished:
                writer.discard()
            else:
                job.update(backup=writer.abort(str(exc) if isinstance(exc, BackupError) else f"internal error: {exc}"))
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
        return self._with_live_state(self.archives.list_backups())

    def page(self, page_size: int, page_token: str) -> tuple[list[Backup], str]:
        backups, token = self.archives.page(page_size, page_token)
        return self._with_live_state(backups), token

    def get(self, backup_id: str) -> Backup:
        return self._with_live_state([self.archives.get(backup_id)])[0]

    def delete(self, backup_id: str) -> tuple[Backup, frozenset[Location]]:
        """Remove every copy (directory and bucket); the backup as it was, and where it was removed from."""
        backup = self.get(backup_id)
        # From here on the backup exists: a refusal is worth a line in the job history, a typo is not.
        job = Job(kind=JobKind.DELETE, trigger=Trigger.MANUAL, description=f"deleting {backup.id}", backup=backup)
        with self.slot.inline(job):
            removed = self._delete(backup)
            where = " and ".join(w.value for w in Location if w in removed) or "the directory"
            job.summary = f"deleted a {backup.state.value} backup of {backup.size_bytes} bytes from {where}"
            job.finish(result=backup)
        return backup, removed

    def _delete(self, backup: Backup) -> frozenset[Location]:
        backup_id = backup.id
        if backup.state is State.CREATING:
            raise FailedPrecondition(
                f"backup {backup_id} is still being created; wait for it to finish", reason="BACKUP_IN_PROGRESS"
            )
        if self.store.is_in_use(backup_id):
            raise FailedPrecondition(
                f"backup {backup_id} is being downloaded or restored; try again when that has finished",
                reason="BACKUP_IN_USE",
            )
        if Location.BUCKET not in backup.locations:
            return self.archives.delete(backup)
        with self.database.try_exclusive(ARCHIVE_LOCK_CLASS, backup.id) as free:
            if not free:
                raise FailedPrecondition(
                    f"backup {backup_id} is being downloaded or restored from the bucket by a replica; try again "
                    "when that has finished",
                    reason="BACKUP_IN_USE",
                )
            return self.archives.delete(backup)

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

        pinned = self.archives.update(backup_id, change)
        _logger.info(
            "pinned %s%s",
            backup_id,
            f" until {pinned.pin.expire_time}" if pinned.pin and pinned.pin.expire_time else "",
        )
        return pinned

    def unpin(self, backup_id: str) -> Backup:
        unpinned = self.archives.update(backup_id, lambda b: b.replace(pin=None))
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
        self.settings.check_policy(policy)
        if dry_run:
            return policy, self.apply_retention(policy=policy, dry_run=True)
        self.settings.set_policy(policy)
        return policy, self.apply_retention(trigger=Trigger.MANUAL, caller=callers.current(), always_record=True)

    def retention_decisions(self, policy: Policy | None = None) -> list[retention.Decision]:
        """What the policy (by default the one in force) does with each backup of the directory now, and why.
        With a bucket the directory may let its newest copies go (the bucket keeps them; `_retain_local`
        still keeps each until it is offsite)."""
        settings = self.settings.current
        zone = parse_time_zone(settings.schedule.time_zone, variable="time_zone")
        backups = [b for b in self.store.list_backups() if b.state is not State.READY or Location.LOCAL in b.locations]
        in_use = {b.id for b in backups if self.store.is_in_use(b.id)}
        return retention.decide(
            backups,
            policy or settings.policy,
            zone,
            now=self.clock(),
            in_use=in_use,
            keep_newest=self.offsite is None,
        )

    def apply_retention(
        self,
        *,
        policy: Policy | None = None,
        dry_run: bool = False,
        trigger: Trigger = Trigger.SCHEDULED,
        caller: Caller | None = None,
        always_record: bool = False,
    ) -> list[str]:
        """Delete what the retention policy does not keep (retention.py decides), from the directory and,
        when there is one, from the bucket; the ids deleted (with `dry_run`: that would be), newest first.
        A run that deleted something, failed to, or was asked for (`always_record`) goes into the history."""
        policy = policy or self.settings.current.policy
        failures: list[str] = []
        started = Job(kind=JobKind.RETENTION, trigger=trigger, description="retention", caller=caller)
        with self._retention_lock:
            deleted = self._retain_local(policy, dry_run=dry_run, failures=failures)
            if self.offsite is not None:
                deleted += [i for i in self._retain_bucket(policy, dry_run=dry_run) if i not in deleted]
        if deleted and not dry_run:
            _logger.info("retention deleted %s", ", ".join(deleted))
        if not dry_run and (deleted or failures or always_record):
            self._record_retention(started, deleted, failures)
        return deleted

    def _retain_local(self, policy: Policy, *, dry_run: bool, failures: list[str]) -> list[str]:
        """The directory: what `retention.decide` does not keep, except an archive in use since the decision
        (a download that just began) and, with a bucket, one that is not offsite yet. A file that cannot be
        deleted is logged and skipped."""
        deleted: list[str] = []
        for backup in retention.to_delete(self.retention_decisions(policy)):
            if backup.state is State.READY and self.offsite is not None and not self.offsite.is_offsite(backup.id):
                _logger.info("retention keeps %s in the backup directory: it is not in the bucket yet", backup.id)
                continue
            if dry_run:
                deleted.append(backup.id)
                continue
            if self.store.is_in_use(backup.id):
                _logger.info("retention keeps %s: it is in use", backup.id)
                continue
            try:
                self.store.delete(backup.id)
            except (OSError, BackupError) as exc:
                _logger.warning("retention could not delete %s: %s", backup.id, exc)
                failures.append(f"{backup.id} ({getattr(exc, 'strerror', None) or exc})")
                continue
            deleted.append(backup.id)
        return deleted

    def _retain_bucket(self, policy: Policy, *, dry_run: bool) -> list[str]:
        """The bucket, by the same rules with its own keep_last (APERTURE_BACKUP_S3_KEEP, default the
        directory's, at least 1). One replica at a time (an advisory lock; a replica that finds it taken
        leaves the work to the holder), and never an archive a replica is reading (its read lock is tried
        before each deletion)."""
        bucket = self.archives.bucket
        if bucket is None:
            return []
        keep_last = self.bucket_keep if self.bucket_keep is not None else max(policy.keep_last, 1)
        bucket_policy = dataclasses.replace(policy, keep_last=keep_last)
        zone = parse_time_zone(self.settings.current.schedule.time_zone, variable="time_zone")
        deleted: list[str] = []
        try:
            with self.database.try_exclusive(BUCKET_RETENTION_LOCK_KEY) as mine:
                if not mine:
                    _logger.info("bucket retention skipped: another replica is applying it")
                    return []
                backups = bucket.list_backups(fresh=True)
                in_use = {b.id for b in backups if self.store.is_in_use(b.id)}
                decisions = retention.decide(backups, bucket_policy, zone, now=self.clock(), in_use=in_use)
                for backup in retention.to_delete(decisions):
                    if dry_run:
                        deleted.append(backup.id)
                        continue
                    with self.database.try_exclusive(ARCHIVE_LOCK_CLASS, backup.id) as free:
                        if not free:
                            _logger.info("bucket retention keeps %s: a replica is reading it", backup.id)
                            continue
                        bucket.delete(backup.id)
                    deleted.append(backup.id)
        except BackupError as exc:
            _logger.warning("bucket retention did not run to its end: %s", exc)
        except psycopg.Error as exc:
            _logger.warning("bucket retention skipped: the database holding its lock is unreachable: %s", exc)
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
        last_ok, last_failed, last_verified, last_verify_success_time = self._summary(self.archives.listing())
        return Status(
            last_successful=last_ok,
            last_failed=last_failed,
            current_job=self.slot.current,
            database_reachable=self.database.reachable(),
            last_verified=last_verified,
            last_verify_success_time=last_verify_success_time,
        )

    def newest_ready(self) -> Backup | None:
        return next((b for b in self.archives.listing() if b.state is State.READY), None)


_Summary = tuple[Backup | None, Backup | None, Backup | None, datetime | None]


def _summarize(backups: tuple[Backup, ...]) -> _Summary:
    """GetStatus's facts from a listing: the newest successful backup, the newest failure when it is newer,
    the backup verified most recently and when a verification last passed. A running backup's live state
    (`_with_live_state`) changes none of them: it is CREATING, and unverified."""
    last_ok = next((b for b in backups if b.state is State.READY), None)
    last_failed = next((b for b in backups if b.state is State.FAILED), None)
    if last_failed and last_ok and last_failed.create_time < last_ok.create_time:
        last_failed = None
    verified = [b for b in backups if b.verification is not None]
    last_verified = max(verified, key=lambda b: b.verification.time if b.verification else b.create_time, default=None)
    passed = [b.verification.time for b in verified if b.verification is not None and b.verification.passed]
    return last_ok, last_failed, last_verified, max(passed, default=None)


def wait_for(job: Job) -> Backup:
    """Block until a backup job ends; its Backup, or its error raised."""
    job.wait()
    if job.error is not None:
        raise job.error
    if not isinstance(job.result, Backup):
        raise Internal(f"{job.description} ended without a result")
    return job.result

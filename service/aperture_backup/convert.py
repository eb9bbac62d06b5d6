"""Conversions between the domain model and the protobuf messages, in one place."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup_client import wire

from .errors import InvalidArgument
from .history import HistoryEntry, Outcome
from .jobs import Job, JobKind
from .journal import JobRecord
from .model import Backup, Compression, Format, Location, Progress, State, Trigger
from .notify import DeliveryStatus
from .offsite import OffsiteStatus
from .restore import RestoreResult
from .retention import Policy
from .settings import Schedule

STATES = {
    State.CREATING: pb.BACKUP_STATE_CREATING,
    State.READY: pb.BACKUP_STATE_READY,
    State.FAILED: pb.BACKUP_STATE_FAILED,
}
FORMATS = {Format.PLAIN: pb.BACKUP_FORMAT_PLAIN, Format.CUSTOM: pb.BACKUP_FORMAT_CUSTOM}
COMPRESSIONS = {
    Compression.NONE: pb.COMPRESSION_NONE,
    Compression.GZIP: pb.COMPRESSION_GZIP,
    Compression.ZSTD: pb.COMPRESSION_ZSTD,
}
TRIGGERS = {
    Trigger.MANUAL: pb.BACKUP_TRIGGER_MANUAL,
    Trigger.SCHEDULED: pb.BACKUP_TRIGGER_SCHEDULED,
    Trigger.PRE_RESTORE: pb.BACKUP_TRIGGER_PRE_RESTORE,
    Trigger.UPLOADED: pb.BACKUP_TRIGGER_UPLOADED,
    Trigger.EXTERNAL: pb.BACKUP_TRIGGER_EXTERNAL,
}
PHASES = {
    "preparing": pb.PHASE_PREPARING,
    "dumping": pb.PHASE_DUMPING,
    "finalizing": pb.PHASE_FINALIZING,
    "uploading": pb.PHASE_UPLOADING,
    "verifying": pb.PHASE_VERIFYING,
    "safety_backup": pb.PHASE_SAFETY_BACKUP,
    "restoring": pb.PHASE_RESTORING,
    "done": pb.PHASE_DONE,
    "checking": pb.PHASE_CHECKING,
}
JOB_KINDS = {
    JobKind.BACKUP: pb.JOB_KIND_BACKUP,
    JobKind.RESTORE: pb.JOB_KIND_RESTORE,
    JobKind.VERIFY: pb.JOB_KIND_VERIFY,
    JobKind.DELETE: pb.JOB_KIND_DELETE,
    JobKind.RETENTION: pb.JOB_KIND_RETENTION,
}
#: By the kind's name, as the job history stores it: a kind this table lacks shows as UNSPECIFIED, with its
#: description, rather than failing the whole list.
_JOB_KINDS_BY_NAME = {kind.value: number for kind, number in JOB_KINDS.items()}
_TRIGGERS_BY_NAME = {trigger.value: number for trigger, number in TRIGGERS.items()}
OUTCOMES = {
    Outcome.SUCCEEDED: pb.JOB_OUTCOME_SUCCEEDED,
    Outcome.FAILED: pb.JOB_OUTCOME_FAILED,
    Outcome.CANCELLED: pb.JOB_OUTCOME_CANCELLED,
    Outcome.INTERRUPTED: pb.JOB_OUTCOME_INTERRUPTED,
}


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    message = timestamp_pb2.Timestamp()
    message.FromDatetime(value)
    return message


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=seconds))
    return message


LOCATIONS = {Location.LOCAL: pb.STORAGE_LOCATION_LOCAL, Location.BUCKET: pb.STORAGE_LOCATION_BUCKET}


def locations_to_pb(locations: frozenset[Location]) -> list[pb.StorageLocation.ValueType]:
    """In a fixed order: the directory first."""
    return [LOCATIONS[where] for where in Location if where in locations]


def offsite_to_pb(status: OffsiteStatus) -> pb.OffsiteStatus:
    message = pb.OffsiteStatus(
        bucket=status.bucket, reachable=status.reachable, error=status.error, pending_ids=status.pending
    )
    if status.last_upload_time is not None:
        message.last_upload_time.CopyFrom(timestamp(status.last_upload_time))
    return message


def backup_to_pb(backup: Backup) -> pb.Backup:
    message = pb.Backup(
        id=backup.id,
        filename=backup.filename,
        state=STATES[backup.state],
        create_time=timestamp(backup.create_time),
        size_bytes=backup.size_bytes,
        sha256=backup.sha256,
        format=FORMATS[backup.kind.format],
        compression=COMPRESSIONS[backup.kind.compression],
        trigger=TRIGGERS[backup.trigger],
        database=backup.database,
        server_version=backup.server_version,
        pg_dump_version=backup.pg_dump_version,
        error=backup.error,
        encrypted=backup.kind.encrypted,
        age_recipients=backup.age_recipients,
        locations=locations_to_pb(backup.locations),
    )
    if backup.duration_seconds is not None:
        message.duration.CopyFrom(duration(backup.duration_seconds))
    if backup.contents is not None:
        message.table_rows.update(backup.contents.rows)
    if backup.verification is not None:
        verification = backup.verification
        message.verify_time.CopyFrom(timestamp(verification.time))
        message.verify_result = pb.VERIFY_RESULT_PASSED if verification.passed else pb.VERIFY_RESULT_FAILED
        message.verify_failed_check = verification.failed_check
        message.verify_message = verification.message
    if backup.pin is not None and backup.pinned_at(datetime.now(UTC)):
        message.pinned = True
        if backup.pin.expire_time is not None:
            message.pin_expire_time.CopyFrom(timestamp(backup.pin.expire_time))
    return message


class BackupMessages:
    """`backup_to_pb` remembered per backup, with its encoding: the listing hands out the same (frozen)
    Backup objects while a file is unchanged, so List and GetStatus convert each backup once rather than at
    every call, and List answers with the encoded backups joined (`list_response`), without building and
    serializing a ListResponse of them each time. Whether a pin is active depends on the time, so a
    backup pinned until a time is converted again once that time has come."""

    #: More entries than this (ids of backups long gone) and the cache starts again.
    LIMIT = 20_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Converted] = {}

    def __call__(self, backup: Backup) -> pb.Backup:
        return self._entry(backup, datetime.now(UTC)).message

    def list_response(self, backups: list[Backup], next_page_token: str) -> bytes:
        """`ListResponse(backups=..., next_page_token=...).SerializeToString()`, from the encodings kept."""
        now = datetime.now(UTC)
        pieces = [self._entry(b, now).framed for b in backups]
        if next_page_token:
            pieces.append(pb.ListResponse(next_page_token=next_page_token).SerializeToString())
        return b"".join(pieces)

    def _entry(self, backup: Backup, now: datetime) -> _Converted:
        known = self._entries.get(backup.id)  # a dict read needs no lock; replacing entries does
        if known is not None and known.backup is backup and (known.until is None or now < known.until):
            return known
        pin = backup.pin
        until = pin.expire_time if pin is not None and pin.expire_time is not None and pin.expire_time > now else None
        message = backup_to_pb(backup)
        encoded = message.SerializeToString()
        entry = _Converted(backup, message, wire.length_delimited_head(_LIST_BACKUPS, len(encoded)) + encoded, until)
        with self._lock:
            if len(self._entries) >= self.LIMIT:
                self._entries.clear()
            self._entries[backup.id] = entry
        return entry


_LIST_BACKUPS = pb.ListResponse.BACKUPS_FIELD_NUMBER


@dataclass(frozen=True, slots=True)
class _Converted:
    backup: Backup
    message: pb.Backup
    #: The message as one entry of ListResponse.backups: the field's key, the length, the encoding.
    framed: bytes
    #: When a pin's expiry changes the message; None: never.
    until: datetime | None


def progress_to_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(
        phase=PHASES.get(progress.phase, pb.PHASE_UNSPECIFIED),
        bytes_done=progress.bytes_done,
        bytes_total=progress.bytes_total,
        tables_done=progress.tables_done,
        tables_total=progress.tables_total,
        elapsed=duration(progress.elapsed_seconds),
        message=progress.message,
    )


def job_to_pb(job: Job) -> pb.Job:
    return pb.Job(
        kind=JOB_KINDS[job.kind],
        backup_id=job.backup_id,
        trigger=TRIGGERS[job.trigger],
        start_time=timestamp(job.start_time),
        progress=progress_to_pb(job.progress),
    )


def interrupted_job_to_pb(record: JobRecord) -> pb.Job:
    """A job the previous process did not finish (journal.py)."""
    what = {
        "restore": "rolled back by PostgreSQL; the database is as it was",
        "verify": "its scratch database was dropped at start-up; nothing was recorded",
    }.get(record.kind, "no archive kept")
    return pb.Job(
        kind=JOB_KINDS[JobKind(record.kind)],
        backup_id=record.backup_id,
        trigger=TRIGGERS[Trigger(record.trigger)],
        start_time=timestamp(record.start_time),
        progress=pb.Progress(
            phase=pb.PHASE_UNSPECIFIED,
            message=f"{record.description} was interrupted: the service stopped before it finished ({what})",
        ),
    )


def history_entry_to_pb(entry: HistoryEntry) -> pb.JobRecord:
    return pb.JobRecord(
        id=entry.id,
        kind=_JOB_KINDS_BY_NAME.get(entry.kind, pb.JOB_KIND_UNSPECIFIED),
        trigger=_TRIGGERS_BY_NAME.get(entry.trigger, pb.BACKUP_TRIGGER_UNSPECIFIED),
        caller_role=entry.caller_role,
        caller_address=entry.caller_address,
        start_time=timestamp(entry.start_time),
        duration=duration(entry.duration_seconds),
        outcome=OUTCOMES.get(entry.outcome, pb.JOB_OUTCOME_UNSPECIFIED),
        backup_id=entry.backup_id,
        error=entry.error,
        error_reason=entry.error_reason,
        description=entry.description,
        summary=entry.summary,
    )


def notification_status_to_pb(status: DeliveryStatus) -> pb.NotificationStatus:
    message = pb.NotificationStatus(
        targets=status.targets, pending=status.pending, given_up=status.given_up, last_error=status.last_error
    )
    if status.last_delivered is not None:
        message.last_delivered_time.CopyFrom(timestamp(status.last_delivered))
    if status.last_error_time is not None:
        message.last_error_time.CopyFrom(timestamp(status.last_error_time))
    return message


def restore_result_to_pb(result: RestoreResult) -> pb.RestoreResult:
    message = pb.RestoreResult(
        restored=backup_to_pb(result.restored),
        reconnect_required=True,
        notify_channel=result.notify_channel,
        duration=duration(result.duration_seconds),
    )
    if result.safety_backup is not None:
        message.safety_backup.CopyFrom(backup_to_pb(result.safety_backup))
    return message


def schedule_to_pb(schedule: Schedule) -> pb.Schedule:
    return pb.Schedule(
        enabled=schedule.enabled,
        time_of_day=schedule.time_of_day,
        time_zone=schedule.time_zone,
        catch_up=schedule.catch_up,
    )


def format_from_pb(value: int) -> Format | None:
    if value == pb.BACKUP_FORMAT_UNSPECIFIED:
        return None
    for fmt, number in FORMATS.items():
        if number == value:
            return fmt
    raise InvalidArgument(f"unknown backup format {value}", reason="INVALID_FORMAT")


def compression_from_pb(value: int) -> Compression | None:
    if value == pb.COMPRESSION_UNSPECIFIED:
        return None
    for compression, number in COMPRESSIONS.items():
        if number == value:
            return compression
    raise InvalidArgument(f"unknown compression {value}", reason="INVALID_FORMAT")


def policy_to_pb(policy: Policy) -> pb.RetentionPolicy:
    return pb.RetentionPolicy(
        keep_last=policy.keep_last,
        keep_daily=policy.keep_daily,
        keep_weekly=policy.keep_weekly,
        keep_monthly=policy.keep_monthly,
    )


def policy_from_pb(message: pb.RetentionPolicy) -> Policy:
    return Policy(
        keep_last=message.keep_last,
        keep_daily=message.keep_daily,
        keep_weekly=message.keep_weekly,
        keep_monthly=message.keep_monthly,
    )


#: Longest pin with an expiry; longer ones are meant as pins without expiry (leave ttl unset).
MAX_PIN_TTL = timedelta(days=100 * 366)


def ttl_from_pb(message: duration_pb2.Duration) -> timedelta:
    """A pin's duration: positive and at most a hundred years, else INVALID_ARGUMENT."""
    if not 0 < message.seconds + message.nanos / 1e9 <= MAX_PIN_TTL.total_seconds():
        raise InvalidArgument(
            f"ttl must be positive and at most {MAX_PIN_TTL.days} days, got {message.seconds} s; leave it unset "
            "to pin until Unpin",
            reason="INVALID_TTL",
        )
    try:
        return message.ToTimedelta()
    except (OverflowError, ValueError):
        raise InvalidArgument(f"ttl is not a valid duration ({message.seconds} s, {message.nanos} ns)") from None

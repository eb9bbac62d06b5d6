"""Domain errors. Each names a `reason` a caller can branch on; the RPC layer maps classes to status codes
in one table (`rpc_errors.py`), so nothing below the servicer knows about gRPC."""

from __future__ import annotations

import errno

#: errno values that mean "no room", whatever the file system calls it.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class BackupError(Exception):
    """Base of every error the service reports to callers. The message is meant for a person."""

    reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.metadata = metadata or {}


class InvalidArgument(BackupError):
    """The request itself is wrong (bad id, out-of-range value)."""

    reason = "INVALID_ARGUMENT"


class NotFound(BackupError):
    """The backup asked for does not exist."""

    reason = "BACKUP_NOT_FOUND"


class OutOfRange(BackupError):
    """An offset lies past the end of an archive."""

    reason = "OFFSET_OUT_OF_RANGE"


class FailedPrecondition(BackupError):
    """The request is valid but the system is not in a state to run it (backup still CREATING, no
    compatible pg_dump, ...)."""

    reason = "FAILED_PRECONDITION"


class JobRunning(FailedPrecondition):
    """Another backup or restore holds the job lock (in this process or in another replica)."""

    reason = "JOB_RUNNING"


class Unauthenticated(BackupError):
    """The caller sent no token, or one the service does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(BackupError):
    """The caller's token is valid but its role may not call this RPC."""

    reason = "PERMISSION_DENIED"


class ResourceExhausted(BackupError):
    """Too large, or not enough disk space."""

    reason = "RESOURCE_EXHAUSTED"


class DataLoss(BackupError):
    """An archive is corrupt, truncated or does not match its checksum."""

    reason = "ARCHIVE_CORRUPT"


class Aborted(BackupError):
    """An operation was stopped on purpose (a Cancel call, or the service shutting down)."""

    reason = "CANCELLED"


class DeadlineExceeded(BackupError):
    """A caller or an operation took longer than allowed (a stalled upload, a restore past its limit)."""

    reason = "DEADLINE_EXCEEDED"


class Unavailable(BackupError):
    """The database does not answer; trying again later may work."""

    reason = "DATABASE_UNAVAILABLE"


class Internal(BackupError):
    """A tool failed in a way the caller cannot fix (pg_dump crashed, disk error)."""

    reason = "INTERNAL"


def from_os_error(exc: OSError, doing: str) -> BackupError:
    """The domain error for a failed file operation: a full disk is RESOURCE_EXHAUSTED with advice, anything
    else INTERNAL. `doing` says what was being written ("saving the settings")."""
    if exc.errno in DISK_FULL_ERRNOS:
        return ResourceExhausted(
            f"{doing} failed: the backup directory's disk is full ({exc.strerror}); free space, delete old "
            "backups or lower the retention, then try again",
            reason="DISK_FULL",
        )
    return Internal(f"{doing} failed: {exc.strerror or exc}")

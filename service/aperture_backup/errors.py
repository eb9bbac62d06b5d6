"""Domain errors. Each names a `reason` a caller can branch on; the RPC layer maps classes to status codes
in one table (`rpc_errors.py`), so nothing below the servicer knows about gRPC."""

from __future__ import annotations


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


class Unavailable(BackupError):
    """The database does not answer; trying again later may work."""

    reason = "DATABASE_UNAVAILABLE"


class Internal(BackupError):
    """A tool failed in a way the caller cannot fix (pg_dump crashed, disk error)."""

    reason = "INTERNAL"

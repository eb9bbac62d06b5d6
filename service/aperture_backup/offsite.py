"""Offsite copies: every READY archive of the backup directory goes to the bucket.

A backup job copies its new archive at once (phase "uploading"), so that a replica that runs the next
scheduled backup sees it in the bucket. When that fails (the bucket unreachable, wrong credentials), the
archive stays in the directory, counted as pending, and a background thread tries again with exponential
back-off; GetStatus shows the pending archives and the last error. Archives made by someone else (files
without a manifest) are not copied, and with age recipients configured neither is an unencrypted one: only
encrypted bytes leave the machine.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .errors import BackupError
from .model import Backup, Location, State, Trigger
from .storage import PerListing
from .storage.catalog import Archives
from .storage.local import ArchiveWriter

if TYPE_CHECKING:  # the S3 library loads only when a bucket is configured
    from .storage.bucket import GrowingUpload

_logger = logging.getLogger(__name__)

#: First wait after a failed copy; doubled after each further failure, up to RETRY_MAX_SECONDS.
RETRY_INITIAL_SECONDS = 30.0
RETRY_MAX_SECONDS = 3600.0
#: How often the thread looks for archives to copy when nothing wakes it.
SCAN_SECONDS = 300.0

FailureListener = Callable[[Backup, BackupError], None]


@dataclass(frozen=True)
class OffsiteStatus:
    bucket: str
    #: Whether the last request to the bucket succeeded.
    reachable: bool
    #: Why the last copy (or listing) failed; '' when it did not.
    error: str
    #: READY archives of the directory not yet in the bucket, oldest first.
    pending: tuple[str, ...]
    last_upload_time: datetime | None


@dataclass
class _Retry:
    attempts: int = 0
    not_before: float = 0.0
    error: str = ""


@dataclass
class Offsite:
    """Copies archives from the directory to the bucket, now and later."""

    archives: Archives
    #: Only encrypted archives go to the bucket (age recipients are configured).
    encrypted_only: bool = False
    retry_initial: float = RETRY_INITIAL_SECONDS
    retry_max: float = RETRY_MAX_SECONDS
    scan_seconds: float = SCAN_SECONDS
    clock: Callable[[], float] = field(default=lambda: datetime.now(UTC).timestamp())
    #: Called (in the copying thread) for each failed copy; never allowed to raise into it.
    on_failure: list[FailureListener] = field(default_factory=list)
    #: Called with the id of each archive copied (after a failure: the copy works again).
    on_success: list[Callable[[str], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.archives.bucket is None:
            raise ValueError("offsite copies need a bucket")
        self.bucket = self.archives.bucket
        self._lock = threading.Lock()
        self._copying = threading.Lock()
        self._retries: dict[str, _Retry] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error = ""
        self._last_upload: datetime | None = None
        #: The ids of a bucket listing, and the archives of a directory listing that belong in the bucket,
        #: oldest first: every GetStatus asks, and a thousand archives are worth not going through again
        #: while nothing changed.
        self._bucket_ids = PerListing(lambda listing: frozenset(b.id for b in listing))
        self._to_copy = PerListing(
            lambda listing: tuple(b for b in reversed(listing) if Location.LOCAL in b.locations and self.wanted(b))
        )

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="offsite", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """At the service's stop: waits up to `timeout` for the copying thread, which copies nothing more; a
        listing of the bucket under way (the first one reads every manifest) stops at its next request."""
        self._stop.set()
        self._wake.set()
        self.bucket.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Look for archives to copy now (after a backup, or in tests)."""
        self._wake.set()

    # -- copying ---------------------------------------------------------------------------------------

    def wanted(self, backup: Backup) -> bool:
        """Whether this archive belongs in the bucket."""
        return (
            backup.state is State.READY
            and bool(backup.sha256)
            and backup.trigger is not Trigger.EXTERNAL
            and (backup.kind.encrypted or not self.encrypted_only)
        )

    def copy(self, backup: Backup, *, on_progress: Callable[[int], None] | None = None) -> bool:
        """Copy one archive now; False (and the error recorded, the archive pending) when it failed."""
        if not self.wanted(backup):
            return False
        with self._copying:  # one upload at a time: the job's and the retry thread's never overlap
            if self.is_offsite(backup.id):
                self._succeeded(backup.id)
                return True
            try:
                self.bucket.put(backup, self.archives.local.path_of(backup.id), on_progress=on_progress)
            except BackupError as exc:
                self._failed(backup, exc)
                return False
            except OSError as exc:  # the local file went away (deleted by hand): nothing to copy any more
                _logger.warning("cannot copy %s to the bucket: %s", backup.id, exc)
                return False
        self._succeeded(backup.id)
        return True

    def start_streaming(self, writer: ArchiveWriter) -> GrowingUpload | None:
        """Begin copying an archive while it is written (see `GrowingUpload`); None when it will not go to
        the bucket, or the bucket is known to be unreachable (the copy is then made afterwards)."""
        backup = writer.backup
        if self.bucket.unreachable or (self.encrypted_only and not backup.kind.encrypted):
            return None
        try:
            return self.bucket.growing_upload(backup.id, writer.temp_path)
        except BackupError as exc:
            _logger.warning("cannot upload %s while it is written (it is copied afterwards): %s", backup.id, exc)
            return None

    def finish_streaming(
        self, upload: GrowingUpload, backup: Backup, *, on_progress: Callable[[int], None] | None = None
    ) -> bool:
        """Complete an upload begun by `start_streaming`; False (the error recorded, the archive pending)
        when it failed."""
        with self._copying:
            try:
                upload.finish(backup, on_progress=on_progress)
            except BackupError as exc:
                self._failed(backup, exc)
                return False
        self._succeeded(backup.id)
        return True

    def pending(self) -> list[Backup]:
        """READY archives of the directory the bucket does not have, oldest first."""
        in_bucket = self._in_bucket()
        return [b for b in self._to_copy(self.archives.local.listing()) if b.id not in in_bucket]

    def is_offsite(self, backup_id: str) -> bool:
        return backup_id in self._in_bucket()

    def _in_bucket(self) -> frozenset[str]:
        return self._bucket_ids(self.archives.bucket_listing())

    def status(self) -> OffsiteStatus:
        pending = tuple(b.id for b in self.pending())
        with self._lock:
            error = self._error or self.archives.bucket_error
            return OffsiteStatus(
                bucket=self.bucket.describe(),
                reachable=not self.archives.bucket_error and not (pending and self._error),
                error=error,
                pending=pending,
                last_upload_time=self._last_upload,
            )

    def retry_pending(self) -> int:
        """Copy every pending archive whose back-off has passed; returns how many were copied."""
        copied = 0
        for backup in self.pending():
            with self._lock:
                retry = self._retries.get(backup.id)
                if retry is not None and retry.not_before > self.clock():
                    continue
            if self._stop.is_set():
                break
            if self.copy(backup):
                copied += 1
        return copied

    # -- internals -------------------------------------------------------------------------------------

    def _succeeded(self, backup_id: str) -> None:
        with self._lock:
            self._retries.pop(backup_id, None)
            if not self._retries:
                self._error = ""
            self._last_upload = datetime.now(UTC)
        for listener in list(self.on_success):
            try:
                listener(backup_id)
            except Exception:
                _logger.exception("an offsite success listener failed")

    def _failed(self, backup: Backup, exc: BackupError) -> None:
        with self._lock:
            retry = self._retries.setdefault(backup.id, _Retry())
            retry.attempts += 1
            wait = min(self.retry_max, self.retry_initial * 2 ** (retry.attempts - 1))
            retry.not_before = self.clock() + wait
            retry.error = str(exc)
            self._error = str(exc)
        _logger.warning(
            "could not copy %s to the bucket (attempt %d; next try in %.0f s; it stays in the backup directory): %s",
            backup.id,
            retry.attempts,
            wait,
            exc,
        )
        for listener in list(self.on_failure):
            try:
                listener(backup, exc)
            except Exception:
                _logger.exception("an offsite failure listener failed")

    def _next_wait(self) -> float:
        with self._lock:
            waits = [r.not_before - self.clock() for r in self._retries.values()]
        return max(0.05, min([self.scan_seconds, *waits]))

    def check(self) -> bool:
        """Reach the bucket; log (and show in GetStatus) what is wrong, such as wrong credentials or a missing
        bucket. The service works on without it, keeping archives in the directory until it answers."""
        try:
            self.bucket.check()
        except BackupError as exc:
            self.archives.bucket_error = str(exc)
            _logger.error("the bucket cannot be used yet (archives stay in the backup directory): %s", exc)
            return False
        self.archives.bucket_error = ""
        _logger.info("offsite copies go to %s", self.bucket.describe())
        return True

    def _loop(self) -> None:
        if self.check():
            try:
                self.bucket.abort_stale_uploads()
            except BackupError as exc:
                _logger.warning("could not look for incomplete uploads in the bucket: %s", exc)
        while not self._stop.is_set():
            try:
                self.retry_pending()
            except Exception:  # the thread must live on to copy tomorrow's backup
                _logger.exception("offsite copying failed unexpectedly")
            self._wake.wait(self._next_wait())
            self._wake.clear()

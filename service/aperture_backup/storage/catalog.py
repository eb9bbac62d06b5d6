"""Every archive the service can reach, wherever it lives: the backup directory, the bucket, or both.

List and Get merge the two locations (`Backup.locations` says where each archive is); reads prefer the
local copy and fall back to the bucket, holding the archive's cross-replica read lock meanwhile, so that
no replica's retention deletes it under the reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from aperture_backup.errors import BackupError, DataLoss, NotFound, ResourceExhausted
from aperture_backup.model import Backup, Location, State

from . import chunks
from .local import TEMP_PREFIX, ArchiveStore, sort_key

if TYPE_CHECKING:  # the S3 library loads only when a bucket is configured
    from .bucket import Bucket

_logger = logging.getLogger(__name__)

#: Reads of this size when an archive is fetched from the bucket.
FETCH_CHUNK = 1024 * 1024

ReadLock = Callable[[str], AbstractContextManager[None]]


@contextlib.contextmanager
def _no_lock(_: str) -> Iterator[None]:
    yield


class Archives:
    """The backup directory and, when configured, the bucket, seen as one collection."""

    def __init__(self, local: ArchiveStore, bucket: Bucket | None = None, *, read_lock: ReadLock = _no_lock):
        self.local = local
        self.bucket = bucket
        self._read_lock = read_lock
        #: Why the bucket could not be listed the last time; '' when it could.
        self.bucket_error = ""
        #: Told of each archive stored in the directory outside a backup job (uploads, safety backups), so
        #: that its offsite copy is made in the background.
        self.on_stored: Callable[[Backup], None] | None = None
        #: The last merged listing, and the directory's and the bucket's listings it was made of.
        self._merged: tuple[tuple[Backup, ...], tuple[Backup, ...], tuple[Backup, ...]] | None = None
        #: By id, each backup the last merge found in both places: the directory's and the one listed (made
        #: from the directory's alone). The next merge lists the same object while the directory's is the
        #: same, so that what callers derive from a backup (List's encoding of it) is not made again whenever
        #: either listing changes.
        self._in_both: dict[str, tuple[Backup, Backup]] = {}

    # -- listing ---------------------------------------------------------------------------------------

    def list_backups(self, *, fresh: bool = False) -> list[Backup]:
        """Every backup, newest first (a list of the caller's own). While the bucket is unreachable, its
        last listing stands in."""
        return list(self.listing(fresh=fresh))

    def listing(self, *, fresh: bool = False) -> tuple[Backup, ...]:
        """Every backup, newest first, as `list_backups`; the same tuple while neither the directory's
        listing nor the bucket's changed (`ArchiveStore.listing`), so that what List and GetStatus derive
        from it is computed once per listing."""
        local = self.local.listing()
        remote = self.bucket_listing(fresh=fresh)
        if not remote:
            return local
        merged = self._merged
        if merged is not None and merged[0] is local and merged[1] is remote:
            return merged[2]
        by_id = {b.id: b for b in local}
        known, in_both = self._in_both, {}
        for copy in remote:
            mine = by_id.get(copy.id)
            if mine is None or Location.LOCAL not in mine.locations:
                by_id[copy.id] = copy  # only the bucket has it (or the local record lost its file)
            elif mine.state is State.READY and mine.sha256 == copy.sha256:
                before = known.get(copy.id)
                if before is not None and before[0] is mine:
                    both = before[1]
                else:
                    both = mine.replace(locations=mine.locations | {Location.BUCKET})
                in_both[copy.id] = (mine, both)
                by_id[copy.id] = both
        result = tuple(sorted(by_id.values(), key=sort_key, reverse=True))
        self._in_both = in_both
        self._merged = (local, remote, result)
        return result

    def bucket_backups(self, *, fresh: bool = False) -> list[Backup]:
        return list(self.bucket_listing(fresh=fresh))

    def bucket_listing(self, *, fresh: bool = False) -> tuple[Backup, ...]:
        """The bucket's backups, newest first; the same tuple while its listing stands (`Bucket.listing`);
        the last one while the bucket is unreachable, () without a bucket."""
        if self.bucket is None:
            return ()
        try:
            backups = self.bucket.listing(fresh=fresh)
        except BackupError as exc:
            if self.bucket_error != str(exc):
                _logger.warning("cannot list the bucket: %s", exc)
            self.bucket_error = str(exc)
            return self.bucket.cached_listing() or ()
        self.bucket_error = ""
        return backups

    def page(self, page_size: int, page_token: str) -> tuple[list[Backup], str]:
        return self.local.page_of(self.listing(), page_size, page_token)

    def get(self, backup_id: str) -> Backup:
        try:
            found = self.local.get(backup_id)
        except NotFound:
            found = None
        if found is not None and (Location.LOCAL in found.locations or self.bucket is None):
            if self.bucket is not None and found.state is State.READY:
                listed = {b.id: b for b in self.bucket_backups()}
                if backup_id in listed and listed[backup_id].sha256 == found.sha256:
                    found = found.replace(locations=found.locations | {Location.BUCKET})
            return found
        if self.bucket is not None:
            try:
                return self.bucket.get(backup_id)
            except NotFound:
                pass
        if found is not None:
            return found
        raise NotFound(f"no backup with id {backup_id!r}; List shows the ids there are")

    def update(self, backup_id: str, change: Callable[[Backup], Backup]) -> Backup:
        """Change what a backup's manifest says (its pin, its verification) wherever it has one: in the
        directory, and in the bucket, so that a replica, or a new machine after a disaster, sees it too."""
        found = self.get(backup_id)
        in_bucket = self.bucket is not None and Location.BUCKET in found.locations
        updated = None
        if Location.LOCAL in found.locations or not in_bucket:
            updated = self.local.update(backup_id, change)
        if self.bucket is not None and in_bucket:
            remote = change(self.bucket.get(backup_id))
            self.bucket.write_manifest(remote)
            updated = updated or remote
        return (updated or found).replace(locations=found.locations)

    # -- reading ---------------------------------------------------------------------------------------

    def _reading_from(self, backup: Backup) -> Bucket | None:
        """The bucket, when reading the archive means reading it (the directory has no file of it)."""
        if self.bucket is None or Location.BUCKET not in backup.locations or self.local.has_file(backup.id):
            return None
        return self.bucket

    @contextlib.contextmanager
    def reading(self, backup: Backup, offset: int = 0) -> Iterator[BinaryIO]:
        """The archive's bytes from `offset` on: from the directory when it holds the file, else streamed
        from the bucket under the archive's read lock."""
        bucket = self._reading_from(backup)
        if bucket is None:
            with self.local.reading(backup.id, offset) as handle:
                yield handle
            return
        with self._read_lock(backup.id), bucket.reading(backup.id, offset) as handle:
            yield handle

    @contextlib.contextmanager
    def local_file(self, backup: Backup) -> Iterator[Path]:
        """A file of the archive for tools that read a file (pg_restore, the restore's checks): the
        directory's own, or a hidden copy fetched from the bucket (its SHA-256 checked against the
        manifest), removed afterwards; a start-up sweep removes one a crash left."""
        if self._reading_from(backup) is None:
            yield self.local.path_of(backup.id)
            return
        temp = self.local.directory / f"{TEMP_PREFIX}fetch-{backup.id}"
        free = shutil.disk_usage(self.local.directory).free
        if free < backup.size_bytes:
            raise ResourceExhausted(
                f"{backup.id} is only in the bucket and needs {backup.size_bytes} bytes in the backup directory to "
                f"be restored from; {free} are free",
                reason="DISK_FULL",
            )
        try:
            self._fetch(backup, temp)
            yield temp
        finally:
            temp.unlink(missing_ok=True)

    def _fetch(self, backup: Backup, temp: Path) -> None:
        digest = hashlib.sha256()
        size = 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with self.reading(backup) as source, open(fd, "wb") as out:
            for data in chunks(source, FETCH_CHUNK):
                digest.update(data)
                size += len(data)
                out.write(data)
        if size != backup.size_bytes or (backup.sha256 and digest.hexdigest() != backup.sha256):
            raise DataLoss(
                f"the bucket's copy of {backup.id} has {size} bytes with SHA-256 {digest.hexdigest()}, but its "
                f"manifest records {backup.size_bytes} bytes with SHA-256 {backup.sha256}",
                reason="CHECKSUM_MISMATCH",
            )
        _logger.info("fetched %s from the bucket (%d bytes)", backup.id, size)

    # -- deleting --------------------------------------------------------------------------------------

    def delete(self, backup: Backup) -> frozenset[Location]:
        """Remove every copy; returns where copies were removed from."""
        removed: set[Location] = set()
        if Location.LOCAL in backup.locations or not backup.locations:
            self.local.delete(backup.id)
            removed.add(Location.LOCAL)
        if self.bucket is not None and Location.BUCKET in backup.locations:
            self.bucket.delete(backup.id)
            removed.add(Location.BUCKET)
        return frozenset(removed)

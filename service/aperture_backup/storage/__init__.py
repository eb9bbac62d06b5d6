"""Where archives live: the backup directory (`local.py`) and, optionally, an S3-compatible bucket
(`bucket.py`), behind one small read interface (`ArchiveSource`).

The domain writes every archive to the directory first (an `ArchiveWriter`, renamed into place only when
complete) and copies READY archives to the bucket (`offsite.py`); it reads an archive from whichever
location holds it, the directory first. Nothing outside this package imports the S3 library.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol

from aperture_backup.model import Backup, Location


class ArchiveSource(Protocol):
    """A place archives can be listed, read and deleted from."""

    location: Location

    def list_backups(self) -> list[Backup]:
        """Every backup this location holds, newest first."""

    def get(self, backup_id: str) -> Backup:
        """One backup; NotFound when this location does not hold it."""

    def reading(self, backup_id: str, offset: int = 0) -> AbstractContextManager[BinaryIO]:
        """The archive's bytes from `offset` on, streamed (never read into memory whole)."""

    def delete(self, backup_id: str) -> Backup | None:
        """Remove the archive and its manifest."""


def chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """`handle` in reads of at most `size` bytes."""
    while data := handle.read(size):
        yield data

"""Where archives live: the backup directory (`local.py`) and, optionally, an S3-compatible bucket
(`bucket.py`), behind one small read interface (`ArchiveSource`).

The domain writes every archive to the directory first (an `ArchiveWriter`, renamed into place only when
complete) and copies READY archives to the bucket (`offsite.py`); it reads an archive from whichever
location holds it, the directory first. Nothing outside this package imports the S3 library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import BinaryIO, Generic, Protocol, TypeVar

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


_T = TypeVar("_T")


class PerListing(Generic[_T]):
    """What `compute` makes of a listing, computed once per listing: the stores hand out the same tuple
    while nothing changed (`ArchiveStore.listing`), so a caller asking again gets the value kept for that
    tuple rather than another pass over every backup. Threads may compute the same value twice at worst."""

    def __init__(self, compute: Callable[[tuple[Backup, ...]], _T]):
        self._compute = compute
        self._last: tuple[tuple[Backup, ...], _T] | None = None

    def __call__(self, listing: tuple[Backup, ...]) -> _T:
        last = self._last  # one read: another thread may replace it meanwhile
        if last is not None and last[0] is listing:
            return last[1]
        value = self._compute(listing)
        self._last = (listing, value)
        return value


def chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    """`handle` in reads of at most `size` bytes."""
    while data := handle.read(size):
        yield data

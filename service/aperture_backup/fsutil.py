"""Durable writes: archives whose data is on disk when they are committed, and small JSON files
(manifests, settings) that a crash never leaves half-written."""

from __future__ import annotations

import errno
import io
import json
import os
import secrets
from pathlib import Path
from typing import Any


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any, *, temp: Path | None = None, exclusive: bool = False) -> None:
    """Write `data` to `path`, readable by the owner only, durably, and so that a reader finds the file whole
    or not at all: written to `temp` (default: a hidden name beside `path`), fsynced, then moved into place.
    `exclusive`: create it, failing with FileExistsError when it exists (a reservation)."""
    text = json.dumps(data, indent=2)
    temp = temp or path.with_name(f".{path.name}.tmp")
    if exclusive:
        # A name of this writer's own: two writers reserving one name must not share a temporary file.
        temp = temp.with_name(f"{temp.name}.{secrets.token_hex(4)}")
    try:
        _write_durably(temp, text, os.O_EXCL if exclusive else os.O_TRUNC)
        if not exclusive:
            os.replace(temp, path)
        else:
            _link_exclusively(temp, path, text)
        fsync_directory(path.parent)
    except BaseException:
        # A full disk fails the write or the close: leave no temporary file behind.
        temp.unlink(missing_ok=True)
        raise


def _link_exclusively(temp: Path, path: Path, text: str) -> None:
    """Give the complete `temp` the name `path` unless that name exists (FileExistsError): a hard link, unlike
    a rename, refuses an existing name. Where the file system has no hard links, `path` is created
    exclusively and written in place (a reader may then see it before it is complete)."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        try:
            _write_durably(path, text, os.O_EXCL)
        except FileExistsError:
            raise
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    temp.unlink()


def _write_durably(path: Path, text: str, mode: int) -> None:
    """Create `path` (owner only) with `text` and fsync it; `mode` is O_EXCL or O_TRUNC."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | mode, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


#: What link(2) answers on file systems without hard links (FAT, some network and FUSE file systems).
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


#: An archive file hands what it has written to the disk every this many bytes.
WRITEBACK_EVERY_BYTES = 8 * 1024 * 1024


class WritebackFile(io.FileIO):
    """A file written front to back whose data goes to disk while it is written, not all at its fsync.

    Every WRITEBACK_EVERY_BYTES it asks the kernel (`posix_fadvise(POSIX_FADV_DONTNEED)`) to start writing
    the bytes just written back, without waiting, and to drop them from the page cache once clean. The
    fsync that commits an archive then waits for the last few MB only, and backups do not push the
    database's own pages out of memory. Measured, 1.1 GB in 1 MiB writes, then fsync, medians of 3: 0.97 s
    without, 0.58 s with every 4 MiB, 0.67 s every 16 MiB (the fsync alone: 0.74 s without, 0.04-0.1 s with).
    PostgreSQL's `*_flush_after` settings do the same for its own files. Where the call does not exist
    (not Linux), this is a plain file.
    """

    def __init__(self, fd: int):
        super().__init__(fd, "wb", closefd=True)
        self._written = 0
        self._handed_over = 0
        self._hint = hasattr(os, "posix_fadvise")

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        """Writes all of `data` or raises. A raw write(2) may write only part of it (the disk filled
        midway) and say so only in its count: callers that take a write for done would lose the rest in
        silence, and the next write, or none if this was the last, would report the full disk."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = super().write(view[done:])
            if not n:
                raise BlockingIOError(errno.EAGAIN, "the archive file took no bytes")
            done += n
        self._written += done
        if self._hint and self._written - self._handed_over >= WRITEBACK_EVERY_BYTES:
            self._hand_over()
        return done

    def _hand_over(self) -> None:
        try:
            os.posix_fadvise(
                self.fileno(), self._handed_over, self._written - self._handed_over, os.POSIX_FADV_DONTNEED
            )
        except OSError:
            # Only a hint: a file system that refuses it still gets everything at the fsync.
            self._hint = False
        self._handed_over = self._written

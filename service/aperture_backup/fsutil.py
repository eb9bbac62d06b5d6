"""Durable writes: archives whose data is on disk when they are committed, and small JSON files
(manifests, settings) that a crash never leaves half-written."""

from __future__ import annotations

import io
import json
import os
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
    """Write `data` to `path`, readable by the owner only. `exclusive`: create it, failing with
    FileExistsError when it exists (a reservation). Otherwise atomically: write `temp` (default: a hidden
    name beside `path`), fsync, rename over `path`, fsync the directory."""
    target = path if exclusive else temp or path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if not exclusive:
            os.replace(target, path)
            fsync_directory(path.parent)
    except BaseException:
        # A full disk fails the write or the close: leave neither a temporary file nor a half reservation.
        target.unlink(missing_ok=True)
        raise


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
        n = super().write(data)
        if n:
            self._written += n
            if self._hint and self._written - self._handed_over >= WRITEBACK_EVERY_BYTES:
                self._hand_over()
        return n or 0

    def _hand_over(self) -> None:
        try:
            os.posix_fadvise(
                self.fileno(), self._handed_over, self._written - self._handed_over, os.POSIX_FADV_DONTNEED
            )
        except OSError:
            # Only a hint: a file system that refuses it still gets everything at the fsync.
            self._hint = False
        self._handed_over = self._written

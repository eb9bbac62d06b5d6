"""A real, small file system for tests of a full disk: a tmpfs of a few hundred KiB mounted in the test's
directory (needs root, as CI has; elsewhere the test is skipped with the reason)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["archives_on_small_filesystem", "fill", "small_filesystem"]


@contextlib.contextmanager
def small_filesystem(path: Path, size_kib: int = 256) -> Iterator[Path]:
    """Mount a tmpfs of `size_kib` KiB at `path` for the duration of the block."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def archives_on_small_filesystem(work: Path, size_kib: int) -> Iterator[tuple[Path, Path]]:
    """A backup directory on a small file system whose `.state` (the service's job journal and working
    files) stays on `work`'s disk, so that only the archives run out of room. Yields the mount point and
    the backup directory."""
    state = work / "state"
    state.mkdir()
    with small_filesystem(work / "small", size_kib=size_kib) as small:
        backup_dir = small / "backups"
        backup_dir.mkdir()
        (backup_dir / ".state").symlink_to(state)
        yield small, backup_dir


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file into `directory` until the file system has no room left; returns it."""
    filler = directory / name
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as handle:
        while True:
            try:
                handle.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler

"""Archive files hand their data to the disk as they are written; what is read back is what was written."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from aperture_backup import fsutil


def test_a_writeback_file_keeps_every_byte(tmp_path: Path) -> None:
    path = tmp_path / "archive"
    piece = os.urandom(1_000_003)  # odd sizes, so hand-overs fall inside writes
    total = 3 * fsutil.WRITEBACK_EVERY_BYTES + 12_345
    digest = hashlib.sha256()
    with fsutil.WritebackFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)) as out:
        written = 0
        while written < total:
            data = piece[: total - written]
            assert out.write(data) == len(data)
            digest.update(data)
            written += len(data)
        os.fsync(out.fileno())

    assert path.stat().st_size == total
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest.hexdigest()


def test_a_file_system_that_refuses_the_hint_still_gets_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(offset)
        raise OSError(errno.EINVAL, "not supported here")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    path = tmp_path / "archive"
    data = os.urandom(3 * fsutil.WRITEBACK_EVERY_BYTES)
    with fsutil.WritebackFile(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)) as out:
        for start in range(0, len(data), 1 << 20):
            out.write(data[start : start + (1 << 20)])
    assert calls == [0], "asked once, then no more"
    assert path.read_bytes() == data

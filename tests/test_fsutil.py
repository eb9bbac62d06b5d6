"""Durable writes: archive files hand their data to the disk as they are written, and JSON files appear whole
or not at all; what is read back is what was written."""

from __future__ import annotations

import errno
import hashlib
import json
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


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_json_file_appears_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exclusive: bool
) -> None:
    """A reader listing the directory meanwhile (List, while a backup reserves its id) never finds the
    file empty or half-written under its name."""
    path = tmp_path / "backup.manifest.json"
    seen_while_writing = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        seen_while_writing.append(path.exists())
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.write_json(path, {"id": "backup"}, temp=tmp_path / ".tmp-backup.manifest.json", exclusive=exclusive)
    assert seen_while_writing[0] is False, "the name existed before its content was on disk"
    assert json.loads(path.read_text()) == {"id": "backup"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.manifest.json"], "no temporary file is left"
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_exclusive_write_refuses_a_taken_name_and_leaves_it_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "backup.manifest.json"
    fsutil.write_json(path, {"first": True}, exclusive=True)
    with pytest.raises(FileExistsError):
        fsutil.write_json(path, {"second": True}, exclusive=True)
    assert json.loads(path.read_text()) == {"first": True}
    assert [p.name for p in tmp_path.iterdir()] == ["backup.manifest.json"]


def test_an_exclusive_write_works_where_the_file_system_has_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: object, target: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "backup.manifest.json"
    fsutil.write_json(path, {"id": "backup"}, exclusive=True)
    assert json.loads(path.read_text()) == {"id": "backup"}
    with pytest.raises(FileExistsError):
        fsutil.write_json(path, {"id": "other"}, exclusive=True)
    assert [p.name for p in tmp_path.iterdir()] == ["backup.manifest.json"]

"""Running pg_dump: its output streams to the archive worker (archive_worker.py), a child process that
compresses, encrypts (when archives are encrypted), hashes and counts it into the archive's temporary file;
pg_dump's `--verbose` log on stderr drives the progress; its exit status and the worker's decide success."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .archive_worker import ArchiveWorker
from .database import Database, first_line
from .encryption import AgeKeys
from .errors import Aborted, BackupError, Internal, Unavailable
from .model import ArchiveKind, Contents, Format
from .pipes import StderrTail, enlarge_pipe, kill
from .storage.local import ArchiveWriter
from .toolchain import Toolset

_logger = logging.getLogger(__name__)

_TABLE_RE = re.compile(r'dumping contents of table "?([^"]+)"?')


@dataclass(frozen=True)
class DumpResult:
    size_bytes: int
    sha256: str
    tables: int
    #: Rows by table and the schema the archive creates (contents.py); None when they could not be read.
    contents: Contents | None = None


def pg_dump_command(toolset: Toolset, database: Database, kind: ArchiveKind) -> list[str]:
    """The pg_dump command line: like Aperture's own (`--no-owner --no-acl`, so an archive restores into
    a fresh install whose roles differ), with the connection string but never the password."""
    command = [
        toolset.tool("pg_dump"),
        "--dbname",
        database.child_conninfo(),
        "--no-owner",
        "--no-acl",
        "--verbose",
        "--format",
        "custom" if kind.format is Format.CUSTOM else "plain",
    ]
    if kind.format is Format.CUSTOM:
        command += ["--compress", "6"]
    return command


class _PgDumpStderr(StderrTail):
    """Counts tables as pg_dump's --verbose log reports them; keeps only its error lines for the message
    (the verbose lines would push them out)."""

    def __init__(self, stream: IO[bytes]):
        super().__init__(stream, "pg_dump")
        self.tables = 0
        self.current = ""

    def keep(self, line: str) -> bool:
        match = _TABLE_RE.search(line)
        if match:
            self.tables += 1
            self.current = match.group(1)
            return False
        lowered = line.lower()
        return "error" in lowered or "fatal" in lowered or "detail" in lowered


def run_dump(
    toolset: Toolset,
    database: Database,
    kind: ArchiveKind,
    writer: ArchiveWriter,
    *,
    cancel: threading.Event,
    on_progress: Callable[[int, int, str], None],
    keys: AgeKeys | None = None,
    fast: bool = False,
) -> DumpResult:
    """Dump the database into `writer`'s temporary file, encrypted to `keys`' recipients when `kind` is
    encrypted, compressed with less CPU when `fast` (compression.compressor). The bytes go from pg_dump to
    a child process that makes the archive (archive_worker.py); this thread only reads its progress.
    Raises a BackupError on any failure; the caller aborts the writer."""
    if kind.encrypted and (keys is None or not keys.encrypts):
        raise Internal("an encrypted backup was asked for without age recipients")
    command = pg_dump_command(toolset, database, kind)
    _logger.info("running pg_dump %s for %s", toolset.version, database.describe())
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=database.child_env()
    )
    if proc.stdout is None or proc.stderr is None:  # pragma: no cover - PIPE always gives streams
        raise Internal("pg_dump started without pipes")
    enlarge_pipe(proc.stdout.fileno())
    try:
        worker = ArchiveWorker(proc.stdout, writer.file.fileno(), kind, keys=keys, fast=fast, toolset=toolset)
    except BaseException:
        kill(proc)
        raise
    finally:
        # The worker holds the pipe's read end now: if it dies, pg_dump's next write fails and it ends.
        proc.stdout.close()
    # pg_dump can sit silent for a long time (waiting for a table lock, say), so a shutdown must not wait
    # for its next byte: a watcher kills it, and the worker, as soon as the job is cancelled.
    finished = threading.Event()
    threading.Thread(
        target=_kill_on_cancel, args=(proc, worker, cancel, finished), name="pg_dump-cancel", daemon=True
    ).start()
    stderr = _PgDumpStderr(proc.stderr)
    stderr.start()
    try:
        for size in worker.sizes():
            on_progress(size, stderr.tables, stderr.current)
        # The worker's failure first, and at once: a full disk also ends pg_dump, with a broken pipe, and a
        # pg_dump waiting for a lock would not notice a dead worker until it writes again.
        result = worker.result()
        returncode = proc.wait()
        stderr.join()
        if cancel.is_set():
            raise _cancelled(cancel)
    except BaseException as exc:
        kill(proc)
        worker.kill()
        if cancel.is_set() and not isinstance(exc, Aborted):
            raise _cancelled(cancel) from None  # what the kill of a cancel made fail
        raise
    finally:
        finished.set()
    if returncode != 0:
        raise _dump_failure(returncode, stderr, database)
    size = _stored_size(writer)
    if size != result.size_bytes:
        raise Internal(
            f"the archive worker reported {result.size_bytes} bytes but the file has {size}; no archive was kept"
        )
    if result.uncounted:
        _logger.warning("%s; the backup is kept without row counts", result.uncounted)
    on_progress(size, stderr.tables, "")
    return DumpResult(size_bytes=size, sha256=result.sha256, tables=stderr.tables, contents=result.contents)


def _stored_size(writer: ArchiveWriter) -> int:
    try:
        return os.fstat(writer.file.fileno()).st_size
    except OSError as exc:
        raise Internal(f"reading the new archive's size failed: {exc}") from None


def _cancelled(cancel: threading.Event) -> BackupError:
    reason = getattr(cancel, "reason", "") or "the service is shutting down"
    return Aborted(f"the backup was cancelled: {reason}; no archive was kept", reason="CANCELLED")


def _kill_on_cancel(
    proc: subprocess.Popen[bytes], worker: ArchiveWorker, cancel: threading.Event, finished: threading.Event
) -> None:
    while not finished.wait(0.2):
        if cancel.is_set():
            _logger.info("stopping pg_dump (pid %d): the backup was cancelled", proc.pid)
            proc.kill()
            worker.kill()
            return


def _dump_failure(returncode: int, stderr: StderrTail, database: Database) -> BackupError:
    detail = stderr.summary()
    if returncode < 0:
        return Internal(f"pg_dump was killed by signal {-returncode} before it finished; no archive was kept")
    text = detail.lower()
    if "connection" in text or "could not connect" in text or "authentication" in text:
        return Unavailable(f"pg_dump could not connect to {database.describe()}: {first_line(detail)}")
    return Internal(f"pg_dump failed (exit status {returncode}): {detail}", reason="PG_DUMP_FAILED")

"""Running pg_dump: its output streams through the compressor, age (when archives are encrypted) and the
hasher to the archive's temporary file; its `--verbose` log on stderr drives the progress; its exit status
alone decides success."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .compression import HashingFile, Sink, compressor
from .contents import ContentCounter, CustomArchiveCounter
from .database import Database, first_line
from .encryption import AgeKeys
from .errors import Aborted, BackupError, Internal, ResourceExhausted, Unavailable
from .model import ArchiveKind, Contents, Format
from .pipes import StderrTail, enlarge_pipe, kill
from .storage.local import ArchiveWriter
from .toolchain import Toolset

_logger = logging.getLogger(__name__)

#: Read size from pg_dump's pipe: large reads amortise the per-call cost of Python (the pipe is enlarged
#: to match, see pipes.py).
READ_SIZE = 1024 * 1024
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
    encrypted, compressed with less CPU when `fast` (compression.compressor). Raises a BackupError on any
    failure; the caller aborts the writer."""
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
    # pg_dump can sit silent for a long time (waiting for a table lock, say), so a shutdown must not wait
    # for its next byte: a watcher kills it as soon as the job is cancelled.
    finished = threading.Event()
    threading.Thread(target=_kill_on_cancel, args=(proc, cancel, finished), name="pg_dump-cancel", daemon=True).start()
    sink = HashingFile(writer.file)
    stderr = _PgDumpStderr(proc.stderr)
    stderr.start()
    # The SHA-256 is of the stored bytes: age sits between the compressor and the hash.
    stage: io.RawIOBase = sink
    if keys is not None and kind.encrypted:
        stage = keys.encrypting(sink)
    out = compressor(kind.compression, stage, fast=fast)
    # Rows are counted from the stream as it goes by (contents.py): plain SQL directly, a custom archive
    # through a pg_restore that turns it into the same SQL.
    plain_counter = ContentCounter() if kind.format is Format.PLAIN else None
    custom_counter = CustomArchiveCounter(toolset) if kind.format is Format.CUSTOM else None
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    last_report = 0.0
    try:
        while True:
            if cancel.is_set():
                raise _cancelled(cancel)
            n = proc.stdout.readinto(view)  # type: ignore[attr-defined]
            if not n:
                break
            out.write(view[:n])
            if plain_counter is not None:
                plain_counter.feed(view[:n])
            elif custom_counter is not None:
                custom_counter.feed(view[:n])
            now = time.monotonic()
            if now - last_report > 0.25:
                last_report = now
                on_progress(sink.size, stderr.tables, stderr.current)
        out.close()
        if stage is not sink:
            stage.close()  # age's last chunk; waits for its thread
        returncode = proc.wait()
        stderr.join()
    except OSError as exc:
        kill(proc)
        _discard(out, stage, sink)
        if custom_counter is not None:
            custom_counter.abort()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ResourceExhausted(
                f"the backup directory is full ({exc.strerror}); free space or lower the retention",
                reason="DISK_FULL",
            ) from None
        raise Internal(f"writing the archive failed: {exc}") from None
    except BaseException:
        kill(proc)
        _discard(out, stage, sink)
        if custom_counter is not None:
            custom_counter.abort()
        raise
    finally:
        finished.set()
    if cancel.is_set() or returncode != 0:
        if custom_counter is not None:
            custom_counter.abort()
        if cancel.is_set():
            raise _cancelled(cancel)
        raise _dump_failure(returncode, stderr, database)
    contents = plain_counter.finish() if plain_counter is not None else None
    if custom_counter is not None:
        contents = custom_counter.finish()
    on_progress(sink.size, stderr.tables, "")
    return DumpResult(size_bytes=sink.size, sha256=sink.sha256.hexdigest(), tables=stderr.tables, contents=contents)


def _cancelled(cancel: threading.Event) -> BackupError:
    reason = getattr(cancel, "reason", "") or "the service is shutting down"
    return Aborted(f"the backup was cancelled: {reason}; no archive was kept", reason="CANCELLED")


def _discard(out: Sink, stage: io.RawIOBase, sink: io.RawIOBase) -> None:
    """After a failure: end the compressor's and age's threads (what they still write goes to the temporary
    file the caller removes); their own errors are the same failure again."""
    with contextlib.suppress(Exception):
        out.close()
    if stage is not sink:
        with contextlib.suppress(Exception):
            stage.close()


def _kill_on_cancel(proc: subprocess.Popen[bytes], cancel: threading.Event, finished: threading.Event) -> None:
    while not finished.wait(0.2):
        if cancel.is_set():
            _logger.info("stopping pg_dump (pid %d): the backup was cancelled", proc.pid)
            proc.kill()
            return


def _dump_failure(returncode: int, stderr: StderrTail, database: Database) -> BackupError:
    detail = stderr.summary()
    if returncode < 0:
        return Internal(f"pg_dump was killed by signal {-returncode} before it finished; no archive was kept")
    text = detail.lower()
    if "connection" in text or "could not connect" in text or "authentication" in text:
        return Unavailable(f"pg_dump could not connect to {database.describe()}: {first_line(detail)}")
    return Internal(f"pg_dump failed (exit status {returncode}): {detail}", reason="PG_DUMP_FAILED")

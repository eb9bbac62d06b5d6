"""A new archive's bytes are made in a child process of their own: pg_dump's output goes straight into it,
and it compresses, encrypts (age), hashes (SHA-256) and counts the rows (contents.py) of what it reads, and
writes the archive's temporary file. The service keeps pg_dump itself: its log, its cancel and its exit
status, and the manifest.

Why a process and not threads: that work holds the interpreter's lock in slices of a millisecond or more
(every read, the row counter, the compressor's queue), and it runs at a lower CPU priority (priority.py).
When the cores are busy, the kernel gives a thread of nice 10 so little time that it keeps the lock for
tens of milliseconds, and every RPC of the service waits for it. Measured on 2 busy cores, a thread of the
service waking every millisecond: p99 late by 21-23 ms and at worst 90-96 ms with the dump in the service,
2.3 ms and 9 ms with it in a child. The child costs about 0.1 s to start and 23 MB of memory.

The protocol is small: the child's configuration is one JSON argument; its standard input is the dump; the
archive file is an inherited descriptor; it writes JSON lines on standard output, `{"size": n}` as the
archive grows, then one line with the result (`size`, `sha256`, `contents`) or an `error` (with its
`errno` when the system refused a write, so a full disk stays a full disk). Its standard error carries
anything else it has to say, which the service logs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import site
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from .compression import HashingFile, compressor
from .contents import ContentCounter, CustomArchiveCounter
from .encryption import AgeKeys
from .errors import DISK_FULL_ERRNOS, BackupError, Internal, from_os_error
from .fsutil import WritebackFile
from .model import ArchiveKind, Compression, Contents, Format
from .pipes import StderrTail, kill
from .toolchain import Toolset

_logger = logging.getLogger(__name__)

#: This module, as `python -m` runs it.
_MODULE = "aperture_backup.archive_worker"
#: Read size from the dump's pipe: large reads amortise the per-call cost of Python (the pipe is enlarged
#: to match, see pipes.py).
READ_SIZE = 1024 * 1024
#: How often the child reports the archive's size.
PROGRESS_SECONDS = 0.25


@dataclass(frozen=True)
class ArchiveResult:
    size_bytes: int
    sha256: str
    #: Rows by table and the schema the archive creates; None when they could not be read.
    contents: Contents | None
    #: Why they could not be read: for the log, once pg_dump's own success is known.
    uncounted: str = ""


# -- the service's side ----------------------------------------------------------------------------------


class ArchiveWorker:
    """The child making one archive from `source` (pg_dump's stdout, handed over: the service no longer
    reads it) into the open file `archive`, encrypted to `keys`' recipients when `kind` is encrypted (the
    caller has checked that there are some). Read `sizes()` to its end, then `result()`; `kill()` at any
    time. Started from the backup's thread, it inherits its CPU priority."""

    def __init__(
        self,
        source: IO[bytes],
        archive: int,
        kind: ArchiveKind,
        *,
        keys: AgeKeys | None,
        fast: bool,
        toolset: Toolset,
    ):
        spec = {
            "archive_fd": archive,
            "compression": kind.compression.value,
            "fast": fast,
            "recipients": list(keys.recipients) if keys is not None and kind.encrypted else [],
            "custom": kind.format is Format.CUSTOM,
            "toolset": [toolset.major, toolset.minor, str(toolset.bin_dir)],
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE, json.dumps(spec)],
            stdin=source,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(archive,),
            env=_child_env(),
        )
        if self._proc.stdout is None or self._proc.stderr is None:  # pragma: no cover - PIPE gives streams
            raise Internal("the archive worker started without pipes")
        self._stdout = self._proc.stdout
        self._stderr = _WorkerStderr(self._proc.stderr)
        self._stderr.start()
        self._final: dict[str, Any] | None = None

    def sizes(self) -> Iterator[int]:
        """The archive's size as it grows, until the child is done (or gone)."""
        for raw in self._stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                _logger.warning("the archive worker wrote an unreadable line: %r", raw[:200])
                continue
            if not isinstance(message, dict):
                continue
            if "size" in message and len(message) == 1:
                yield int(message["size"])
            else:
                self._final = message

    def result(self) -> ArchiveResult:
        """What the child made, once `sizes()` has ended; raises a BackupError for what it could not."""
        returncode = self._proc.wait()
        self._stderr.join(5)
        final = self._final or {}
        if "error" in final:
            code = final.get("errno")
            if code in DISK_FULL_ERRNOS:
                raise from_os_error(OSError(code, os.strerror(code)), "writing the archive")
            raise Internal(f"writing the archive failed: {final['error']}")
        if returncode != 0 or "sha256" not in final:
            how = f"was killed by signal {-returncode}" if returncode < 0 else f"ended with status {returncode}"
            raise Internal(f"the archive worker {how} before it finished: {self._stderr.summary()}")
        contents = final.get("contents")
        return ArchiveResult(
            size_bytes=int(final["size"]),
            sha256=str(final["sha256"]),
            contents=Contents.from_json(contents) if isinstance(contents, dict) else None,
            uncounted=str(final.get("uncounted") or ""),
        )

    def kill(self) -> None:
        kill(self._proc)
        self._stderr.join(5)


class _WorkerStderr(StderrTail):
    """The child's stderr: logged as the service's own warnings, and kept for the message of a crash."""

    def __init__(self, stream: IO[bytes]):
        super().__init__(stream, "archive-worker")

    def keep(self, line: str) -> bool:
        _logger.warning("archive worker: %s", line)
        return True


def _child_env() -> dict[str, str]:
    """The service's environment, with this package's directory first on the path unless it is installed
    (in site-packages): the child then runs the same code as the service, wherever that came from."""
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in (*site.getsitepackages(), site.getusersitepackages())}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


# -- the child's side ------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """Make the archive as `argv[1]` describes; the outcome is the last line on stdout."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    spec = json.loads(argv[1])
    report = sys.stdout
    try:
        result = _make(spec, report)
    except BaseException as exc:  # whatever it was, the service is told and the child ends
        if isinstance(exc, OSError):
            _say(report, {"error": exc.strerror or str(exc), "errno": exc.errno})
        elif isinstance(exc, BackupError):
            _say(report, {"error": str(exc)})
        else:
            logging.exception("making the archive failed")
            _say(report, {"error": f"{type(exc).__name__}: {exc}"})
        _end(1)
    _say(
        report,
        {
            "size": result.size_bytes,
            "sha256": result.sha256,
            "contents": result.contents.to_json() if result.contents is not None else None,
            "uncounted": result.uncounted,
        },
    )
    return 0


def _make(spec: dict[str, Any], report: IO[str]) -> ArchiveResult:
    source = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115 - stdin, closed when the child ends
    archive = WritebackFile(int(spec["archive_fd"]))
    sink = HashingFile(archive)
    # The SHA-256 is of the stored bytes: age sits between the compressor and the hash.
    stage: io.RawIOBase = sink
    if spec["recipients"]:
        stage = AgeKeys(recipients=tuple(spec["recipients"])).encrypting(sink)
    out = compressor(Compression(spec["compression"]), stage, fast=bool(spec["fast"]))
    # Rows are counted from the stream as it goes by (contents.py): plain SQL directly, a custom archive
    # through a pg_restore that turns it into the same SQL.
    major, minor, bin_dir = spec["toolset"]
    counter: ContentCounter | CustomArchiveCounter = (
        CustomArchiveCounter(Toolset(int(major), int(minor), Path(bin_dir))) if spec["custom"] else ContentCounter()
    )
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    last_report = 0.0
    try:
        while n := source.readinto(view):
            out.write(view[:n])
            counter.feed(view[:n])
            now = time.monotonic()
            if now - last_report > PROGRESS_SECONDS:
                last_report = now
                _say(report, {"size": sink.size})
        out.close()
        if stage is not sink:
            stage.close()  # age's last chunk; waits for its thread
        archive.close()
    except BaseException:
        if isinstance(counter, CustomArchiveCounter):
            counter.abort()
        raise
    contents = counter.finish()
    failure = counter.failure if isinstance(counter, CustomArchiveCounter) else ""
    return ArchiveResult(size_bytes=sink.size, sha256=sink.sha256.hexdigest(), contents=contents, uncounted=failure)


def _say(report: IO[str], message: dict[str, Any]) -> None:
    try:
        report.write(json.dumps(message) + "\n")
        report.flush()
    except BrokenPipeError:
        # The service is gone, and with it the backup: ending here also ends pg_dump, at its next write.
        _end(1)


def _end(status: int) -> NoReturn:
    """Exit without waiting for the compressor's or age's threads, which may wait for input that never
    comes."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

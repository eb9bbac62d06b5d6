"""Child processes and the pipes between them: shared by the dump (pg_dump → us) and the restore
(us → psql, pg_restore → us)."""

from __future__ import annotations

import collections
import fcntl
import logging
import re
import subprocess
import threading
from typing import IO

_logger = logging.getLogger(__name__)

#: Pipes are enlarged from Linux's default 64 KiB so that the process on the other side keeps working
#: while we compress, hash or filter a 1 MiB read (measured: 1.7x faster reading pg_dump's output).
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = 1031
_PIPE_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"


def enlarge_pipe(pipe: IO[bytes] | int | None) -> None:
    """Best effort: an unprivileged process may not exceed /proc/sys/fs/pipe-max-size (1 MiB by default),
    so fall back to that limit, and keep the default pipe when even that is refused."""
    if pipe is None:
        return
    fd = pipe if isinstance(pipe, int) else pipe.fileno()
    for size in (PIPE_SIZE, _pipe_max_size()):
        if size <= 0:
            continue
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
        except OSError:
            continue
        return
    _logger.debug("could not enlarge a pipe; using the default size")


def _pipe_max_size() -> int:
    try:
        with open(_PIPE_MAX_SIZE_PATH, encoding="ascii") as f:
            return min(int(f.read()), PIPE_SIZE)
    except (OSError, ValueError):
        return 0


#: What PostgreSQL's messages quote of the data itself, and what is kept of it: the table, the line, the
#: column and the kind of problem, never a row's values (they end up in gRPC errors and logs).
_ROW_DATA = (
    (re.compile(r"(COPY \S+, line \d+(?:, column [^:]+)?): .*"), r"\1"),
    (re.compile(r"Failing row contains \(.*\)"), "Failing row contains (...)"),
    (re.compile(r"Key \((.*?)\)=\(.*\)( already exists| is not present in table| conflicts)"), r"Key (\1)=(...)\2"),
    (re.compile(r"(invalid input (?:syntax|value) for (?:type )?[^:]+): .*"), r"\1"),
)
#: psql's echo of the failing statement (`LINE 3: INSERT ... VALUES ('...')`) and its caret line.
_STATEMENT_ECHO = re.compile(r"(?:^|:\s)LINE \d+: |^\s*\^\s*$")


def redact_row_data(line: str) -> str | None:
    """A tool's stderr line without the row data PostgreSQL quotes in it; None for a line that is nothing
    but archive text (psql's statement echo)."""
    if _STATEMENT_ECHO.search(line):
        return None
    for pattern, replacement in _ROW_DATA:
        line = pattern.sub(replacement, line)
    return line


class StderrTail(threading.Thread):
    """Reads a child's stderr in a thread of its own (a full stderr pipe would stall the child) and keeps
    the last lines, for the message shown to a person only: success is decided by exit statuses."""

    def __init__(self, stream: IO[bytes], name: str):
        super().__init__(name=f"{name}-stderr", daemon=True)
        self._stream = stream
        self.lines: collections.deque[str] = collections.deque(maxlen=20)

    def run(self) -> None:
        for raw in self._stream:
            line = redact_row_data(raw.decode("utf-8", "replace").rstrip())
            if line and self.keep(line):
                self.lines.append(line)

    def keep(self, line: str) -> bool:
        """Whether `line` belongs in the message; subclasses also read progress from it here."""
        return True

    def summary(self, count: int = 3) -> str:
        return "; ".join(list(self.lines)[-count:]) or "no message"


def kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill a child that is still running and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()

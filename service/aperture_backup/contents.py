"""What a dump holds, read from its SQL as it streams through: rows by table, and the tables, indexes and
extensions it creates. Recorded in the manifest at backup time; Verify compares a restored scratch database
with it (verify.py).

Rows are counted from pg_dump's own data blocks, not by asking the database: `COPY <table> (...) FROM
stdin;`, then one line per row (COPY's text format escapes newlines inside values, so a row never spans
lines), then a line `\\.`. So the count is of what the archive holds, in the dump's own snapshot.

A plain-format dump is counted as pg_dump writes it (`dump.py` feeds its output here). A custom-format
archive is compressed inside, block by block; its SQL is what `pg_restore -f -` prints. So pg_dump's output
also goes, as it streams, to a `pg_restore -f -` that reads it from a pipe in one pass, and what pg_restore
prints is counted the same way (`CustomArchiveCounter`). That costs pg_restore's CPU beside pg_dump, no
second read of the archive and no work in the database, and it counts exactly the bytes that are stored
(before compression and encryption, which do not change them).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading

from .errors import Internal
from .model import Contents
from .pipes import StderrTail, enlarge_pipe, kill
from .toolchain import Toolset

#: An identifier as pg_dump prints it: plain, or double-quoted with "" for a quote.
_IDENT = rb'(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)'
_QUALIFIED = rb"(" + _IDENT + rb"(?:\." + _IDENT + rb")?)"
_COPY_RE = re.compile(rb"^COPY " + _QUALIFIED + rb" (?:\(.*\) )?FROM stdin;$")
_TABLE_RE = re.compile(rb"^CREATE (?:UNLOGGED |FOREIGN )?TABLE " + _QUALIFIED + rb"(?: |\(|$)")
_INDEX_RE = re.compile(rb"^CREATE (?:UNIQUE )?INDEX (" + _IDENT + rb") ON (?:ONLY )?" + _QUALIFIED + rb" ")
_EXTENSION_RE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS (" + _IDENT + rb")")
_ALTER_TABLE_RE = re.compile(rb"^ALTER TABLE (?:ONLY )?" + _QUALIFIED + rb"$")
#: Constraints that come with an index of their name.
_CONSTRAINT_RE = re.compile(rb"^    ADD CONSTRAINT (" + _IDENT + rb") (?:PRIMARY KEY|UNIQUE|EXCLUDE)")
_END_OF_DATA = b"\\.\n"
_READ_SIZE = 1024 * 1024


def _schema_of(qualified: bytes) -> bytes:
    """`public` of `public.users` (identifiers with dots inside quotes are rare; pg_dump qualifies all)."""
    match = re.match(_IDENT, qualified)
    return match.group(0) if match and len(match.group(0)) < len(qualified) else b""


class ContentCounter:
    """Fed a plain dump's SQL in pieces of any size (`feed`), says what it holds (`contents`). Data lines are
    counted with bytes.count, not one by one in Python: rows are most of a dump."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._copying: str | None = None
        self._alter_table: bytes | None = None
        self.rows: dict[str, int] = {}
        self.tables: list[str] = []
        self.indexes: list[str] = []
        self.extensions: list[str] = []

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        end = self._buffer.rfind(b"\n") + 1
        if end == 0:
            return
        position = self._consume(end)
        del self._buffer[:position]

    def finish(self) -> Contents:
        if self._buffer:
            self._buffer += b"\n"
            self._consume(len(self._buffer))
            self._buffer.clear()
        return self.contents

    @property
    def contents(self) -> Contents:
        return Contents(
            rows=dict(self.rows),
            tables=tuple(dict.fromkeys(self.tables)),
            indexes=tuple(dict.fromkeys(self.indexes)),
            extensions=tuple(dict.fromkeys(self.extensions)),
        )

    def _consume(self, end: int) -> int:
        """Process the complete lines in buffer[:end]; returns where processing stopped (always `end`)."""
        buffer = self._buffer
        position = 0
        while position < end:
            if self._copying is not None:
                stop = self._end_of_data(position, end)
                if stop < 0:
                    self.rows[self._copying] += buffer.count(b"\n", position, end)
                    return end
                self.rows[self._copying] += buffer.count(b"\n", position, stop)
                self._copying = None
                position = stop + len(_END_OF_DATA)
                continue
            newline = buffer.index(b"\n", position, end)
            self._statement_line(bytes(buffer[position:newline]))
            position = newline + 1
        return end

    def _end_of_data(self, position: int, end: int) -> int:
        """Where the `\\.` line ending the data starts, or -1 when not in buffer[position:end]."""
        buffer = self._buffer
        found = buffer.find(_END_OF_DATA, position, end)
        while found >= 0 and found != position and buffer[found - 1] != 0x0A:
            found = buffer.find(_END_OF_DATA, found + 1, end)
        return found

    def _statement_line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line or line.startswith(b"--"):
            return
        if match := _COPY_RE.match(line):
            self._copying = match.group(1).decode("utf-8", "replace")
            self.rows.setdefault(self._copying, 0)
        elif match := _TABLE_RE.match(line):
            self.tables.append(match.group(1).decode("utf-8", "replace"))
        elif match := _INDEX_RE.match(line):
            schema = _schema_of(match.group(2))
            self.indexes.append(self._qualify(schema, match.group(1)))
        elif match := _EXTENSION_RE.match(line):
            self.extensions.append(match.group(1).decode("utf-8", "replace").strip('"'))
        elif match := _ALTER_TABLE_RE.match(line):
            self._alter_table = match.group(1)
            return
        elif (match := _CONSTRAINT_RE.match(line)) and self._alter_table is not None:
            self.indexes.append(self._qualify(_schema_of(self._alter_table), match.group(1)))
        self._alter_table = None

    @staticmethod
    def _qualify(schema: bytes, name: bytes) -> str:
        return (schema + b"." + name if schema else name).decode("utf-8", "replace")


class CustomArchiveCounter:
    """Counts a custom-format archive as pg_dump writes it: the bytes are also fed to `pg_restore -f -`
    (which reads a custom archive from a pipe in one pass), and a thread counts the SQL it prints.
    `finish()` once pg_dump has ended: the contents, or None when pg_restore could not read it (why is in
    `failure`), which must not fail a backup whose archive is fine: Verify then checks what it can."""

    def __init__(self, toolset: Toolset):
        self._counter = ContentCounter()
        self._proc = subprocess.Popen(
            [toolset.tool("pg_restore"), "--no-owner", "--no-acl", "--file", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if self._proc.stdin is None or self._proc.stdout is None or self._proc.stderr is None:  # pragma: no cover
            raise Internal("pg_restore started without pipes")
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout
        enlarge_pipe(self._stdin)
        enlarge_pipe(self._proc.stdout)
        self._stderr = StderrTail(self._proc.stderr, "pg_restore")
        self._stderr.start()
        self._broken = False
        self.failure = ""
        self._reader = threading.Thread(target=self._read, name="pg_restore-count", daemon=True)
        self._reader.start()
        self._version = toolset.version

    def _read(self) -> None:
        while data := self._stdout.read(_READ_SIZE):
            self._counter.feed(data)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            return
        try:
            self._stdin.write(data)
        except (BrokenPipeError, OSError):
            self._broken = True

    def finish(self) -> Contents | None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        returncode = self._proc.wait()
        self._reader.join()
        self._stderr.join(5)
        if returncode != 0 or self._broken:
            self.failure = (
                f"pg_restore {self._version} could not read the new archive to count its rows (exit status "
                f"{returncode}): {self._stderr.summary()}"
            )
            return None
        return self._counter.finish()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        kill(self._proc)
        self._reader.join(5)

"""Streaming filter for pg_dump's plain SQL (and `pg_restore -f` output) on its way into one psql session.

A restore runs the whole archive inside one transaction that only we commit. pg_dump wraps large-object
data in its own `BEGIN;` ... `COMMIT;`; left in, that COMMIT would commit everything before it and a later
error would leave a half-restored database. So this filter removes exactly that pair: a `BEGIN;` line that
is the first statement after a TOC header of type `BLOBS` (pg_dump 9.0-18 prints
`-- Data for Name: BLOBS; Type: BLOBS; ...`, 17+ names the range: `-- Data for Name: 900001..900006;
Type: BLOBS; ...`; `LARGE OBJECTS` is accepted too) and the `COMMIT;` line that closes it. Between the two
only pg_dump's `lo_open`/`lowrite`/`lo_close` calls may appear; anything else is refused rather than guessed at.

Everything else passes through byte for byte. `BEGIN;`/`COMMIT;` lines anywhere else (function bodies,
procedures) are never touched, because removal is anchored on the header. COPY data (`COPY ... FROM stdin;`
up to the line `\\.`) is passed on without looking at its lines: the terminator is found with
`bytes.find`, so the cost of a multi-gigabyte table is a few C-level scans, not a Python loop per row.

A restore may ask for statements around each pgvector index build (`around_vector_index`): a one-line
`CREATE INDEX ... USING hnsw|ivfflat (...)` statement, as pg_dump writes it, is passed on between them
(restore.BuildSettings gives those builds a parallel worker, which would cost the small btree builds more
than it saves).

The archive's own `\\restrict KEY` / `\\unrestrict KEY` lines are dropped: the restore puts psql into
restricted mode itself, with its own key, before the archive starts, and psql refuses a second
`\\restrict`.

Every line outside COPY data also goes through `sqlscan.StatementScanner`, which splits the SQL into
statements as psql does and refuses, before psql sees it, a top-level statement that would end the
restore's transaction (`COMMIT`, `ROLLBACK`, `BEGIN`, ...) or any psql meta-command. COPY data is entered
where the scanner sees psql enter it (a `COPY ... FROM stdin` statement ending its line), so that the two
never disagree about what is data and what is SQL. A line outside COPY data longer than MAX_LINE_BYTES
is refused, so that memory stays bounded whatever the archive holds.
"""

from __future__ import annotations

import re
from enum import Enum

from .errors import BackupError, DataLoss, FailedPrecondition
from .sqlscan import ScanError, StatementScanner

__all__ = ["MAX_LINE_BYTES", "SqlFilter", "SqlFilterError"]

#: Longest line outside COPY data. pg_dump's own lines are far shorter (data goes into COPY blocks, large
#: objects into lowrite calls of a few KB; a function body of megabytes would be extreme).
MAX_LINE_BYTES = 64 * 1024 * 1024

#: A pg_dump TOC header line, e.g. `-- Data for Name: BLOBS; Type: BLOBS; Schema: -; Owner: -`.
_HEADER_RE = re.compile(rb"^-- (?:Data for )?Name: .*; Type: (?P<type>[^;]*); Schema: ")
_LARGE_OBJECT_TYPES = frozenset({b"BLOBS", b"LARGE OBJECTS"})
#: What pg_dump writes between the BEGIN and COMMIT of large-object data: lo_open, lowrite, lo_close.
_LARGE_OBJECT_CALLS = (b"SELECT pg_catalog.lo_open(", b"SELECT pg_catalog.lowrite(", b"SELECT pg_catalog.lo_close(")
_EXTENSION_COMMENT_RE = re.compile(rb"^COMMENT ON EXTENSION [A-Za-z_][A-Za-z0-9_]* IS '(?:[^'\\]|'')*';\r?$")
#: pg_dump's ownership statements, one line each, no string literal in them.
_OWNER_RE = re.compile(rb"^ALTER [^';]* OWNER TO [^';]*;\r?$")
_RESTRICT_RE = re.compile(rb"^\\(?:un)?restrict [A-Za-z0-9]+\r?$")
#: pg_dump's statement for an index of pgvector's (one line, ending the statement).
_VECTOR_INDEX_RE = re.compile(rb"^CREATE (?:UNIQUE )?INDEX [^;]* USING (?:hnsw|ivfflat) \([^\n]*;$")
#: psql ends COPY data at a line `\.` (with a Unix or a Windows line end).
_COPY_TERMINATOR = b"\\."
_COPY_TERMINATOR_ENDS = (b"\n", b"\r\n")


class SqlFilterError(ValueError):
    """The SQL is not shaped like pg_dump output where the filter must understand it (truncated COPY data,
    foreign statements inside large-object data), or does what a restore must not allow (`refused`)."""

    def __init__(self, message: str, *, refused_reason: str | None = None):
        super().__init__(message)
        self.refused_reason = refused_reason

    def to_error(self) -> BackupError:
        """The domain error a restore reports; the database was never changed by what was refused."""
        message = f"{self}; the database was left unchanged"
        if self.refused_reason is not None:
            return FailedPrecondition(message, reason=self.refused_reason)
        return DataLoss(message, reason="ARCHIVE_INVALID")


class _State(Enum):
    SQL = "sql"
    COPY = "copy"
    LARGE_OBJECTS = "large objects"


class SqlFilter:
    """Push-based: `feed(chunk)` returns the bytes to pass on (in order), `finish()` the rest. Raises
    SqlFilterError when the input cannot be restored atomically or ends in the middle of data."""

    def __init__(self, *, staging: bool = False, around_vector_index: tuple[bytes, bytes] | None = None) -> None:
        #: In a staging restore the archive runs as a role that may not do what its owner statements ask:
        #: pg_dump's `ALTER ... OWNER TO` lines are left out (everything goes to the live database's owner at
        #: the swap, as with --no-owner), and so are its `COMMENT ON EXTENSION` lines (the extensions belong
        #: to the privileged session; the comment is the extension's own).
        self._staging = staging
        #: SQL passed on before and after each of pg_dump's pgvector index statements, when given.
        self._around_vector_index = around_vector_index
        self.vector_indexes = 0
        self._scanner = StatementScanner()
        self._buf = bytearray()
        self._state = _State.SQL
        #: TOC type of the last header seen, until the first statement after it.
        self._pending_type: bytes | None = None
        #: Index in `_buf` where the current COPY's data starts, while that start is still buffered.
        self._copy_start = -1
        self._copy_table = b""
        self._line = 0  # lines fully consumed, for messages
        self.large_object_sections = 0

    # -- public ---------------------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        pos = 0
        while True:
            if self._state is _State.COPY:
                pos, done = self._copy(pos, out)
            else:
                pos, done = self._lines(pos, out, final=False)
            if not done:
                break
        self._compact(pos)
        return out

    def finish(self) -> bytes:
        """The last bytes; raises when the input ended inside COPY data or large-object data."""
        out: list[bytes] = []
        pos = 0
        if self._state is not _State.COPY:
            pos, _ = self._lines(pos, out, final=True)
        if self._state is _State.COPY:
            raise SqlFilterError(
                f"the archive ends inside the data of {self._copy_table.decode(errors='replace')} (line "
                f"{self._line + 1}): it is truncated"
            )
        if self._state is _State.LARGE_OBJECTS:
            raise SqlFilterError(f"the archive ends inside large-object data (line {self._line + 1}): it is truncated")
        self._compact(pos)
        return b"".join(out)

    # -- states ---------------------------------------------------------------------------------------

    def _copy(self, pos: int, out: list[bytes]) -> tuple[int, bool]:
        """Pass COPY data through up to and including its terminator line; (new pos, terminator found)."""
        buf = self._buf
        search = pos
        while True:
            idx = buf.find(_COPY_TERMINATOR, search)
            after = idx + len(_COPY_TERMINATOR)
            if idx < 0 or bytes(buf[after : after + 2]) in (b"", b"\r"):
                # Not found, or found but its line end not yet arrived: pass on what surely is data, and keep
                # back what could start a terminator split across chunks, with the newline before it.
                keep = max(pos, len(buf) - 3 if idx < 0 else idx - 1)
                if keep > pos:
                    out.append(bytes(buf[pos:keep]))
                    self._line += buf.count(b"\n", pos, keep)
                    if self._copy_start >= 0 and keep > self._copy_start:
                        self._copy_start = -1
                return keep, False
            line_end = next((after + len(e) for e in _COPY_TERMINATOR_ENDS if buf.startswith(e, after)), -1)
            if line_end >= 0 and (idx == self._copy_start or (idx > 0 and buf[idx - 1] == 0x0A)):
                out.append(bytes(buf[pos:line_end]))
                self._line += buf.count(b"\n", pos, line_end)
                self._state = _State.SQL
                self._copy_start = -1
                return line_end, True
            search = idx + 1

    def _lines(self, pos: int, out: list[bytes], *, final: bool) -> tuple[int, bool]:
        """Handle whole lines in SQL and large-object state; (new pos, switched to COPY)."""
        buf = self._buf
        emit_from = pos
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) - pos > MAX_LINE_BYTES:
                    raise SqlFilterError(
                        f"line {self._line + 1} of the archive is longer than {MAX_LINE_BYTES // (1024 * 1024)} "
                        "MiB outside COPY data; pg_dump writes no such lines, so the archive was refused"
                    )
                if not final or pos >= len(buf):
                    break
                nl = len(buf)  # last line without a newline
            end = min(nl + 1, len(buf))
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            statement_start = self._state is _State.SQL and self._scanner.at_top_level
            keep = self._line_kept(line)
            self._line += 1
            if not keep:
                out.append(bytes(buf[emit_from:pos]))
                emit_from = end
            elif (
                self._around_vector_index is not None
                and statement_start
                and self._scanner.at_top_level
                and self._state is _State.SQL
                and _VECTOR_INDEX_RE.match(line)
            ):
                before, after = self._around_vector_index
                out += [bytes(buf[emit_from:pos]), before, bytes(buf[pos:end])]
                if not buf.endswith(b"\n", pos, end):
                    out.append(b"\n")
                out.append(after)
                emit_from = end
                self.vector_indexes += 1
            pos = end
            if self._state is _State.COPY:
                self._copy_start = pos
                out.append(bytes(buf[emit_from:pos]))
                return pos, True
        if pos > emit_from:
            out.append(bytes(buf[emit_from:pos]))
        return pos, False

    def _line_kept(self, line: bytes) -> bool:
        """Look at one line outside COPY data; update the state; False when the line must be dropped."""
        top_level = self._scanner.at_top_level
        if self._state is _State.LARGE_OBJECTS:
            if line == b"COMMIT;" and top_level:
                self._state = _State.SQL
                return False
            if not (not line or line.startswith(_LARGE_OBJECT_CALLS)) or not top_level:
                raise SqlFilterError(
                    f"unexpected statement in large-object data at line {self._line + 1}: {line[:80]!r}; "
                    "the archive is not what pg_dump writes and cannot be restored atomically"
                )
        elif top_level:
            if self._pending_type is not None and line and not line.startswith(b"--"):
                toc_type, self._pending_type = self._pending_type, None
                if toc_type in _LARGE_OBJECT_TYPES and line == b"BEGIN;":
                    self._state = _State.LARGE_OBJECTS
                    self.large_object_sections += 1
                    return False
            if line.startswith(b"-- "):
                header = _HEADER_RE.match(line)
                if header is not None:
                    self._pending_type = header.group("type")
            elif (line.startswith(b"\\") and _RESTRICT_RE.match(line)) or (
                self._staging and (_EXTENSION_COMMENT_RE.match(line) or _OWNER_RE.match(line))
            ):
                return False
        try:
            self._scanner.line(line)
        except ScanError as exc:
            raise SqlFilterError(str(exc), refused_reason=exc.reason) from None
        if self._scanner.copy_from_stdin:
            self._state = _State.COPY
            self._copy_table = line.split(b" ", 2)[1] if line.startswith(b"COPY ") else b"a COPY statement"
        return True

    def _compact(self, pos: int) -> None:
        if pos:
            del self._buf[:pos]
            if self._copy_start >= 0:
                self._copy_start -= pos

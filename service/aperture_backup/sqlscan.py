"""Where psql's statements begin: a scanner that splits SQL into statements the way psql does, so that the
restore can look at the first words of every top-level statement of an archive before psql sends it.

psql decides where a statement ends (a `;` outside quotes, comments, parentheses and `BEGIN ... END`
bodies of `CREATE FUNCTION/PROCEDURE`), and from there the server runs it. An archive that contains
`ROLLBACK;` or `COMMIT;` at the top level would end the restore's transaction, and what follows would run
on its own; one with `\\! cmd` would run a shell command where psql is not restricted. The scanner follows
psql's own lexer (`src/fe_utils/psqlscan.l`: quote and dollar-quote rules, nested comments, the
`paren_depth` and `begin_depth` counters) closely enough that both agree on every boundary; where the two
could read a text differently (a plain string with a backslash before its closing quote, which psql reads
differently when `standard_conforming_strings` is off), it refuses instead of guessing.

It works line by line on bytes (the filter hands it whole lines outside COPY data) and keeps its state
between lines.
"""

from __future__ import annotations

import re
from enum import Enum

__all__ = ["ScanError", "StatementScanner"]

#: First words of statements that end, start or hand over a transaction.
TRANSACTION_CONTROL = frozenset({b"BEGIN", b"START", b"COMMIT", b"END", b"ROLLBACK", b"ABORT"})

_TOKEN = re.compile(
    rb"""(?P<ws>[ \t\r\n\f\v]+)
    |(?P<line_comment>--)
    |(?P<block_comment>/\*)
    |(?P<extended>[eE]')
    |(?P<quote>')
    |(?P<ident_quote>")
    |(?P<dollar>\$(?:[A-Za-z_\x80-\xff][A-Za-z_0-9\x80-\xff]*)?\$)
    |(?P<ident>[A-Za-z_\x80-\xff][A-Za-z_0-9$\x80-\xff]*)
    |(?P<semicolon>;)
    |(?P<open>\()
    |(?P<close>\))
    |(?P<backslash>\\)
    |(?P<other>[^ \t\r\n\f\v\-/eE'"$A-Za-z_\x80-\xff;()\\]+|.)""",
    re.VERBOSE | re.DOTALL,
)
_BLOCK_COMMENT_TOKEN = re.compile(rb"/\*|\*/")
_FUNCTION_WORDS = {b"create": b"c", b"function": b"f", b"procedure": b"p", b"or": b"o", b"replace": b"r"}


class ScanError(ValueError):
    """The SQL would do something a restore must not allow, or cannot be split with certainty. `reason` is
    the ErrorInfo reason the restore reports."""

    def __init__(self, message: str, *, reason: str = "ARCHIVE_REFUSED"):
        super().__init__(message)
        self.reason = reason


class _Mode(Enum):
    NORMAL = "normal"
    QUOTE = "string"
    EXTENDED = "escape string"
    IDENT = "quoted identifier"
    DOLLAR = "dollar-quoted string"
    COMMENT = "comment"


class StatementScanner:
    """Feed lines with `line()`; raises ScanError at the first forbidden top-level statement. After a line,
    `copy_from_stdin` tells whether psql will now read COPY data (a `COPY ... FROM STDIN` statement ended
    on it)."""

    def __init__(self) -> None:
        self._mode = _Mode.NORMAL
        self._dollar_tag = b""
        self._comment_depth = 0
        self._paren_depth = 0
        self._begin_depth = 0
        self._identifier_count = 0
        self._identifiers = [b"", b"", b"", b""]
        #: The statement's first words (upper case), up to three, while it is being read.
        self._words: list[bytes] = []
        self._is_copy_from_stdin = False
        self._previous_was_from = False
        self.copy_from_stdin = False
        #: The table of the last COPY ... FROM stdin, for messages.
        self.copy_table = b""
        self.line_number = 0

    @property
    def at_top_level(self) -> bool:
        """Between statements: not inside a string, comment, or an unfinished statement."""
        return self._mode is _Mode.NORMAL and not self._words and self._paren_depth == 0

    def line(self, text: bytes) -> None:
        """Scan one line (without its newline)."""
        self.line_number += 1
        self.copy_from_stdin = False
        pos, end = 0, len(text)
        while pos < end:
            if self._mode is not _Mode.NORMAL:
                pos = self._inside(text, pos)
                continue
            match = _TOKEN.match(text, pos)
            if match is None:  # pragma: no cover - the last alternative matches any byte
                raise ScanError(f"line {self.line_number} could not be read as SQL")
            kind, pos = match.lastgroup, match.end()
            if kind in ("ws", "other"):
                if kind == "other" and not self._words:
                    self._words.append(b"?")  # a statement that starts with a symbol: not a keyword one
                continue
            if kind == "line_comment":
                return
            if kind == "block_comment":
                self._mode, self._comment_depth = _Mode.COMMENT, 1
            elif kind == "quote":
                self._mode = _Mode.QUOTE
                self._word(b"?")
            elif kind == "extended":
                self._mode = _Mode.EXTENDED
                self._word(b"?")
            elif kind == "ident_quote":
                self._mode = _Mode.IDENT
                self._word(b"?")
            elif kind == "dollar":
                self._mode, self._dollar_tag = _Mode.DOLLAR, match.group()
                self._word(b"?")
            elif kind == "ident":
                self._identifier(match.group())
            elif kind == "open":
                self._paren_depth += 1
                self._word(b"?")
            elif kind == "close":
                if self._paren_depth > 0:
                    self._paren_depth -= 1
            elif kind == "semicolon":
                if self._paren_depth == 0 and self._begin_depth == 0:
                    self._end_statement(text[pos:])
            elif kind == "backslash":
                raise ScanError(
                    f"line {self.line_number} holds a psql meta-command ({text[pos - 1 : pos + 15]!r}...), which "
                    "could run commands on this machine; pg_dump writes none, so the archive was refused"
                )

    # -- inside quotes and comments ----------------------------------------------------------------------

    def _inside(self, text: bytes, pos: int) -> int:
        """Advance through a string, quoted identifier or comment; the position after it (or the line's end)."""
        end = len(text)
        if self._mode is _Mode.DOLLAR:
            idx = text.find(self._dollar_tag, pos)
            if idx < 0:
                return end
            self._mode = _Mode.NORMAL
            return idx + len(self._dollar_tag)
        if self._mode is _Mode.COMMENT:
            while True:
                match = _BLOCK_COMMENT_TOKEN.search(text, pos)
                if match is None:
                    return end
                pos = match.end()
                self._comment_depth += 1 if match.group() == b"/*" else -1
                if self._comment_depth == 0:
                    self._mode = _Mode.NORMAL
                    return pos
        quote = b'"' if self._mode is _Mode.IDENT else b"'"
        while True:
            idx = text.find(quote, pos)
            if idx < 0:
                return end
            if self._mode is _Mode.EXTENDED and _odd_backslashes_before(text, idx, pos):
                pos = idx + 1  # in E'...' a backslash escapes the next byte, the quote included
                continue
            elif self._mode is _Mode.QUOTE and _odd_backslashes_before(text, idx, pos):
                raise ScanError(
                    f"line {self.line_number} has a string ending in a backslash, which psql reads differently "
                    "when standard_conforming_strings is off; pg_dump writes such strings as E'...', so the "
                    "archive was refused rather than guessed at"
                )
            if idx + 1 < end and text[idx + 1] == quote[0]:
                pos = idx + 2  # a doubled quote stands for itself
                continue
            self._mode = _Mode.NORMAL
            return idx + 1

    # -- statements --------------------------------------------------------------------------------------

    def _word(self, word: bytes) -> None:
        if len(self._words) < 3:
            self._words.append(word)

    def _identifier(self, token: bytes) -> None:
        lowered = token.lower()
        if self._identifier_count == 0:
            self._identifiers = [b"", b"", b"", b""]
            if lowered.upper() in TRANSACTION_CONTROL and not self._words:
                raise self._refusal(token)
        if lowered in _FUNCTION_WORDS and self._identifier_count < 4:
            self._identifiers[self._identifier_count] = _FUNCTION_WORDS[lowered]
        self._identifier_count += 1
        ids = self._identifiers
        in_function = ids[0] == b"c" and (
            ids[1] in (b"f", b"p") or (ids[1] == b"o" and ids[2] == b"r" and ids[3] in (b"f", b"p"))
        )
        if in_function and self._paren_depth == 0:
            # psql's heuristic for `BEGIN ATOMIC ... END` bodies, whose semicolons end no statement.
            if lowered == b"begin":
                self._begin_depth += 1
            elif lowered == b"case":
                if self._begin_depth >= 1:
                    self._begin_depth += 1
            elif lowered == b"end" and self._begin_depth > 0:
                self._begin_depth -= 1
        first = not self._words
        self._word(token.upper())
        if first:
            return
        words = self._words
        if words[0] == b"PREPARE" and len(words) >= 2 and words[1] == b"TRANSACTION":
            raise self._refusal(b"PREPARE TRANSACTION")
        upper = token.upper()
        if words[0] == b"COPY":
            if upper == b"STDIN" and self._previous_was_from:
                self._is_copy_from_stdin = True
                self.copy_table = words[1] if len(words) > 1 else b"?"
            elif upper == b"BINARY":
                raise ScanError(
                    f"line {self.line_number} has a binary COPY, whose data psql would read past where the "
                    "text of the archive says; pg_dump writes none, so the archive was refused"
                )
        self._previous_was_from = upper == b"FROM"

    def _end_statement(self, rest: bytes) -> None:
        copy = self._is_copy_from_stdin
        self._words = []
        self._identifier_count = 0
        self._is_copy_from_stdin = False
        self._previous_was_from = False
        if copy:
            if rest.strip() and not rest.strip().startswith(b"--"):
                raise ScanError(
                    f"line {self.line_number} has more after a COPY ... FROM stdin statement; pg_dump ends "
                    "the line there, and what psql does with the rest is not certain, so the archive was refused"
                )
            self.copy_from_stdin = True

    def _refusal(self, word: bytes) -> ScanError:
        shown = word.decode("ascii", "replace").upper()
        return ScanError(
            f"line {self.line_number} starts a {shown} statement at the top level, which would end the restore's "
            "transaction and let what follows run on its own; pg_dump writes none there, so the archive was "
            "refused before that statement ran",
            reason="ARCHIVE_NOT_ATOMIC",
        )


def _odd_backslashes_before(text: bytes, idx: int, start: int) -> bool:
    """Whether an odd run of backslashes (from `start` on) ends just before `idx`."""
    count = 0
    back = idx - 1
    while back >= start and text[back] == 0x5C:
        count += 1
        back -= 1
    return count % 2 == 1

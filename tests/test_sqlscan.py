"""Archives that try to leave the restore's transaction, or to run psql meta-commands, are refused before
the statement runs, and the database is unchanged; text that only looks like such statements (in strings,
comments, dollar quotes, function bodies, COPY data) restores as usual. Each case goes through the real
service and the real psql, which decides what a statement is."""

from __future__ import annotations

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.sqlfilter import MAX_LINE_BYTES, SqlFilter, SqlFilterError
from aperture_backup.sqlscan import ScanError, StatementScanner
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, public_tables
from tests.support.service import RunningService, StartService

HEADER = b"-- hand-made archive\nSET standard_conforming_strings = on;\nCREATE TABLE public.loaded (a int);\n"
#: What each hostile archive does after its trick: if it ran on its own, the table would be gone.
PAYLOAD = b"\nDROP TABLE public.important;\n"

HOSTILE = {
    "rollback": b"ROLLBACK;",
    "commit": b"COMMIT;",
    "end": b"END;",
    "abort": b"ABORT;",
    "begin": b"BEGIN;",
    "start": b"START TRANSACTION;",
    "prepare": b"PREPARE TRANSACTION 'x';",
    "lower-case": b"rollback ;",
    "after-a-comment": b"/* a /* nested */ comment */ ROLLBACK;",
    "same-line": b"SELECT 1; ROLLBACK;",
    "after-a-string": b"SELECT 'it''s'; COMMIT;",
    "after-dollar-quote": b"SELECT $x$ $y$ ; $x$; COMMIT;",
    "after-atomic-body": (
        b"CREATE FUNCTION public.f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; "
        b"END;\nCOMMIT;"
    ),
    "copy-crlf-terminator": b"CREATE TABLE public.c (a text);\nCOPY public.c (a) FROM stdin;\nx\n\\.\r\nCOMMIT;",
    "copy-without-toc-header": b"CREATE TABLE public.c (a text);\nCOPY public.c FROM stdin;\n'\n\\.\nROLLBACK;",
    "backslash-before-quote": b"SELECT 'a\\'; ROLLBACK; --';",
    "shell-command": b"\\! touch /tmp/aperture-backup-pwned",
    "gexec": b"SELECT 'DROP TABLE public.important' \\gexec",
    "connect": b"\\connect postgres",
}

#: Text that only looks like transaction control; psql sends none of it as a statement of its own.
BENIGN = {
    "in-a-string": b"SELECT '; ROLLBACK; COMMIT;';",
    "in-an-escape-string": b"SELECT E'\\'; ROLLBACK;';",
    "in-a-line-comment": b"SELECT 1; -- ROLLBACK;",
    "in-a-block-comment": b"/* /* ROLLBACK; */ COMMIT; */ SELECT 1;",
    "in-a-dollar-quote": b"DO $body$ BEGIN PERFORM 1; END $body$;",
    "in-a-quoted-identifier": b'CREATE TABLE public."rollback; commit" (a int);',
    "procedure-body": (b"CREATE PROCEDURE public.p() LANGUAGE plpgsql AS $$\nBEGIN\nCOMMIT;\nEND\n$$;"),
    "atomic-body": (
        b"CREATE OR REPLACE FUNCTION public.g(x int) RETURNS int LANGUAGE sql\n"
        b"BEGIN ATOMIC\n  SELECT CASE WHEN x > 0 THEN x ELSE 0 END;\n  SELECT x;\nEND;"
    ),
    "in-copy-data": b"CREATE TABLE public.c (a text);\nCOPY public.c (a) FROM stdin;\nROLLBACK;\nCOMMIT;\n\\.",
    "in-parentheses": b"SELECT (1);",
    "savepoints": b"SAVEPOINT s; SELECT 1; RELEASE SAVEPOINT s;",
}


@pytest.fixture
def target(pg16: PgServer, make_database: MakeDatabase) -> Database:
    db = make_database(pg16)
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.important (a int); INSERT INTO public.important VALUES (42)")
    return db


def _restore(svc: RunningService, archive: bytes, name: str) -> list[pb.RestoreResponse]:
    (svc.backup_dir / name).write_bytes(archive)
    return list(svc.client.stub.Restore(pb.RestoreRequest(id=name, skip_safety_backup=True), timeout=120))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_statements_are_refused_before_they_run(
    case: str, target: Database, service_factory: StartService
) -> None:
    svc = service_factory(target.uri)
    archive = HEADER + HOSTILE[case] + PAYLOAD
    with pytest.raises(Exception) as refused:
        _restore(svc, archive, f"hostile-{case}.sql")
    error = refused.value
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    assert public_tables(target.uri) == {"important"}, "neither the payload nor what came before it was committed"
    with psycopg.connect(target.uri) as conn:
        assert conn.execute("SELECT a FROM public.important").fetchall() == [(42,)]
    assert code.name == "FAILED_PRECONDITION", details
    assert "unchanged" in details and "refused" in details


def test_a_shell_command_never_runs(target: Database, service_factory: StartService, tmp_path: object) -> None:
    from pathlib import Path

    marker = Path("/tmp/aperture-backup-pwned")
    marker.unlink(missing_ok=True)
    svc = service_factory(target.uri)
    with pytest.raises(Exception, match="meta-command"):
        _restore(svc, HEADER + HOSTILE["shell-command"] + PAYLOAD, "shell.sql")
    assert not marker.exists()


@pytest.mark.parametrize("case", list(BENIGN))
def test_look_alikes_restore_as_usual(case: str, target: Database, service_factory: StartService) -> None:
    svc = service_factory(target.uri)
    messages = _restore(svc, HEADER + BENIGN[case] + b"\n", f"benign-{case}.sql")
    assert messages[-1].HasField("result")
    assert "loaded" in public_tables(target.uri) and "important" not in public_tables(target.uri)


# -- the scanner and the filter alone --------------------------------------------------------------------------


def _scan(text: bytes) -> StatementScanner:
    scanner = StatementScanner()
    for line in text.split(b"\n"):
        scanner.line(line)
    return scanner


@pytest.mark.parametrize("case", [c for c in HOSTILE if not c.startswith("copy")])
def test_the_scanner_alone_refuses_what_the_service_refuses(case: str) -> None:
    with pytest.raises(ScanError):
        _scan(HEADER + HOSTILE[case] + PAYLOAD)


@pytest.mark.parametrize("case", [c for c in BENIGN if c != "in-copy-data"])
def test_the_scanner_alone_lets_look_alikes_through(case: str) -> None:
    assert _scan(HEADER + BENIGN[case] + b"\n").at_top_level


def test_a_huge_line_is_refused_with_bounded_memory() -> None:
    sql_filter = SqlFilter()
    chunk = b"x" * (1024 * 1024)
    with pytest.raises(SqlFilterError, match="longer than 64 MiB"):
        for _ in range(MAX_LINE_BYTES // len(chunk) + 2):
            sql_filter.feed(b"SELECT '" + chunk if _ == 0 else chunk)


def test_a_huge_copy_line_streams_through() -> None:
    """COPY data is not held: a 100 MiB row passes in pieces."""
    sql_filter = SqlFilter()
    passed = sum(len(p) for p in sql_filter.feed(b"COPY public.t (a) FROM stdin;\n"))
    chunk = b"y" * (1024 * 1024)
    for _ in range(100):
        passed += sum(len(p) for p in sql_filter.feed(chunk))
        assert len(sql_filter._buf) < 16  # what the filter holds back
    passed += sum(len(p) for p in sql_filter.feed(b"\n\\.\n"))
    passed += len(sql_filter.finish())
    assert passed == len(b"COPY public.t (a) FROM stdin;\n") + 100 * len(chunk) + len(b"\n\\.\n")


_FRAGMENTS = [
    b"SELECT 1",
    b";",
    b" ",
    b"\n",
    b"'",
    b"''",
    b"E'",
    b"\\\\",
    b"$$",
    b"$a$",
    b"--",
    b"/*",
    b"*/",
    b'"',
    b"(",
    b")",
    b"CREATE FUNCTION f() BEGIN ATOMIC",
    b"CASE",
    b"END",
    b"COPY t FROM stdin",
    b"\\.",
    b"x",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40), st.integers(1, 50))
def test_the_filter_gives_the_same_answer_whatever_the_chunks(fragments: list[bytes], size: int) -> None:
    """Split anywhere, the filter passes the same bytes and refuses at the same place; it never fails
    with anything but SqlFilterError."""
    text = b"".join(fragments)

    def run(step: int) -> tuple[bytes, str]:
        sql_filter = SqlFilter()
        out: list[bytes] = []
        try:
            for i in range(0, len(text), step):
                out += sql_filter.feed(text[i : i + step])
            out.append(sql_filter.finish())
        except SqlFilterError as exc:
            return b"".join(out), str(exc).split(";")[0]
        return b"".join(out), ""

    whole_out, whole_error = run(max(1, len(text)))
    out, error = run(size)
    assert error == whole_error
    if not error:
        assert out == whole_out


def test_a_gigabyte_line_does_not_grow_the_server(target: Database, service_factory: StartService) -> None:
    """A 1 GiB line compresses to about a megabyte; restored, it is refused at the line limit, and the
    server's memory stays bounded (it used to grow by several GiB)."""
    import gzip as gzip_module
    import io

    import psutil

    svc = service_factory(target.uri)
    name = "long-line.sql.gz"
    buffer = io.BytesIO()
    with gzip_module.GzipFile(fileobj=buffer, mode="wb", compresslevel=6) as out:
        out.write(b"-- hand-made\nSELECT '")
        block = b"x" * (16 * 1024 * 1024)
        for _ in range(64):
            out.write(block)
        out.write(b"';\n")
    (svc.backup_dir / name).write_bytes(buffer.getvalue())
    import threading

    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the peak while it runs, not what is left after
        while not done.wait(0.02):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with pytest.raises(Exception, match="longer than 64 MiB") as refused:
            list(svc.client.stub.Restore(pb.RestoreRequest(id=name, skip_safety_backup=True), timeout=300))
    finally:
        done.set()
        sampler.join()
    grown = peak[0] - before
    assert refused.value.code().name == "DATA_LOSS"  # type: ignore[attr-defined]
    assert grown < 400 * 1024 * 1024, f"the server grew by {grown / 2**20:.0f} MiB"
    assert public_tables(target.uri) == {"important"}

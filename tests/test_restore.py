"""Restore end to end, on real servers with the real client tools: atomic (a failure anywhere, even at the
last statement or in the last bytes of the file, leaves the database exactly as it was), complete (nothing
created after the backup survives), and honest about why it failed.

Also the SQL filter on real pg_dump output of 16 and 18: exactly the BEGIN/COMMIT pair around large-object
data goes, everything else stays byte for byte.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import threading
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import zstandard
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture_backup.database import JOB_LOCK_KEY, NOTIFY_CHANNEL
from aperture_backup.errors import DataLoss
from aperture_backup.jobs import Job, JobKind
from aperture_backup.model import DEFAULT_KIND, Compression, Trigger
from aperture_backup.restore import ArchiveReader
from aperture_backup.sqlfilter import SqlFilter, SqlFilterError
from aperture_backup_client import pb
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.seed import LARGE_OBJECT_OID_BASE
from tests.support.service import RunningService, StartService

#: Names as Aperture writes them (it names files after the UTC time, not our `aperture-backup-` ids).
APERTURE_DUMP = "aperture_backup_20261128T010000Z.dump"
APERTURE_SQL_GZ = "aperture_backup_20261128T010000Z.sql.gz"


# -- helpers -------------------------------------------------------------------------------------------------


def _restore(svc: RunningService, backup_id: str, *, skip_safety_backup: bool = False) -> list[pb.RestoreResponse]:
    request = pb.RestoreRequest(id=backup_id, skip_safety_backup=skip_safety_backup)
    return list(svc.client.stub.Restore(request, timeout=240))


def _refused(
    svc: RunningService, backup_id: str, *, skip_safety_backup: bool = True
) -> tuple[grpc.StatusCode, str, str]:
    """Code, ErrorInfo reason and message of a restore that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        _restore(svc, backup_id, skip_safety_backup=skip_safety_backup)
    error = info.value
    status = rpc_status.from_call(error)
    reason = ""
    if status is not None:
        for detail in status.details:
            error_info = error_details_pb2.ErrorInfo()
            if detail.Unpack(error_info):
                reason = error_info.reason
    return error.code(), reason, error.details() or ""


def _execute(uri: str, *statements: str) -> None:
    with psycopg.connect(uri) as conn:
        for statement in statements:
            conn.execute(statement.encode())
        conn.commit()


def _change_everything(uri: str) -> None:
    """What happens to a database after a backup: a later migration adds a table, a function and a schema,
    rows change, a sequence moves on, a large object goes and another comes."""
    _execute(
        uri,
        "CREATE TABLE public.added_by_later_migration (id int PRIMARY KEY, note text)",
        "INSERT INTO public.added_by_later_migration VALUES (1, 'must be gone after the restore')",
        "CREATE SCHEMA later_schema",
        "CREATE FUNCTION later_schema.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "UPDATE public.movies SET title = title || ' (edited)' WHERE id % 3 = 0",
        "DELETE FROM public.ratings WHERE movie_id % 2 = 0",
        "INSERT INTO public.aperture_migrations VALUES (999, '999_later', now())",
        "SELECT setval('public.series_id_seq', 987654)",
        f"SELECT lo_unlink({LARGE_OBJECT_OID_BASE + 1})",
        "SELECT lo_from_bytea(0, 'a large object made after the backup')",
    )


def _dump_file(server: PgServer, uri: str, target: Path, *, custom: bool) -> None:
    """An archive the way Aperture itself makes it: `pg_dump --no-owner --no-acl -F c -Z 6`, or (older
    versions) plain SQL through gzip."""
    if custom:
        server.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "-Z", "6", "-f", target, "-d", uri)
        return
    sql = server.run("pg_dump", "-d", uri).stdout.encode()
    target.write_bytes(gzip.compress(sql))


def _phases(messages: list[pb.RestoreResponse]) -> list[int]:
    phases: list[int] = []
    for message in messages:
        if not phases or phases[-1] != message.progress.phase:
            phases.append(message.progress.phase)
    return phases


def _filtered(
    data: bytes, *, seed: int = 0, around_vector_index: tuple[bytes, bytes] | None = None
) -> tuple[bytes, SqlFilter]:
    """Run `data` through the filter in random-sized chunks (1 byte to 64 KiB), as a stream would."""
    rng = random.Random(seed)  # noqa: S311 - chunk sizes, not secrets
    sql_filter = SqlFilter(around_vector_index=around_vector_index)
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rng.choice([1, 2, 3, 7, 100, 4096, 65536])
        out += sql_filter.feed(data[pos : pos + size])
        pos += size
    out.append(sql_filter.finish())
    return b"".join(out), sql_filter


#: Objects whose text contains what the filter must leave alone: `BEGIN;`/`COMMIT;` lines in a procedure
#: body and in COPY data, and a line that looks like pg_dump's large-object header inside COPY data.
_TRAPS = r"""
CREATE PROCEDURE public.batch_commit() LANGUAGE plpgsql AS $body$
BEGIN
INSERT INTO public.filter_traps VALUES ('from the procedure');
COMMIT;
END
$body$;
CREATE TABLE public.filter_traps (line text);
INSERT INTO public.filter_traps VALUES
    ('-- Data for Name: BLOBS; Type: BLOBS; Schema: -; Owner: -'), ('--'), (''), ('BEGIN;'), ('COMMIT;'),
    (E'multi\nline\nCOMMIT;\n\\.'), ('\.'), ('ends with a backslash \');
"""


# -- the SQL filter on real pg_dump output -------------------------------------------------------------------


@pytest.mark.parametrize("server_name", ["pg16", "pg18"])
def test_filter_removes_only_the_large_object_transaction(
    server_name: str, request: pytest.FixtureRequest, make_database: MakeDatabase
) -> None:
    server: PgServer = request.getfixturevalue(server_name)
    db = make_database(server, seeded=True)
    _execute(db.uri, _TRAPS)
    dump = server.run("pg_dump", "--no-owner", "--no-acl", "-d", db.uri).stdout.encode()
    lines = dump.split(b"\n")
    # What pg_dump prints around large-object data (16: "Name: BLOBS", 18: "Name: 900001..900006").
    header = next(
        i
        for i, line in enumerate(lines)
        if lines[i - 1] == b"--" and line.startswith(b"-- Data for ") and b"; Type: BLOBS; " in line
    )
    assert lines[header + 1 : header + 4] == [b"--", b"", b"BEGIN;"]
    begin = header + 3
    commit = lines.index(b"COMMIT;", begin)
    # The archive's own \restrict lines go too (the restore restricts psql itself, with its own key).
    kept = lines[:begin] + lines[begin + 1 : commit] + lines[commit + 1 :]
    expected = b"\n".join(line for line in kept if not re.match(rb"\\(un)?restrict [A-Za-z0-9]+$", line))

    for seed in range(5):
        out, sql_filter = _filtered(dump, seed=seed)
        assert out == expected
        assert sql_filter.large_object_sections == 1

    # Everything else is as pg_dump wrote it: the procedure's COMMIT, the COPY data's BEGIN/COMMIT lines.
    assert b"\nINSERT INTO public.filter_traps VALUES ('from the procedure');\nCOMMIT;\nEND\n" in out
    assert b"\nBEGIN;\n" in out and b"\nCOMMIT;\n" in out
    assert b"\n\\restrict " not in out and b"\n\\unrestrict " not in out


def test_filter_passes_copy_data_through_and_refuses_truncation() -> None:
    header = b"--\n-- Data for Name: t; Type: TABLE DATA; Schema: public; Owner: -\n--\n\n"
    empty = header + b"COPY public.t (a) FROM stdin;\n\\.\n\n"
    copy = header + b"COPY public.t (a) FROM stdin;\nBEGIN;\n\\\\.\nx\\.\nCOMMIT;\n\\.\n\nSELECT 1;\n"
    assert _filtered(empty)[0] == empty
    assert _filtered(copy)[0] == copy
    for truncated in (copy[: copy.index(b"\\.\n\n")], header + b"COPY public.t (a) FROM stdin;\n"):
        with pytest.raises(SqlFilterError, match="truncated"):
            _filtered(truncated)


def test_filter_puts_the_given_sql_around_pgvector_index_statements_only() -> None:
    """pg_dump's one-line HNSW and IVFFlat index statements get the restore's SQL before and after them;
    a btree index, the same text inside a function body, COPY data or a statement split over lines do not."""
    hnsw = b"CREATE INDEX e_hnsw ON public.e USING hnsw (embedding public.halfvec_cosine_ops) WITH (m='16');"
    ivfflat = b"CREATE UNIQUE INDEX e_ivf ON ONLY public.e USING ivfflat (embedding public.vector_l2_ops);"
    untouched = (
        b"CREATE INDEX e_owner ON public.e USING btree (owner);\n"
        b"CREATE FUNCTION public.f() RETURNS void LANGUAGE sql AS $$\n" + hnsw + b"\n$$;\n"
        b"COPY public.t (a) FROM stdin;\n" + hnsw + b"\n\\.\n"
        b"CREATE INDEX e_split ON public.e\n    USING hnsw (embedding public.halfvec_cosine_ops);\n"
    )
    sql = untouched + hnsw + b"\n" + ivfflat
    around = (b"SET LOCAL a = 1;\n", b"SET LOCAL a TO DEFAULT;\n")
    expected = untouched + around[0] + hnsw + b"\n" + around[1] + around[0] + ivfflat + b"\n" + around[1]
    for seed in range(5):
        out, sql_filter = _filtered(sql, seed=seed, around_vector_index=around)
        assert out == expected
        assert sql_filter.vector_indexes == 2
    assert _filtered(sql)[0] == sql, "nothing is added unless the restore asks"


def test_filter_refuses_foreign_statements_inside_large_object_data() -> None:
    sql = (
        b"--\n-- Data for Name: BLOBS; Type: BLOBS; Schema: -; Owner: -\n--\n\nBEGIN;\n\n"
        b"SELECT pg_catalog.lo_open('1', 131072);\nDROP TABLE important;\nCOMMIT;\n"
    )
    with pytest.raises(SqlFilterError, match="unexpected statement"):
        _filtered(sql)
    with pytest.raises(SqlFilterError, match="truncated"):
        _filtered(sql[: sql.index(b"DROP")])


# -- restores through the service ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_GZIP),
        (pb.BACKUP_FORMAT_CUSTOM, pb.COMPRESSION_UNSPECIFIED),
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_ZSTD),
    ],
    ids=["sql.gz", "custom", "sql.zst"],
)
@pytest.mark.parametrize("isolation", ["staging", "in-place"])
def test_restore_brings_back_exactly_the_backup(
    seeded_db: Database,
    service_factory: StartService,
    fmt: pb.BackupFormat.ValueType,
    compression: pb.Compression.ValueType,
    isolation: str,
) -> None:
    _execute(seeded_db.uri, _TRAPS)
    svc = service_factory(seeded_db.uri, restore_isolation=isolation)
    expected = fingerprint(seeded_db.uri)
    backup = svc.client.create(format=fmt, compression=compression)
    _change_everything(seeded_db.uri)

    with psycopg.connect(seeded_db.uri, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        messages = _restore(svc, backup.id)
        if isolation == "staging":
            # The swap cuts every session of the database: the application learns it that way.
            with pytest.raises(psycopg.OperationalError):
                list(listener.notifies(timeout=10, stop_after=1))
        else:
            notifies = list(listener.notifies(timeout=10, stop_after=1))
            assert [(n.channel, n.payload) for n in notifies] == [(NOTIFY_CHANNEL, backup.id)]

    assert_same(expected, fingerprint(seeded_db.uri))
    result = messages[-1].result
    assert result.restored.id == backup.id
    assert result.reconnect_required
    assert result.notify_channel == NOTIFY_CHANNEL
    assert result.duration.ToTimedelta().total_seconds() > 0

    # The safety backup was taken first, is listed with its trigger, and holds the changed database.
    safety = result.safety_backup
    assert safety.state == pb.BACKUP_STATE_READY and safety.trigger == pb.BACKUP_TRIGGER_PRE_RESTORE
    assert svc.client.get(safety.id).trigger == pb.BACKUP_TRIGGER_PRE_RESTORE
    assert _phases(messages)[-3:] == [pb.PHASE_SAFETY_BACKUP, pb.PHASE_RESTORING, pb.PHASE_DONE]
    assert pb.PHASE_VERIFYING in _phases(messages)
    restoring = [m.progress for m in messages if m.progress.phase == pb.PHASE_RESTORING]
    assert restoring[-1].bytes_total == backup.size_bytes
    assert messages[-1].progress.bytes_done == backup.size_bytes

    # Restoring the safety backup brings the changes back: it is a real backup of the database as it was.
    _restore(svc, safety.id, skip_safety_backup=True)
    with psycopg.connect(seeded_db.uri) as conn:
        assert conn.execute("SELECT note FROM public.added_by_later_migration").fetchall() == [
            ("must be gone after the restore",)
        ]
    assert not svc.server.app.store.is_in_use(backup.id)
    assert not svc.server.app.store.is_in_use(safety.id)


@pytest.mark.parametrize("custom", [True, False], ids=["dump", "sql.gz"])
def test_restores_archives_aperture_made_itself(
    seeded_db: Database, service_factory: StartService, tmp_path: Path, custom: bool
) -> None:
    backup_dir = tmp_path / "aperture-backups"
    backup_dir.mkdir()
    name = APERTURE_DUMP if custom else APERTURE_SQL_GZ
    _dump_file(seeded_db.server, seeded_db.uri, backup_dir / name, custom=custom)
    expected = fingerprint(seeded_db.uri)
    _change_everything(seeded_db.uri)
    svc = service_factory(seeded_db.uri, backup_dir)

    listed = svc.client.get(name)
    assert listed.trigger == pb.BACKUP_TRIGGER_EXTERNAL and not listed.sha256
    messages = _restore(svc, name, skip_safety_backup=True)

    assert_same(expected, fingerprint(seeded_db.uri))
    assert messages[-1].result.restored.id == name
    assert not messages[-1].result.HasField("safety_backup")


def test_restore_into_a_brand_new_empty_database(
    pg_server: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    source = make_database(pg_server, seeded=True)
    target = make_database(pg_server)
    source_svc = service_factory(source.uri, tmp_path / "shared")
    backup = source_svc.client.create(format=pb.BACKUP_FORMAT_CUSTOM)
    source_svc.stop()

    svc = service_factory(target.uri, tmp_path / "shared")
    messages = _restore(svc, backup.id)

    assert_same(fingerprint(source.uri), fingerprint(target.uri))
    assert messages[-1].result.safety_backup.trigger == pb.BACKUP_TRIGGER_PRE_RESTORE


def _failing_archive(server: PgServer, uri: str, target: Path, tail: bytes) -> bytes:
    """A real plain dump whose very last statement fails, gzip'd as Aperture's older versions wrote it."""
    sql = server.run("pg_dump", "--no-owner", "--no-acl", "-d", uri).stdout.encode()
    data = gzip.compress(sql + tail)
    target.write_bytes(data)
    return data


def test_failure_at_the_last_statement_leaves_the_database_as_it_was(
    seeded_db: Database, service_factory: StartService, tmp_path: Path
) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    _failing_archive(seeded_db.server, seeded_db.uri, backup_dir / APERTURE_SQL_GZ, b"\nSELECT 1 / 0 AS fails_last;\n")
    _change_everything(seeded_db.uri)
    before = fingerprint(seeded_db.uri)
    svc = service_factory(seeded_db.uri, backup_dir)

    code, reason, message = _refused(svc, APERTURE_SQL_GZ)

    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "RESTORE_FAILED"
    assert "division by zero" in message and "unchanged" in message
    assert_same(before, fingerprint(seeded_db.uri))
    assert svc.server.app.slot.current is None


def test_archive_that_commits_by_itself_is_caught(
    seeded_db: Database, service_factory: StartService, tmp_path: Path
) -> None:
    """A hand-made archive with its own COMMIT cannot be made atomic: it is refused before the COMMIT runs,
    so nothing before it is committed either."""
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    (backup_dir / "handmade.sql").write_bytes(b"-- hand-made\nCREATE TABLE public.t (a int);\nCOMMIT;\n")
    before = fingerprint(seeded_db.uri)
    svc = service_factory(seeded_db.uri, backup_dir)

    code, reason, message = _refused(svc, "handmade.sql")

    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "ARCHIVE_NOT_ATOMIC"
    assert "starts a COMMIT statement at the top level" in message and "unchanged" in message
    assert_same(before, fingerprint(seeded_db.uri))


@pytest.mark.parametrize("damage", ["crc", "truncated"])
def test_corrupt_gzip_tail_is_data_loss_and_changes_nothing(
    seeded_db: Database, service_factory: StartService, tmp_path: Path, damage: str
) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    path = backup_dir / APERTURE_SQL_GZ
    data = _failing_archive(seeded_db.server, seeded_db.uri, path, b"")
    if damage == "crc":
        # The CRC-32 in the trailer: every byte of SQL decompresses and runs; only the end says "corrupt".
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:])
    else:
        path.write_bytes(data[:-20])
    _change_everything(seeded_db.uri)
    before = fingerprint(seeded_db.uri)
    svc = service_factory(seeded_db.uri, backup_dir)

    code, _, message = _refused(svc, APERTURE_SQL_GZ)

    assert code == grpc.StatusCode.DATA_LOSS, message
    assert "gzip" in message
    assert_same(before, fingerprint(seeded_db.uri))


@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["sql.gz", "custom"])
def test_checksum_mismatch_is_data_loss_and_changes_nothing(
    seeded_db: Database, service_factory: StartService, fmt: pb.BackupFormat.ValueType
) -> None:
    svc = service_factory(seeded_db.uri)
    backup = svc.client.create(format=fmt)
    manifest = svc.backup_dir / f"{backup.id}.manifest.json"
    data = json.loads(manifest.read_text())
    data["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    _change_everything(seeded_db.uri)
    before = fingerprint(seeded_db.uri)

    code, reason, message = _refused(svc, backup.id)

    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    assert "SHA-256" in message
    assert_same(before, fingerprint(seeded_db.uri))


@pytest.mark.parametrize("custom", [True, False], ids=["dump", "sql.gz"])
def test_archive_from_a_newer_pg_dump_is_refused_before_touching_the_database(
    pg16: PgServer,
    pg18: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
    custom: bool,
) -> None:
    newer = make_database(pg18, seeded=True)
    target = make_database(pg16, seeded=True)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    name = APERTURE_DUMP if custom else APERTURE_SQL_GZ
    _dump_file(pg18, newer.uri, backup_dir / name, custom=custom)
    before = fingerprint(target.uri)
    svc = service_factory(target.uri, backup_dir)

    code, reason, message = _refused(svc, name, skip_safety_backup=False)

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # pg_restore 16 may already refuse to read an 18 archive; otherwise the version check does.
    assert reason in {"ARCHIVE_TOO_NEW", "ARCHIVE_UNREADABLE"}, message
    assert "18" in message or "newer pg_dump" in message
    assert_same(before, fingerprint(target.uri))
    assert [b.id for b in svc.client.list()] == [name]  # refused before the safety backup, too


def test_refused_while_another_job_runs(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    backup = svc.client.create()
    slot = svc.server.app.slot
    running = Job(kind=JobKind.BACKUP, trigger=Trigger.SCHEDULED, description="a scheduled backup")
    slot.claim(running)
    try:
        code, reason, message = _refused(svc, backup.id)
    finally:
        running.finish()
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_RUNNING")
    assert "scheduled backup" in message

    # Another replica holds the database lock: refused too, and nothing changes.
    _change_everything(seeded_db.uri)
    before = fingerprint(seeded_db.uri)
    with psycopg.connect(seeded_db.uri, autocommit=True) as other_replica:
        other_replica.execute("SELECT pg_advisory_lock(%s)", (JOB_LOCK_KEY,))
        code, reason, _ = _refused(svc, backup.id, skip_safety_backup=False)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_RUNNING")
    assert_same(before, fingerprint(seeded_db.uri))
    assert [b.trigger for b in svc.client.list()] == [pb.BACKUP_TRIGGER_MANUAL]


def test_restore_while_a_backup_runs_is_refused(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True)
    svc = service_factory(db.uri)
    first = svc.client.create()
    started = threading.Event()
    created: list[pb.CreateResponse] = []

    def run_backup() -> None:
        for message in svc.client.stub.Create(pb.CreateRequest(), timeout=120):
            started.set()
            created.append(message)

    # pg_dump waits for this lock, so the backup is certainly still running when Restore comes.
    with table_lock(db.uri, "public.movies") as blocker:
        consumer = threading.Thread(target=run_backup)
        consumer.start()
        assert started.wait(30)
        code, reason, message = _refused(svc, first.id)
        blocker.rollback()
    consumer.join(120)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_RUNNING")
    assert "manual backup" in message
    assert created[-1].backup.state == pb.BACKUP_STATE_READY


def test_bad_unknown_and_unusable_ids(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    assert _refused(svc, "../etc/passwd")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(svc, "")[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(svc, "aperture-backup-2020-01-01T00-00-00-000000Z-0000.sql.gz")[0] == grpc.StatusCode.NOT_FOUND

    # A FAILED backup holds nothing to restore.
    app = svc.server.app
    failed = app.store.begin(DEFAULT_KIND, Trigger.MANUAL).abort("pg_dump failed")
    code, reason, message = _refused(svc, failed.id)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BACKUP_FAILED")
    assert "pg_dump failed" in message


def test_application_holding_locks_makes_the_restore_fail_cleanly(
    seeded_db: Database, service_factory: StartService
) -> None:
    """In place, the restore must wait for the application's locks; it gives up cleanly (a staging restore
    does not wait: it cuts the application's sessions at the swap, see the next test)."""
    svc = service_factory(seeded_db.uri, restore_isolation="in-place")
    backup = svc.client.create()
    _change_everything(seeded_db.uri)
    before = fingerprint(seeded_db.uri)
    svc.server.app.restores.lock_timeout_seconds = 1.0
    with psycopg.connect(seeded_db.uri) as application:
        application.execute("SELECT count(*) FROM public.movies")  # holds its lock until the transaction ends
        code, reason, message = _refused(svc, backup.id)
        application.rollback()
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESTORE_FAILED")
    assert "lock timeout" in message
    assert_same(before, fingerprint(seeded_db.uri))


def test_a_staging_restore_cuts_the_sessions_that_hold_locks(
    seeded_db: Database, service_factory: StartService
) -> None:
    svc = service_factory(seeded_db.uri)  # a superuser: staging, by default
    expected = fingerprint(seeded_db.uri)
    backup = svc.client.create()
    _change_everything(seeded_db.uri)
    with psycopg.connect(seeded_db.uri) as application:
        application.execute("SELECT count(*) FROM public.movies")  # holds its lock until the transaction ends
        _restore(svc, backup.id, skip_safety_backup=True)
        with pytest.raises(psycopg.OperationalError):
            application.execute("SELECT 1")
    assert_same(expected, fingerprint(seeded_db.uri))


def _write_compressed(path: Path, parts: list[bytes], compression: Compression) -> None:
    if compression is Compression.GZIP:
        path.write_bytes(b"".join(gzip.compress(p) for p in parts))
    else:
        path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD], ids=["gzip", "zstd"])
def test_archive_reader_checks_the_stream_while_reading(tmp_path: Path, compression: Compression) -> None:
    parts = [b"SELECT 1;\n" * 300_000, b"SELECT 2;\n" * 10]  # several members/frames, as pigz or cat make
    path = tmp_path / "archive"
    _write_compressed(path, parts, compression)
    reader = ArchiveReader(path, compression)
    assert b"".join(reader.chunks()) == b"".join(parts)
    reader.verify(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(DataLoss, match="SHA-256"):
        reader.verify("0" * 64)

    good = path.read_bytes()
    for damaged in (good[:-3], good + b"trailing garbage", good[: len(good) // 2]):
        path.write_bytes(damaged)
        with pytest.raises(DataLoss):
            b"".join(ArchiveReader(path, compression).chunks())


def test_large_objects_are_restored(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    with psycopg.connect(seeded_db.uri) as conn:
        original = conn.execute("SELECT oid::bigint FROM pg_largeobject_metadata ORDER BY oid").fetchall()
    assert original, "the seed must hold large objects"
    backup = svc.client.create()
    _change_everything(seeded_db.uri)
    _restore(svc, backup.id, skip_safety_backup=True)
    with psycopg.connect(seeded_db.uri) as conn:
        assert conn.execute("SELECT oid::bigint FROM pg_largeobject_metadata ORDER BY oid").fetchall() == original


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, ("256MB", "1")),
        ({"restore_maintenance_work_mem": "1GB", "restore_workers": 0}, ("1GB", "0")),
        ({"restore_maintenance_work_mem": "", "restore_workers": None}, ("64MB", "2")),
    ],
    ids=["defaults", "configured", "server"],
)
def test_index_builds_get_the_configured_memory_and_workers(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
    settings: dict[str, Any],
    expected: tuple[str, str],
) -> None:
    """What the archive's own statements (its index builds) see in the restore's session: the settings of
    APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM and _WORKERS, or with 'server' PostgreSQL's defaults."""
    db = make_database(pg16)
    svc = service_factory(db.uri, **settings)
    archive = tmp_path / "settings.sql"
    archive.write_text(
        "CREATE TABLE public.seen AS SELECT current_setting('maintenance_work_mem') AS memory,\n"
        "    current_setting('max_parallel_maintenance_workers') AS workers;\n"
    )
    svc.client.upload(archive, restore=True, skip_safety_backup=True)
    with psycopg.connect(db.uri) as conn:
        row = conn.execute("SELECT memory, workers FROM public.seen").fetchone()
        server = conn.execute("SHOW maintenance_work_mem").fetchone()
    assert row == expected
    assert server == ("64MB",), "the server's own setting is unchanged"


@pytest.mark.parametrize("workers", [1, 0])
def test_hnsw_builds_of_embeddings_get_a_parallel_worker(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
    workers: int,
) -> None:
    """An embeddings table keeps its vectors in TOAST, so its heap stays far below PostgreSQL's 8MB
    threshold for parallel index builds: without the restore's own threshold its HNSW graph is built on one
    core however many workers are allowed. Seen from the server: a parallel worker led by the restore's
    session while the archive's HNSW index builds, and none when APERTURE_BACKUP_RESTORE_WORKERS=0."""
    db = make_database(pg16)
    svc = service_factory(db.uri, restore_workers=workers)
    archive = tmp_path / "embeddings.sql"
    archive.write_text(
        "CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;\n"
        "CREATE TABLE public.embeddings (id integer PRIMARY KEY, embedding public.halfvec(1536) NOT NULL);\n"
        "SELECT pg_catalog.setseed(0.5);\n"
        "INSERT INTO public.embeddings SELECT i, (SELECT array_agg(random()::real)"
        " FROM generate_series(1, 1536 + 0 * i))::public.halfvec(1536) FROM generate_series(1, 3000) AS i;\n"
        "CREATE INDEX embeddings_hnsw ON public.embeddings USING hnsw (embedding public.halfvec_cosine_ops);\n"
    )
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        # From another database: a staging restore's swap ends the sessions of the live one.
        with psycopg.connect(pg16.database_uri("postgres"), autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity AS w JOIN pg_stat_activity AS l ON l.pid = w.leader_pid "
                    "WHERE w.backend_type = 'parallel worker' AND l.application_name LIKE 'aperture-backup-restore-%'"
                ).fetchone()
                seen.append(row[0] if row else 0)
                done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        svc.client.upload(archive, restore=True, skip_safety_backup=True)
    finally:
        done.set()
        watcher.join()
    with psycopg.connect(db.uri) as conn:
        assert conn.execute("SELECT count(*) FROM public.embeddings").fetchone() == (3000,)
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'embeddings_hnsw'").fetchone()
        reloptions = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'embeddings'").fetchone()
    assert index is not None and "hnsw" in index[0]
    assert reloptions == (None,), "the table is left as the archive made it"
    assert (max(seen) >= 1) == (workers > 0), f"parallel workers seen while restoring: {max(seen)}"

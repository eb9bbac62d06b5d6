"""A new archive is made by a child process (archive_worker.py): pg_dump's output goes into it, and it
compresses, encrypts, hashes and counts into the archive's temporary file. When it dies, the backup fails
at once with the reason, and nothing of it is kept. Real PostgreSQL 16, real pg_dump, real signals.

A lock on a live table keeps pg_dump waiting, after the worker has started, for as long as a test needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import psycopg
import pytest
from psycopg import sql

from aperture.backup.v1 import backup_pb2 as pb
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, pg_dump_waits_for_a_lock, public_tables, table_lock
from tests.support.service import (
    StartService,
    archive_workers,
    pg_dump_children,
    process_alive,
    service_process,
    wait_for,
)


@pytest.fixture
def db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=20)


def test_a_killed_archive_worker_fails_the_backup_at_once_and_leaves_nothing(
    db: Database, service_factory: StartService
) -> None:
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        call = svc.client.stub.Create(pb.CreateRequest(), timeout=300)
        first = next(call)
        wait_for(lambda: pg_dump_waits_for_a_lock(db.uri), timeout=60)
        [worker] = archive_workers()
        worker.kill()
        # Still inside the lock: the backup does not wait for pg_dump to notice, at its next write.
        with pytest.raises(grpc.RpcError) as ended:
            list(call)
        assert pg_dump_children(database=db.dbname) == []
    assert ended.value.code() is grpc.StatusCode.INTERNAL, ended.value.details()
    assert "the archive worker was killed by signal 9 before it finished" in (ended.value.details() or "")
    failed = svc.client.get(first.backup.id)
    assert failed.state == pb.BACKUP_STATE_FAILED and "archive worker" in failed.error
    assert [p.name for p in svc.backup_dir.iterdir() if p.name.startswith(".tmp-")] == []
    assert archive_workers() == []
    assert svc.client.create().state == pb.BACKUP_STATE_READY, "the job lock is free"


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_GZIP),
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_ZSTD),
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_NONE),
        (pb.BACKUP_FORMAT_CUSTOM, pb.COMPRESSION_UNSPECIFIED),
    ],
)
def test_what_the_worker_reports_is_what_the_file_holds(
    db: Database, service_factory: StartService, fmt: pb.BackupFormat.ValueType, compression: pb.Compression.ValueType
) -> None:
    svc = service_factory(db.uri)
    backup = svc.client.create(format=fmt, compression=compression)
    data = (svc.backup_dir / backup.filename).read_bytes()
    assert backup.size_bytes == len(data)
    assert backup.sha256 == hashlib.sha256(data).hexdigest()
    # The rows it counted as the dump streamed by: every table of the seed, each with the rows it has.
    expected = {}
    with psycopg.connect(db.uri) as conn:
        for table in public_tables(db.uri):
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table))
            [(count,)] = conn.execute(query).fetchall()
            expected[f"public.{table}"] = count
    assert dict(backup.table_rows) == expected
    assert archive_workers() == []


def test_a_killed_service_takes_its_worker_and_pg_dump_with_it(
    pg16: PgServer, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """pg_dump learns that the service is gone at its next log line (its stderr went to the service), the
    worker at the end of its input or at its next report (a few times a second), whichever comes first: no
    orphan goes on writing a whole archive nobody will keep."""
    db = make_database(pg16)
    with psycopg.connect(db.uri) as conn:  # about 60 MB of SQL that gzip cannot shrink much
        conn.execute(
            "CREATE TABLE public.hashes AS SELECT g AS id, md5(g::text) || md5((g + 1)::text) || "
            "md5((g + 2)::text) || md5((g + 3)::text) AS body FROM generate_series(1, 400000) AS g"
        )
    backup_dir = tmp_path / "backups"
    with service_process(backup_dir, tmp_path / "serve.log", DATABASE_URL=db.uri) as svc:
        whole = svc.client.create(format=pb.BACKUP_FORMAT_PLAIN).size_bytes
        with table_lock(db.uri, "public.hashes") as holder:
            call = svc.client.stub.Create(pb.CreateRequest(format=pb.BACKUP_FORMAT_PLAIN), timeout=300)
            next(call)
            wait_for(lambda: pg_dump_waits_for_a_lock(db.uri), timeout=60)
            [worker] = archive_workers(svc.process.pid)
            [pg_dump] = pg_dump_children(svc.process.pid, database=db.dbname)
            svc.kill()
            holder.rollback()  # pg_dump goes on, and writes
            wait_for(lambda: not process_alive(worker.pid) and not process_alive(pg_dump.pid), timeout=60)
    [temporary] = [p for p in backup_dir.iterdir() if p.name.startswith(".tmp-")]
    assert temporary.stat().st_size < whole // 4, (temporary.stat().st_size, whole)

"""Stopping a job: Cancel, the restore time limit and SIGTERM end a restore stuck in a statement that takes
forever (`pg_sleep`), and a backup stuck behind a lock, at once, with nothing changed and nothing left
running: no psql or pg_dump, no server process, no lock."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.isolation import STAGING_MARK
from aperture_backup_client import BackupClient
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.service import (
    SLEEPER,
    SLEEPER_SQL,
    CallInThread,
    RunningService,
    StartService,
    archive_workers,
    clean_environment,
    error_reason,
    free_port,
    pg_dump_children,
    serve_process,
    wait_for,
)


@pytest.fixture
def db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=20)


def _sleepers(uri: str) -> list[int]:
    """Server processes running the archive's pg_sleep."""
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE query LIKE '%pg_sleep(100000)%' "
            "AND pid <> pg_catalog.pg_backend_pid()"
        ).fetchall()
    return [int(r[0]) for r in rows]


def _psql_children(pid: int | None = None) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if child.name() == "psql":
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def _start_sleeping_restore(svc: RunningService, uri: str) -> CallInThread:
    (svc.backup_dir / SLEEPER).write_bytes(SLEEPER_SQL)
    call = svc.client.stub.Restore(pb.RestoreRequest(id=SLEEPER, skip_safety_backup=True), timeout=300)
    running = CallInThread(call)
    wait_for(lambda: _sleepers(uri), timeout=60)
    return running


def test_cancel_stops_a_restore_stuck_in_a_statement(db: Database, service_factory: StartService) -> None:
    svc = service_factory(db.uri)
    before = fingerprint(db.uri)
    running = _start_sleeping_restore(svc, db.uri)
    assert _psql_children()

    started = time.monotonic()
    response = svc.client.cancel(SLEEPER)
    assert response.stopped and response.job.kind == pb.JOB_KIND_RESTORE
    running.join(30)
    assert time.monotonic() - started < 20
    assert running.error is not None and running.error.code() is grpc.StatusCode.ABORTED
    assert error_reason(running.error) == "CANCELLED"
    assert "cancelled: a Cancel call asked for it" in (running.error.details() or "")

    assert_same(before, fingerprint(db.uri))
    assert _sleepers(db.uri) == [], "the server process was ended, not left holding its locks"
    assert _psql_children() == []
    assert not svc.client.status().HasField("current_job")
    # The job lock is free: a backup runs at once.
    assert svc.client.create().state == pb.BACKUP_STATE_READY


def test_a_restore_past_its_time_limit_is_rolled_back(db: Database, service_factory: StartService) -> None:
    svc = service_factory(db.uri, restore_timeout=3.0)
    before = fingerprint(db.uri)
    running = _start_sleeping_restore(svc, db.uri)
    running.join(60)
    assert running.error is not None and running.error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_reason(running.error) == "RESTORE_TIMEOUT"
    assert "APERTURE_BACKUP_RESTORE_TIMEOUT" in (running.error.details() or "")
    assert_same(before, fingerprint(db.uri))
    assert _sleepers(db.uri) == [] and _psql_children() == []


def test_cancel_stops_a_backup_waiting_for_a_lock(db: Database, service_factory: StartService) -> None:
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        call = svc.client.stub.Create(pb.CreateRequest(), timeout=300)
        first = next(call)
        wait_for(pg_dump_children)
        wait_for(archive_workers)
        response = svc.client.cancel(first.backup.id)
        assert response.stopped
        with pytest.raises(grpc.RpcError) as ended:
            list(call)
    assert ended.value.code() is grpc.StatusCode.ABORTED and error_reason(ended.value) == "CANCELLED"
    assert pg_dump_children() == []
    assert archive_workers() == []
    listed = svc.client.get(first.backup.id)
    assert listed.state == pb.BACKUP_STATE_FAILED and "cancelled" in listed.error
    assert [p.name for p in svc.backup_dir.iterdir() if p.name.startswith(".tmp-")] == []


def test_cancel_says_what_is_wrong(db: Database, service_factory: StartService) -> None:
    svc = service_factory(db.uri)
    for backup_id, code, reason in (
        ("", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BACKUP_ID"),
        ("aperture-backup-x.sql.gz", grpc.StatusCode.FAILED_PRECONDITION, "NO_JOB"),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            svc.client.cancel(backup_id)
        assert (refused.value.code(), error_reason(refused.value)) == (code, reason)
    running = _start_sleeping_restore(svc, db.uri)
    try:
        with pytest.raises(grpc.RpcError) as other:
            svc.client.cancel("aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz")
        assert other.value.code() is grpc.StatusCode.NOT_FOUND
        assert "a restore of sleeper.sql" in (other.value.details() or "")
    finally:
        svc.client.cancel(SLEEPER)
        running.join(30)


def test_sigterm_ends_a_stuck_restore_at_once(db: Database, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    (backup_dir / SLEEPER).write_bytes(SLEEPER_SQL)
    before = fingerprint(db.uri)
    port = free_port()
    args = ("--listen", f"127.0.0.1:{port}", "--dir", str(backup_dir), "--schedule", "off", "--catch-up", "false")
    proc = serve_process(
        *args, env=clean_environment(DATABASE_URL=db.uri), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with BackupClient(f"127.0.0.1:{port}") as client:
            wait_for(lambda: _answers(client), timeout=60)
            call = client.stub.Restore(pb.RestoreRequest(id=SLEEPER, skip_safety_backup=True), timeout=300)
            running = CallInThread(call)
            wait_for(lambda: _sleepers(db.uri), timeout=60)
            children = _psql_children(proc.pid)
            assert children
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            assert time.monotonic() - started < 10
            running.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "no orphaned psql"
    wait_for(lambda: not _sleepers(db.uri), timeout=15)
    assert_same(before, fingerprint(db.uri))


def _answers(client: BackupClient) -> bool:
    try:
        client.status()
    except grpc.RpcError:
        return False
    return True


def test_a_restore_interrupted_by_sigkill_is_known_after_the_restart(db: Database, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    (backup_dir / SLEEPER).write_bytes(SLEEPER_SQL)
    before = fingerprint(db.uri)
    environment = clean_environment(DATABASE_URL=db.uri)

    def serve(port: int) -> subprocess.Popen[bytes]:
        listen = f"127.0.0.1:{port}"
        args = ("--listen", listen, "--dir", str(backup_dir), "--schedule", "off", "--catch-up", "false")
        return serve_process(*args, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    port = free_port()
    first = serve(port)
    try:
        with BackupClient(f"127.0.0.1:{port}") as client:
            wait_for(lambda: _answers(client), timeout=60)
            call = client.stub.Restore(pb.RestoreRequest(id=SLEEPER, skip_safety_backup=True), timeout=300)
            running = CallInThread(call)
            wait_for(lambda: _sleepers(db.uri), timeout=60)
            assert list((backup_dir / ".state" / "tmp").iterdir()), "the restore's working files are there"
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            running.join(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert _sleepers(db.uri), "PostgreSQL alone does not notice: the statement still runs"

    port = free_port()
    second = serve(port)
    try:
        with BackupClient(f"127.0.0.1:{port}") as client:
            wait_for(lambda: _answers(client), timeout=60)
            status = client.status()
            assert status.HasField("interrupted_job")
            job = status.interrupted_job
            assert job.kind == pb.JOB_KIND_RESTORE and job.backup_id == SLEEPER
            assert "interrupted" in job.progress.message and "as it was" in job.progress.message
            [history] = client.list_jobs()  # the killed process recorded nothing; the restart did
            assert (history.kind, history.outcome) == (pb.JOB_KIND_RESTORE, pb.JOB_OUTCOME_INTERRUPTED)
            assert history.backup_id == SLEEPER and history.error_reason == "INTERRUPTED"
            assert history.caller_address.startswith("127.0.0.1:"), "who started it, from the journal"
            wait_for(lambda: not _sleepers(db.uri), timeout=15)  # the restart ended the orphaned session
            assert list((backup_dir / ".state" / "tmp").iterdir()) == []
            with psycopg.connect(db.uri) as conn:  # and dropped the staging database it loaded into
                staged = conn.execute(
                    "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE %s", (f"{db.dbname}{STAGING_MARK}%",)
                ).fetchall()
            assert staged == []
            assert_same(before, fingerprint(db.uri))

            # A later restore supersedes the record.
            backup = client.create()
            list(client.stub.Restore(pb.RestoreRequest(id=backup.id, skip_safety_backup=True), timeout=300))
            assert not client.status().HasField("interrupted_job")
            assert [j.outcome for j in client.list_jobs()] == [
                pb.JOB_OUTCOME_SUCCEEDED,
                pb.JOB_OUTCOME_SUCCEEDED,
                pb.JOB_OUTCOME_INTERRUPTED,
            ]
    finally:
        second.terminate()
        second.wait(timeout=30)

"""Backups run at lower CPU priority than the calls people wait on (issue 16: List and GetStatus while a
backup runs). Real PostgreSQL 16, real pg_dump; the service runs in this process, so its threads and its
pg_dump are this process's, and their nice values are read from the kernel.

A lock on a live table keeps pg_dump waiting, after it has started, for as long as a test needs."""

from __future__ import annotations

import contextlib
import os
import threading

import grpc
import psutil
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.priority import BACKGROUND_NICENESS
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, pg_dump_waits_for_a_lock, table_lock
from tests.support.service import (
    SLEEPER,
    SLEEPER_SQL,
    RestoreCall,
    StartService,
    archive_workers,
    pg_dump_children,
    wait_for,
)


@pytest.fixture
def db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=20)


def _nice_of_thread(name: str) -> int:
    [thread] = [t for t in threading.enumerate() if t.name == name and t.native_id is not None]
    assert thread.native_id is not None
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


def _niced_threads(base: int) -> int:
    """How many threads of this process run at a lower priority than `base` (a thread may end between
    the listing and the look)."""
    lowered = 0
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):
            lowered += os.getpriority(os.PRIO_PROCESS, int(tid)) > base
    return lowered


def _psql_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() == "psql"]


def test_a_backup_and_its_pg_dump_yield_the_cpu_and_the_rpcs_do_not(
    db: Database, service_factory: StartService
) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        call = svc.client.stub.Create(pb.CreateRequest(), timeout=300)
        first = next(call)
        wait_for(lambda: pg_dump_waits_for_a_lock(db.uri), timeout=60)
        [pg_dump] = pg_dump_children(database=db.dbname)
        assert pg_dump.nice() == base + BACKGROUND_NICENESS
        # The process that compresses, hashes and counts the archive, and every thread of it.
        wait_for(archive_workers, timeout=60)
        [worker] = archive_workers()
        assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in worker.threads()} == {base + BACKGROUND_NICENESS}
        assert _nice_of_thread("job-backup") == base + BACKGROUND_NICENESS
        # The job's thread at least; the process itself (and so every thread started later, the RPC threads'
        # pool included) keeps its priority.
        assert _niced_threads(base) >= 1
        assert svc.client.status().current_job.backup_id == first.backup.id
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
    *_, last = call
    assert last.backup.state == pb.BACKUP_STATE_READY
    # The priority ended with the job's threads: none of the threads that outlive it was lowered.
    wait_for(lambda: _niced_threads(base) == 0, timeout=30)


def test_a_safety_backup_yields_the_cpu_to_the_restore_it_guards(db: Database, service_factory: StartService) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    svc = service_factory(db.uri)
    backup = svc.client.create()
    with table_lock(db.uri) as holder:
        running = RestoreCall(svc, backup.id)
        wait_for(lambda: pg_dump_waits_for_a_lock(db.uri), timeout=60)
        [pg_dump] = pg_dump_children(database=db.dbname)
        assert pg_dump.nice() == base + BACKGROUND_NICENESS
        assert _nice_of_thread("safety-backup") == base + BACKGROUND_NICENESS
        [worker] = archive_workers()
        assert worker.nice() == base + BACKGROUND_NICENESS
        assert _nice_of_thread("job-restore") == base, "the restore's load is what the caller waits for"
        holder.rollback()
        running.join()
    assert running.error is None, running.failure()
    wait_for(lambda: _niced_threads(base) == 0, timeout=30)


def test_a_verification_and_its_load_yield_the_cpu(db: Database, service_factory: StartService) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    svc = service_factory(db.uri)
    # A hand-made archive whose load sleeps in the scratch database until the verification is cancelled.
    (svc.backup_dir / SLEEPER).write_bytes(SLEEPER_SQL)
    call = svc.client.stub.Verify(pb.VerifyRequest(id=SLEEPER), timeout=300)
    next(call)
    wait_for(_psql_children, timeout=60)
    [psql] = _psql_children()
    assert psql.nice() == base + BACKGROUND_NICENESS
    assert _nice_of_thread("job-verify") == base + BACKGROUND_NICENESS
    assert svc.client.cancel(SLEEPER).stopped
    with pytest.raises(grpc.RpcError):
        list(call)
    wait_for(lambda: _niced_threads(base) == 0, timeout=30)

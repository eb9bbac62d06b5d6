"""Verify against real servers: an archive restored into a scratch database beside the live one, checked
and dropped. A good backup passes; one whose archive was edited by hand to lose rows fails, and says so in
Get, List, GetStatus and the Prometheus endpoint; the live database is never touched; a role that may not
create databases gets a FAILED_PRECONDITION that says why."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from datetime import UTC, datetime
from datetime import time as time_of_day
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
import time_machine
from psycopg import sql
from psycopg.conninfo import make_conninfo

from aperture_backup.jobs import Job, JobKind
from aperture_backup.model import State, Trigger, Verification
from aperture_backup_client import pb
from tests.support.age import age_keygen
from tests.support.archives import TABLE_WITHOUT_REFERENCES, drop_copy_rows, reseal_manifest
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.metrics import scrape
from tests.support.postgres import PgServer
from tests.support.receiver import Receiver
from tests.support.service import (
    SLEEPER,
    SLEEPER_SQL,
    StartApp,
    StartService,
    free_port,
    process_alive,
    service_process,
    wait_for,
)

EDITED_TABLE = TABLE_WITHOUT_REFERENCES


def _scratch_databases(server: PgServer, live: str) -> list[str]:
    with psycopg.connect(server.uri) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_catalog.pg_database WHERE starts_with(datname, %s)", (f"{live}_aperture_restore_",)
        ).fetchall()
    return [str(r[0]) for r in rows]


@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["plain", "custom"])
def test_a_good_backup_passes_and_the_live_database_is_untouched(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, fmt: pb.BackupFormat.ValueType
) -> None:
    db = make_database(pg16, seeded=True, rows=30)
    svc = service_factory(
        db.uri, verify_sql="SELECT count(*) > 0 FROM users", metrics_listen=f"127.0.0.1:{free_port()}"
    )
    backup = svc.client.create(format=fmt)
    before = fingerprint(db.uri)
    phases: list[int] = []
    verified = svc.client.verify(on_progress=lambda m: phases.append(m.progress.phase))

    assert verified.id == backup.id, "without an id, the newest READY backup"
    assert verified.verify_result == pb.VERIFY_RESULT_PASSED, verified.verify_message
    assert "row_counts" in verified.verify_message and "verify_sql" in verified.verify_message
    assert abs(verified.verify_time.ToDatetime(UTC) - datetime.now(UTC)).total_seconds() < 300
    assert pb.PHASE_RESTORING in phases and pb.PHASE_CHECKING in phases
    assert svc.client.get(backup.id).verify_result == pb.VERIFY_RESULT_PASSED
    status = svc.client.status()
    assert status.last_verified_backup.id == backup.id
    assert status.last_verify_success_time == verified.verify_time
    assert_same(before, fingerprint(db.uri))
    assert _scratch_databases(pg16, db.dbname) == [], "the scratch database is dropped"
    samples = scrape(svc)
    assert samples[("aperture_backup_last_verify_success_timestamp_seconds", ())] == pytest.approx(
        verified.verify_time.ToDatetime(UTC).timestamp()
    )
    assert (
        samples[("aperture_backup_runs_total", (("kind", "verify"), ("result", "success"), ("trigger", "manual")))] == 1
    )


def test_an_archive_that_lost_rows_fails_and_is_reported(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=30)
    receiver = Receiver().start()
    svc = service_factory(db.uri, metrics_listen=f"127.0.0.1:{free_port()}", notify_urls=(receiver.url,))
    good = svc.client.create()
    svc.client.verify(good.id)
    edited = svc.client.create()
    drop_copy_rows(svc.backup_dir / edited.id, EDITED_TABLE, 2)
    reseal_manifest(svc.backup_dir, edited.id)
    ended: list[Job] = []
    svc.server.app.slot.on_end.append(ended.append)

    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify(edited.id)

    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "row_counts" in (info.value.details() or "")
    assert f"{EDITED_TABLE} has 3 rows, the backup recorded 5" in (info.value.details() or "")
    shown = svc.client.get(edited.id)
    assert shown.verify_result == pb.VERIFY_RESULT_FAILED
    assert shown.verify_failed_check == "row_counts"
    assert f"{EDITED_TABLE} has 3 rows" in shown.verify_message
    listed = {b.id: b for b in svc.client.list()}
    assert listed[edited.id].verify_result == pb.VERIFY_RESULT_FAILED
    assert listed[good.id].verify_result == pb.VERIFY_RESULT_PASSED
    status = svc.client.status()
    assert status.last_verified_backup.id == edited.id
    assert status.last_verified_backup.verify_result == pb.VERIFY_RESULT_FAILED
    assert status.last_verify_success_time == listed[good.id].verify_time
    # The hook a notifier subscribes to: the job ended, with the backup and its verification.
    wait_for(lambda: ended)
    assert ended[0].kind is JobKind.VERIFY and ended[0].error is not None
    assert ended[0].error.reason == "VERIFY_FAILED" and ended[0].error.metadata["check"] == "row_counts"
    assert ended[0].backup is not None and ended[0].backup.verification is not None
    assert not ended[0].backup.verification.passed
    samples = scrape(svc)
    assert (
        samples[("aperture_backup_last_verify_timestamp_seconds", ())]
        > (samples[("aperture_backup_last_verify_success_timestamp_seconds", ())])
    ), "the alert rule of the README: the last verification failed"
    assert (
        samples[("aperture_backup_runs_total", (("kind", "verify"), ("result", "failure"), ("trigger", "manual")))] == 1
    )
    assert _scratch_databases(pg16, db.dbname) == []
    # And a person hears of it: one notification (failures only, by default) to a real webhook receiver.
    try:
        (told,) = receiver.wait_for(1)
        assert told["type"] == "failure" and "verif" in told["title"].lower(), told
        assert edited.id in told["message"] and "row_counts" in told["message"], told
    finally:
        receiver.stop()


def test_the_operators_query_must_return_true(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=10)
    svc = service_factory(db.uri, verify_sql="SELECT count(*) > 1000 FROM users")
    backup = svc.client.create()
    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify(backup.id)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    shown = svc.client.get(backup.id)
    assert shown.verify_failed_check == "verify_sql"
    assert "returned False" in shown.verify_message


def _role(server: PgServer, name: str, *, createdb: bool) -> str:
    """A login role that is not a superuser; its connection string to the server's maintenance database."""
    with psycopg.connect(server.uri, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'verify-test-password' {}").format(
                sql.Identifier(name), sql.SQL("CREATEDB" if createdb else "NOCREATEDB")
            )
        )
    return make_conninfo(server.uri, user=name, password="verify-test-password")


def _own_database(server: PgServer, make_database: MakeDatabase, role: str, role_uri: str) -> Database:
    db = make_database(server)
    with psycopg.connect(server.database_uri(db.dbname), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db.dbname), sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(role)))
    uri = make_conninfo(role_uri, dbname=db.dbname)
    with psycopg.connect(uri) as conn:
        conn.execute("CREATE TABLE public.notes (id serial PRIMARY KEY, body text)")
        conn.execute("INSERT INTO public.notes (body) SELECT 'note ' || g FROM generate_series(1, 25) g")
    return Database(server=server, uri=uri, dbname=db.dbname)


def test_a_role_that_may_create_databases_verifies_as_itself(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    role_uri = _role(pg16, "aperture_verify_creator", createdb=True)
    db = _own_database(pg16, make_database, "aperture_verify_creator", role_uri)
    svc = service_factory(db.uri)
    svc.client.create()
    verified = svc.client.verify()
    assert verified.verify_result == pb.VERIFY_RESULT_PASSED, verified.verify_message
    assert dict(verified.table_rows) == {"public.notes": 25}
    assert _scratch_databases(pg16, db.dbname) == []


def test_a_role_that_may_not_create_databases_verifies_in_a_throwaway_server(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    role_uri = _role(pg16, "aperture_verify_plain", createdb=False)
    db = _own_database(pg16, make_database, "aperture_verify_plain", role_uri)
    with psycopg.connect(db.uri) as conn:
        conn.execute("DELETE FROM public.notes WHERE id > 20")
    svc = service_factory(db.uri, pg_bin_dir=pg16.bin_dir)
    good = svc.client.create()
    verified = svc.client.verify(good.id)
    assert verified.verify_result == pb.VERIFY_RESULT_PASSED, verified.verify_message
    assert dict(verified.table_rows) == {"public.notes": 20}
    assert _scratch_databases(pg16, db.dbname) == [], "nothing was made on the live server"
    # It really checks there: an archive that lost rows fails in the throwaway server too.
    edited = svc.client.create(format=pb.BACKUP_FORMAT_PLAIN)
    drop_copy_rows(svc.backup_dir / edited.id, "public.notes", 3)
    reseal_manifest(svc.backup_dir, edited.id)
    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify(edited.id)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    assert "public.notes has 17 rows, the backup recorded 20" in (info.value.details() or "")
    leftovers = [p for p in Path(tempfile.gettempdir()).glob("aperture-verify-server-*")]
    assert leftovers == [], "the throwaway server's directory is deleted"


def test_a_throwaway_server_a_killed_service_left_running_is_stopped_at_the_next_start(
    pg16: PgServer, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """SIGKILL in the middle of a verification leaves its throwaway server running, with its directory; the
    next start of the service stops that server and deletes the directory."""
    role_uri = _role(pg16, "aperture_verify_plain", createdb=False)
    db = _own_database(pg16, make_database, "aperture_verify_plain", role_uri)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    # A hand-made archive whose load sleeps in the throwaway server until the service dies.
    (backup_dir / SLEEPER).write_bytes(SLEEPER_SQL)
    settings = {"DATABASE_URL": db.uri, "PG_BIN_DIR": str(pg16.bin_dir)}
    found: list[psutil.Process] = []
    data_dir: Path | None = None
    try:
        with service_process(backup_dir, tmp_path / "first.log", **settings) as first:
            call = first.client.stub.Verify(pb.VerifyRequest(id=SLEEPER), timeout=300)
            next(call)

            def loading_postmaster() -> bool:
                """The throwaway postmaster, once the verification's psql loads into it."""
                children = psutil.Process(first.process.pid).children(recursive=True)
                if not any(child.name() == "psql" for child in children):
                    return False
                found[:] = [c for c in children if c.name() == "postgres" and "-D" in c.cmdline()]
                return bool(found)

            wait_for(loading_postmaster, timeout=120)
            arguments = found[0].cmdline()
            data_dir = Path(arguments[arguments.index("-D") + 1])
            assert data_dir.parent.name.startswith("aperture-verify-server-")
            first.kill()
            call.cancel()
        assert process_alive(found[0].pid), "the killed service's throwaway server runs on (the case this test is for)"
        assert data_dir is not None and data_dir.is_dir()
        with service_process(backup_dir, tmp_path / "second.log", **settings) as second:
            assert not process_alive(found[0].pid), "the orphaned server was stopped"
            assert not data_dir.parent.exists(), "its directory was deleted"
            assert "a throwaway verification server a stopped service left behind" in second.log()
    finally:
        # A failed run must not leave a server or a directory that fails the other tests.
        for server in found:
            if process_alive(server.pid):
                os.kill(server.pid, signal.SIGKILL)
        if data_dir is not None:
            shutil.rmtree(data_dir.parent, ignore_errors=True)


def test_without_createdb_or_a_server_of_the_same_major_it_says_why_it_cannot_verify(
    pg16: PgServer, pg18: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    role_uri = _role(pg16, "aperture_verify_plain", createdb=False)
    db = _own_database(pg16, make_database, "aperture_verify_plain", role_uri)
    svc = service_factory(db.uri)
    # Only PostgreSQL 18's server where it looks for one: a throwaway server must be of the live one's major.
    svc.server.app.verifier.server_tool_dirs = [pg18.bin_dir]
    backup = svc.client.create()
    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify(backup.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "may not create databases" in (info.value.details() or "")
    assert "CREATEDB" in (info.value.details() or "") and "PostgreSQL 16 server" in (info.value.details() or "")
    assert svc.client.get(backup.id).verify_result == pb.VERIFY_RESULT_UNSPECIFIED, "no verdict recorded"


def test_verify_refuses_what_it_cannot_verify(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16)
    svc = service_factory(db.uri)
    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no READY backup" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        svc.client.verify("../etc/passwd")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_scheduled_backup_is_verified_when_due(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp
) -> None:
    db = make_database(pg16, seeded=True, rows=10)
    with time_machine.travel(datetime(2026, 12, 1, 0, 59, 50, tzinfo=UTC), tick=True):
        app = app_factory(
            db.uri, schedule_enabled=True, schedule_time=time_of_day(1, 0), time_zone="UTC", verify="weekly"
        )
        wait_for(lambda: any(b.verification is not None for b in app.backups.list_backups()), timeout=120)
        backup = app.backups.list_backups()[0]
        assert backup.trigger is Trigger.SCHEDULED and backup.state is State.READY
        assert backup.verification is not None and backup.verification.passed
        assert not app.verifier.due(), "weekly: the next one is due in a week"
    with time_machine.travel(datetime(2026, 12, 8, 1, 0, 0, tzinfo=UTC)):
        assert app.verifier.due()
    # After a failed verification, every scheduled backup is verified until one passes again.
    app.store.update(backup.id, lambda b: b.replace(verification=Verification(datetime.now(UTC), passed=False)))
    assert app.verifier.due()
    app.verifier.schedule = "off"
    assert not app.verifier.due()


@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["plain", "custom"])
def test_an_encrypted_backup_is_counted_and_verified(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
    fmt: pb.BackupFormat.ValueType,
) -> None:
    key = age_keygen(tmp_path / "key.txt")
    db = make_database(pg16, seeded=True, rows=15)
    svc = service_factory(db.uri, age_recipients=(key.public_key,), age_identity_file=key.identity_file)
    backup = svc.client.create(format=fmt)
    with psycopg.connect(db.uri) as conn:
        row = conn.execute("SELECT count(*) FROM public.users").fetchone()
    assert backup.encrypted and row is not None
    assert backup.table_rows["public.users"] == row[0], "counted before encryption"
    verified = svc.client.verify(backup.id)
    assert verified.verify_result == pb.VERIFY_RESULT_PASSED, verified.verify_message

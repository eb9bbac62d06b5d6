"""Staging restores (APERTURE_BACKUP_RESTORE_ISOLATION=staging) with the service connected as a superuser,
as the `postgres` image's POSTGRES_USER is: an archive's SQL runs as a role without the service's powers,
in a database of its own that replaces the live one only once everything has passed. Real servers, real
psql; what a hostile archive tries must fail and leave the live database exactly as it was."""

from __future__ import annotations

import gzip
from pathlib import Path

import grpc
import psycopg
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.isolation import RESTORE_ROLE, STAGING_MARK
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import RunningService, StartService, wait_for
from tests.test_restore import _TRAPS, _change_everything, _execute

MARKER = Path("/tmp/aperture-backup-isolation-marker")

#: What an archive restored by a superuser could do beyond the database, each hidden as a DO block or a
#: function call rather than a statement a text filter would see.
HOSTILE = {
    "copy-to-program": f"COPY (SELECT 1) TO PROGRAM 'touch {MARKER}';",
    "program-from-do": f"DO $$ BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {MARKER}'''; END $$;",
    "read-server-file": "CREATE TABLE public.loot AS SELECT pg_catalog.pg_read_file('/etc/passwd') AS data;",
    "superuser-role": "DO $$ BEGIN EXECUTE 'CREATE ROLE aperture_evil SUPERUSER LOGIN'; END $$;",
    "alter-system": "ALTER SYSTEM SET log_statement = 'all';",
    "large-object-import": "SELECT pg_catalog.lo_import('/etc/passwd');",
    "regain-superuser": "SET SESSION AUTHORIZATION postgres;",
    "write-server-file": f"COPY (SELECT 'x') TO '{MARKER}';",
}


def _staging(service_factory: StartService, db: Database) -> RunningService:
    return service_factory(db.uri, restore_isolation="staging")


def _leftover_databases(server: PgServer, db: Database) -> list[str]:
    """Staging databases of `db` still on the server."""
    with psycopg.connect(server.database_uri("postgres"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE %s", (f"{db.dbname}{STAGING_MARK}%",)
        )
        return [str(r[0]) for r in rows.fetchall()]


def _owned_by_restore_role(uri: str) -> int:
    with psycopg.connect(uri) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = %s",
            (RESTORE_ROLE,),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("server_name", ["pg16", "pg18"])
@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["sql.gz", "custom"])
def test_a_staging_restore_brings_back_exactly_the_backup(
    server_name: str,
    fmt: pb.BackupFormat.ValueType,
    request: pytest.FixtureRequest,
    make_database: MakeDatabase,
    service_factory: StartService,
) -> None:
    server: PgServer = request.getfixturevalue(server_name)
    db = make_database(server, seeded=True)
    _execute(db.uri, _TRAPS)
    svc = _staging(service_factory, db)
    expected = fingerprint(db.uri)
    backup = svc.client.create(format=fmt)
    _change_everything(db.uri)
    with psycopg.connect(db.uri, autocommit=True) as application:
        result = svc.client.restore(backup.id)
        # The application's connection was cut at the swap: it must reconnect, as the result says.
        with pytest.raises(psycopg.OperationalError):
            application.execute("SELECT 1")
    assert result.reconnect_required and result.safety_backup.trigger == pb.BACKUP_TRIGGER_PRE_RESTORE
    assert_same(expected, fingerprint(db.uri))
    assert _owned_by_restore_role(db.uri) == 0, "everything belongs to the database's owner again"
    wait_for(lambda: _leftover_databases(server, db) == [], timeout=30)  # the old one goes in the background
    # The safety backup is a real backup of what was there, and restores the same way.
    svc.client.restore(result.safety_backup.id, skip_safety_backup=True)
    with psycopg.connect(db.uri) as conn:
        assert conn.execute("SELECT count(*) FROM public.added_by_later_migration").fetchone() == (1,)


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_archive_cannot_reach_beyond_its_database(
    case: str, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    MARKER.unlink(missing_ok=True)
    db = make_database(pg16, seeded=True, rows=20)
    svc = _staging(service_factory, db)
    before = fingerprint(db.uri)
    archive = b"-- hand-made\nCREATE TABLE public.first (a int);\n" + HOSTILE[case].encode() + b"\n"
    (svc.backup_dir / f"{case}.sql.gz").write_bytes(gzip.compress(archive))

    with pytest.raises(grpc.RpcError) as refused:
        svc.client.restore(f"{case}.sql.gz", skip_safety_backup=True)

    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    assert "unchanged" in (refused.value.details() or "")
    assert not MARKER.exists(), "no program ran and no file was written on the database host"
    with psycopg.connect(pg16.database_uri("postgres")) as conn:
        assert conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'aperture_evil'").fetchone() is None
        assert conn.execute("SELECT current_setting('log_statement')").fetchone() != ("all",)
        auto_conf = conn.execute("SELECT count(*) FROM pg_catalog.pg_file_settings WHERE name = 'log_statement'")
        assert auto_conf.fetchone() == (0,)
    assert_same(before, fingerprint(db.uri))
    wait_for(lambda: _leftover_databases(pg16, db) == [], timeout=30)


def test_a_role_that_is_not_a_superuser_restores_in_place(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    """Such a role cannot do what a hostile archive wants anyway: the restore stays in place, in one
    transaction, and cuts no connection."""
    db = make_database(pg16)
    owner = f"app_{db.dbname[-8:]}"
    with psycopg.connect(pg16.database_uri("postgres"), autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER')
        conn.execute(f'ALTER DATABASE "{db.dbname}" OWNER TO "{owner}"')
    uri = db.uri + f" user={owner}"
    _execute(
        uri, "CREATE TABLE public.items (id int PRIMARY KEY, name text)", "INSERT INTO public.items VALUES (1, 'one')"
    )
    svc = service_factory(uri)
    expected = fingerprint(db.uri)  # read as a superuser: the fingerprint sets lc_messages
    backup = svc.client.create()
    _execute(uri, "INSERT INTO public.items VALUES (2, 'two')")
    with psycopg.connect(uri, autocommit=True) as application:
        svc.client.restore(backup.id, skip_safety_backup=True)
        assert application.execute("SELECT 1").fetchone() == (1,), "in place, no connection is cut"
    assert_same(expected, fingerprint(db.uri))
    wait_for(lambda: _leftover_databases(pg16, db) == [], timeout=30)
    svc.stop()

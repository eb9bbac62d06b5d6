"""Backups end to end: Create through the real server and tools, archives that restore by hand to the
same fingerprint, List/Get/Delete, id validation, retention, failures that leave no READY archive."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from aperture_backup.database import JOB_LOCK_KEY, PING_REUSE_SECONDS
from aperture_backup.database import Database as AppDatabase
from aperture_backup_client import pb
from tests.support.archives import restore_by_hand
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.service import RunningService, StartService, pg_dump_children, wait_for


def _files(directory: Path) -> list[str]:
    """Everything in the backup directory, temporary files included, but not the `.state` folder."""
    return sorted(p.name for p in directory.iterdir() if p.name != ".state")


def _error(info: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    error = info.value
    return error.code(), error.details() or ""


@pytest.mark.parametrize(
    ("fmt", "compression", "suffix"),
    [
        (pb.BACKUP_FORMAT_UNSPECIFIED, pb.COMPRESSION_UNSPECIFIED, ".sql.gz"),
        (pb.BACKUP_FORMAT_CUSTOM, pb.COMPRESSION_UNSPECIFIED, ".dump"),
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_ZSTD, ".sql.zst"),
    ],
    ids=["sql.gz", "custom", "sql.zst"],
)
def test_create_gives_an_archive_that_restores_by_hand_to_the_same_database(
    seeded_db: Database,
    make_database: MakeDatabase,
    service_factory: StartService,
    fmt: pb.BackupFormat.ValueType,
    compression: pb.Compression.ValueType,
    suffix: str,
) -> None:
    svc = service_factory(seeded_db.uri)
    before = fingerprint(seeded_db.uri)
    messages: list[pb.CreateResponse] = []
    backup = svc.client.create(format=fmt, compression=compression, on_progress=messages.append)

    assert backup.state == pb.BACKUP_STATE_READY
    assert backup.id.startswith("aperture-backup-") and backup.id.endswith(suffix)
    assert backup.trigger == pb.BACKUP_TRIGGER_MANUAL
    assert backup.database == seeded_db.dbname
    assert backup.server_version.split(".")[0] == str(seeded_db.server.major)
    assert backup.pg_dump_version.split(".")[0] == str(seeded_db.server.major)
    assert backup.duration.ToTimedelta().total_seconds() > 0
    archive = svc.backup_dir / backup.id
    assert archive.stat().st_size == backup.size_bytes
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == backup.sha256

    # Progress: the first message shows the backup CREATING; tables are counted against the total.
    assert messages[0].backup.state == pb.BACKUP_STATE_CREATING
    last = messages[-1].progress
    assert last.phase == pb.PHASE_DONE
    assert last.tables_total >= 10 and last.tables_done == last.tables_total
    assert last.bytes_done == backup.size_bytes

    target = make_database(seeded_db.server)
    restore_by_hand(archive, target)
    assert_same(before, fingerprint(target.uri))


def test_sql_gz_is_a_standard_gzip_stream(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True)
    svc = service_factory(db.uri)
    backup = svc.client.create()
    archive = svc.backup_dir / backup.id
    subprocess.run(["gzip", "-t", str(archive)], check=True)
    text = gzip.decompress(archive.read_bytes()).decode()
    assert "PostgreSQL database dump complete" in text
    assert "CREATE TABLE public.users" in text
    assert "CREATE EXTENSION IF NOT EXISTS vector" in text


def test_archives_and_manifests_are_private(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True)
    svc = service_factory(db.uri)
    backup = svc.client.create()
    assert stat.S_IMODE(svc.backup_dir.stat().st_mode) == 0o700
    for path in (svc.backup_dir / backup.id, svc.backup_dir / f"{backup.id}.manifest.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_backups_in_the_same_second_do_not_collide_and_list_newest_first(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True)
    svc = service_factory(db.uri)
    ids = [svc.client.create().id for _ in range(3)]
    assert len(set(ids)) == 3
    assert ids == sorted(ids), "names sort by time"
    listed = [b.id for b in svc.client.list()]
    assert listed == list(reversed(ids))


def _aperture_files(server: PgServer, db: Database, directory: Path) -> dict[str, Path]:
    """Files the way Aperture writes them itself, with the real tools."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    dump = directory / "aperture_backup_2026-01-02T01-00-00Z.dump"
    subprocess.run(
        [str(server.tool("pg_dump")), "--no-owner", "--no-acl", "-F", "c", "-Z", "6", "-d", db.uri, "-f", str(dump)],
        check=True,
        env=env,
    )
    sql = directory / "aperture_backup_2026-01-01T01-00-00Z.sql"
    subprocess.run([str(server.tool("pg_dump")), "-d", db.uri, "-f", str(sql)], check=True, env=env)
    sql_gz = directory / "aperture_backup_2025-12-31T01-00-00Z.sql.gz"
    with open(sql, "rb") as src, gzip.open(sql_gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    old = time.time() - 86400 * 30
    for index, path in enumerate((dump, sql, sql_gz)):
        os.utime(path, (old - index * 86400, old - index * 86400))
    return {"dump": dump, "sql": sql, "sql.gz": sql_gz}


def test_list_shows_files_the_service_did_not_make_recognised_by_content(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    files = _aperture_files(pg16, db, backup_dir)
    (backup_dir / "notes.txt").write_text("not an archive\n")
    (backup_dir / "renamed.sql.gz").write_bytes(b"this is not gzip at all")
    (backup_dir / ".tmp-aperture-backup-2026-01-01T00-00-00-000000Z-abcd.sql.gz").write_bytes(b"\x1f\x8bpartial")
    disguised = backup_dir / "mystery.bin"  # a custom-format archive with the wrong extension
    shutil.copy(files["dump"], disguised)

    svc = service_factory(db.uri, backup_dir=backup_dir)
    made = svc.client.create()
    listed = {b.id: b for b in svc.client.list()}

    assert set(listed) == {made.id, *(p.name for p in files.values()), "mystery.bin"}
    assert listed[files["dump"].name].format == pb.BACKUP_FORMAT_CUSTOM
    assert listed["mystery.bin"].format == pb.BACKUP_FORMAT_CUSTOM
    assert listed[files["sql.gz"].name].compression == pb.COMPRESSION_GZIP
    assert listed[files["sql"].name].compression == pb.COMPRESSION_NONE
    for name in files:
        assert listed[files[name].name].trigger == pb.BACKUP_TRIGGER_EXTERNAL
        assert listed[files[name].name].state == pb.BACKUP_STATE_READY
    assert next(iter(listed)) == made.id, "newest first"
    # The temporary file left by a crash is swept at start-up.
    assert not list(backup_dir.glob(".tmp-*"))


def test_list_paginates(pg16: PgServer, make_database: MakeDatabase, service_factory: StartService) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    ids = [svc.client.create().id for _ in range(5)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = svc.client.stub.List(pb.ListRequest(page_size=2, page_token=token))
        assert len(response.backups) <= 2
        seen += [b.id for b in response.backups]
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(ids))
    with pytest.raises(grpc.RpcError) as info:
        svc.client.stub.List(pb.ListRequest(page_token="garbage!"))
    assert _error(info)[0] == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad_id", ["", "..", "../etc/passwd", "/etc/passwd", "a/b", "x" * 300, "..\\x", ".tmp-x"])
def test_bad_ids_are_invalid_argument(
    bad_id: str, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16)
    svc = service_factory(db.uri)
    for call in (svc.client.get, svc.client.delete):
        with pytest.raises(grpc.RpcError) as info:
            call(bad_id)
        assert _error(info)[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_get_and_delete(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    outside = tmp_path / "outside.sql"
    outside.write_text("-- not to be touched\n")
    svc = service_factory(db.uri)
    backup = svc.client.create()
    assert svc.client.get(backup.id) == backup

    with pytest.raises(grpc.RpcError) as info:
        svc.client.get("aperture-backup-1999-01-01T00-00-00-000000Z-0000.sql.gz")
    code, details = _error(info)
    assert code == grpc.StatusCode.NOT_FOUND and "List" in details

    deleted = svc.client.delete(backup.id)
    assert deleted.id == backup.id
    assert _files(svc.backup_dir) == []
    with pytest.raises(grpc.RpcError) as info:
        svc.client.delete(backup.id)
    assert _error(info)[0] == grpc.StatusCode.NOT_FOUND
    assert outside.exists()


def test_retention_keeps_the_newest_n_and_survives_a_restart(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    svc = service_factory(db.uri, backup_dir=backup_dir)
    ids = [svc.client.create().id for _ in range(4)]

    response = svc.client.set_retention(2)
    assert response.policy.keep_last == 2
    assert sorted(response.deleted_ids) == sorted(ids[:2])
    assert [b.id for b in svc.client.list()] == [ids[3], ids[2]]

    # Retention runs after each successful backup.
    newest = svc.client.create().id
    assert [b.id for b in svc.client.list()] == [newest, ids[3]]

    for bad in (0, 101, -1):
        with pytest.raises(grpc.RpcError) as info:
            svc.client.set_retention(bad)
        assert _error(info)[0] == grpc.StatusCode.INVALID_ARGUMENT
    svc.stop()

    restarted = service_factory(db.uri, backup_dir=backup_dir, keep=7)
    assert restarted.client.get_retention().keep_last == 2, "the value set through the API wins over the default"


def test_failed_backups_do_not_count_toward_retention(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    good = service_factory(db.uri, backup_dir=backup_dir)
    kept = good.client.create().id
    good.stop()
    broken = service_factory("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2", backup_dir=backup_dir)
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            broken.client.create()
    response = broken.client.set_retention(1)
    assert response.deleted_ids == []
    states = [(b.id, b.state) for b in broken.client.list()]
    assert (kept, pb.BACKUP_STATE_READY) in states
    assert sum(1 for _, state in states if state == pb.BACKUP_STATE_FAILED) == 3


def test_server_down_is_unavailable_and_leaves_a_visible_failure(service_factory: StartService) -> None:
    svc = service_factory("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2")
    with pytest.raises(grpc.RpcError) as info:
        svc.client.create()
    code, details = _error(info)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" in details
    backups = list(svc.client.list())
    assert [b.state for b in backups] == [pb.BACKUP_STATE_FAILED]
    assert backups[0].error
    assert _files(svc.backup_dir) == [f"{backups[0].id}.manifest.json"], "no archive data is kept"
    status = svc.client.status()
    assert status.last_failed_backup.id == backups[0].id
    assert not status.HasField("last_successful_backup")
    assert not status.database_reachable


def test_status_answers_reachability_without_waiting_and_follows_the_database(
    pg16: PgServer, make_database: MakeDatabase
) -> None:
    # GetStatus's answer: the first call pings; later ones get the latest answer at once while one
    # background ping refreshes it, so 20 monitors never queue behind a connection.
    db = make_database(pg16, create=False)
    database = AppDatabase(db.uri)
    assert not database.reachable(), "the database does not exist yet"
    pg16.create_database(db.dbname)
    time.sleep(PING_REUSE_SECONDS + 0.1)
    assert not database.reachable(), "a stale answer comes back at once; the refresh runs behind it"
    wait_for(database.reachable, timeout=10)
    assert database.ping(), "the health check's ping agrees"


@pytest.mark.parametrize("problem", ["unknown role", "unknown database"])
def test_wrong_credentials_give_a_clear_status_and_no_ready_archive(
    problem: str, pg16: PgServer, service_factory: StartService
) -> None:
    uri = pg16.database_uri("postgres")
    params = psycopg.conninfo.conninfo_to_dict(uri)
    if problem == "unknown role":
        params["user"] = "nobody_here"
    else:
        params["dbname"] = "no_such_database"
    svc = service_factory(psycopg.conninfo.make_conninfo(**params))  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as info:
        svc.client.create()
    code, details = _error(info)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert ("nobody_here" if problem == "unknown role" else "no_such_database") in details
    assert all(b.state == pb.BACKUP_STATE_FAILED for b in svc.client.list())


def _start_create(svc: RunningService) -> tuple[threading.Thread, dict[str, object]]:
    """Start a Create in a thread; return once its pg_dump runs (callers hold a `table_lock`, so it waits)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["backup"] = svc.client.create()
        except grpc.RpcError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(pg_dump_children)
    return thread, outcome


def test_one_job_at_a_time_and_status_shows_the_running_job(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        thread, outcome = _start_create(svc)
        listed = list(svc.client.list())
        assert [b.state for b in listed] == [pb.BACKUP_STATE_CREATING]
        status = svc.client.status()
        assert status.current_job.kind == pb.JOB_KIND_BACKUP
        assert status.current_job.backup_id == listed[0].id

        with pytest.raises(grpc.RpcError) as info:
            svc.client.create()
        code, details = _error(info)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert listed[0].id in details
        with pytest.raises(grpc.RpcError) as info:
            svc.client.delete(listed[0].id)
        assert _error(info)[0] == grpc.StatusCode.FAILED_PRECONDITION
    thread.join(60)
    backup = outcome["backup"]
    assert isinstance(backup, pb.Backup) and backup.state == pb.BACKUP_STATE_READY


def test_another_replica_holding_the_lock_refuses_the_backup(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    with psycopg.connect(db.uri, autocommit=True) as other_replica:
        other_replica.execute("SELECT pg_advisory_lock(%s)", (JOB_LOCK_KEY,))
        with pytest.raises(grpc.RpcError) as info:
            svc.client.create()
        code, details = _error(info)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "another replica" in details
    assert svc.client.create().state == pb.BACKUP_STATE_READY


def test_the_backup_goes_on_when_the_caller_disconnects(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        stream = svc.client.stub.Create(pb.CreateRequest())
        first = next(stream)
        assert first.backup.state == pb.BACKUP_STATE_CREATING
        stream.cancel()
    wait_for(lambda: svc.client.get(first.backup.id).state == pb.BACKUP_STATE_READY)


def test_a_killed_pg_dump_fails_the_backup_and_leaves_nothing(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    with table_lock(db.uri):
        thread, outcome = _start_create(svc)
        for proc in pg_dump_children():
            proc.kill()
        thread.join(60)
    error = outcome["error"]
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "killed by signal 9" in (error.details() or "")
    backups = list(svc.client.list())
    assert [b.state for b in backups] == [pb.BACKUP_STATE_FAILED]
    assert _files(svc.backup_dir) == [f"{backups[0].id}.manifest.json"], "no archive data is kept"


def test_passwords_never_reach_process_arguments_manifests_or_logs(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    secret = "s3cr3t-Pa55word"
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute(
            f"DROP ROLE IF EXISTS backup_operator; CREATE ROLE backup_operator LOGIN SUPERUSER PASSWORD '{secret}'"
        )
    params = psycopg.conninfo.conninfo_to_dict(db.uri)
    params.update(user="backup_operator", password=secret)
    caplog.set_level("DEBUG")
    svc = service_factory(psycopg.conninfo.make_conninfo(**params))  # type: ignore[arg-type]
    with table_lock(db.uri):
        thread, _ = _start_create(svc)
        for proc in pg_dump_children():
            assert secret not in " ".join(proc.cmdline())
    thread.join(60)
    manifests = [p.read_text() for p in svc.backup_dir.glob("*.manifest.json")]
    assert manifests and all(secret not in text for text in manifests)
    assert secret not in caplog.text
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute("DROP ROLE backup_operator")


def test_a_full_disk_fails_cleanly(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    # 1 MiB is enough for the manifests but not for an uncompressed archive of a few MB.
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        db = make_database(pg16, seeded=True, rows=20)
        with psycopg.connect(db.uri, autocommit=True) as conn:  # about 4 MB of plain SQL
            conn.execute("CREATE TABLE filler AS SELECT g, md5(g::text) AS h FROM generate_series(1, 100000) g")
        svc = service_factory(db.uri, backup_dir=mount_point / "backups")
        with pytest.raises(grpc.RpcError) as info:
            svc.client.create(format=pb.BACKUP_FORMAT_PLAIN, compression=pb.COMPRESSION_NONE)
        code, details = _error(info)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in details
        backups = list(svc.client.list())
        assert [b.state for b in backups] == [pb.BACKUP_STATE_FAILED]
        assert not list((mount_point / "backups").glob(".tmp-*"))
        svc.stop()
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_manifest_records_provenance(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    backup = svc.client.create()
    manifest = json.loads((svc.backup_dir / f"{backup.id}.manifest.json").read_text())
    assert manifest["state"] == "ready"
    assert manifest["sha256"] == backup.sha256
    assert manifest["size_bytes"] == backup.size_bytes
    assert manifest["server_version"].startswith("16.")
    assert manifest["pg_dump_version"].startswith("16.")
    assert manifest["trigger"] == "manual"
    assert manifest["format"] == "plain" and manifest["compression"] == "gzip"


def test_a_file_removed_by_its_maker_disappears_from_the_list(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    files = _aperture_files(pg16, db, backup_dir)
    svc = service_factory(db.uri, backup_dir=backup_dir)
    name = files["dump"].name
    # A download records the checksum of a file found without a manifest, in a manifest of its own.
    svc.client.download(name, tmp_path / "copy.dump")
    assert (backup_dir / f"{name}.manifest.json").exists()
    files["dump"].unlink()  # Aperture prunes its own backups
    assert name not in {b.id for b in svc.client.list()}
    with pytest.raises(grpc.RpcError) as info:
        svc.client.get(name)
    assert _error(info)[0] == grpc.StatusCode.NOT_FOUND
    svc.stop()
    service_factory(db.uri, backup_dir=backup_dir)
    assert not (backup_dir / f"{name}.manifest.json").exists(), "the start-up sweep removes the orphan"

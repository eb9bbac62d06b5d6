"""The Aperture backend's path: the TypeScript client (clients/typescript) against the real service.

`test/drive.ts` (compiled with the package's own tsc) runs one scenario per command through the typed
API and prints what it saw; these tests check that against the service's disk and database. Further
down: the package's own `npm test` against the service, and the packed tarball installed into a scratch
project and driven from plain JavaScript (import and require), so that what ships is what is tested.

Needs node and npm; skips without them unless APERTURE_REQUIRE_NODE=1. The first run installs the
package's dependencies with `npm ci` (from package-lock.json, kept in clients/typescript/node_modules).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from aperture_backup_client import BackupClient, pb
from scripts.gen_ts_client import (
    NODE_MODULES,
    PACKAGE,
    REQUIRE_NODE_ENV,
    TSC,
    NodeMissing,
    ensure_node_modules,
    node_tools,
)
from tests.support.archives import TABLE_WITHOUT_REFERENCES, drop_copy_rows, reseal_manifest
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.service import RunningService, StartService, pg_dump_children, wait_for
from tests.support.tls import make_authority

MISSING_ID = "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"
ADMIN_TOKEN = "ts-client-admin-token-0123456789"
READ_TOKEN = "ts-client-read-token-9876543210"
ERROR_DOMAIN = "backup.aperture.dev"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the package's dependencies installed."""
    try:
        node_binary, _ = node_tools()
    except NodeMissing as exc:
        if os.environ.get(REQUIRE_NODE_ENV) == "1":
            pytest.fail(f"{exc}, and {REQUIRE_NODE_ENV}=1 requires it")
        pytest.skip(f"TypeScript client not tested: {exc}")
    ensure_node_modules()
    return node_binary


@pytest.fixture(scope="module")
def drive_script(node: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test/drive.ts compiled (with src/) into a temporary directory."""
    out = tmp_path_factory.mktemp("ts-build")
    result = subprocess.run(
        [str(TSC), "-p", str(PACKAGE / "tsconfig.json"), "--outDir", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}{result.stderr}"
    return out / "test" / "drive.js"


def drive(node: str, script: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 180) -> Any:
    """Run one drive.ts command; its printed JSON."""
    # NODE_PATH: the compiled script lives outside the package, so let it find the package's node_modules.
    result = subprocess.run(
        [node, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES), **(env or {})},
    )
    assert result.returncode == 0, f"drive {args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def archives(svc: RunningService) -> set[str]:
    """Every file in the backup directory (archives, manifests, leftovers), the state directory apart."""
    return {p.name for p in svc.backup_dir.iterdir() if p.name != ".state"}


def assert_status_error(error: dict[str, Any], code_name: str, reason: str) -> None:
    assert error["name"] == "BackupServiceError", error
    assert (error["codeName"], error["reason"], error["domain"]) == (code_name, reason, ERROR_DOMAIN), error
    assert error["details"] and error["message"].startswith(f"{code_name}: ")


def change_database(uri: str) -> None:
    """What happens after a backup: a later migration adds a table, rows change and go."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.added_later (id int PRIMARY KEY)")
        conn.execute("UPDATE public.movies SET title = title || ' (edited)' WHERE id % 3 = 0")
        conn.execute("DELETE FROM public.ratings WHERE movie_id % 2 = 0")


def test_every_rpc_through_the_typed_api(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    database = make_database(pg16, seeded=True)
    svc = service_factory(database.uri)
    work = tmp_path / "work"
    work.mkdir()

    out = drive(node, drive_script, "everything", svc.target, str(work), MISSING_ID)

    plain, custom = out["plain"], out["custom"]
    archive = svc.backup_dir / plain["id"]
    # Enums as string unions, sizes as bigint (printed as decimal strings), times as Date.
    assert (plain["state"], plain["format"], plain["compression"], plain["trigger"]) == (
        "READY",
        "PLAIN",
        "GZIP",
        "MANUAL",
    )
    assert (custom["state"], custom["format"], custom["compression"]) == ("READY", "CUSTOM", "NONE")
    assert custom["id"].endswith(".dump")
    assert plain["sizeBytes"] == str(archive.stat().st_size)
    assert plain["sha256"] == sha256(archive)
    assert plain["database"] == database.dbname and plain["durationMs"] > 0
    assert out["sizeIsBigint"] is True and out["createTimeIsDate"] is True
    assert out["got"] == plain

    # Progress as a callback and as an async iterator, each ending in DONE.
    for phases in (out["callbackPhases"], out["iterated"]):
        assert phases[0] == "PREPARING" and "DUMPING" in phases and phases[-1] == "DONE"
    assert out["callbackBackupIds"] == [plain["id"]] and out["lastCallbackState"] == "READY"

    # Two pages of one: list() followed the token; newest first.
    assert out["listed"] == [custom["id"], plain["id"]]
    assert out["firstPage"] == {"ids": [custom["id"]], "hasNext": True}

    status = out["status"]
    assert status["lastSuccessfulId"] == custom["id"] and status["lastSuccessfulAgeMs"] >= 0
    assert (status["database"], status["databaseReachable"], status["currentJob"]) == (database.dbname, True, None)

    retention = out["retention"]
    no_periods = {"keepDaily": 0, "keepWeekly": 0, "keepMonthly": 0}
    assert retention["before"] == {"keepLast": 7, **no_periods}
    # validateOnly: what keeping one would delete (the older backup), with nothing deleted or saved.
    assert retention["dryRun"]["deletedIds"] == [plain["id"]]
    assert retention["afterDryRun"] == [custom["id"], plain["id"]]
    assert retention["set"] == {"keepLast": 5, **no_periods, "deletedIds": []}
    assert retention["after"] == {"keepLast": 5, **no_periods}
    assert svc.client.get_retention().keep_last == 5
    assert_status_error(retention["bad"], "INVALID_ARGUMENT", "INVALID_RETENTION")

    schedule = out["schedule"]
    assert schedule["before"]["enabled"] is False and "nextRunTime" not in schedule["before"]
    assert schedule["on"]["timeOfDay"] == "03:30" and schedule["on"]["timeZone"] == "Europe/Berlin"
    assert schedule["on"]["enabled"] is True and schedule["on"]["nextRunIsDate"] is True
    assert schedule["off"]["enabled"] is False and "nextRunTime" not in schedule["off"]
    assert svc.client.get_schedule().schedule.time_of_day == "03:30"
    assert_status_error(schedule["bad"], "INVALID_ARGUMENT", "INVALID_SCHEDULE")

    download = out["download"]
    size = archive.stat().st_size
    assert download["result"]["sha256Verified"] is True and download["result"]["bytesWritten"] == str(size)
    assert download["sha256"] == plain["sha256"] and download["partLeft"] is False
    assert (work / "whole.sql.gz").read_bytes() == archive.read_bytes()
    # Resumed from the half in the part file: only the rest came over the wire, and the whole is checked.
    assert download["resume"]["resumedFrom"] == str(size // 2)
    assert download["resume"]["bytesWritten"] == str(size - size // 2)
    assert download["resumedSha256"] == plain["sha256"] and not (work / "resumed.sql.gz.part").exists()
    # Aborted after the first chunk: AbortError, a part to resume, no file under the final name (then
    # resumed to the end).
    assert download["aborted"]["name"] == "AbortError" and download["aborted"]["isAbortError"] is True
    assert 0 < download["abortedPartBytes"] < size and download["abortedFinalExists"] is False
    assert download["afterAbort"]["resumedFrom"] == str(download["abortedPartBytes"])
    assert download["afterAbortSha256"] == plain["sha256"]
    assert download["writableSha256"] == plain["sha256"] and download["intoWritable"]["sha256Verified"] is True
    assert download["tailBytes"] == size - size // 2 and download["tail"]["sha256Verified"] is False
    assert_status_error(download["missing"], "NOT_FOUND", "BACKUP_NOT_FOUND")
    assert download["missingLeftFiles"] == [False, False]

    errors = out["errors"]
    assert_status_error(errors["missingGet"], "NOT_FOUND", "BACKUP_NOT_FOUND")
    assert errors["missingGet"]["code"] == 5 and MISSING_ID in errors["missingGet"]["details"]
    assert errors["guards"] == {"isNotFound": True, "isJobRunning": False}
    assert errors["preAborted"]["name"] == "AbortError"

    upload = out["upload"]
    from_file = upload["fromFile"]
    assert "restore" not in from_file  # undefined: no restore was asked for
    assert from_file["backup"]["trigger"] == "UPLOADED" and from_file["backup"]["sha256"] == plain["sha256"]
    assert (svc.backup_dir / from_file["backup"]["id"]).read_bytes() == archive.read_bytes()
    assert upload["uploadEvents"][0] == "UPLOADING" and upload["uploadEvents"][-1] == "DONE"
    assert "VERIFYING" in upload["uploadEvents"]
    assert upload["fromStream"]["backup"]["sha256"] == plain["sha256"]
    # Without sizeBytes the stream was spooled (and the spool removed), then sent with its SHA-256.
    assert upload["spooled"]["backup"]["sha256"] == plain["sha256"] and upload["spooled"]["left"] == []
    assert upload["wrongSize"]["name"] == "TransferError"
    assert upload["aborted"]["name"] == "AbortError"

    # The upload from the stream was deleted through the API; the refused and aborted ones left nothing.
    assert out["deleted"]["id"] == upload["fromStream"]["backup"]["id"]
    assert_status_error(out["deletedGet"], "NOT_FOUND", "BACKUP_NOT_FOUND")

    # The job history, newest first through pages of two: the two deletes, then the backups made.
    jobs = out["jobs"]
    assert [(j["kind"], j["backupId"]) for j in jobs[:2]] == [
        ("DELETE", upload["fromStream"]["backup"]["id"]),
        ("DELETE", upload["spooled"]["backup"]["id"]),
    ]
    assert [(j["kind"], j["backupId"]) for j in jobs if j["kind"] == "BACKUP"] == [
        ("BACKUP", custom["id"]),
        ("BACKUP", plain["id"]),
    ]
    assert all(j["outcome"] == "SUCCEEDED" and j["trigger"] == "MANUAL" for j in jobs)
    assert all(j["callerAddress"].startswith("127.0.0.1:") and j["durationMs"] >= 0 for j in jobs)
    assert [j["id"] for j in jobs] == [j.id for j in svc.client.list_jobs()]
    assert out["jobsFirstPage"] == {"ids": [j["id"] for j in jobs[:2]], "hasNext": True}

    def only_the_kept_archives() -> bool:
        kept = {plain["id"], custom["id"], from_file["backup"]["id"]}
        return archives(svc) == kept | {f"{name}.manifest.json" for name in kept}

    wait_for(only_the_kept_archives, timeout=10)
    assert [b.id for b in svc.client.list()] == [from_file["backup"]["id"], custom["id"], plain["id"]]


def test_verify_pin_and_unpin_through_the_typed_api(
    node: str, drive_script: Path, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    database = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(database.uri)
    edited = svc.client.create().id
    newest = svc.client.create().id
    drop_copy_rows(svc.backup_dir / edited, TABLE_WITHOUT_REFERENCES, 1)
    reseal_manifest(svc.backup_dir, edited)

    out = drive(node, drive_script, "verify-and-pin", svc.target, edited)

    assert out["newest"]["id"] == newest and out["newest"]["verifyResult"] == "PASSED"
    assert out["newest"]["tableRows"][TABLE_WITHOUT_REFERENCES] == "5", "bigint, written as a decimal string"
    assert {"RESTORING", "CHECKING", "DONE"} <= set(out["phases"])
    assert_status_error(out["failed"], "DATA_LOSS", "VERIFY_FAILED")
    assert out["failed"]["metadata"]["check"] == "row_counts"
    assert out["failedBackup"]["verifyResult"] == "FAILED"
    assert out["failedBackup"]["verifyFailedCheck"] == "row_counts"
    assert out["status"]["lastVerifiedId"] == edited and out["status"]["lastVerifiedResult"] == "FAILED"
    assert out["status"]["lastVerifySuccessTime"] == out["newest"]["verifyTime"]
    assert out["pinnedForever"] == {"pinned": True, "expires": None}
    assert out["pinnedForAnHour"]["pinned"] is True and out["pinnedForAnHour"]["expires"] is not None
    assert out["unpinned"] == {"pinned": False, "expires": None}
    assert_status_error(out["badPin"], "INVALID_ARGUMENT", "INVALID_TTL")
    # The newest backup of one day (the schedule's zone is UTC here): the older one goes, unless the two
    # were made on either side of midnight; a preview deletes nothing.
    days = {b.create_time.ToDatetime().date() for b in svc.client.list()}
    assert out["preview"]["deletedIds"] == ([edited] if len(days) == 1 else [])
    assert out["preview"]["keepDaily"] == 1 and len(list(svc.client.list())) == 2


def test_restore_and_upload_and_restore_bring_the_database_back(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    database = make_database(pg16, seeded=True)
    svc = service_factory(database.uri)
    expected = fingerprint(database.uri)
    created = drive(node, drive_script, "create", svc.target)["backup"]

    # The admin page: restore a stored backup (a safety backup first).
    change_database(database.uri)
    restored = drive(node, drive_script, "restore", svc.target, created["id"])
    assert_same(expected, fingerprint(database.uri))
    result = restored["result"]
    assert result["restored"]["id"] == created["id"] and result["reconnectRequired"] is True
    assert result["notifyChannel"] == "aperture_backup_restored" and result["durationMs"] > 0
    assert result["safetyBackup"]["trigger"] == "PRE_RESTORE"
    assert "SAFETY_BACKUP" in restored["phases"] and "RESTORING" in restored["phases"]
    assert restored["phases"][-1] == "DONE"

    # The first-run wizard: upload an archive (a stream of known size) and restore it.
    copy = tmp_path / "from-the-old-install.sql.gz"
    shutil.copyfile(svc.backup_dir / created["id"], copy)
    change_database(database.uri)
    uploaded = drive(
        node, drive_script, "upload", svc.target, str(copy), "--restore", "--stream", "--skip-safety-backup"
    )
    assert_same(expected, fingerprint(database.uri))
    upload = uploaded["result"]
    assert upload["backup"]["trigger"] == "UPLOADED" and upload["backup"]["sha256"] == sha256(copy)
    assert upload["restore"]["restored"]["id"] == upload["backup"]["id"]
    assert "safetyBackup" not in upload["restore"]
    assert uploaded["phases"][0] == "UPLOADING" and "RESTORING" in uploaded["phases"]

    # And from a file path, with the safety backup.
    change_database(database.uri)
    from_file = drive(node, drive_script, "upload", svc.target, str(copy), "--restore")["result"]
    assert_same(expected, fingerprint(database.uri))
    assert from_file["restore"]["safetyBackup"]["trigger"] == "PRE_RESTORE"

    # A restore of an unknown id: NOT_FOUND, nothing touched.
    before = fingerprint(database.uri)
    refused = drive(node, drive_script, "restore", svc.target, MISSING_ID)
    assert_status_error(refused["error"], "NOT_FOUND", "BACKUP_NOT_FOUND")
    assert_same(before, fingerprint(database.uri))


def test_a_second_job_is_refused_with_job_running_and_an_abort_leaves_the_backup_running(
    node: str, drive_script: Path, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    database = make_database(pg16, seeded=True)
    svc = service_factory(database.uri)
    ready = svc.client.create()
    # pg_dump waits for this lock, so the first backup is certainly still running while the script runs.
    with table_lock(database.uri, "public.movies") as blocker:
        out = drive(node, drive_script, "job-running", svc.target, ready.id)
        blocker.rollback()

    assert out["runningState"] == "CREATING"
    assert_status_error(out["second"], "FAILED_PRECONDITION", "JOB_RUNNING")
    assert out["runningId"] in out["second"]["details"] and out["secondIsJobRunning"] is True
    assert_status_error(out["restore"], "FAILED_PRECONDITION", "JOB_RUNNING")
    assert out["currentJob"]["kind"] == "BACKUP" and out["currentJob"]["backupId"] == out["runningId"]
    assert out["aborted"]["name"] == "AbortError"
    # The caller stopped waiting; the service finished the backup all the same (as documented).
    wait_for(lambda: svc.client.get(out["runningId"]).state == pb.BACKUP_STATE_READY, timeout=60)


def test_cancel_and_an_abort_with_cancel_job_on_abort_stop_jobs_on_the_service(
    node: str, drive_script: Path, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    database = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(database.uri)
    # pg_dump waits for this lock: each backup is still running when the script stops it.
    with table_lock(database.uri, "public.movies"):
        out = drive(node, drive_script, "cancel-backups", svc.target)

    # An abort with cancelJobOnAbort: AbortError for the caller, and the backup stopped on the service.
    assert out["abortedError"]["name"] == "AbortError"
    assert out["afterAbort"]["state"] == "FAILED" and "cancelled" in out["afterAbort"]["error"]
    assert out["currentJobAfterAbort"] is None
    # cancel() by the backup's id: stopped, and the job's own call rejects with ABORTED / CANCELLED.
    assert out["cancelled"]["stopped"] is True and out["cancelled"]["job"]["kind"] == "BACKUP"
    assert out["cancelled"]["job"]["backupId"] == out["otherId"]
    assert_status_error(out["otherError"], "ABORTED", "CANCELLED")
    assert out["otherIsJobCancelled"] is True
    assert out["afterCancel"]["state"] == "FAILED"
    assert_status_error(out["nothing"], "FAILED_PRECONDITION", "NO_JOB")
    assert pg_dump_children() == []
    # Neither cancelled backup kept an archive: only their FAILED manifests are there.
    assert archives(svc) == {f"{out['abortedId']}.manifest.json", f"{out['otherId']}.manifest.json"}


def test_an_aborted_restore_with_cancel_job_on_abort_is_rolled_back(
    node: str, drive_script: Path, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    database = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(database.uri)
    before = fingerprint(database.uri)
    # A hand-made archive whose second statement takes forever: the restore is certainly running.
    sleeper = "sleeper.sql"
    (svc.backup_dir / sleeper).write_bytes(
        b"-- hand-made\nCREATE TABLE public.half (a int);\nSELECT pg_catalog.pg_sleep(100000);\n"
    )
    out = drive(node, drive_script, "cancel-restore", svc.target, sleeper)
    assert out["error"]["name"] == "AbortError" and "RESTORING" in out["phases"]
    assert out["currentJob"] is None  # cancelled on the service before the promise rejected
    assert_same(before, fingerprint(database.uri))


def test_status_tells_a_restore_interrupted_by_sigkill(
    node: str, drive_script: Path, pg16: PgServer, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """The service killed mid-restore and started again: status() reports the interrupted job."""
    database = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    sleeper = "sleeper.sql"
    (backup_dir / sleeper).write_bytes(b"-- hand-made\nSELECT pg_catalog.pg_sleep(100000);\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment["APERTURE_BACKUP_DATABASE_URL"] = database.uri

    def serve() -> tuple[subprocess.Popen[bytes], str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = f"127.0.0.1:{probe.getsockname()[1]}"
        command = [sys.executable, "-m", "aperture_backup", "serve", "--listen", address, "--dir", str(backup_dir)]
        process = subprocess.Popen(
            [*command, "--schedule", "off", "--catch-up", "false"],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with BackupClient(address) as client:
            wait_for(lambda: _answers(client), timeout=60)
        return process, address

    first, address = serve()
    try:
        with BackupClient(address) as client:
            restore = client.stub.Restore(pb.RestoreRequest(id=sleeper, skip_safety_backup=True), timeout=300)
            wait_for(lambda: next(restore).progress.phase == pb.PHASE_RESTORING, timeout=60)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    second, address = serve()
    try:
        status = drive(node, drive_script, "status", address)["status"]
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert "currentJob" not in status  # undefined: nothing runs after the restart
    job = status["interruptedJob"]
    assert (job["kind"], job["backupId"], job["trigger"]) == ("RESTORE", sleeper, "MANUAL"), job
    assert "interrupted" in job["progress"]["message"]


def _answers(client: BackupClient) -> bool:
    try:
        client.status()
    except grpc.RpcError:
        return False
    return True


def test_a_checksum_mismatch_leaves_no_file_under_the_final_name(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    database = make_database(pg16, seeded=True)
    svc = service_factory(database.uri)
    backup = svc.client.create()
    # The archive rots on the service's disk after its manifest recorded the SHA-256 (same size).
    archive = svc.backup_dir / backup.id
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))

    dest = tmp_path / "saved.sql.gz"
    out = drive(node, drive_script, "download", svc.target, backup.id, str(dest))
    assert out["error"]["name"] == "ChecksumMismatchError", out
    assert backup.sha256 in out["error"]["message"]
    assert not dest.exists() and not Path(f"{dest}.part").exists()

    # A resumed part that does not belong to this archive: the whole is checked, and refused the same way.
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))  # healthy again
    Path(f"{dest}.part").write_bytes(b"\0" * 100)
    out = drive(node, drive_script, "download", svc.target, backup.id, str(dest), "--resume")
    assert out["error"]["name"] == "ChecksumMismatchError"
    assert not dest.exists() and not Path(f"{dest}.part").exists()

    # And with a healthy archive and no part, the download lands under its name.
    out = drive(node, drive_script, "download", svc.target, backup.id, str(dest), "--resume")
    assert out["result"]["sha256Verified"] is True and out["result"]["resumedFrom"] == "0"
    assert dest.read_bytes() == archive.read_bytes()


def test_the_packages_own_npm_test_against_the_service(
    node: str, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    """`npm test` (test/client.test.ts, node's test runner) against this service, which it is handed
    through APERTURE_BACKUP_ADDRESS; without it, the package starts `aperture-backup serve` itself."""
    _, npm = node_tools()
    database = make_database(pg16, seeded=True)
    # With a token: every call of the suite carries it (the variable the service's CLI reads, too).
    svc = service_factory(database.uri, token=ADMIN_TOKEN)
    result = subprocess.run(
        [npm, "test", "--silent"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "APERTURE_BACKUP_ADDRESS": svc.target, "APERTURE_BACKUP_TOKEN": ADMIN_TOKEN},
    )
    assert result.returncode == 0, f"npm test failed:\n{result.stdout}\n{result.stderr}"
    assert "# fail 0" in result.stdout and "# pass " in result.stdout
    passed = int(result.stdout.split("# pass ")[1].split()[0])
    assert passed >= 14
    # It ran against this service: its backups are here (the ones it deleted apart).
    with BackupClient(svc.target, token=ADMIN_TOKEN) as admin_client:
        assert any(b.trigger == pb.BACKUP_TRIGGER_MANUAL for b in admin_client.list())


def test_npm_test_starts_a_service_of_its_own_when_none_is_given(node: str) -> None:
    """Without APERTURE_BACKUP_ADDRESS, `npm test` starts `aperture-backup serve` (this project's, named by
    APERTURE_BACKUP_BIN here) on a free port with the embedded PostgreSQL, and stops it afterwards."""
    _, npm = node_tools()
    command = Path(sys.executable).parent / "aperture-backup"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment["APERTURE_BACKUP_BIN"] = str(command)
    # The system's temporary directory, not tmp_path: the embedded PostgreSQL's socket path must stay short.
    scratch = Path(tempfile.gettempdir())

    def own_directories() -> set[Path]:
        return set(scratch.glob("aperture-backup-npm-test-*"))

    before = own_directories()
    result = subprocess.run(
        [npm, "test", "--silent"],
        cwd=PACKAGE,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environment,
    )
    assert result.returncode == 0, f"npm test failed:\n{result.stdout}\n{result.stderr}"
    assert "# fail 0" in result.stdout and int(result.stdout.split("# pass ")[1].split()[0]) >= 14
    # The service it started was stopped, and its directory removed.
    assert own_directories() == before


def test_tokens_admin_read_only_missing_and_wrong(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    database = make_database(pg16, seeded=True, rows=50)
    svc = service_factory(database.uri, token=ADMIN_TOKEN, read_token=READ_TOKEN)

    def calls(**env: str) -> dict[str, Any]:
        work = tmp_path / f"calls-{len(list(tmp_path.iterdir()))}"
        work.mkdir()
        return dict(drive(node, drive_script, "calls", svc.target, str(work), env=env))

    admin = calls(APERTURE_BACKUP_TOKEN=ADMIN_TOKEN)
    assert all(admin[name]["ok"] for name in ("list", "status", "create", "download", "upload")), admin
    assert admin["download"]["sha256"] == sha256(svc.backup_dir / admin["create"]["id"])

    # Without a token, or with a wrong one: UNAUTHENTICATED, typed, on reads and writes alike.
    for env, reason in (
        ({}, "TOKEN_MISSING"),
        ({"APERTURE_BACKUP_TOKEN": "not-the-token-of-this-service"}, "TOKEN_INVALID"),
    ):
        refused = calls(**env)
        for name in ("list", "status", "create", "download"):
            assert_status_error(refused[name], "UNAUTHENTICATED", reason)
            assert refused[name]["guards"]["isUnauthenticated"] is True
        assert refused["upload"] == {"skipped": True}  # the download left no file to upload

    # The read-only token reads and downloads, and may not write: PERMISSION_DENIED naming the roles.
    token_file = tmp_path / "read-token"
    token_file.write_text(READ_TOKEN + "\n")
    reader = calls(APERTURE_BACKUP_TOKEN_FILE=str(token_file))
    assert reader["list"]["ok"] and reader["status"]["ok"] and reader["download"]["ok"], reader
    for name in ("create", "upload"):
        assert_status_error(reader[name], "PERMISSION_DENIED", "ROLE_INSUFFICIENT")
        assert reader[name]["guards"]["isPermissionDenied"] is True
    assert reader["create"]["metadata"] == {"method": "Create", "required_role": "admin", "role": "read-only"}
    # Only the admin's calls changed anything: its backup and its upload.
    with BackupClient(svc.target, token=ADMIN_TOKEN) as admin_client:
        triggers = sorted(b.trigger for b in admin_client.list())
    assert triggers == [pb.BACKUP_TRIGGER_MANUAL, pb.BACKUP_TRIGGER_UPLOADED]


def test_tls_and_mutual_tls(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    database = make_database(pg16, seeded=True, rows=50)
    ca = make_authority(tmp_path / "pki", "ca")
    server = ca.server()
    tls = service_factory(database.uri, tls_cert=server.cert, tls_key=server.key, token=ADMIN_TOKEN)
    work = tmp_path / "work"
    work.mkdir()

    trusted = {"APERTURE_BACKUP_TOKEN": ADMIN_TOKEN, "APERTURE_BACKUP_CA_CERT": str(ca.cert)}
    out = drive(node, drive_script, "calls", tls.target, str(work), env=trusted)
    assert all(out[name]["ok"] for name in ("list", "status", "create", "download", "upload")), out
    # By name rather than by address: the certificate carries localhost too.
    port = tls.target.rpartition(":")[2]
    by_name = drive(node, drive_script, "calls", f"localhost:{port}", str(work), env=trusted)
    assert by_name["list"]["ok"], by_name
    # Plaintext to a TLS port, or a CA that did not sign the certificate: UNAVAILABLE, not UNKNOWN.
    plaintext = drive(node, drive_script, "calls", tls.target, str(work), env={"APERTURE_BACKUP_TOKEN": ADMIN_TOKEN})
    assert plaintext["list"]["codeName"] == "UNAVAILABLE", plaintext
    other = make_authority(tmp_path / "other", "other")
    untrusted = drive(
        node,
        drive_script,
        "calls",
        tls.target,
        str(work),
        env={"APERTURE_BACKUP_TOKEN": ADMIN_TOKEN, "APERTURE_BACKUP_CA_CERT": str(other.cert)},
    )
    assert untrusted["list"]["codeName"] == "UNAVAILABLE", untrusted

    # Mutual TLS: a client certificate from the CA gets in; none, or one from another CA, does not.
    mtls = service_factory(database.uri, tls_cert=server.cert, tls_key=server.key, tls_client_ca=ca.cert)
    client = ca.client("aperture-backend")
    with_cert = {
        "APERTURE_BACKUP_CA_CERT": str(ca.cert),
        "APERTURE_BACKUP_CLIENT_CERT": str(client.cert),
        "APERTURE_BACKUP_CLIENT_KEY": str(client.key),
    }
    out = drive(node, drive_script, "calls", mtls.target, str(work), env=with_cert)
    assert all(out[name]["ok"] for name in ("list", "status", "create", "download", "upload")), out
    anonymous = drive(
        node, drive_script, "calls", mtls.target, str(work), env={"APERTURE_BACKUP_CA_CERT": str(ca.cert)}
    )
    assert anonymous["list"]["codeName"] == "UNAVAILABLE", anonymous
    stranger = other.client("mallory")
    refused = drive(
        node,
        drive_script,
        "calls",
        mtls.target,
        str(work),
        env={
            **with_cert,
            "APERTURE_BACKUP_CLIENT_CERT": str(stranger.cert),
            "APERTURE_BACKUP_CLIENT_KEY": str(stranger.key),
        },
    )
    assert refused["list"]["codeName"] == "UNAVAILABLE", refused


def _fresh_checkout(destination: Path) -> Path:
    """The package's files as a fresh clone has them (what git tracks: no dist/, no node_modules/)."""
    root = PACKAGE.parent.parent
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--", "clients/typescript"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            if name:
                target = destination / Path(name).relative_to("clients/typescript")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, target)
    else:  # not a git checkout (an unpacked source archive): the same, by the package's .gitignore
        shutil.copytree(
            PACKAGE,
            destination,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("node_modules", "dist", "build", "*.tgz", ".install.lock"),
        )
    assert not (destination / "dist").exists()
    return destination


def test_the_packed_package_installed_into_a_scratch_project_drives_the_service(
    node: str,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    _, npm = node_tools()
    quiet = ["--no-audit", "--no-fund", "--loglevel=error"]
    checkout = _fresh_checkout(tmp_path / "checkout")
    # The build tools (typescript) of the already installed dev dependencies, as `npm ci` would bring.
    (checkout / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    packed = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path), *quiet],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert packed.returncode == 0, packed.stderr
    tarball = tmp_path / json.loads(packed.stdout)[0]["filename"]
    with tarfile.open(tarball) as archive:
        files = set(archive.getnames())
    # prepare built dist/ in the fresh checkout: JavaScript and declarations for both entry points.
    for name in ("index.js", "index.d.ts", "index.mjs", "index.d.mts", "client.js", "transfers.d.ts"):
        assert f"package/dist/{name}" in files, sorted(files)
    assert "package/dist/generated/aperture/backup/v1/backup.js" in files
    assert {"package/package.json", "package/README.md"} <= files
    assert not [f for f in files if f.startswith(("package/src/", "package/test/", "package/node_modules/"))]

    # A scratch project installs the tarball; its dependencies come from the npm registry (or npm's cache).
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "scratch-backend", "version": "1.0.0", "private": True}))
    installed = subprocess.run(
        [npm, "install", str(tarball), "--prefer-offline", *quiet],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    for name in ("scenario.cjs", "consumer.cjs", "consumer.mjs", "types.mts", "types.cts"):
        shutil.copyfile(PACKAGE / "test" / "consumer" / name, app / name)

    # Its declarations type-check from an ES module and a CommonJS module (the package's own tsc).
    (app / "tsconfig.json").write_text(
        json.dumps(
            {
                "compilerOptions": {
                    "module": "node16",
                    "moduleResolution": "node16",
                    "target": "ES2022",
                    "strict": True,
                    "noEmit": True,
                    "types": ["node"],
                    "typeRoots": [str(NODE_MODULES / "@types")],
                },
                "files": ["types.mts", "types.cts"],
            }
        )
    )
    checked = subprocess.run(
        [str(TSC), "-p", str(app / "tsconfig.json")], capture_output=True, text=True, timeout=180, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    database = make_database(pg16, seeded=True, rows=50)
    svc = service_factory(database.uri, token=ADMIN_TOKEN)
    expected = fingerprint(database.uri)
    environment = {k: v for k, v in os.environ.items() if k != "NODE_PATH"}
    for entry in ("consumer.mjs", "consumer.cjs"):
        work = tmp_path / entry
        work.mkdir()
        result = subprocess.run(
            [node, entry, svc.target, str(work)],
            cwd=app,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**environment, "APERTURE_BACKUP_TOKEN": ADMIN_TOKEN},
        )
        assert result.returncode == 0, f"{entry} failed:\n{result.stderr}"
        out = json.loads(result.stdout)
        backup = out["backup"]
        archive = svc.backup_dir / backup["id"]
        assert backup["state"] == "READY" and out["phases"][-1] == "DONE" and out["sizeIsBigint"] is True
        assert backup["id"] in out["listed"] and out["sameAsGet"] is True
        assert out["status"] == {"lastSuccessfulId": backup["id"], "databaseReachable": True}
        assert out["retention"]["set"]["deletedIds"] == [] and out["schedule"]["set"] == "02:45"
        assert out["download"]["sha256"] == backup["sha256"] == sha256(archive)
        assert out["download"]["sha256Verified"] is True and out["download"]["bytes"] == str(archive.stat().st_size)
        assert out["upload"]["trigger"] == "UPLOADED" and "RESTORING" in out["upload"]["phases"]
        assert out["restore"]["restoredId"] == backup["id"] and out["restore"]["reconnectRequired"] is True
        assert out["deleted"] == out["upload"]["restoredId"]
        assert out["notFound"] == {
            "isNotFound": True,
            "isBackupServiceError": True,
            "codeName": "NOT_FOUND",
            "reason": "BACKUP_NOT_FOUND",
        }
        assert out["noJob"] == {"refused": True, "codeName": "FAILED_PRECONDITION", "reason": "NO_JOB"}
        assert out["aborted"] == {"name": "AbortError", "isAbortError": True}
        # Restored twice from a backup of this very database: the same as before.
        assert_same(expected, fingerprint(database.uri))


MEMORY_TEST_MIB = 384


def test_node_memory_stays_flat_while_large_archives_move(
    node: str,
    drive_script: Path,
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    """test/memory.ts samples the Node process's RSS while it uploads a 384 MiB archive generated as it is
    sent (every piece a new buffer), downloads it into a file and uploads that file. A client that
    gathered the archive, or ignored back-pressure, would grow by the archive's size; this one's growth is
    the same for 256 MiB and 2 GiB (about 100 MiB over its baseline, measured with 2 GiB on Node 20)."""
    database = make_database(pg16)
    svc = service_factory(database.uri)
    work = tmp_path / "work"
    work.mkdir()
    out = drive(node, drive_script.parent / "memory.js", svc.target, str(MEMORY_TEST_MIB), str(work), timeout=600)

    assert out["sizeMiB"] == MEMORY_TEST_MIB
    checksums = out["checksums"]
    assert checksums["generated"] == checksums["service"] == checksums["downloadedFile"]
    for transfer in ("uploadStream", "download", "uploadFile"):
        growth = out[transfer]["peakMiB"] - out["baselineMiB"]
        assert growth < MEMORY_TEST_MIB / 2, (transfer, out)
    # Both uploads were stored and then deleted by the script; the download left no file behind.
    assert list(svc.client.list()) == [] and list(work.iterdir()) == []

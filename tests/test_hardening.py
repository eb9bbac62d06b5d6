"""Inputs and faults that used to make the service lie, hang or stop: each made to happen for real (a real
full file system, real requests through the real server) and answered with a deliberate status."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.config import ConfigError
from aperture_backup.server import create_server
from aperture_backup_client import BackupClient
from tests.support.filesystem import archives_on_small_filesystem, fill, small_filesystem
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService, clean_environment, free_port, serve_process, wait_for
from tests.support.service import test_config as service_config

BAD_ZONES = ["right/UTC", "posix/Europe/Berlin", "localtime", "Factory", "posixrules", "Europe/" + "x" * 5000, ""]


@pytest.fixture
def db16(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=20)


def _failure(call: object) -> tuple[grpc.StatusCode, str, str]:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    status = rpc_status.from_call(error)
    reason = ""
    if status is not None and status.details:
        detail = error_details_pb2.ErrorInfo()
        status.details[0].Unpack(detail)
        reason = detail.reason
    return error.code(), reason, error.details() or ""


# -- time zones ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zone", BAD_ZONES, ids=lambda z: z[:20] or "empty")
def test_a_time_zone_the_scheduler_cannot_use_is_refused_before_it_is_saved(
    zone: str, db16: Database, service_factory: StartService
) -> None:
    svc = service_factory(db16.uri, schedule_enabled=True)
    before = svc.client.get_schedule()
    code, reason, details = _failure(lambda: svc.client.set_schedule(time_zone=zone))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCHEDULE")
    assert 'IANA time zone such as "Europe/Berlin"' in details
    assert len(details) < 300 and "/usr/" not in details
    after = svc.client.get_schedule()
    assert after.schedule == before.schedule and after.next_run_time == before.next_run_time
    assert not (svc.backup_dir / ".state" / "settings.json").exists()


@pytest.mark.parametrize("zone", ["Europe/Berlin", "America/Argentina/Buenos_Aires", "UTC", "Etc/GMT+5"])
def test_real_time_zones_are_accepted(zone: str, db16: Database, service_factory: StartService) -> None:
    svc = service_factory(db16.uri, schedule_enabled=True)
    response = svc.client.set_schedule(time_zone=zone)
    assert response.schedule.time_zone == zone and response.HasField("next_run_time")


def test_a_bad_saved_setting_never_stops_start_up(
    db16: Database, service_factory: StartService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup_dir = tmp_path / "backups"
    (backup_dir / ".state").mkdir(parents=True)
    saved = {"keep": 3, "schedule": {"enabled": True, "time_of_day": "02:00", "time_zone": "right/UTC"}}
    (backup_dir / ".state" / "settings.json").write_text(json.dumps(saved))
    svc = service_factory(db16.uri, backup_dir=backup_dir, schedule_enabled=True, time_zone="Europe/Berlin")
    schedule = svc.client.get_schedule()
    assert schedule.schedule.time_zone == "Europe/Berlin" and schedule.HasField("next_run_time")
    assert "ignoring invalid settings file" in caplog.text


def test_the_environment_time_zone_is_checked_the_same_way() -> None:
    from aperture_backup.config import Config

    with pytest.raises(ConfigError, match="TZ must be an IANA time zone"):
        Config.from_env({"TZ": "posix/Europe/Berlin"})


# -- page tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [["2026-01-01T00:00:00", "x"], ["2026-01-01T00:00:00+00:00", 5], {"a": 1, "b": 2}, ["x"], "plain"],
    ids=["naive-time", "number-id", "object", "short", "string"],
)
def test_a_forged_page_token_is_invalid_argument(
    payload: object, db16: Database, service_factory: StartService
) -> None:
    svc = service_factory(db16.uri)
    svc.client.create()
    token = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
    code, reason, _ = _failure(lambda: svc.client.stub.List(pb.ListRequest(page_token=token)))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


# -- retention and uploads -----------------------------------------------------------------------------------


def test_uploads_do_not_push_out_the_backups_of_this_database(db16: Database, service_factory: StartService) -> None:
    svc = service_factory(db16.uri)
    svc.client.set_retention(2)
    real = [svc.client.create().id for _ in range(2)]
    junk = gzip.compress(b"-- PostgreSQL database dump\nSELECT 1;\n")
    path = svc.backup_dir.parent / "junk.sql.gz"
    path.write_bytes(junk)
    uploads = [svc.client.upload(path).backup.id for _ in range(7)]
    newest = svc.client.create().id

    listed = {b.id: b for b in svc.client.list()}
    assert set(listed) == {real[1], newest, *uploads}, "the oldest real backup goes; every upload stays"
    assert all(listed[u].trigger == pb.BACKUP_TRIGGER_UPLOADED for u in uploads)
    assert list(svc.client.set_retention(1).deleted_ids) == [real[1]]


# -- a full disk ---------------------------------------------------------------------------------------------


def test_a_full_disk_is_resource_exhausted_and_leaves_nothing_behind(
    db16: Database, service_factory: StartService, tmp_path: Path
) -> None:
    with small_filesystem(tmp_path / "small", size_kib=256) as small:
        backup_dir = small / "backups"
        svc = service_factory(db16.uri, backup_dir=backup_dir)
        (backup_dir / ".state").mkdir(exist_ok=True)
        filler = fill(small)
        before = sorted(p.name for p in backup_dir.rglob("*"))

        for call in (
            svc.client.create,
            lambda: svc.client.set_retention(3),
            lambda: svc.client.set_schedule(time_of_day="03:00"),
        ):
            code, reason, details = _failure(call)
            assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL"), details
            assert "disk is full" in details and "free space" in details
        assert sorted(p.name for p in backup_dir.rglob("*")) == before, "no temporary file, no empty manifest"
        assert list(svc.client.list()) == []
        assert svc.client.get_retention().keep_last == 7
        assert svc.client.get_schedule().schedule.time_of_day == "01:00"

        # Room again: everything works, and nothing of the failed attempts shows.
        filler.unlink()
        backup = svc.client.create()
        assert [b.id for b in svc.client.list()] == [backup.id]
        assert svc.client.set_retention(3).policy.keep_last == 3
        svc.stop()


def test_a_backup_that_fills_the_disk_midway_fails_cleanly(
    db16: Database, make_database: MakeDatabase, pg16: PgServer, service_factory: StartService, tmp_path: Path
) -> None:
    big = make_database(pg16, seeded=True, rows=200)
    with small_filesystem(tmp_path / "small", size_kib=128) as small:
        svc = service_factory(big.uri, backup_dir=small / "backups")
        code, reason, details = _failure(
            lambda: svc.client.create(format=pb.BACKUP_FORMAT_PLAIN, compression=pb.COMPRESSION_NONE)
        )
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL"), details
        assert "disk is full" in details and "free space" in details, details
        listed = list(svc.client.list())
        assert all(b.state == pb.BACKUP_STATE_FAILED for b in listed)
        assert not [p for p in (small / "backups").iterdir() if p.name.startswith(".tmp-")]
        svc.stop()


@pytest.mark.parametrize("sent", ["part", "all"])
def test_an_upload_that_finds_the_disk_full_is_not_stored(
    sent: str, db16: Database, service_factory: StartService, tmp_path: Path
) -> None:
    """The disk fills while an upload arrives. "part": with room left for a part of its last chunk only (a
    write that takes part of a chunk must not pass for done, or the archive would be stored cut short).
    "all": after every byte is on disk, before its manifest is written (the archive must not stay listed
    under a manifest that says it is still being made)."""
    data = gzip.compress(b"-- PostgreSQL database dump\n" + os.urandom(600_000).hex().encode())
    first = 64 * 1024 if sent == "part" else len(data)
    with archives_on_small_filesystem(tmp_path, size_kib=4 * 1024) as (small, backup_dir):
        svc = service_factory(db16.uri, backup_dir=backup_dir)
        fillers: list[Path] = []

        def requests() -> Iterator[pb.UploadAndRestoreRequest]:
            digest = hashlib.sha256(data).hexdigest()
            yield pb.UploadAndRestoreRequest(
                metadata=pb.UploadMetadata(filename="filling.sql.gz", size_bytes=len(data), sha256=digest)
            )
            yield pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=0, data=data[:first]))
            wait_for(
                lambda: any(p.name.startswith(".tmp-") and p.stat().st_size >= first for p in backup_dir.iterdir())
            )
            fillers.append(fill(small))
            if first < len(data):
                with open(fillers[0], "r+b") as handle:  # room for a part of what is left, not for all of it
                    handle.truncate(fillers[0].stat().st_size - 128 * 1024)
                yield pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=first, data=data[first:]))

        upload = svc.client.stub.UploadAndRestore
        code, reason, details = _failure(lambda: list(upload(requests(), timeout=60)))
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "DISK_FULL"), details
        assert "disk is full" in details and "free space" in details, details
        assert list(svc.client.list()) == []
        assert [p.name for p in backup_dir.iterdir() if p.name != ".state"] == [], "no archive, no temporary file"

        # Room again: the same upload is stored whole.
        fillers[0].unlink()
        source = tmp_path / "whole.sql.gz"
        source.write_bytes(data)
        stored = svc.client.upload(source).backup
        assert stored.state == pb.BACKUP_STATE_READY
        assert [b.id for b in svc.client.list()] == [stored.id]
        assert (backup_dir / stored.filename).read_bytes() == data
        svc.stop()


# -- a second instance on the same address -------------------------------------------------------------------


def test_a_second_instance_on_a_taken_address_fails_to_start(
    db16: Database, service_factory: StartService, tmp_path: Path
) -> None:
    first = service_factory(db16.uri)
    config = service_config(db16.uri, tmp_path / "second", listen=first.target)
    with pytest.raises(OSError, match=rf"cannot listen on {first.target}: the address is in use"):
        create_server(config)
    with BackupClient(first.target) as client:
        for _ in range(8):  # every call reaches the first instance
            assert client.status().database_reachable
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aperture_backup",
            "serve",
            "--listen",
            first.target,
            "--dir",
            str(tmp_path / "third"),
            "--database-url",
            db16.uri,
            "--schedule",
            "off",
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {first.target}: the address is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_taken_by_another_program_is_reported(db16: Database, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        target = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(OSError, match="address is in use"):
            create_server(service_config(db16.uri, tmp_path / "b", listen=target))


def test_a_second_instance_never_takes_the_embedded_database_of_the_first(tmp_path: Path) -> None:
    environment = clean_environment()
    backup_dir = tmp_path / "backups"

    def serve(port: int) -> subprocess.Popen[str]:
        args = ("--listen", f"127.0.0.1:{port}", "--dir", str(backup_dir), "--schedule", "off", "--catch-up", "false")
        return serve_process(*args, env=environment, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    first_port = free_port()
    first = serve(first_port)
    try:
        assert first.stdout is not None
        for line in first.stdout:
            if "listening on" in line:
                break
        else:
            pytest.fail("the first instance did not start")
        second = serve(free_port())
        output, _ = second.communicate(timeout=120)
        assert second.returncode == 1, output
        assert "is already running" in output and "same APERTURE_BACKUP_DIR" in output
        assert "Traceback" not in output
        with BackupClient(f"127.0.0.1:{first_port}") as client:
            assert client.status().database_reachable, "the first instance's database is still up"
            assert client.create().state == pb.BACKUP_STATE_READY
    finally:
        first.terminate()
        first.wait(timeout=60)


# -- secrets and data in messages ----------------------------------------------------------------------------


def test_a_badly_encoded_password_is_not_echoed() -> None:
    from aperture_backup.config import Config

    with pytest.raises(ConfigError) as refused:
        Config.from_env({"APERTURE_BACKUP_DATABASE_URL": "postgresql://aperture:s3cr%zzet@db:5432/aperture"})
    message = str(refused.value)
    assert "s3cr" not in message and "zzet" not in message
    assert "percent-encoded" in message and "%25" in message


def test_a_password_on_the_command_line_is_warned_about(tmp_path: Path, db16: Database) -> None:
    url = db16.uri + " password=notreallysecret"  # trust authentication ignores it
    assert "notreallysecret" in url
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aperture_backup",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--dir",
            str(tmp_path / "b"),
            "--database-url",
            url,
            "--schedule",
            "off",
        ],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    text = "".join(lines)
    assert "--database-url carries a password" in text and "APERTURE_BACKUP_DATABASE_URL_FILE" in text
    assert "notreallysecret" not in text


def test_row_data_never_reaches_errors_or_logs(
    db16: Database, service_factory: StartService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """psql's messages quote the row that failed; the service reports the table and line, not the data."""
    secret = "alice.secret@example.com"
    archive = tmp_path / "leaky.sql.gz"
    archive.write_bytes(
        gzip.compress(
            b"-- PostgreSQL database dump\n"
            b"CREATE TABLE people (id integer, email text UNIQUE);\n"
            b"COPY people (id, email) FROM stdin;\n" + f"1\t{secret}\n2\t{secret}\n".encode() + b"\\.\n"
        )
    )
    svc = service_factory(db16.uri)
    code, _, details = _failure(lambda: svc.client.upload(archive, restore=True, skip_safety_backup=True))
    assert code in {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
    }, details
    assert "COPY people, line 2" in details and "Key (email)=(...)" in details, details
    assert secret not in details
    assert secret not in caplog.text


# -- stalled transfers ---------------------------------------------------------------------------------------


def test_stalled_uploads_neither_starve_other_calls_nor_stay(
    db16: Database, service_factory: StartService, tmp_path: Path
) -> None:
    """16 clients send an upload's metadata and a chunk, then stall: at most `max_transfers` are taken, the
    rest refused at once; List, GetStatus and health answer throughout; the stalled ones are dropped with
    their temporary files after the idle timeout."""
    import threading
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    svc = service_factory(db16.uri, max_transfers=2, upload_idle_timeout=3.0)
    data = gzip.compress(b"-- PostgreSQL database dump\n" + os.urandom(300_000).hex().encode())
    release = threading.Event()
    outcomes: list[grpc.StatusCode] = []
    lock = threading.Lock()

    def stalled_upload() -> None:
        def requests() -> Iterator[pb.UploadAndRestoreRequest]:
            digest = hashlib.sha256(data).hexdigest()
            yield pb.UploadAndRestoreRequest(
                metadata=pb.UploadMetadata(filename="slow.sql.gz", size_bytes=len(data), sha256=digest)
            )
            yield pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=0, data=data[: 256 * 1024]))
            release.wait(60)

        with grpc.insecure_channel(svc.target) as channel:
            try:
                list(
                    channel.stream_stream(
                        "/aperture.backup.v1.BackupService/UploadAndRestore",
                        request_serializer=pb.UploadAndRestoreRequest.SerializeToString,
                        response_deserializer=pb.UploadAndRestoreResponse.FromString,
                    )(requests(), timeout=60)
                )
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        with lock:
            outcomes.append(code)

    threads = [threading.Thread(target=stalled_upload) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while len(outcomes) < 14 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 14, outcomes

        # Two uploads hold their threads; every other call still answers, promptly.
        with grpc.insecure_channel(svc.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(20):
            assert svc.client.stub.GetStatus(pb.GetStatusRequest(), timeout=2).database_reachable
            svc.client.stub.List(pb.ListRequest(), timeout=2)

        deadline = time.monotonic() + 30
        while len(outcomes) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(c.name for c in outcomes[14:]) == ["DEADLINE_EXCEEDED"] * 2, outcomes
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
    leftovers = [p.name for p in svc.backup_dir.iterdir() if p.name != ".state"]
    assert leftovers == [], "a dropped upload leaves nothing behind"
    source = tmp_path / "whole.sql.gz"
    source.write_bytes(data)
    assert svc.client.upload(source).backup.state == pb.BACKUP_STATE_READY

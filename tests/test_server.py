"""The server as a user meets it: health checking, reflection, grpcurl, and start/stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.fixtures import Database
from tests.support.postgres import table_lock
from tests.support.service import (
    StartService,
    clean_environment,
    free_port,
    grpcurl_path,
    pg_dump_children,
    serve_process,
    wait_for,
)

SERVICE = "aperture.backup.v1.BackupService"


def _grpcurl(target: str, *words: str, flags: tuple[str, ...] = ()) -> str:
    """grpcurl [flags] address [list | describe SYMBOL | METHOD]"""
    result = subprocess.run(
        [grpcurl_path(), "-plaintext", *flags, target, *words],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_health_is_serving_while_the_database_answers(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    with grpc.insecure_channel(svc.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_is_not_serving_when_the_database_is_down(service_factory: StartService) -> None:
    svc = service_factory(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres")
    with grpc.insecure_channel(svc.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_grpcurl_lists_describes_and_checks_health(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    services = _grpcurl(svc.target, "list").split()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    assert any(name.startswith("grpc.reflection.") for name in services)

    description = _grpcurl(svc.target, "describe", SERVICE)
    for rpc in (
        "Create",
        "List",
        "Get",
        "Delete",
        "StreamDownload",
        "UploadAndRestore",
        "Restore",
        "SetRetention",
        "GetRetention",
        "SetSchedule",
        "GetSchedule",
        "GetStatus",
    ):
        assert f"rpc {rpc} (" in description
    # The .proto comments are the documentation grpcurl shows.
    assert "Runs pg_dump now" in description

    backup = _grpcurl(svc.target, "describe", "aperture.backup.v1.Backup")
    assert "The archive's file name in the backup directory" in backup

    health = json.loads(_grpcurl(svc.target, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}


def _start_serve(database_uri: str, backup_dir: Path) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = clean_environment(
        DATABASE_URL=database_uri, DIR=str(backup_dir), LISTEN=f"127.0.0.1:{port}", CATCH_UP="false"
    )
    # A service that does not stop is aborted, and this prints where each of its threads is.
    env["PYTHONFAULTHANDLER"] = "1"
    proc = serve_process(env=env, text=True, stderr=subprocess.PIPE)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            assert "SERVING" in _grpcurl(target, "grpc.health.v1.Health/Check")
            return proc, target
        except AssertionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
            time.sleep(0.2)


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, then the service's log; a service still running after a minute fails the test with the
    stack of each of its threads."""
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        pytest.fail(f"the service did not stop within 60 s of SIGTERM:\n{proc.stderr.read() if proc.stderr else ''}")
    log = proc.stderr.read() if proc.stderr else ""
    assert code == 0, log
    return log


def test_serve_stops_cleanly_on_sigterm(seeded_db: Database, tmp_path: Path) -> None:
    proc, _ = _start_serve(seeded_db.uri, tmp_path / "backups")
    assert "shutting down" in _stop(proc)


def test_a_sigterm_that_lands_on_another_thread_still_stops_the_service(seeded_db: Database, tmp_path: Path) -> None:
    """The kernel hands a process's signal to any of its threads. kill() with a thread's id prefers that
    thread, so this is the case the main thread alone would not notice: it stopped only sometimes, and a
    container's stop then waited for its SIGKILL."""
    proc, _ = _start_serve(seeded_db.uri, tmp_path / "backups")
    others = [int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task") if int(tid) != proc.pid]
    assert others
    os.kill(others[-1], signal.SIGTERM)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "shutting down" in (proc.stderr.read() if proc.stderr else "")


def test_sigterm_during_a_backup_leaves_no_half_written_archive(seeded_db: Database, tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    proc, target = _start_serve(seeded_db.uri, backup_dir)
    # pg_dump waits for this lock, so the backup is certainly running when the signal comes.
    with table_lock(seeded_db.uri):
        create = subprocess.Popen(
            [grpcurl_path(), "-plaintext", "-d", "{}", target, f"{SERVICE}/Create"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: pg_dump_children(proc.pid))
        stderr = _stop(proc)
    create.wait(timeout=30)
    assert "shutting down" in stderr
    assert not list(backup_dir.glob(".tmp-*"))
    manifests = [json.loads(p.read_text()) for p in backup_dir.glob("*.manifest.json")]
    assert [(m["state"], "cancelled" in m["error"]) for m in manifests] == [("failed", True)]
    archives = [p for p in backup_dir.iterdir() if p.is_file() and not p.name.endswith(".manifest.json")]
    assert archives == []


@pytest.mark.parametrize("rpc", ["StreamDownload", "UploadAndRestore"])
def test_transfer_rpcs_answer_an_empty_request_with_invalid_argument(
    rpc: str, seeded_db: Database, service_factory: StartService
) -> None:
    """Through grpcurl, `{}` is an empty id (StreamDownload) or a message with neither metadata nor chunk
    (UploadAndRestore): refused with a reason, no longer UNIMPLEMENTED."""
    svc = service_factory(seeded_db.uri)
    result = subprocess.run(
        [grpcurl_path(), "-plaintext", "-d", "{}", svc.target, f"{SERVICE}/{rpc}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr, result.stderr
    assert "Unimplemented" not in result.stderr

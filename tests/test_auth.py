"""Who may call: tokens and roles per RPC, open health and reflection, refusals that leave no trace of the
token, and the refusal to start exposed without one. Against the real server and a real database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.auth import READ_ONLY_METHODS, Role, TokenAuthenticator, required_role
from aperture_backup.config import Config, ConfigError
from aperture_backup_client import BackupClient, method_path
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import RunningService, StartService, grpcurl_path

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
SERVICE = pb.DESCRIPTOR.services_by_name["BackupService"]
ALL_METHODS = [m.name for m in SERVICE.methods]

#: A request for each RPC that the servicer refuses cheaply (INVALID_ARGUMENT, NOT_FOUND...) or answers
#: without changing anything: what matters here is whether the call got past authentication.
HARMLESS: dict[str, protobuf_message.Message] = {
    "Create": pb.CreateRequest(format=pb.BACKUP_FORMAT_CUSTOM, compression=pb.COMPRESSION_ZSTD),
    "List": pb.ListRequest(),
    "Get": pb.GetRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "Delete": pb.DeleteRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "StreamDownload": pb.StreamDownloadRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "UploadAndRestore": pb.UploadAndRestoreRequest(),
    "Restore": pb.RestoreRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "SetRetention": pb.SetRetentionRequest(policy=pb.RetentionPolicy(keep_last=0)),
    "GetRetention": pb.GetRetentionRequest(),
    "SetSchedule": pb.SetScheduleRequest(time_of_day="25:99"),
    "GetSchedule": pb.GetScheduleRequest(),
    "GetStatus": pb.GetStatusRequest(),
    "Cancel": pb.CancelRequest(backup_id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "Verify": pb.VerifyRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "Pin": pb.PinRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "Unpin": pb.UnpinRequest(id="aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"),
    "ListJobs": pb.ListJobsRequest(),
}


def _call(target: str, method: str, token: str | None) -> grpc.StatusCode:
    """Call one RPC with `token` (or none); the status code it ends with (OK when it succeeds)."""
    metadata: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {token}"),) if token else ()
    descriptor = SERVICE.methods_by_name[method]
    request = HARMLESS[method]
    with grpc.insecure_channel(target) as channel:
        kwargs: dict[str, Any] = {
            "request_serializer": lambda m: m.SerializeToString(),
            "response_deserializer": lambda b: b,
        }
        try:
            if descriptor.client_streaming:
                call = channel.stream_stream(method_path(method), **kwargs)
                list(call(iter([request]), metadata=metadata, timeout=60))
            elif descriptor.server_streaming:
                list(channel.unary_stream(method_path(method), **kwargs)(request, metadata=metadata, timeout=60))
            else:
                channel.unary_unary(method_path(method), **kwargs)(request, metadata=metadata, timeout=60)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def db16(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16)


@pytest.fixture
def secured(db16: Database, service_factory: StartService) -> RunningService:
    return service_factory(db16.uri, token=ADMIN, read_token=READER)


def test_every_rpc_has_a_decided_role() -> None:
    assert set(HARMLESS) == set(ALL_METHODS), "a new RPC needs a harmless request here and a role decision"
    assert set(READ_ONLY_METHODS) <= set(ALL_METHODS)
    for method in ALL_METHODS:
        expected = Role.READ_ONLY if method in READ_ONLY_METHODS else Role.ADMIN
        assert required_role(method_path(method)) is expected
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert required_role("/some.other.Service/Method") is Role.ADMIN


@pytest.mark.parametrize("method", ALL_METHODS)
def test_roles_per_rpc(method: str, secured: RunningService) -> None:
    target = secured.target
    assert _call(target, method, None) is grpc.StatusCode.UNAUTHENTICATED
    assert _call(target, method, "not-the-token-0123456789") is grpc.StatusCode.UNAUTHENTICATED
    admin = _call(target, method, ADMIN)
    assert admin not in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNKNOWN}
    reader = _call(target, method, READER)
    if method in READ_ONLY_METHODS:
        assert reader is admin
    else:
        assert reader is grpc.StatusCode.PERMISSION_DENIED


def test_a_refused_read_only_caller_changes_nothing(secured: RunningService) -> None:
    admin = BackupClient(secured.target, token=ADMIN)
    reader = BackupClient(secured.target, token=READER)
    try:
        backup = admin.create()
        with pytest.raises(grpc.RpcError) as denied:
            reader.delete(backup.id)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "Delete needs the admin role" in (denied.value.details() or "")
        assert "read-only" in (denied.value.details() or "")
        info = error_details_pb2.ErrorInfo()
        status = rpc_status.from_call(denied.value)
        assert status is not None
        status.details[0].Unpack(info)
        assert info.reason == "ROLE_INSUFFICIENT"
        assert dict(info.metadata) == {"method": "Delete", "required_role": "admin", "role": "read-only"}
        with pytest.raises(grpc.RpcError):
            reader.set_retention(1)
        assert [b.id for b in reader.list()] == [backup.id]
        assert reader.get_retention().keep_last == 7
        # What the read-only role is for: copying the backups away.
        chunks = list(reader.stream_download(backup.id))
        assert sum(len(c.data) for c in chunks) == backup.size_bytes
    finally:
        admin.close()
        reader.close()


def test_health_and_reflection_stay_open(secured: RunningService) -> None:
    with grpc.insecure_channel(secured.target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    grpcurl = grpcurl_path()
    listed = subprocess.run(
        [grpcurl, "-plaintext", secured.target, "list"], capture_output=True, text=True, timeout=60, check=True
    )
    assert SERVICE.full_name in listed.stdout
    described = subprocess.run(
        [grpcurl, "-plaintext", secured.target, "describe", SERVICE.full_name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "rpc Create" in described.stdout


def test_grpcurl_with_and_without_the_token(secured: RunningService) -> None:
    def grpcurl(*headers: str) -> subprocess.CompletedProcess[str]:
        flags = [arg for header in headers for arg in ("-H", header)]
        return subprocess.run(
            [grpcurl_path(), "-plaintext", *flags, "-d", "{}", secured.target, f"{SERVICE.full_name}/GetStatus"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = grpcurl()
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    assert "authorization: Bearer" in refused.stderr  # the message says what to send
    wrong = grpcurl("authorization: Bearer wrong-token-0123456789")
    assert wrong.returncode != 0 and "not valid" in wrong.stderr
    assert "wrong-token" not in wrong.stderr
    ok = grpcurl(f"authorization: Bearer {READER}")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["databaseReachable"] is True


def test_tokens_never_reach_the_logs_and_refusals_are_logged_once_a_minute(
    secured: RunningService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for token in (None, "wrong-token-0123456789", READER, None, "another-wrong-token-0123456789"):
        _call(secured.target, "Delete", token)
    _call(secured.target, "List", ADMIN)
    text = "\n".join(record.getMessage() for record in caplog.records)
    for secret in (ADMIN, READER, "wrong-token-0123456789", "another-wrong-token"):
        assert secret not in text
    warnings = [r for r in caplog.records if r.name == "aperture_backup.auth" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "127.0.0.1" in warnings[0].getMessage()
    assert ADMIN not in repr(secured.config) and READER not in repr(secured.config)


def test_the_warning_comes_again_after_a_minute() -> None:
    from aperture_backup.auth import _PeerWarnings
    from aperture_backup.errors import Unauthenticated

    now = [1000.0]
    warnings = _PeerWarnings(clock=lambda: now[0])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("aperture_backup.auth")
    logger.addHandler(handler)
    try:
        error = Unauthenticated("no token", reason="TOKEN_MISSING")
        warnings.warn("ipv4:10.0.0.7:5000", "/x/Y", error)
        warnings.warn("ipv4:10.0.0.7:5001", "/x/Y", error)  # same host, another port
        warnings.warn("ipv4:10.0.0.8:5000", "/x/Y", error)
        now[0] += 61
        warnings.warn("ipv4:10.0.0.7:5002", "/x/Y", error)
    finally:
        logger.removeHandler(handler)
    assert [r.split(" from ")[1].split(":")[0] for r in records] == ["10.0.0.7", "10.0.0.8", "10.0.0.7"]


def test_authenticator_reads_the_bearer_header_only() -> None:
    auth = TokenAuthenticator(ADMIN, READER)
    assert auth.role_of([("authorization", f"Bearer {ADMIN}")]) is Role.ADMIN
    assert auth.role_of([("authorization", f"bearer {READER}")]) is Role.READ_ONLY
    for metadata in (
        [],
        [("authorization", ADMIN)],
        [("authorization", f"Basic {ADMIN}")],
        [("authorization", f"Bearer {ADMIN}x")],
        [("authorization", f"Bearer {ADMIN}"), ("authorization", f"Bearer {READER}")],
        [("x-token", ADMIN)],
    ):
        with pytest.raises(Exception, match=r"token|authorization") as refused:
            auth.role_of(metadata)
        assert ADMIN not in str(refused.value)


# -- configuration -----------------------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    return {f"APERTURE_BACKUP_{k}": v for k, v in values.items()}


def test_tokens_come_from_the_environment_or_from_files(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(ADMIN + "\n")
    reader = tmp_path / "read-token"
    reader.write_text(READER)
    config = Config.from_env(_env(TOKEN_FILE=str(secret), READ_TOKEN_FILE=str(reader), LISTEN="0.0.0.0:1"))
    assert (config.token, config.read_token) == (ADMIN, READER)
    assert Config.from_env(_env(TOKEN=ADMIN)).token == ADMIN
    url = tmp_path / "database_url"
    url.write_text("postgresql://aperture:secret@db:5432/aperture\n")
    assert (
        Config.from_env(_env(DATABASE_URL_FILE=str(url))).database_url
        == "postgresql://aperture:secret@db:5432/aperture"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"TOKEN": "short-token"}, r"APERTURE_BACKUP_TOKEN is 11 characters long; tokens need at least 16"),
        ({"TOKEN": ADMIN, "READ_TOKEN": "tiny"}, r"APERTURE_BACKUP_READ_TOKEN is 4 characters"),
        ({"TOKEN": "has spaces in the middle of it"}, r"APERTURE_BACKUP_TOKEN contains spaces"),
        ({"TOKEN": ADMIN, "TOKEN_FILE": "/nonexistent"}, r"both APERTURE_BACKUP_TOKEN and APERTURE_BACKUP_TOKEN_FILE"),
        ({"TOKEN_FILE": "/nonexistent/token"}, r"APERTURE_BACKUP_TOKEN_FILE names /nonexistent/token, which cannot"),
        ({"READ_TOKEN": READER}, r"APERTURE_BACKUP_READ_TOKEN is set but APERTURE_BACKUP_TOKEN is not"),
        ({"TOKEN": ADMIN, "READ_TOKEN": ADMIN}, r"are the same"),
        ({"LISTEN": "0.0.0.0:50051"}, r"refusing to listen on 0.0.0.0:50051 without authentication"),
        ({"LISTEN": "[::]:50051"}, r"APERTURE_BACKUP_TOKEN_FILE"),
        ({"LISTEN": "backup.example:50051"}, r"APERTURE_BACKUP_INSECURE=true"),
        ({"TLS_CERT": "/x.pem"}, r"APERTURE_BACKUP_TLS_KEY is not set"),
        ({"TLS_CLIENT_CA": "/ca.pem"}, r"TLS_CLIENT_CA requires"),
        ({"INSECURE": "perhaps"}, r"APERTURE_BACKUP_INSECURE must be true or false"),
    ],
)
def test_bad_security_settings_stop_start_up(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        Config.from_env(_env(**values))
    for secret in (ADMIN, READER, "short-token", "has spaces"):
        assert secret not in str(refused.value)


def test_an_empty_or_unreadable_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=r"APERTURE_BACKUP_TOKEN_FILE names .* which is empty"):
        Config.from_env(_env(TOKEN_FILE=str(empty)))
    with pytest.raises(ConfigError, match="cannot be read"):
        Config.from_env(_env(TOKEN_FILE=str(tmp_path)))


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1"])
def test_loopback_needs_no_token(listen: str) -> None:
    assert Config.from_env(_env(LISTEN=listen)).token is None


def test_insecure_switch_allows_an_open_address() -> None:
    assert Config.from_env(_env(LISTEN="0.0.0.0:50051", INSECURE="true")).insecure


def _serve(tmp_path: Path, db: Database, *args: str, **env: str) -> subprocess.Popen[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment.update(_env(DATABASE_URL=db.uri, DIR=str(tmp_path / "backups"), SCHEDULE="off", CATCH_UP="false"))
    environment.update(_env(**env))
    return subprocess.Popen(
        [sys.executable, "-m", "aperture_backup", "serve", *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_line(proc: subprocess.Popen[str], predicate: Callable[[str], bool], timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if predicate(line):
            return line
    raise AssertionError("the service never said it:\n" + "".join(seen))


def test_serve_refuses_an_open_address_without_a_token(tmp_path: Path, db16: Database) -> None:
    proc = _serve(tmp_path, db16, "--listen", "0.0.0.0:0")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, output
    assert "refusing to listen on 0.0.0.0:0 without authentication" in output
    assert "APERTURE_BACKUP_TOKEN_FILE" in output and "openssl rand -hex 32" in output


def test_serve_with_the_insecure_switch_warns_at_start(tmp_path: Path, db16: Database) -> None:
    proc = _serve(tmp_path, db16, "--listen", "0.0.0.0:0", "--insecure")
    try:
        line = _wait_for_line(proc, lambda line: "WARNING" in line and "APERTURE_BACKUP_INSECURE" in line)
        assert "without a token" in line
        _wait_for_line(proc, lambda line: "listening on" in line)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_cli_sends_the_token(tmp_path: Path, secured: RunningService) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(READER + "\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}

    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aperture_backup", *args],
            env={**environment, **_env(ADDRESS=secured.target, **env)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    refused = cli("status")
    assert refused.returncode == 6 and "not allowed" in refused.stderr and "--token-file" in refused.stderr
    assert cli("status", "--token-file", str(token_file)).returncode == 0
    assert cli("status", "--token", READER).returncode == 0
    assert cli("list", TOKEN_FILE=str(token_file)).returncode == 0
    denied = cli("create", TOKEN=READER)
    assert denied.returncode == 6 and "Create needs the admin role" in denied.stderr
    assert cli("health").returncode == 0  # open, no token needed

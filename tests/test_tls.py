"""TLS and mutual TLS: the real server with real certificates, called through the Python client, the CLI
and the real grpcurl; bad files stop start-up naming the variable; SIGHUP swaps the certificate of a
running `aperture-backup serve` without dropping a download in flight."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from aperture_backup.config import ConfigError
from aperture_backup.server import create_server
from aperture_backup_client import BackupClient
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService, free_port, grpcurl_path
from tests.support.service import test_config as service_config
from tests.support.tls import Authority, make_authority

TOKEN = "tls-test-token-0123456789abcdef"
SERVICE = "aperture.backup.v1.BackupService"


@pytest.fixture
def db16(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=50)


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "pki", "ca")


def _refused(client: BackupClient) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        client.status()
    return info.value.code()


def test_tls_through_the_python_client_and_grpcurl(
    db16: Database, ca: Authority, service_factory: StartService, tmp_path: Path
) -> None:
    pair = ca.server()
    svc = service_factory(db16.uri, tls_cert=pair.cert, tls_key=pair.key, token=TOKEN)
    with BackupClient(svc.target, token=TOKEN, ca_cert=ca.cert) as client:
        backup = client.create()
        downloaded = client.download(backup.id, tmp_path / "copy")
        assert downloaded.sha256 == hashlib.sha256((tmp_path / "copy").read_bytes()).hexdigest()
    with BackupClient(svc.target, token=TOKEN) as plaintext:
        assert _refused(plaintext) is grpc.StatusCode.UNAVAILABLE
    other = make_authority(tmp_path / "other", "other")
    with BackupClient(svc.target, token=TOKEN, ca_cert=other.cert) as untrusted:
        assert _refused(untrusted) is grpc.StatusCode.UNAVAILABLE

    grpcurl = grpcurl_path()
    listed = subprocess.run(
        [grpcurl, "-cacert", str(ca.cert), svc.target, "list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert listed.returncode == 0 and SERVICE in listed.stdout, listed.stderr
    status = subprocess.run(
        [grpcurl, "-cacert", str(ca.cert), "-H", f"authorization: Bearer {TOKEN}", svc.target, f"{SERVICE}/List"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert [b["id"] for b in json.loads(status.stdout)["backups"]] == [backup.id]
    plain = subprocess.run(
        [grpcurl, "-plaintext", svc.target, "list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert plain.returncode != 0


def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    db16: Database, ca: Authority, service_factory: StartService, tmp_path: Path
) -> None:
    pair = ca.server()
    svc = service_factory(db16.uri, tls_cert=pair.cert, tls_key=pair.key, tls_client_ca=ca.cert)
    client_pair = ca.client("aperture-backend")
    with BackupClient(svc.target, ca_cert=ca.cert, client_cert=client_pair.cert, client_key=client_pair.key) as client:
        assert client.status().database_reachable
    with BackupClient(svc.target, ca_cert=ca.cert) as anonymous:
        assert _refused(anonymous) is grpc.StatusCode.UNAVAILABLE
    stranger = make_authority(tmp_path / "stranger", "stranger").client("mallory")
    with BackupClient(svc.target, ca_cert=ca.cert, client_cert=stranger.cert, client_key=stranger.key) as mallory:
        assert _refused(mallory) is grpc.StatusCode.UNAVAILABLE

    grpcurl = [grpcurl_path(), "-cacert", str(ca.cert)]
    with_cert = subprocess.run(
        [*grpcurl, "-cert", str(client_pair.cert), "-key", str(client_pair.key), svc.target, f"{SERVICE}/GetStatus"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert with_cert.returncode == 0, with_cert.stderr
    without = subprocess.run(
        [*grpcurl, svc.target, f"{SERVICE}/GetStatus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert without.returncode != 0

    # The CLI, configured as an administrator would: the same variables, certificate files.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment.update(
        {
            "APERTURE_BACKUP_ADDRESS": svc.target,
            "APERTURE_BACKUP_CA_CERT": str(ca.cert),
            "APERTURE_BACKUP_CLIENT_CERT": str(client_pair.cert),
            "APERTURE_BACKUP_CLIENT_KEY": str(client_pair.key),
        }
    )
    for command in (["status"], ["health"]):
        result = subprocess.run(
            [sys.executable, "-m", "aperture_backup", *command],
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("fault", ["missing-cert", "garbage-cert", "garbage-key", "wrong-key", "missing-ca"])
def test_bad_tls_files_stop_start_up_naming_the_variable(
    fault: str, db16: Database, ca: Authority, tmp_path: Path
) -> None:
    pair, other = ca.server(), ca.issue("other", server=True)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key, client_ca = pair.cert, pair.key, None
    expected = {
        "missing-cert": "APERTURE_BACKUP_TLS_CERT names",
        "garbage-cert": "APERTURE_BACKUP_TLS_CERT names .* which holds no PEM certificate",
        "garbage-key": "APERTURE_BACKUP_TLS_KEY names .* holds no PEM private key",
        "wrong-key": "APERTURE_BACKUP_TLS_KEY .* is not the private key of the certificate",
        "missing-ca": "APERTURE_BACKUP_TLS_CLIENT_CA names .* cannot be read",
    }[fault]
    if fault == "missing-cert":
        cert = tmp_path / "nope.pem"
    elif fault == "garbage-cert":
        cert = garbage
    elif fault == "garbage-key":
        key = garbage
    elif fault == "wrong-key":
        key = other.key
    else:
        client_ca = tmp_path / "no-ca.pem"
    config = service_config(db16.uri, tmp_path / "backups", tls_cert=cert, tls_key=key, tls_client_ca=client_ca)
    with pytest.raises(ConfigError, match=expected):
        create_server(config)


@pytest.fixture
def tls_process(db16: Database, ca: Authority, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`aperture-backup serve` as an operator runs it: TLS from files, a token from a secret file."""
    pair = ca.server()
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(pair.cert.read_bytes())
    live_key.write_bytes(pair.key.read_bytes())
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment.update(
        {
            "APERTURE_BACKUP_DATABASE_URL": db16.uri,
            "APERTURE_BACKUP_DIR": str(tmp_path / "backups"),
            "APERTURE_BACKUP_LISTEN": f"0.0.0.0:{port}",
            "APERTURE_BACKUP_SCHEDULE": "off",
            "APERTURE_BACKUP_CATCH_UP": "false",
            "APERTURE_BACKUP_TOKEN_FILE": str(token_file),
            "APERTURE_BACKUP_TLS_CERT": str(live_cert),
            "APERTURE_BACKUP_TLS_KEY": str(live_key),
        }
    )
    log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115 - read by the test while the server runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "aperture_backup", "serve"], env=environment, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        yield proc, f"127.0.0.1:{port}", tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_sighup_reloads_the_certificate_without_dropping_calls(
    tls_process: tuple[subprocess.Popen[bytes], str, Path], ca: Authority
) -> None:
    proc, target, directory = tls_process
    with BackupClient(target, token=TOKEN, ca_cert=ca.cert) as client:
        backup = client.create()
        # A download in flight across the reload: the first chunk before, the rest after.
        chunks = client.stream_download(backup.id, chunk_size=64 * 1024)
        digest = hashlib.sha256(next(chunks).data)

        renewed_ca = make_authority(directory / "renewed", "renewed")
        renewed = renewed_ca.server()
        # Replace the files as an ACME client does: a new key and certificate from (here) another CA.
        (directory / "live.crt").write_bytes(renewed.cert.read_bytes())
        (directory / "live.key").write_bytes(renewed.key.read_bytes())
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "TLS certificate reloaded" not in (directory / "serve.log").read_text():
            assert time.monotonic() < deadline, (directory / "serve.log").read_text()
            time.sleep(0.1)

        for chunk in chunks:
            digest.update(chunk.data)
        assert digest.hexdigest() == backup.sha256
        assert client.status().database_reachable  # the established connection goes on

    with BackupClient(target, token=TOKEN, ca_cert=renewed_ca.cert) as renewed_client:
        assert [b.id for b in renewed_client.list()] == [backup.id]
    with BackupClient(target, token=TOKEN, ca_cert=ca.cert) as stale:
        assert _refused(stale) is grpc.StatusCode.UNAVAILABLE

    # A botched renewal (a key that does not match) keeps the running certificate and the service up.
    (directory / "live.key").write_bytes(ca.server().key.read_bytes())
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "TLS reload failed" not in (directory / "serve.log").read_text():
        assert time.monotonic() < deadline, (directory / "serve.log").read_text()
        time.sleep(0.1)
    assert proc.poll() is None
    with BackupClient(target, token=TOKEN, ca_cert=renewed_ca.cert) as still:
        assert still.status().database_reachable
    assert TOKEN not in (directory / "serve.log").read_text()

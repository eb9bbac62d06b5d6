"""A real S3-compatible server on loopback for the offsite tests: `moto_server` (PyPI `moto[server]`) in a
process of its own, spoken to through the real S3 protocol with boto3, the library the service uses.

The shared server checks credentials: it starts with IAM authentication enforced after the few calls
that create one user with an access key (`INITIAL_NO_AUTH_ACTION_COUNT`), so a wrong key is refused as a
real service refuses it. Fault tests start servers of their own, which they kill and start again.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from tests.support.service import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["Credentials", "FaultyProxy", "S3Server", "running_s3", "s3_environment"]

REGION = "us-east-1"
#: Calls the fixture makes before authentication is enforced: create_user, put_user_policy, create_access_key.
_SETUP_CALLS = 3


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str


@dataclass
class S3Server:
    """One moto_server process; `kill()` and `start()` again on the same port (its content is lost)."""

    log_path: Path
    authenticated: bool = False
    port: int = field(default_factory=free_port)
    credentials: Credentials = Credentials("AKIAOFFSITETESTS0001", "offsite-tests-secret")
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        if self.authenticated:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_CALLS)
        moto = Path(sys.executable).parent / "moto_server"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start; see {self.log_path}")
            time.sleep(0.05)
        if self.authenticated:
            self._make_user()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def client(self, credentials: Credentials | None = None) -> S3Client:
        creds = credentials or self.credentials
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=creds.access_key_id,
            aws_secret_access_key=creds.secret_access_key,
        )

    def make_bucket(self) -> str:
        name = f"offsite-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, int]:
        """Every object of the bucket and its size."""
        listing = self.client().list_objects_v2(Bucket=bucket)
        return {entry["Key"]: entry["Size"] for entry in listing.get("Contents", [])}

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def manifest(self, bucket: str, key: str) -> dict[str, Any]:
        return dict(json.loads(self.read(bucket, key + ".manifest.json")))

    def _make_user(self) -> None:
        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="aperture-backup")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="aperture-backup", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="aperture-backup")["AccessKey"]
        self.credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"])


@contextlib.contextmanager
def running_s3(log_path: Path, *, authenticated: bool = False, port: int | None = None) -> Iterator[S3Server]:
    server = S3Server(log_path, authenticated=authenticated)
    if port:
        server.port = port
    server.start()
    try:
        yield server
    finally:
        server.kill()


def s3_environment(credentials: Credentials, home: Path) -> dict[str, str]:
    """The AWS variables a service process needs, and nothing from this machine's own AWS files."""
    return {
        "AWS_ACCESS_KEY_ID": credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The shared, authenticating S3 server."""
    with running_s3(tmp_path_factory.mktemp("s3") / "moto.log", authenticated=True) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment set up for the in-process service to reach the shared S3 server."""
    values = s3_environment(s3_server.credentials, tmp_path)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


class FaultyProxy:
    """An HTTP proxy between the service and the S3 server that injects faults into chosen requests: the
    network failing under one part of a multipart upload (the connection dropped without an answer), or a
    request held until the test lets it go (to kill a process in the middle of an upload).

    Rules match a request by a substring of its path and query (`partNumber=2`), and a hold also by its
    method; `drop` drops the next `times` matching requests, `hold` blocks each matching request until
    `release()`. Every request seen
    is recorded in `seen` as "METHOD path"."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.seen: list[str] = []
        #: "METHOD path -> status" for each request the S3 server answered.
        self.answers: list[str] = []
        self._drops: dict[str, int] = {}
        #: (method or "", substring of the path)
        self._holds: set[tuple[str, str]] = set()
        self._released = threading.Event()
        self._drop_held = False
        self._held = threading.Event()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                body = self._body()
                action = proxy._decide(self.command, self.path)
                if action == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                try:
                    upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    upstream.close()
                except OSError:  # the S3 server is down: the client sees the connection drop
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                proxy._answered(self.command, self.path, response.status)
                self.send_response_only(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                        self.send_header(name, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                with contextlib.suppress(OSError):  # the client gave up (a killed service)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)

            def handle(self) -> None:
                with contextlib.suppress(OSError):  # a client that went away mid-request
                    super().handle()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815 - http.server's names

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop(self, match: str, times: int = 1) -> None:
        with self._lock:
            self._drops[match] = times

    def hold(self, match: str, method: str = "") -> None:
        """Block each request whose path contains `match` (and of `method`, when given) until `release()`."""
        with self._lock:
            self._holds.add((method, match))

    def wait_held(self, timeout: float = 60) -> None:
        if not self._held.wait(timeout):
            raise AssertionError("no request was held in time")

    def release(self, *, drop: bool = False) -> None:
        """Let held requests go on to the S3 server, or with `drop` cut them off (their client is gone)."""
        with self._lock:
            self._holds.clear()
            self._drop_held = drop
        self._released.set()

    def count(self, match: str) -> int:
        with self._lock:
            return sum(match in entry for entry in self.seen)

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def _answered(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.answers.append(f"{method} {path} -> {status}")

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self.seen.append(f"{method} {path}")
            for match, left in self._drops.items():
                if match in path and left > 0:
                    self._drops[match] = left - 1
                    return "drop"
            held = any(match in path and method_ in ("", method) for method_, match in self._holds)
        if held:
            self._held.set()
            self._released.wait(120)
            with self._lock:
                if self._drop_held:
                    return "drop"
        return "forward"

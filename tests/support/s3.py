"""A real S3-compatible server on loopback for the offsite tests: `moto_server` (PyPI `moto[server]`) in a
process of its own, spoken to through the real S3 protocol with boto3, the library the service uses.

The shared server checks credentials: it starts with IAM authentication enforced after the few calls
that create one user with an access key (`INITIAL_NO_AUTH_ACTION_COUNT`), so a wrong key is refused as a
real service refuses it. Fault tests start servers of their own, which they kill and start again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
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

__all__ = ["Credentials", "S3Server", "s3_environment"]

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
    server = S3Server(log_path, authenticated=authenticated, **({"port": port} if port else {}))
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

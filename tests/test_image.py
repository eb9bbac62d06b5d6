"""The container image, built from the project's Dockerfile and run as the README's Docker section runs it.

Real parts only: a real Docker daemon builds and runs the image, the container backs up and restores a real
PostgreSQL 16 seeded like Aperture's, and the real grpcurl calls it from the host with the token.

Where no Docker daemon answers, these tests skip with the reason; `APERTURE_REQUIRE_DOCKER=1` (CI sets it)
turns that skip into a failure. Public registries may be out of reach, so the image is built on a base made
here (`debootstrap --variant=minbase bookworm`, imported with `docker import`): Debian bookworm as the
Dockerfile's default `debian:bookworm-slim` is, so the tested build differs from the shipped one only in its
base image and the CA bundle given to pip. `APERTURE_TEST_IMAGE_BASE` names another base instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.service import grpcurl_path, wait_for

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "APERTURE_REQUIRE_DOCKER"
BASE_ENV = "APERTURE_TEST_IMAGE_BASE"
DOCKER_ENV = "APERTURE_TEST_DOCKER"
CA_BUNDLE_ENV = "APERTURE_TEST_CA_BUNDLE"
#: The locally made base, kept between runs: re-made when older than BASE_MAX_AGE (the build upgrades
#: nothing in it, so a week-old base would carry week-old essential packages).
LOCAL_BASE = "aperture-backup-test/base:bookworm"
BASE_MAX_AGE = timedelta(days=7)
SERVICE = "aperture.backup.v1.BackupService"
#: The image's user (Dockerfile: useradd --uid 10001).
USER_ID = 10001
STOP_LIMIT = 10.0


def _unavailable(reason: str) -> None:
    """Skip, or fail where CI said Docker must be there."""
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this is a failure, not a skip)")
    pytest.skip(reason)


def _docker_cli() -> str | None:
    """The docker client to drive the daemon with. Debian's 20.10 daemon builds with BuildKit only through
    its own client (a newer client on PATH wants the buildx plugin for that), so Debian's comes first."""
    if chosen := os.environ.get(DOCKER_ENV):
        return chosen
    debian = Path("/usr/bin/docker")
    return str(debian) if debian.exists() else shutil.which("docker")


@dataclass(frozen=True)
class Docker:
    cli: str

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_BUILDKIT": "1"}
        result = subprocess.run(
            [self.cli, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env, **kwargs
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def inspect(self, name: str, template: str) -> str:
        return self("inspect", "-f", template, name).stdout.strip()


def _report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's output even without -s (build time, image size)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line(f"[image] {line}")
        else:
            print(f"[image] {line}")


@pytest.fixture(scope="module")
def docker() -> Docker:
    cli = _docker_cli()
    if cli is None:
        _unavailable("no docker client installed (Debian: apt-get install docker.io)")
    assert cli is not None
    client = Docker(cli)
    server = client("version", "--format", "{{.Server.Version}}", check=False, timeout=30)
    if server.returncode != 0:
        _unavailable(f"no Docker daemon answers: {server.stderr.strip()}")
    return client


def _local_base(docker: Docker) -> str:
    """A Debian bookworm minbase image made here, reused while younger than BASE_MAX_AGE."""
    created = docker("image", "inspect", "-f", "{{.Created}}", LOCAL_BASE, check=False)
    if created.returncode == 0:
        when = datetime.fromisoformat(created.stdout.strip()[:26].rstrip("Z")).replace(tzinfo=UTC)
        if datetime.now(UTC) - when < BASE_MAX_AGE:
            return LOCAL_BASE
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        _unavailable(f"debootstrap is not installed, and {LOCAL_BASE} is not there to build on (or set {BASE_ENV})")
    assert debootstrap is not None
    if os.geteuid() != 0:
        _unavailable(f"debootstrap needs root to make {LOCAL_BASE} (or set {BASE_ENV} to a bookworm image)")
    with tempfile.TemporaryDirectory(prefix="aperture-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [debootstrap, "--variant=minbase", "bookworm", str(rootfs)],
            check=True,
            capture_output=True,
            timeout=900,
        )
        # What debian:bookworm-slim leaves out as well: the downloaded packages and the package lists.
        for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/lib/apt/lists/*_*")]:
            leftover.unlink()
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            docker("import", "-", LOCAL_BASE, stdin=tar.stdout, timeout=600)
        assert tar.returncode == 0
    return LOCAL_BASE


def _ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts, for pip inside the build (a TLS-intercepting proxy's CA is
    trusted only here); None where pip uses its own."""
    for variable in (CA_BUNDLE_ENV, "PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(variable)
        if value and Path(value).is_file():
            return Path(value)
    return None


@pytest.fixture(scope="module")
def image(docker: Docker, request: pytest.FixtureRequest) -> Iterator[str]:
    """The image built from the project's Dockerfile; removed at the end (its layers stay in the cache)."""
    base = os.environ.get(BASE_ENV) or _local_base(docker)
    tag = f"aperture-backup-test:{uuid.uuid4().hex[:8]}"
    command = ["build", "--build-arg", f"BASE={base}", "-t", tag]
    if (bundle := _ca_bundle()) is not None:
        command += ["--secret", f"id=ca_bundle,src={bundle}"]
    started = time.monotonic()
    docker(*command, str(ROOT), timeout=1200)
    size = int(docker.inspect(tag, "{{.Size}}"))
    _report(request, f"built on {base} in {time.monotonic() - started:.1f} s; image size {size / 1e6:.0f} MB")
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


class _Relay:
    """Forwards TCP connections to PostgreSQL's Unix socket: the test server listens on no TCP port, and a
    container reaches the host only through the network. Bytes pass unchanged; PostgreSQL sees a local
    connection."""

    def __init__(self, host: str, socket_path: str) -> None:
        self._socket_path = socket_path
        self._listener = socket.create_server((host, 0))
        self.host, self.port = host, int(self._listener.getsockname()[1])
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="pg-relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self._socket_path)
            except OSError:
                client.close()
                continue
            self._open += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._open:
            sock.close()


@pytest.fixture(scope="module")
def relay(docker: Docker, pg16: PgServer) -> Iterator[_Relay]:
    """PostgreSQL 16 on the address of Docker's default bridge on this host, where containers reach it."""
    config = json.loads(docker("network", "inspect", "-f", "{{json .IPAM.Config}}", "bridge").stdout)[0]
    # Docker 20.10 often leaves Gateway out; the bridge then has the subnet's first address.
    gateway = config.get("Gateway") or str(next(ipaddress.ip_network(config["Subnet"]).hosts()))
    params = conninfo_to_dict(pg16.uri)
    socket_path = f"{params['host']}/.s.PGSQL.{params.get('port') or 5432}"
    forwarder = _Relay(gateway, socket_path)
    yield forwarder
    forwarder.close()


def _secrets(directory: Path, **files: str) -> Path:
    """Secret files as Docker mounts them: readable by the container's user only."""
    directory.mkdir()
    for name, value in files.items():
        path = directory / name
        path.write_text(value + "\n", encoding="utf-8")
        if os.geteuid() == 0:
            os.chown(path, USER_ID, USER_ID)
            path.chmod(0o400)
        else:
            path.chmod(0o444)
    return directory


def _grpcurl(
    target: str, method: str, request: dict[str, Any] | None = None, *, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    headers = ["-H", f"authorization: Bearer {token}"] if token else []
    return subprocess.run(
        [grpcurl_path(), "-plaintext", *headers, "-d", json.dumps(request or {}), target, f"{SERVICE}/{method}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _messages(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    decoder, text, found = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        found.append(message)
        text = text[end:].lstrip()
    return found


def _wait_healthy(docker: Docker, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(docker.inspect(name, "{{json .State}}"))
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return
        if not state["Running"] or health == "unhealthy" or time.monotonic() > deadline:
            logs = docker("logs", name, check=False)
            raise AssertionError(f"container is {health or state['Status']}: {state}\n{logs.stdout}{logs.stderr}")
        time.sleep(0.5)


def _volume_files(docker: Docker, image: str, volume: str) -> dict[str, str]:
    """Name → "uid gid mode" of everything in the volume, read by a container of the same image."""
    listing = docker(
        "run", "--rm", "-v", f"{volume}:/backups", "--entrypoint", "sh", image, "-c",
        "cd /backups && find . -mindepth 1 -exec stat -c '%n %u %g %a' {} +",
    ).stdout  # fmt: skip
    return {line.split(" ", 1)[0][2:]: line.split(" ", 1)[1] for line in listing.splitlines()}


_LIST_TOOLSETS = (
    "import json; from aperture_backup import toolchain; "
    "print(json.dumps([(t.major, str(t.bin_dir)) for t in reversed(toolchain.discover())]))"
)


def test_the_image_backs_up_and_restores_aperture_as_a_non_root_user(
    docker: Docker, image: str, relay: _Relay, pg16: PgServer, make_database: MakeDatabase, tmp_path: Path
) -> None:
    database = make_database(pg16, seeded=True)
    token = secrets.token_hex(32)
    url = f"postgresql://postgres@{relay.host}:{relay.port}/{database.dbname}"
    secret_dir = _secrets(tmp_path / "secrets", aperture_backup_token=token, database_url=url)
    name, volume = f"aperture-backup-test-{uuid.uuid4().hex[:8]}", f"aperture-backups-test-{uuid.uuid4().hex[:8]}"
    try:
        # The README's `docker run`, with the port published on a free loopback port of its own.
        docker(
            "run", "-d", "--name", name,
            "-e", "APERTURE_BACKUP_DATABASE_URL_FILE=/run/secrets/database_url",
            "-e", "APERTURE_BACKUP_TOKEN_FILE=/run/secrets/aperture_backup_token",
            "-v", f"{secret_dir}:/run/secrets:ro",
            "-v", f"{volume}:/backups", "-p", "127.0.0.1::50051", image,
        )  # fmt: skip
        _wait_healthy(docker, name)
        port = docker("port", name, "50051/tcp").stdout.split()[0].rsplit(":", 1)[1]
        target = f"127.0.0.1:{port}"

        # Not root: the image says so, and so does the kernel about the process it runs.
        assert docker.inspect(name, "{{.Config.User}}") == f"{USER_ID}:{USER_ID}"
        status_lines = docker("exec", name, "cat", "/proc/1/status").stdout.splitlines()
        uids = next(line for line in status_lines if line.startswith("Uid:")).split()[1:]
        assert uids == [str(USER_ID)] * 4

        # The client tools the README promises, found where the service looks, each one able to dump
        # this server (pg_dump refuses servers newer than itself, so 15 only says its version).
        found = docker("exec", name, "python3", "-c", _LIST_TOOLSETS).stdout
        toolsets = {int(major): bin_dir for major, bin_dir in json.loads(found)}
        assert sorted(toolsets) == [15, 16, 17, 18], toolsets
        for major, bin_dir in toolsets.items():
            if major >= 16:
                docker("exec", name, f"{bin_dir}/pg_dump", "--schema-only", "-f", "/dev/null", "-d", url)

        # The token from the secret file is required, and enough.
        refused = _grpcurl(target, "GetStatus")
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
        status = _messages(_grpcurl(target, "GetStatus", token=token))[0]
        assert status["databaseReachable"] is True and status["database"] == database.dbname

        source = fingerprint(database.uri)
        created = _messages(_grpcurl(target, "Create", token=token))[-1]["backup"]
        assert created["state"] == "BACKUP_STATE_READY"
        assert created["serverVersion"].startswith("16.") and created["pgDumpVersion"].startswith("16.")
        volume_root = docker("exec", name, "stat", "-c", "%u %g %a", "/backups").stdout.strip()
        assert volume_root == f"{USER_ID} {USER_ID} 700"
        files = _volume_files(docker, image, volume)
        assert files[created["id"]] == f"{USER_ID} {USER_ID} 600"
        assert files[f"{created['id']}.manifest.json"] == f"{USER_ID} {USER_ID} 600"

        # A change after the backup, then Restore: exactly the backed-up database again.
        with psycopg.connect(database.uri) as conn:
            conn.execute("CREATE TABLE public.added_after_backup (id integer)")
            conn.execute("UPDATE public.movies SET title = title || ' (changed)'")
        assert fingerprint(database.uri) != source
        result = _messages(_grpcurl(target, "Restore", {"id": created["id"]}, token=token))[-1]["result"]
        assert result["restored"]["id"] == created["id"]
        assert_same(source, fingerprint(database.uri))
        archives = {created["id"], result["safetyBackup"]["id"]}

        # `docker stop` in the middle of a backup: SIGTERM ends the job and the service well within the grace
        # period, with exit status 0 and no temporary file left in the volume.
        with table_lock(database.uri):
            create = subprocess.Popen(
                [grpcurl_path(), "-plaintext", "-H", f"authorization: Bearer {token}", "-d", "{}", target,
                 f"{SERVICE}/Create"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            try:
                wait_for(lambda: "pg_dump" in docker("top", name).stdout, timeout=60)
                started = time.monotonic()
                docker("stop", "-t", str(int(STOP_LIMIT)), name, timeout=60)
                stopped_in = time.monotonic() - started
            finally:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    create.communicate(timeout=30)
                create.kill()
        assert stopped_in < STOP_LIMIT, f"docker stop took {stopped_in:.1f} s"
        state = json.loads(docker.inspect(name, "{{json .State}}"))
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
        after_stop = _volume_files(docker, image, volume)
        leftovers = [n for n in after_stop if n.startswith(".tmp-")]
        assert leftovers == [], leftovers
        # The stopped backup left no archive, and its manifest says why.
        assert {n for n in after_stop if not n.startswith(".") and not n.endswith(".manifest.json")} == archives
        (stopped,) = {n.removesuffix(".manifest.json") for n in after_stop if n.endswith(".manifest.json")} - archives
        manifest = json.loads(
            docker("run", "--rm", "-v", f"{volume}:/backups", "--entrypoint", "cat", image,
                   f"/backups/{stopped}.manifest.json").stdout
        )  # fmt: skip
        assert manifest["state"] == "failed" and "cancel" in manifest["error"], manifest
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_the_image_refuses_to_listen_without_a_token(
    docker: Docker, image: str, relay: _Relay, pg16: PgServer, make_database: MakeDatabase, tmp_path: Path
) -> None:
    database = make_database(pg16)
    url = f"postgresql://postgres@{relay.host}:{relay.port}/{database.dbname}"
    secret_dir = _secrets(tmp_path / "secrets", database_url=url)
    result = docker(
        "run", "--rm", "-e", "APERTURE_BACKUP_DATABASE_URL_FILE=/run/secrets/database_url",
        "-v", f"{secret_dir}:/run/secrets:ro", image,
        check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0:50051 without authentication" in result.stderr, result.stderr


def _compose_command(docker: Docker) -> list[str] | None:
    """`docker compose` where the plugin is there, else Debian's `docker-compose`."""
    if docker("compose", "version", check=False).returncode == 0:
        return [docker.cli, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_the_compose_file_is_valid_and_keeps_the_service_internal(tmp_path: Path) -> None:
    cli = _docker_cli()
    command = _compose_command(Docker(cli)) if cli else None
    if command is None and (legacy := shutil.which("docker-compose")):
        command = [legacy]
    if command is None:
        _unavailable("no compose tool installed (Debian: apt-get install docker-compose)")
    assert command is not None
    project = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", project)
    # The secret files the README makes; the compose tool checks that they exist.
    _secrets(project / "secrets", aperture_backup_token=secrets.token_hex(32), database_url="postgresql://x@db/x")
    env = {**os.environ, "POSTGRES_PASSWORD": "example-password"}
    result = subprocess.run(
        [*command, "-f", str(project / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=project,
    )
    assert result.returncode == 0, result.stderr
    assert "WARN" not in result.stderr, result.stderr
    config = yaml.safe_load(result.stdout)
    services = config["services"]
    assert services["db"]["image"] == "pgvector/pgvector:pg16"
    assert {"db", "app", "aperture-backup"} <= set(services)
    backup = services["aperture-backup"]
    assert "ports" not in backup, "the backup service must not be published beyond the compose network"
    assert {s if isinstance(s, str) else s["source"] for s in backup["secrets"]} == {
        "aperture_backup_token",
        "aperture_backup_database_url",
    }
    environment = backup["environment"]
    assert environment["APERTURE_BACKUP_TOKEN_FILE"] == "/run/secrets/aperture_backup_token"
    assert environment["APERTURE_BACKUP_DATABASE_URL_FILE"] == "/run/secrets/aperture_backup_database_url"
    # Compose v1 prints volumes as "source:target:mode", v2 as mappings.
    targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in backup["volumes"]}
    assert "/backups" in targets
    assert backup["healthcheck"]["test"][:2] == ["CMD", "aperture-backup"]
    assert services["app"]["environment"]["APERTURE_BACKUP_ADDRESS"] == "aperture-backup:50051"

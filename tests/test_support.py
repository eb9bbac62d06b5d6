"""Tests of the test-support layer: servers, seed, fingerprint, and what pg_dump really does with them.

Every later backup/restore test trusts `fingerprint()` to say "identical" only when the databases are
identical, and the seed to exercise what Aperture's database holds. These tests pin both down on real
servers (16, 18, and the optional 15), including a plain and a custom-format dump/restore round trip.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.support.fingerprint import Fingerprint, assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, ToolFailed
from tests.support.seed import LARGE_OBJECT_OID_BASE, TABLES, VECTOR_TABLES

# What each server must offer; a wheel that lost pgvector would silently weaken every later test.
EXPECTED = {
    "pg16": (16, {"vector"}),
    "pg18": (18, {"vector", "pg_trgm"}),
    "pg15": (15, {"pgcrypto", "pg_trgm"}),
}


def _query(uri: str, query: str, *settings: str) -> list[tuple[object, ...]]:
    with psycopg.connect(uri) as conn:
        for setting in settings:
            conn.execute(setting.encode())
        return conn.execute(query.encode()).fetchall()


def _execute(uri: str, statement: str | sql.Composed) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(statement.encode() if isinstance(statement, str) else statement)


def test_server_facts(pg_server: PgServer) -> None:
    major, extensions = EXPECTED[pg_server.name]
    if pg_server.name != "pg15":  # the external server may be pointed elsewhere by APERTURE_TEST_PG15_URL
        assert pg_server.major == major
        assert extensions <= pg_server.extensions
    for tool in ("pg_dump", "pg_restore", "psql"):
        out = pg_server.run(tool, "--version").stdout
        assert f"(PostgreSQL) {pg_server.major}." in out


def test_database_lifecycle_and_uri(pg_server: PgServer) -> None:
    """database_uri() must reach exactly that database, whatever its name, and drop must not wait for
    clients: a restore test that fails midway leaves connections behind."""
    name = 'aperture_t Zoë\'s "odd" name'
    pg_server.drop_database(name)
    uri = pg_server.create_database(name)
    try:
        assert uri == pg_server.database_uri(name)
        assert pg_server.database_exists(name)
        with psycopg.connect(uri, autocommit=True) as conn:
            row = conn.execute("SELECT current_database()").fetchone()
            assert row == (name,)
            out = pg_server.run("psql", "-X", "-At", "-c", "SELECT current_database()", "-d", uri).stdout
            assert out.strip() == name
            pg_server.drop_database(name)  # while `conn` is still open
    finally:
        pg_server.drop_database(name)
    assert not pg_server.database_exists(name)


def test_make_database_without_create(pg_server: PgServer, make_database: MakeDatabase) -> None:
    reserved = make_database(pg_server, create=False)
    assert not pg_server.database_exists(reserved.dbname)
    pg_server.create_database(reserved.dbname)  # as code under test would; the fixture drops it


def test_seed_is_deterministic(pg_server: PgServer, make_database: MakeDatabase) -> None:
    first = make_database(pg_server, seeded=True)
    second = make_database(pg_server, seeded=True)
    assert_same(fingerprint(first.uri), fingerprint(second.uri))


def test_seed_has_aperture_shape(seeded_db: Database) -> None:
    server = seeded_db.server
    fp = fingerprint(seeded_db.uri)
    tables = {key.removeprefix("table public.") for key in fp.schema if key.startswith("table public.")}
    assert set(TABLES) <= tables
    assert "extension plpgsql" in fp.schema
    for extension in server.extensions:
        assert f"extension {extension}" in fp.schema
    assert fp.schema["large objects"].startswith("count 6\n")
    assert f"{LARGE_OBJECT_OID_BASE + 1} sha256" in fp.schema["large objects"]
    assert "materialized view public.genre_popularity" in fp.schema
    assert "view public.movie_rating_summary" in fp.schema
    assert "trigger public.users users_set_updated_at" in fp.schema
    assert fp.schema["type public.user_role"] == "enum 'admin', 'user', 'guest'"
    assert "is_called False" in fp.schema["sequence public.job_schedules_id_seq"]

    names = {row[0] for row in _query(seeded_db.uri, "SELECT display_name FROM public.users")}
    assert {"Zoë Kravitz-fan", "東京の映画好き", "Ærøskøbing 🎬🍿", None} <= names
    orphans = _query(
        seeded_db.uri,
        "SELECT content FROM public.media_assets WHERE content NOT IN "
        "(SELECT oid FROM pg_catalog.pg_largeobject_metadata)",
    )
    assert orphans == []

    if "vector" in server.extensions:
        assert set(VECTOR_TABLES) <= tables
        bq = fp.schema["index public.movie_embeddings_large_bq_idx"]
        assert "binary_quantize(embedding_large))::bit(3072)) public.bit_hamming_ops" in bq
        assert "embedding_large public.halfvec(3072)" in fp.schema["table public.movie_embeddings"]
        # The index must be usable, not just present.
        hits = _query(
            seeded_db.uri,
            "SELECT movie_id FROM public.movie_embeddings "
            "WHERE embedding_large IS NOT NULL ORDER BY binary_quantize(embedding_large)::bit(3072) "
            "<~> (SELECT binary_quantize(embedding_large)::bit(3072) FROM public.movie_embeddings "
            "WHERE movie_id = 1) LIMIT 3",
            "SET LOCAL enable_seqscan = off",
        )
        assert len(hits) == 3
    else:
        assert not set(VECTOR_TABLES) & tables
    assert ("index public.movies_title_trgm_idx" in fp.schema) == ("pg_trgm" in server.extensions)


# Each mutation and the fingerprint keys it must change, and only those.
MUTATIONS: dict[str, tuple[str, set[str]]] = {
    "row": (
        "UPDATE public.system_settings SET value = '\"fr-CH\"' WHERE key = 'ui.locale'",
        {"content public.system_settings"},
    ),
    "row-added": (
        "INSERT INTO public.aperture_migrations VALUES (99, '0099_extra', '2025-01-01 00:00+00')",
        {"content public.aperture_migrations"},
    ),
    "table": (
        "CREATE TABLE public.extra_table (id integer)",
        {"schema table public.extra_table", "content public.extra_table"},
    ),
    "sequence": ("SELECT nextval('public.series_id_seq')", {"schema sequence public.series_id_seq"}),
    "sequence-is-called": (
        "SELECT setval('public.job_schedules_id_seq', 5, true)",
        {"schema sequence public.job_schedules_id_seq"},
    ),
    "function-body": (
        "CREATE OR REPLACE FUNCTION public.set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        "BEGIN\n    NEW.updated_at := clock_timestamp();\n    RETURN NEW;\nEND\n$fn$",
        {"schema function public.set_updated_at()"},
    ),
    "index": ("DROP INDEX public.watch_history_user_time_idx", {"schema index public.watch_history_user_time_idx"}),
    "enum": ("ALTER TYPE public.user_role ADD VALUE 'robot'", {"schema type public.user_role"}),
    "large-object": (
        f"SELECT lo_put({LARGE_OBJECT_OID_BASE + 2}, 3, '\\x00'::bytea)",
        {"schema large objects"},
    ),
    "comment": ("COMMENT ON TABLE public.movies IS 'changed'", {"schema table public.movies"}),
}


def _changed_keys(before: Fingerprint, after: Fingerprint) -> set[str]:
    changed = set()
    for section, old, new in (("schema", before.schema, after.schema), ("content", before.content, after.content)):
        changed |= {f"{section} {key}" for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
    return changed


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_fingerprint_detects_change(seeded_db: Database, mutation: str) -> None:
    statement, expected = MUTATIONS[mutation]
    before = fingerprint(seeded_db.uri)
    _execute(seeded_db.uri, statement)
    after = fingerprint(seeded_db.uri)
    assert _changed_keys(before, after) == expected
    with pytest.raises(AssertionError) as excinfo:
        assert_same(before, after)
    some_key = sorted(expected)[0].split(" ", 1)[1]
    assert some_key in str(excinfo.value)


def test_fingerprint_ignores_physical_order(seeded_db: Database) -> None:
    """A restore writes rows in a different physical order; that must not count as a difference."""
    before = fingerprint(seeded_db.uri)
    for table in ("ratings", "system_settings"):  # same rows, written back in reverse order
        statement = sql.SQL(
            "WITH gone AS (DELETE FROM {table} RETURNING *)"
            " INSERT INTO {table} SELECT * FROM gone ORDER BY gone::text DESC"
        ).format(table=sql.Identifier("public", table))
        _execute(seeded_db.uri, statement)
    _execute(seeded_db.uri, "VACUUM FULL public.movies")
    assert_same(before, fingerprint(seeded_db.uri))


def _plain_dump(db: Database, path: Path) -> None:
    db.server.run("pg_dump", "--no-owner", "--no-acl", "--format=plain", "--file", path, "--dbname", db.uri)


@pytest.mark.parametrize("single_transaction", [False, True], ids=["autocommit", "single-transaction"])
def test_plain_dump_round_trip(
    seeded_db: Database, make_database: MakeDatabase, tmp_path: Path, single_transaction: bool
) -> None:
    dump = tmp_path / "seeded.sql"
    _plain_dump(seeded_db, dump)
    target = make_database(seeded_db.server)
    args = ["-X", "--quiet", "-v", "ON_ERROR_STOP=1", "--file", str(dump), "--dbname", target.uri]
    if single_transaction:
        args.insert(0, "--single-transaction")
    seeded_db.server.run("psql", *args)
    assert_same(fingerprint(seeded_db.uri), fingerprint(target.uri))


def test_custom_dump_round_trip(seeded_db: Database, make_database: MakeDatabase, tmp_path: Path) -> None:
    dump = tmp_path / "seeded.dump"
    server = seeded_db.server
    # The flags Aperture 0.7.8 itself uses for its backups.
    server.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "-Z", "6", "--file", dump, "--dbname", seeded_db.uri)
    assert dump.read_bytes()[:5] == b"PGDMP"
    target = make_database(server)
    server.run(
        "pg_restore",
        "--no-owner",
        "--no-acl",
        "--single-transaction",
        "--exit-on-error",
        "--dbname",
        target.uri,
        dump,
    )
    assert_same(fingerprint(seeded_db.uri), fingerprint(target.uri))


def test_plain_dump_large_objects_break_single_transaction(
    seeded_db: Database, make_database: MakeDatabase, tmp_path: Path
) -> None:
    """Pins the trap the restore code must avoid: a plain dump with large objects has its own
    BEGIN/COMMIT, so `psql --single-transaction -v ON_ERROR_STOP=1` commits everything before that
    COMMIT and a later error leaves a half-restored database (exit status 3)."""
    dump = tmp_path / "seeded.sql"
    _plain_dump(seeded_db, dump)
    lines = dump.read_text(encoding="utf-8").splitlines()
    assert "BEGIN;" in lines and "COMMIT;" in lines
    dump.write_text("\n".join([*lines, "SELECT 1/0;", ""]), encoding="utf-8")

    target = make_database(seeded_db.server)
    with pytest.raises(ToolFailed) as excinfo:
        seeded_db.server.run(
            "psql",
            "--single-transaction",
            "-X",
            "--quiet",
            "-v",
            "ON_ERROR_STOP=1",
            "--file",
            str(dump),
            "--dbname",
            target.uri,
        )
    assert excinfo.value.returncode == 3
    assert "division by zero" in excinfo.value.stderr
    left = fingerprint(target.uri)
    assert "table public.movies" in left.schema, "expected a half-restored database (pre-LO part committed)"
    assert left.schema["large objects"].startswith("count 6")


def test_custom_restore_error_rolls_back(seeded_db: Database, make_database: MakeDatabase, tmp_path: Path) -> None:
    """The counterpart: pg_restore --single-transaction --exit-on-error leaves the target untouched."""
    dump = tmp_path / "seeded.dump"
    server = seeded_db.server
    server.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "--file", dump, "--dbname", seeded_db.uri)
    target = make_database(server)
    _execute(target.uri, "CREATE TABLE public.movies (id integer)")  # collides with the archive
    empty_but_one = fingerprint(target.uri)
    result = server.run(
        "pg_restore",
        "--no-owner",
        "--no-acl",
        "--single-transaction",
        "--exit-on-error",
        "--dbname",
        target.uri,
        dump,
        check=False,
    )
    assert result.returncode == 1
    assert_same(empty_but_one, fingerprint(target.uri))

"""Rows and schema counted as the dump streams through (contents.py), recorded in the manifest and shown
by Get: the counts equal what the database held, in plain and custom format, and the parser is exact
however the stream is cut."""

from __future__ import annotations

import json

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from aperture_backup.contents import ContentCounter
from aperture_backup_client import pb
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService


def _live_counts(uri: str) -> dict[str, int]:
    with psycopg.connect(uri) as conn:
        names = conn.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_catalog.pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        return {
            str(n): int(conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.SQL(n))).fetchone()[0])  # type: ignore[index]
            for (n,) in names
        }


@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["plain", "custom"])
def test_the_manifest_holds_the_rows_tables_indexes_and_extensions_of_the_dump(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, fmt: pb.BackupFormat.ValueType
) -> None:
    db = make_database(pg16, seeded=True, rows=37)
    with psycopg.connect(db.uri) as conn:
        conn.execute('CREATE TABLE public."Odd Name" (v text)')
        conn.execute("""INSERT INTO public."Odd Name" VALUES ('a\nb'), ('\\.'), ('.'), (NULL)""")
    live = _live_counts(db.uri)
    svc = service_factory(db.uri)
    backup = svc.client.create(format=fmt)

    assert dict(backup.table_rows) == live
    assert backup.table_rows['public."Odd Name"'] == 4
    assert dict(svc.client.get(backup.id).table_rows) == live
    manifest = json.loads((svc.backup_dir / f"{backup.id}.manifest.json").read_text())
    contents = manifest["contents"]
    assert set(contents["tables"]) == set(live)
    assert "public.users_username_lower_idx" in contents["indexes"]
    assert "public.users_pkey" in contents["indexes"]
    assert "vector" in contents["extensions"]


_LINES = st.lists(st.text(alphabet="ab\\.\t", max_size=6), max_size=8)


@settings(max_examples=200, deadline=None)
@given(tables=st.lists(_LINES, min_size=1, max_size=4), cuts=st.lists(st.integers(1, 50), min_size=1, max_size=30))
def test_counting_does_not_depend_on_how_the_stream_is_cut(tables: list[list[str]], cuts: list[int]) -> None:
    parts = []
    for number, rows in enumerate(tables):
        parts.append(f"CREATE TABLE public.t{number} (\n    v text\n);\n")
        # COPY's text format: a value "\." is written "\\.", so no data line is the end marker.
        data = "".join(row.replace("\\", "\\\\") + "\n" for row in rows)
        parts.append(f"COPY public.t{number} (v) FROM stdin;\n{data}\\.\n\n")
    dump = "".join(parts).encode()
    counter = ContentCounter()
    position, index = 0, 0
    while position < len(dump):
        size = cuts[index % len(cuts)]
        counter.feed(dump[position : position + size])
        position, index = position + size, index + 1
    contents = counter.finish()
    assert contents.rows == {f"public.t{n}": len(rows) for n, rows in enumerate(tables)}
    assert contents.tables == tuple(f"public.t{n}" for n in range(len(tables)))

"""Two replicas of the service, as two real `serve` processes, on one database and one bucket (a real S3
server on loopback): one scheduled backup a day between them, no archive uploaded twice, bucket retention
one replica at a time, and never deleting an archive a replica is reading from the bucket."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.database import ARCHIVE_LOCK_CLASS, BUCKET_RETENTION_LOCK_KEY
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.s3 import S3Server
from tests.support.service import ServiceProcess, service_process, wait_for

LOCAL, BUCKET = pb.STORAGE_LOCATION_LOCAL, pb.STORAGE_LOCATION_BUCKET


@pytest.fixture
def db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    """Aperture's database; the big table makes an archive of several MB, so that a download in progress
    holds its stream open (gRPC's flow control stops the server until the client reads on)."""
    db = make_database(pg16, seeded=True, rows=50)
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.big AS SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 600000) g")
    return db


def _next_minute() -> str:
    """A schedule time both replicas reach within about a minute, never less than 15 s away."""
    now = datetime.now(UTC)
    when = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if (when - now).total_seconds() < 15:
        when += timedelta(minutes=1)
    return when.strftime("%H:%M")


@contextlib.contextmanager
def _replicas(
    db: Database, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path, **settings: str
) -> Iterator[tuple[ServiceProcess, ServiceProcess, str]]:
    bucket = s3_server.make_bucket()
    shared = {
        "DATABASE_URL": db.uri,
        "S3_URL": f"s3://{bucket}/replicas/",
        "S3_ENDPOINT": s3_server.endpoint,
        **settings,
        **s3_env,
    }
    with (
        service_process(tmp_path / "a", tmp_path / "a.log", **shared) as a,
        service_process(tmp_path / "b", tmp_path / "b.log", **shared) as b,
    ):
        yield a, b, bucket


def _copies(*replicas: ServiceProcess) -> Counter[str]:
    """How often each archive was copied to the bucket, by the replicas' logs."""
    pattern = re.compile(r"copied (\S+) to s3://")
    return Counter(m.group(1) for r in replicas for m in pattern.finditer(r.log()))


def _read_locks(db: Database) -> int:
    with psycopg.connect(db.uri, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' AND classid = %s",
            (ARCHIVE_LOCK_CLASS,),
        ).fetchone()
    return int(row[0]) if row else 0


def _archives(s3_server: S3Server, bucket: str) -> set[str]:
    return {k.removeprefix("replicas/") for k in s3_server.objects(bucket) if not k.endswith(".manifest.json")}


def test_two_replicas_make_one_scheduled_backup_a_day_and_upload_each_archive_once(
    db: Database, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    schedule = _next_minute()
    with _replicas(db, s3_server, s3_env, tmp_path, SCHEDULE=schedule) as (a, b, bucket):
        # Both replicas' schedules fire at the same minute; wait until both have run theirs.
        wait_for(lambda: "scheduled backup" in a.log() and "scheduled backup" in b.log(), timeout=150)
        wait_for(lambda: not a.client.status().HasField("current_job"), timeout=60)
        wait_for(lambda: not b.client.status().HasField("current_job"), timeout=60)
        scheduled = [
            s3_server.manifest(bucket, f"replicas/{i}")
            for i in _archives(s3_server, bucket)
            if s3_server.manifest(bucket, f"replicas/{i}")["trigger"] == "scheduled"
        ]
        assert len(scheduled) == 1, f"one scheduled backup between the two replicas, not {len(scheduled)}"
        made = scheduled[0]["id"]
        skipped = [r for r in (a, b) if "scheduled backup skipped" in r.log()]
        assert len(skipped) == 1, "the other replica skipped its own"
        # Both list it: one has it in its directory and in the bucket, the other only in the bucket.
        seen = sorted(sorted(r.client.get(made).locations) for r in (a, b))
        assert seen == sorted([[BUCKET], [LOCAL, BUCKET]])

        # Manual backups of each replica go to the bucket once each.
        mine, theirs = a.client.create(), b.client.create()
        assert _archives(s3_server, bucket) == {made, mine.id, theirs.id}
        # A replica's listing of the bucket is at most a few seconds old (LISTING_TTL_SECONDS).
        wait_for(lambda: {b_.id for b_ in a.client.list()} == {made, mine.id, theirs.id}, timeout=15)
        copies = _copies(a, b)
        assert set(copies) == {made, mine.id, theirs.id} and set(copies.values()) == {1}, copies


def test_bucket_retention_runs_one_replica_at_a_time_and_spares_what_a_replica_reads(
    db: Database, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    with _replicas(db, s3_server, s3_env, tmp_path, KEEP="5") as (a, b, bucket):
        oldest = a.client.create(compression=pb.COMPRESSION_NONE)
        middle = a.client.create(compression=pb.COMPRESSION_NONE)
        newest = b.client.create(compression=pb.COMPRESSION_NONE)
        assert _archives(s3_server, bucket) == {oldest.id, middle.id, newest.id}
        assert list(b.client.get(middle.id).locations) == [BUCKET], "replica b has it only in the bucket"

        # While another replica holds the bucket's retention lock, a replica leaves the bucket alone.
        with psycopg.connect(db.uri, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (BUCKET_RETENTION_LOCK_KEY,))
            a.client.set_retention(1)
            assert _archives(s3_server, bucket) == {oldest.id, middle.id, newest.id}
            assert "another replica is applying it" in a.log()
            holder.execute("SELECT pg_advisory_unlock(%s)", (BUCKET_RETENTION_LOCK_KEY,))

        # Replica b downloads `middle` from the bucket, slowly: it reads one chunk and waits.
        stream = b.client.stream_download(middle.id, chunk_size=64 * 1024)
        first = next(stream)
        assert first.backup is not None and first.backup.id == middle.id
        # The server is blocked by flow control, holding the archive's read lock (a shared advisory lock).
        wait_for(lambda: _read_locks(db) == 1, timeout=30)
        a.client.set_retention(1)
        left = _archives(s3_server, bucket)
        assert oldest.id not in left, "retention ran"
        assert middle.id in left, "but spared the archive replica b is reading"
        assert "a replica is reading it" in a.log()

        received = len(first.data) + sum(len(chunk.data) for chunk in stream)
        assert received == middle.size_bytes, "the download finished whole"
        a.client.set_retention(1)
        assert _archives(s3_server, bucket) == {newest.id}

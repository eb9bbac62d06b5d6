"""UploadAndRestore with restore=true inflates the archive once: the restore's own read is the upload's
check, and the archive becomes a READY backup only once that read passed, just before the restore commits.

How often an archive is inflated is what the service's `aperture_backup_inflated_bytes_total` metric
counts (compressed bytes fed to its decompressors), scraped over HTTP as Prometheus does. Everything runs
against real PostgreSQL with the real client tools; the fingerprint decides what the database holds.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
import zstandard
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture_backup.compression import Checker, Decompressor, checker, decompressor
from aperture_backup.errors import DataLoss
from aperture_backup.model import Compression
from aperture_backup.restore import READ_SIZE
from aperture_backup_client import pb
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.metrics import scrape
from tests.support.postgres import PgServer, table_lock
from tests.support.service import RunningService, StartService, free_port, wait_for

KiB = 1024
MiB = 1024 * KiB
INFLATED = "aperture_backup_inflated_bytes_total"


def _source(make_database: MakeDatabase, server: PgServer) -> Database:
    """A seeded database, with a table of hashes that makes its `.sql.gz` a few MiB: larger than the
    restore's first read of an archive (its head, READ_SIZE), so that one inflate and two differ clearly."""
    db = make_database(server, seeded=True, rows=100)
    with psycopg.connect(db.uri) as conn:
        conn.execute(
            "CREATE TABLE public.filler AS SELECT i AS id, md5(i::text) || md5((i * 7)::text) AS a, "
            "md5((i * 13)::text) AS b FROM generate_series(1, 80000) AS i"
        )
        conn.commit()
    return db


def _gzip_dump(server: PgServer, uri: str) -> bytes:
    return gzip.compress(server.run("pg_dump", "--no-owner", "--no-acl", "-d", uri).stdout.encode(), 6)


def _requests(
    data: bytes, *, restore: bool = True, skip_safety_backup: bool = True
) -> list[pb.UploadAndRestoreRequest]:
    metadata = pb.UploadMetadata(
        filename="upload.sql.gz",
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        restore=restore,
        skip_safety_backup=skip_safety_backup,
    )
    chunks = [
        pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=i, data=data[i : i + 256 * KiB]))
        for i in range(0, len(data), 256 * KiB)
    ]
    return [pb.UploadAndRestoreRequest(metadata=metadata), *chunks]


def _upload(
    svc: RunningService, requests: Iterator[pb.UploadAndRestoreRequest] | list[pb.UploadAndRestoreRequest]
) -> list[pb.UploadAndRestoreResponse]:
    return list(svc.client.stub.UploadAndRestore(iter(requests), timeout=300))


def _refused(svc: RunningService, requests: list[pb.UploadAndRestoreRequest]) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(svc, requests)
    error = caught.value
    reason = ""
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), reason, error.details() or ""


def _inflated(svc: RunningService) -> float:
    return scrape(svc).get((INFLATED, (("compression", "gzip"),)), 0.0)


def _files(svc: RunningService) -> set[str]:
    return {p.name for p in svc.backup_dir.iterdir() if p.name != ".state"}


def test_upload_and_restore_inflates_the_archive_once(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    source = _source(make_database, pg16)
    target = make_database(pg16, seeded=True, rows=20)
    data = _gzip_dump(pg16, source.uri)
    assert len(data) > 2 * READ_SIZE, "the archive must be larger than the restore's head read"
    svc = service_factory(target.uri, metrics_listen=f"127.0.0.1:{free_port()}")

    before = _inflated(svc)
    last = _upload(svc, _requests(data))[-1]
    restored = _inflated(svc) - before

    assert_same(fingerprint(source.uri), fingerprint(target.uri))
    assert last.backup.state == pb.BACKUP_STATE_READY and last.result.restored.id == last.backup.id
    # The restore reads every byte once; its look at the archive's head before touching the database
    # reads the first READ_SIZE bytes. Checking the upload while it arrived as well would double this.
    assert len(data) <= restored <= len(data) + READ_SIZE, (restored, len(data))

    # An upload only stored is checked while it arrives: once too.
    before = _inflated(svc)
    _upload(svc, _requests(data, restore=False))
    assert _inflated(svc) - before == len(data)


def test_the_upload_is_not_listed_ready_before_the_restore_has_read_it(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    """While the restore's safety backup waits for a lock the application holds, the upload is listed as
    CREATING, neither restorable nor downloadable; READY once the restore read it through. In place, where
    the safety backup comes before the read (a staging restore reads beside it)."""
    source = _source(make_database, pg16)
    target = make_database(pg16, seeded=True, rows=20)
    data = _gzip_dump(pg16, source.uri)
    svc = service_factory(target.uri, restore_isolation="in-place")
    responses: list[pb.UploadAndRestoreResponse] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            responses.extend(_upload(svc, _requests(data, skip_safety_backup=False)))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    with table_lock(target.uri) as locker:
        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: any(b.trigger == pb.BACKUP_TRIGGER_PRE_RESTORE for b in svc.client.list()))
        time.sleep(0.5)
        uploads = [b for b in svc.client.list() if b.trigger == pb.BACKUP_TRIGGER_UPLOADED]
        assert [b.state for b in uploads] == [pb.BACKUP_STATE_CREATING]
        with pytest.raises(grpc.RpcError) as caught:
            list(svc.client.stub.StreamDownload(pb.StreamDownloadRequest(id=uploads[0].id), timeout=30))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        locker.rollback()
    thread.join(300)
    assert not errors, errors
    assert_same(fingerprint(source.uri), fingerprint(target.uri))
    stored = {b.id: b for b in svc.client.list()}[uploads[0].id]
    assert stored.state == pb.BACKUP_STATE_READY and stored.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("damage", ["corrupt in the middle", "cut short", "trailing garbage"])
def test_a_damaged_upload_is_refused_by_the_restore_and_not_kept(
    damage: str, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    source = _source(make_database, pg16)
    target = make_database(pg16, seeded=True, rows=20)
    good = _gzip_dump(pg16, source.uri)
    if damage == "corrupt in the middle":
        data = bytearray(good)
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
        want = "ARCHIVE_CORRUPT"
    elif damage == "cut short":
        data = bytearray(good[: len(good) * 3 // 4])
        want = "ARCHIVE_TRUNCATED"
    else:
        data = bytearray(good + b"not gzip at all")
        want = "ARCHIVE_CORRUPT"
    svc = service_factory(target.uri, metrics_listen=f"127.0.0.1:{free_port()}")
    kept = svc.client.create()
    before = fingerprint(target.uri)
    files = _files(svc)

    code, reason, message = _refused(svc, _requests(bytes(data)))

    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, want), message
    assert "unchanged" in message or "truncated" in message or "corrupt" in message, message
    assert_same(before, fingerprint(target.uri))
    assert [b.id for b in svc.client.list()] == [kept.id]
    assert _files(svc) == files
    # It was the restore that refused it, after receiving it whole (no second check ran before it).
    jobs = [j for j in svc.client.list_jobs() if j.kind == pb.JOB_KIND_RESTORE]
    assert [(j.trigger, j.outcome, j.error_reason) for j in jobs] == [
        (pb.BACKUP_TRIGGER_UPLOADED, pb.JOB_OUTCOME_FAILED, want)
    ], jobs
    assert svc.client.status().current_job.ByteSize() == 0


# -- the check of an upload only stored ----------------------------------------------------------------------


def _zstd_cases() -> dict[str, bytes]:
    plain = b"".join(b"INSERT INTO t VALUES (%d, 'row %d');\n" % (i, i * 7) for i in range(200_000))
    one = zstandard.ZstdCompressor(level=3).compress(plain)
    checksummed = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plain[:100_000])
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"SELECT 1;\n" * 50_000)
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    corrupt = bytearray(one)
    corrupt[len(one) // 2 : len(one) // 2 + 32] = bytes(32)
    return {
        "one frame": one,
        "several frames, a checksum, a skippable frame": one + checksummed + skippable + unsized,
        "cut in a block": one[: len(one) // 3],
        "cut before the checksum's end": checksummed[:-2],
        "cut in the second frame's header": one + checksummed[:3],
        "trailing garbage": one + b"garbage",
        "two bytes of garbage": one + b"ga",
        "corrupt block": bytes(corrupt),
    }


@pytest.mark.parametrize("chunk", [1, 7, 64 * KiB, 4 * MiB], ids=["1 B", "7 B", "64 KiB", "4 MiB"])
def test_the_zstd_check_refuses_what_the_decompressor_refuses(chunk: int) -> None:
    """The upload's zstd check (the stream writer and the frame walk) against the restore's decompressor,
    which decides from the content itself: the same verdict for sound, cut, damaged and extended streams,
    fed in pieces of any size."""

    def verdict(check: Checker | Decompressor, data: bytes) -> str:
        try:
            for i in range(0, len(data), chunk):
                pieces = check.feed(data[i : i + chunk])
                if pieces is not None:
                    collections.deque(pieces, maxlen=0)
            check.end()
        except DataLoss as exc:
            return exc.reason
        return "ok"

    for name, data in _zstd_cases().items():
        want = verdict(decompressor(Compression.ZSTD), data)
        assert verdict(checker(Compression.ZSTD), data) == want, name
        assert (want == "ok") == (name.startswith(("one frame", "several"))), (name, want)


def test_a_damaged_zstd_upload_is_refused_while_it_arrives(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _source(make_database, pg16)
    svc = service_factory(db.uri)
    made = svc.client.create(compression=pb.COMPRESSION_ZSTD)
    good = (svc.backup_dir / made.id).read_bytes()
    assert len(good) > 4 * 64 * KiB, "the damage must lie past the head the upload recognises the archive by"
    files = _files(svc)
    corrupt = bytearray(good)
    corrupt[len(good) // 2 : len(good) // 2 + 32] = bytes(32)
    for data, reason in ((good[: len(good) - 5], "ARCHIVE_TRUNCATED"), (bytes(corrupt), "ARCHIVE_CORRUPT")):
        code, got, message = _refused(svc, _requests(data, restore=False))
        assert (code, got) == (grpc.StatusCode.DATA_LOSS, reason), message
        assert [b.id for b in svc.client.list()] == [made.id]
        assert _files(svc) == files
    stored = _upload(svc, _requests(good, restore=False))[-1].backup
    assert stored.state == pb.BACKUP_STATE_READY and stored.compression == pb.COMPRESSION_ZSTD

"""Downloads and uploads end to end, through the real server, the generated stubs and the real grpcurl binary,
against real PostgreSQL servers: what goes out is byte for byte the archive; what comes in is checked before
it is stored, and a download followed by an upload-and-restore reproduces the source database exactly.

Every refused upload must leave the database's fingerprint unchanged, nothing new in List and nothing on
disk, not even a hidden temporary file.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture_backup import cli
from aperture_backup_client import BackupClient, TransferError, pb, wire
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, table_lock
from tests.support.service import RunningService, StartService, grpcurl_path, wait_for

SERVICE = "aperture.backup.v1.BackupService"
KiB = 1024
MiB = 1024 * KiB


# -- helpers -------------------------------------------------------------------------------------------------


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    """Code, ErrorInfo reason and message of a failed call."""
    reason = ""
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), reason, error.details() or ""


def _files(svc: RunningService) -> set[str]:
    """Everything in the backup directory, hidden temporary files included, but not the `.state` folder."""
    return {p.name for p in svc.backup_dir.iterdir() if p.name != ".state"}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(svc: RunningService, backup_id: str, **fields: int) -> list[pb.StreamDownloadResponse]:
    return list(svc.client.stub.StreamDownload(pb.StreamDownloadRequest(id=backup_id, **fields), timeout=120))


def _joined(messages: list[pb.StreamDownloadResponse], start: int = 0) -> bytes:
    """The data of a download, checking that every chunk starts where the previous one ended."""
    position = start
    for message in messages:
        assert message.offset == position
        position += len(message.data)
    return b"".join(m.data for m in messages)


def _chunks(data: bytes, size: int = 16 * KiB) -> list[pb.UploadAndRestoreRequest]:
    return [
        pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=i, data=data[i : i + size]))
        for i in range(0, len(data), size)
    ]


def _metadata(
    data: bytes, *, size: int | None = None, sha256: str | None = None, restore: bool = False, name: str = "x"
) -> pb.UploadAndRestoreRequest:
    return pb.UploadAndRestoreRequest(
        metadata=pb.UploadMetadata(
            filename=name,
            size_bytes=len(data) if size is None else size,
            sha256=_sha256(data) if sha256 is None else sha256,
            restore=restore,
            skip_safety_backup=True,
        )
    )


def _upload(
    svc: RunningService, requests: Iterator[pb.UploadAndRestoreRequest] | list[pb.UploadAndRestoreRequest]
) -> list[pb.UploadAndRestoreResponse]:
    return list(svc.client.stub.UploadAndRestore(iter(requests), timeout=240))


def _phases(messages: list[pb.UploadAndRestoreResponse]) -> list[int]:
    phases: list[int] = []
    for message in messages:
        if not phases or phases[-1] != message.progress.phase:
            phases.append(message.progress.phase)
    return phases


def _grpcurl(target: str, method: str, data: str, *, stdin: str | None = None) -> list[dict[str, object]]:
    """Call `method` with grpcurl; the JSON messages it prints, in order."""
    result = subprocess.run(
        [grpcurl_path(), "-plaintext", "-max-msg-sz", str(16 * MiB), "-d", data, target, f"{SERVICE}/{method}"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    messages: list[dict[str, object]] = []
    text = result.stdout.strip()
    position = 0
    while position < len(text):
        message, position = decoder.raw_decode(text, position)
        messages.append(message)
        while position < len(text) and text[position].isspace():
            position += 1
    return messages


def _seeded(make_database: MakeDatabase, server: PgServer, rows: int = 20) -> Database:
    return make_database(server, seeded=True, rows=rows)


def _change(uri: str) -> None:
    """What happens to a database after a backup: a new table, changed and deleted rows."""
    with psycopg.connect(uri) as conn:
        conn.execute("CREATE TABLE public.added_later (id int PRIMARY KEY)")
        conn.execute("UPDATE public.movies SET title = title || ' (edited)'")
        conn.execute("DELETE FROM public.ratings")
        conn.commit()


# -- downloads -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [(pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_GZIP), (pb.BACKUP_FORMAT_CUSTOM, pb.COMPRESSION_UNSPECIFIED)],
    ids=["sql.gz", "custom"],
)
def test_download_gives_the_archive_byte_for_byte(
    seeded_db: Database,
    service_factory: StartService,
    tmp_path: Path,
    fmt: pb.BackupFormat.ValueType,
    compression: pb.Compression.ValueType,
) -> None:
    svc = service_factory(seeded_db.uri)
    backup = svc.client.create(format=fmt, compression=compression)
    archive = (svc.backup_dir / backup.id).read_bytes()

    messages = _download(svc, backup.id, chunk_size=16 * KiB)
    assert messages[0].backup == backup, "the first message carries the backup's metadata"
    assert all(not m.HasField("backup") for m in messages[1:])
    assert all(len(m.data) <= 16 * KiB for m in messages)
    data = _joined(messages)
    assert data == archive
    assert _sha256(data) == backup.sha256 and len(data) == backup.size_bytes

    # The default chunk size is 1 MiB; the client method verifies the SHA-256 itself.
    assert all(len(m.data) <= MiB for m in _download(svc, backup.id))
    saved = svc.client.download(backup.id, tmp_path / "saved")
    assert saved == backup
    assert (tmp_path / "saved").read_bytes() == archive
    assert not svc.server.app.store.is_in_use(backup.id), "the pin goes with the stream"

    # The client's stream decodes the messages itself (wire.py), its chunks views into what arrived.
    chunks = list(svc.client.stream_download(backup.id, offset=1000, chunk_size=16 * KiB))
    assert chunks[0].backup == backup and all(c.backup is None for c in chunks[1:])
    assert [c.offset for c in chunks] == [1000 + i * 16 * KiB for i in range(len(chunks))]
    assert all(isinstance(c.data, memoryview) for c in chunks)
    assert b"".join(c.data for c in chunks) == archive[1000:]


def test_an_interrupted_download_resumes_at_its_offset(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16, rows=200)
    svc = service_factory(db.uri)
    backup = svc.client.create(format=pb.BACKUP_FORMAT_PLAIN, compression=pb.COMPRESSION_NONE)
    assert backup.size_bytes > 100 * KiB

    partial = tmp_path / backup.id
    stream = svc.client.stub.StreamDownload(pb.StreamDownloadRequest(id=backup.id, chunk_size=8 * KiB))
    with open(partial, "wb") as handle:
        for _, message in zip(range(3), stream, strict=False):
            handle.write(message.data)
    stream.cancel()
    assert partial.stat().st_size == 24 * KiB
    # Cancelling closes the server's generator, which releases the pin that kept retention away.
    wait_for(lambda: not svc.server.app.store.is_in_use(backup.id))

    resumed = svc.client.download(backup.id, partial, offset=partial.stat().st_size)
    assert resumed.sha256 == backup.sha256
    assert partial.read_bytes() == (svc.backup_dir / backup.id).read_bytes()

    # A resumed stream starts exactly at the offset, and its first message still carries the metadata.
    messages = _download(svc, backup.id, offset=1000, chunk_size=4096)
    assert messages[0].offset == 1000 and messages[0].backup.sha256 == backup.sha256
    assert _joined(messages, 1000) == (svc.backup_dir / backup.id).read_bytes()[1000:]


def test_download_refuses_bad_offsets_ids_and_unusable_backups(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16)
    backup_dir = tmp_path / "backups"
    first = service_factory(db.uri, backup_dir)
    backup = first.client.create()
    first.stop()
    # A failed backup (newer than the good one, so that retention keeps its record).
    broken = service_factory("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2", backup_dir)
    with pytest.raises(grpc.RpcError):
        broken.client.create()
    failed = next(iter(broken.client.list()))
    assert failed.state == pb.BACKUP_STATE_FAILED
    broken.stop()
    svc = service_factory(db.uri, backup_dir)

    at_end = _download(svc, backup.id, offset=backup.size_bytes)
    assert len(at_end) == 1 and at_end[0].backup == backup and at_end[0].data == b""
    assert at_end[0].offset == backup.size_bytes

    cases: list[tuple[pb.StreamDownloadRequest, grpc.StatusCode, str]] = [
        (pb.StreamDownloadRequest(id=backup.id, offset=backup.size_bytes + 1), grpc.StatusCode.OUT_OF_RANGE, ""),
        (pb.StreamDownloadRequest(id=backup.id, offset=-1), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OFFSET"),
        (
            pb.StreamDownloadRequest(id=backup.id, chunk_size=4 * MiB + 1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_CHUNK_SIZE",
        ),
        (pb.StreamDownloadRequest(id=backup.id, chunk_size=-5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CHUNK_SIZE"),
        (
            pb.StreamDownloadRequest(id="aperture-backup-1999-01-01T00-00-00-000000Z-0000.sql.gz"),
            grpc.StatusCode.NOT_FOUND,
            "BACKUP_NOT_FOUND",
        ),
        (pb.StreamDownloadRequest(id="../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BACKUP_ID"),
        (pb.StreamDownloadRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_BACKUP_ID"),
        (pb.StreamDownloadRequest(id=failed.id), grpc.StatusCode.FAILED_PRECONDITION, "BACKUP_FAILED"),
    ]
    for request, code, reason in cases:
        with pytest.raises(grpc.RpcError) as info:
            list(svc.client.stub.StreamDownload(request, timeout=30))
        got_code, got_reason, details = _status(info.value)
        assert (got_code, reason and got_reason) == (code, reason), f"{request}: {details}"
        assert details, "every refusal says why"
    assert "past the end" in _status(_raises(lambda: _download(svc, backup.id, offset=backup.size_bytes + 1)))[2]
    assert not svc.server.app.store.is_in_use(backup.id)


def _raises(call: Callable[[], object], what: str = "the call") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
        pytest.fail(f"{what} was not refused")
    return info.value


def test_download_of_a_backup_still_being_created_is_refused(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = _seeded(make_database, pg16)
    svc = service_factory(db.uri)
    # pg_dump waits for this lock, which keeps the backup CREATING for as long as the test needs.
    with table_lock(db.uri) as locker:
        stream = svc.client.stub.Create(pb.CreateRequest())
        creating = next(stream).backup
        assert creating.state == pb.BACKUP_STATE_CREATING
        code, reason, _ = _status(_raises(lambda: _download(svc, creating.id)))
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BACKUP_IN_PROGRESS")
        locker.rollback()
    assert list(stream)[-1].backup.state == pb.BACKUP_STATE_READY


def test_a_file_without_manifest_gets_its_checksum_recorded_on_first_download(
    pg18: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg18)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    name = "aperture_backup_20261128T010000Z.dump"  # as Aperture names its own files
    pg18.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "-Z", "6", "-f", backup_dir / name, "-d", db.uri)
    archive = (backup_dir / name).read_bytes()
    svc = service_factory(db.uri, backup_dir)
    listed = svc.client.get(name)
    assert listed.trigger == pb.BACKUP_TRIGGER_EXTERNAL and listed.sha256 == ""

    messages = _download(svc, name, chunk_size=64 * KiB)
    first = messages[0].backup
    assert first.sha256 == _sha256(archive) and first.size_bytes == len(archive)
    assert first.trigger == pb.BACKUP_TRIGGER_EXTERNAL and first.create_time == listed.create_time
    assert _joined(messages) == archive
    # Recorded once, in a manifest beside the file: later calls know it at once, and it is still EXTERNAL.
    assert (backup_dir / f"{name}.manifest.json").is_file()
    assert svc.client.get(name) == first
    assert _download(svc, name, offset=len(archive))[0].backup == first


def test_download_through_grpcurl(seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri)
    backup = svc.client.create()
    request = json.dumps({"id": backup.id, "chunk_size": 32 * KiB})
    messages = _grpcurl(svc.target, "StreamDownload", request)
    first = messages[0]["backup"]
    assert isinstance(first, dict)
    assert first["sha256"] == backup.sha256 and int(first["sizeBytes"]) == backup.size_bytes
    offsets = [int(str(m.get("offset", 0))) for m in messages]
    data = b"".join(base64.b64decode(str(m.get("data", ""))) for m in messages)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert data == (svc.backup_dir / backup.id).read_bytes()
    assert _sha256(data) == backup.sha256


def test_retention_keeps_an_archive_while_it_is_downloaded(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    # The oldest archive is large (64 MiB of plain SQL), so that the stream cannot finish into the client's
    # flow-control window while the test holds it open: the server's generator is really mid-stream.
    oldest = backup_dir / "aperture_backup_20250101T010000Z.sql"
    line = b"-- " + b"x" * 1020 + b"\n"
    with open(oldest, "wb") as handle:
        handle.write(b"-- PostgreSQL database dump\n")
        for _ in range(64 * 1024):
            handle.write(line)
    old = time.time() - 30 * 86400
    os.utime(oldest, (old, old))
    svc = service_factory(db.uri, backup_dir)
    middle = svc.client.create().id
    newest = svc.client.create().id

    stream = svc.client.stub.StreamDownload(pb.StreamDownloadRequest(id=oldest.name, chunk_size=64 * KiB))
    first = next(stream)
    assert svc.server.app.store.is_in_use(oldest.name)
    response = svc.client.set_retention(1)
    assert list(response.deleted_ids) == [middle], "the archive being downloaded is kept"
    assert oldest.exists()

    data = first.data + _joined(list(stream), len(first.data))
    assert _sha256(data) == first.backup.sha256 == _sha256(oldest.read_bytes())
    wait_for(lambda: not svc.server.app.store.is_in_use(oldest.name))
    assert list(svc.client.set_retention(1).deleted_ids) == [oldest.name], "once downloaded, retention applies"
    assert [b.id for b in svc.client.list()] == [newest]


# -- uploads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compression", "suffix"),
    [
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_GZIP, ".sql.gz"),
        (pb.BACKUP_FORMAT_CUSTOM, pb.COMPRESSION_UNSPECIFIED, ".dump"),
        (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_ZSTD, ".sql.zst"),
    ],
    ids=["sql.gz", "custom", "sql.zst"],
)
def test_upload_and_store_is_listed_as_uploaded(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
    fmt: pb.BackupFormat.ValueType,
    compression: pb.Compression.ValueType,
    suffix: str,
) -> None:
    db = _seeded(make_database, pg16, rows=200)
    source = service_factory(db.uri)
    made = source.client.create(format=fmt, compression=compression)
    path = tmp_path / "renamed.bin"  # the extension does not decide, the content does
    source.client.download(made.id, path)
    before = fingerprint(db.uri)

    svc = service_factory(db.uri)
    progress: list[pb.UploadAndRestoreResponse] = []
    last = svc.client.upload(path, on_progress=progress.append, chunk_size=16 * KiB)

    stored = last.backup
    assert stored.state == pb.BACKUP_STATE_READY and stored.trigger == pb.BACKUP_TRIGGER_UPLOADED
    assert stored.id.startswith("aperture-backup-") and stored.id.endswith(suffix)
    assert (stored.format, stored.sha256, stored.size_bytes) == (made.format, made.sha256, made.size_bytes)
    assert not last.HasField("result")
    assert [b.id for b in svc.client.list()] == [stored.id]
    assert svc.client.get(stored.id) == stored
    assert _files(svc) == {stored.id, f"{stored.id}.manifest.json"}, "no temporary file is left"
    assert (svc.backup_dir / stored.id).read_bytes() == path.read_bytes()
    assert fingerprint(db.uri) == before, "storing an upload does not touch the database"

    assert _phases(progress) == [pb.PHASE_UPLOADING, pb.PHASE_VERIFYING, pb.PHASE_DONE]
    uploading = [m.progress for m in progress if m.progress.phase == pb.PHASE_UPLOADING]
    assert uploading[0].bytes_done == 0 and uploading[-1].bytes_done == made.size_bytes
    assert all(p.bytes_total == made.size_bytes for p in uploading)
    assert last.progress.phase == pb.PHASE_DONE


def test_the_client_uploads_with_the_checksum_it_is_given(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16)
    svc = service_factory(db.uri)
    path = tmp_path / "upload.sql.gz"
    path.write_bytes(_gzip_sql(pg16, db.uri))

    code, reason, _ = _status(_raises(lambda: svc.client.upload(path, sha256=_sha256(b"other"))))
    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "CHECKSUM_MISMATCH")
    stored = svc.client.upload(path, sha256=_sha256(path.read_bytes()), chunk_size=7 * KiB).backup
    assert (svc.backup_dir / stored.id).read_bytes() == path.read_bytes()


def test_the_client_refuses_a_download_with_a_gap(tmp_path: Path) -> None:
    """Against a server that skips bytes (a real gRPC server, answering StreamDownload out of order)."""

    def gappy(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield wire.encode_download_response(0, b"abc", pb.Backup(id="x", size_bytes=9))
        yield wire.encode_download_response(6, b"ghi")

    method = pb.DESCRIPTOR.services_by_name["BackupService"].methods_by_name["StreamDownload"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                method.containing_service.full_name, {method.name: grpc.unary_stream_rpc_method_handler(gappy)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with BackupClient(f"127.0.0.1:{port}") as client, pytest.raises(TransferError, match="offset 6 where 3"):
            client.download("x", tmp_path / "x")
    finally:
        server.stop(None)


@pytest.mark.parametrize("server_name", ["pg16", "pg18"])
@pytest.mark.parametrize("fmt", [pb.BACKUP_FORMAT_PLAIN, pb.BACKUP_FORMAT_CUSTOM], ids=["sql.gz", "custom"])
def test_download_then_upload_and_restore_reproduces_the_source(
    server_name: str,
    fmt: pb.BackupFormat.ValueType,
    request: pytest.FixtureRequest,
    make_database: MakeDatabase,
    service_factory: StartService,
    tmp_path: Path,
) -> None:
    server: PgServer = request.getfixturevalue(server_name)
    source_db = _seeded(make_database, server, rows=200)
    target_db = _seeded(make_database, server, rows=50)
    _change(target_db.uri)
    source = service_factory(source_db.uri)
    backup = source.client.create(format=fmt)
    path = tmp_path / backup.id
    source.client.download(backup.id, path)

    target = service_factory(target_db.uri)
    progress: list[pb.UploadAndRestoreResponse] = []
    last = target.client.upload(path, restore=True, on_progress=progress.append)

    assert_same(fingerprint(source_db.uri), fingerprint(target_db.uri))
    assert last.backup.trigger == pb.BACKUP_TRIGGER_UPLOADED and last.backup.sha256 == backup.sha256
    assert last.result.restored.id == last.backup.id
    assert last.result.reconnect_required
    safety = last.result.safety_backup
    assert safety.trigger == pb.BACKUP_TRIGGER_PRE_RESTORE and safety.state == pb.BACKUP_STATE_READY
    assert {b.id for b in target.client.list()} == {last.backup.id, safety.id}
    phases = _phases(progress)
    assert phases[:2] == [pb.PHASE_UPLOADING, pb.PHASE_VERIFYING]
    assert phases[-3:] == [pb.PHASE_SAFETY_BACKUP, pb.PHASE_RESTORING, pb.PHASE_DONE]
    assert all(m.backup.id == last.backup.id for m in progress if m.HasField("backup"))
    assert not target.server.app.store.is_in_use(last.backup.id)


@pytest.mark.parametrize("server_name", ["pg16", "pg18"])
def test_grpcurl_download_then_upload_and_restore_reproduces_the_source(
    server_name: str,
    request: pytest.FixtureRequest,
    make_database: MakeDatabase,
    service_factory: StartService,
) -> None:
    server: PgServer = request.getfixturevalue(server_name)
    source_db = _seeded(make_database, server)
    target_db = make_database(server)  # brand new and empty
    source = service_factory(source_db.uri)
    backup = source.client.create()

    downloaded = _grpcurl(source.target, "StreamDownload", json.dumps({"id": backup.id}))
    data = b"".join(base64.b64decode(str(m.get("data", ""))) for m in downloaded)
    assert _sha256(data) == backup.sha256

    target = service_factory(target_db.uri)
    meta = {"filename": backup.id, "size_bytes": len(data), "sha256": _sha256(data), "restore": True}
    lines = [json.dumps({"metadata": meta})]
    lines += [
        json.dumps({"chunk": {"offset": i, "data": base64.b64encode(data[i : i + 256 * KiB]).decode()}})
        for i in range(0, len(data), 256 * KiB)
    ]
    responses = _grpcurl(target.target, "UploadAndRestore", "@", stdin="\n".join(lines))

    assert_same(fingerprint(source_db.uri), fingerprint(target_db.uri))
    last = responses[-1]
    assert isinstance(last["backup"], dict) and isinstance(last["result"], dict)
    assert last["backup"]["trigger"] == "BACKUP_TRIGGER_UPLOADED"
    assert last["backup"]["sha256"] == backup.sha256
    assert last["result"]["reconnectRequired"] is True
    progress = last["progress"]
    assert isinstance(progress, dict) and progress["phase"] == "PHASE_DONE"


def _gzip_sql(server: PgServer, uri: str) -> bytes:
    return gzip.compress(server.run("pg_dump", "--no-owner", "--no-acl", "-d", uri).stdout.encode())


def _custom(server: PgServer, uri: str, path: Path) -> bytes:
    server.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "-f", path, "-d", uri)
    return path.read_bytes()


def test_bad_uploads_are_refused_and_leave_no_trace(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16, rows=200)
    svc = service_factory(db.uri)
    kept = svc.client.create()
    good = _gzip_sql(pg16, db.uri)
    custom = _custom(pg16, db.uri, tmp_path / "x.dump")
    rng = random.Random(4)  # noqa: S311 - test data, not secrets
    noise = rng.randbytes(300 * KiB)
    text = ("Dear administrator,\nthis is a letter, not a database dump.\n" * 2000).encode()
    corrupt = bytearray(good)
    middle = len(corrupt) // 2
    corrupt[middle : middle + 16] = bytes(b ^ 0x5A for b in corrupt[middle : middle + 16])
    cut_gzip = good[: len(good) * 2 // 3]
    cut_custom = custom[: len(custom) * 2 // 3]
    assert len(_chunks(good)) >= 3, "the cases below need several chunks"

    def shuffled(data: bytes) -> list[pb.UploadAndRestoreRequest]:
        chunks = _chunks(data)
        return [chunks[1], chunks[0], *chunks[2:]]

    cases: dict[str, tuple[list[pb.UploadAndRestoreRequest], grpc.StatusCode, str]] = {
        "stream ends early": (
            [_metadata(good, restore=True), *_chunks(good)[:-1]],
            grpc.StatusCode.DATA_LOSS,
            "UPLOAD_TRUNCATED",
        ),
        "declared size larger": (
            [_metadata(good, size=len(good) + 1, restore=True), *_chunks(good)],
            grpc.StatusCode.DATA_LOSS,
            "UPLOAD_TRUNCATED",
        ),
        "declared size smaller": (
            [_metadata(good, size=len(good) - 1, restore=True), *_chunks(good)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UPLOAD_SIZE_MISMATCH",
        ),
        "wrong checksum": (
            [_metadata(good, sha256=_sha256(b"other"), restore=True), *_chunks(good)],
            grpc.StatusCode.DATA_LOSS,
            "CHECKSUM_MISMATCH",
        ),
        "random bytes": (
            [_metadata(noise, restore=True), *_chunks(noise)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "NOT_AN_ARCHIVE",
        ),
        "a text file": (
            [_metadata(text, restore=True, name="dump.sql"), *_chunks(text)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "NOT_AN_ARCHIVE",
        ),
        "gzip of a text file": (
            [_metadata(gzip.compress(text), name="x.sql.gz"), *_chunks(gzip.compress(text))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "NOT_AN_ARCHIVE",
        ),
        "corrupt gzip stream": (
            [_metadata(bytes(corrupt), restore=True), *_chunks(bytes(corrupt))],
            grpc.StatusCode.DATA_LOSS,
            "ARCHIVE_CORRUPT",
        ),
        "gzip without its end": (
            [_metadata(cut_gzip, restore=True), *_chunks(cut_gzip)],
            grpc.StatusCode.DATA_LOSS,
            "ARCHIVE_TRUNCATED",
        ),
        "custom format cut short": (
            [_metadata(cut_custom, restore=True), *_chunks(cut_custom)],
            grpc.StatusCode.DATA_LOSS,
            "ARCHIVE_CORRUPT",
        ),
        "first message without metadata": (_chunks(good), grpc.StatusCode.INVALID_ARGUMENT, "METADATA_REQUIRED"),
        "empty stream": ([], grpc.StatusCode.INVALID_ARGUMENT, "METADATA_REQUIRED"),
        "metadata twice": (
            [_metadata(good), *_chunks(good)[:2], _metadata(good), *_chunks(good)[2:]],
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNEXPECTED_METADATA",
        ),
        "chunks out of order": (
            [_metadata(good, restore=True), *shuffled(good)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "CHUNK_OUT_OF_ORDER",
        ),
        "a gap": (
            [_metadata(good, restore=True), *[c for i, c in enumerate(_chunks(good)) if i != 1]],
            grpc.StatusCode.INVALID_ARGUMENT,
            "CHUNK_OUT_OF_ORDER",
        ),
        "a message with neither": (
            [_metadata(good), pb.UploadAndRestoreRequest(), *_chunks(good)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "EMPTY_MESSAGE",
        ),
        "no size": ([_metadata(good, size=0), *_chunks(good)], grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SIZE"),
        "malformed checksum": (
            [_metadata(good, sha256="abc"), *_chunks(good)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_CHECKSUM",
        ),
    }
    expected_db = fingerprint(db.uri)
    for name, (requests, code, reason) in cases.items():
        error = _raises(lambda requests=requests: _upload(svc, requests), name)  # type: ignore[misc]
        got_code, got_reason, details = _status(error)
        assert (got_code, got_reason) == (code, reason), f"{name}: {got_code} {got_reason} {details}"
        assert [b.id for b in svc.client.list()] == [kept.id], name
        assert _files(svc) == {kept.id, f"{kept.id}.manifest.json"}, name
    assert fingerprint(db.uri) == expected_db
    assert svc.client.status().current_job.ByteSize() == 0


def test_an_upload_over_the_limit_is_resource_exhausted(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = _seeded(make_database, pg16)
    data = _gzip_sql(pg16, db.uri)
    svc = service_factory(db.uri, max_upload_bytes=len(data) - 1)
    code, reason, details = _status(_raises(lambda: _upload(svc, [_metadata(data), *_chunks(data)])))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "UPLOAD_TOO_LARGE")
    assert str(len(data) - 1) in details
    assert list(svc.client.list()) == [] and _files(svc) == set()

    exact = service_factory(db.uri, max_upload_bytes=len(data))
    assert _upload(exact, [_metadata(data), *_chunks(data)])[-1].backup.size_bytes == len(data)

    # Free space is checked against the declared size before anything is received.
    roomy = service_factory(db.uri, max_upload_bytes=1 << 62)
    code, reason, details = _status(_raises(lambda: _upload(roomy, [_metadata(data, size=1 << 60), *_chunks(data)])))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_DISK_SPACE")
    assert "free" in details
    assert list(roomy.client.list()) == [] and _files(roomy) == set()


def test_upload_and_restore_while_a_job_runs_is_refused_before_the_data_arrives(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = _seeded(make_database, pg16)
    svc = service_factory(db.uri)
    data = _gzip_sql(pg16, db.uri)
    sent_chunks = threading.Event()

    def requests() -> Iterator[pb.UploadAndRestoreRequest]:
        yield _metadata(data, restore=True)
        # The chunks would come only after the refusal; the server must not wait for them to refuse.
        sent_chunks.wait(30)
        yield from _chunks(data)

    with table_lock(db.uri) as locker:
        create = svc.client.stub.Create(pb.CreateRequest())
        running = next(create).backup
        started = time.monotonic()
        code, reason, details = _status(_raises(lambda: _upload(svc, requests())))
        assert time.monotonic() - started < 20
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_RUNNING")
        assert running.id in details
        sent_chunks.set()
        # Storing without restoring does not need the job slot.
        stored = _upload(svc, [_metadata(data), *_chunks(data)])[-1].backup
        assert stored.state == pb.BACKUP_STATE_READY
        locker.rollback()
    assert list(create)[-1].backup.state == pb.BACKUP_STATE_READY
    assert {b.trigger for b in svc.client.list()} == {pb.BACKUP_TRIGGER_MANUAL, pb.BACKUP_TRIGGER_UPLOADED}


def test_an_archive_the_server_cannot_load_is_stored_but_not_restored(
    pg16: PgServer, pg18: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    newer = _seeded(make_database, pg18)
    target = _seeded(make_database, pg16)
    data = _gzip_sql(pg18, newer.uri)
    svc = service_factory(target.uri)
    before = fingerprint(target.uri)

    code, reason, details = _status(_raises(lambda: _upload(svc, [_metadata(data, restore=True), *_chunks(data)])))

    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ARCHIVE_TOO_NEW")
    assert fingerprint(target.uri) == before
    # The archive itself is sound (it may be restored into a PostgreSQL 18 server), so it is kept, and the
    # message says under which id.
    stored = list(svc.client.list())
    assert [b.trigger for b in stored] == [pb.BACKUP_TRIGGER_UPLOADED]
    assert stored[0].id in details


def test_cli_download_upload_and_restore(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    source_db = _seeded(make_database, pg16)
    target_db = make_database(pg16)
    source = service_factory(source_db.uri)
    backup = source.client.create()
    output = tmp_path / "out.sql.gz"
    # A partial earlier download, kept under FILE.part as the CLI leaves it.
    (tmp_path / "out.sql.gz.part").write_bytes((source.backup_dir / backup.id).read_bytes()[:1000])

    assert cli.main(["download", backup.id, "--server", source.target, "-o", str(output), "--resume"]) == 0
    assert _sha256(output.read_bytes()) == backup.sha256
    assert not (tmp_path / "out.sql.gz.part").exists()

    target = service_factory(target_db.uri)
    assert cli.main(["upload", str(output), "--server", target.target]) == 0
    stored = next(iter(target.client.list()))
    assert stored.trigger == pb.BACKUP_TRIGGER_UPLOADED
    before = fingerprint(target_db.uri)
    # Without a terminal to ask on, replacing the database needs --yes.
    assert cli.main(["restore", stored.id, "--server", target.target, "--skip-safety-backup"]) == 2
    assert_same(before, fingerprint(target_db.uri))
    assert cli.main(["restore", stored.id, "--server", target.target, "--skip-safety-backup", "--yes"]) == 0
    assert_same(fingerprint(source_db.uri), fingerprint(target_db.uri))


def test_an_upload_the_client_abandons_leaves_nothing(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = _seeded(make_database, pg16, rows=200)
    svc = service_factory(db.uri)
    data = _gzip_sql(pg16, db.uri)
    release = threading.Event()

    def requests() -> Iterator[pb.UploadAndRestoreRequest]:
        yield _metadata(data, restore=True)
        yield from _chunks(data)[:-1]
        release.wait(30)  # the client stalls before the last chunk, then goes away

    call = svc.client.stub.UploadAndRestore(requests())
    try:
        wait_for(lambda: any(name.startswith(".tmp-") for name in _files(svc)))
        # While it arrives, the upload shows as CREATING (like a backup being made), never as READY.
        listed = list(svc.client.list())
        assert [(b.state, b.trigger) for b in listed] == [(pb.BACKUP_STATE_CREATING, pb.BACKUP_TRIGGER_UPLOADED)]
        code, _, _ = _status(_raises(lambda: svc.client.download(listed[0].id, tmp_path / "x")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        call.cancel()
        release.set()
    wait_for(lambda: _files(svc) == set())
    assert list(svc.client.list()) == []

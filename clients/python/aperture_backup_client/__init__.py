"""A small Python client of aperture-backup, over the generated stubs.

with BackupClient("127.0.0.1:50051") as client:
    backup = client.create()
    for b in client.list():
        print(b.id, b.size_bytes)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Unpack

import grpc

from aperture.backup.v1 import backup_pb2 as pb
from aperture.backup.v1 import backup_pb2_grpc

from .connection import ChannelSettings, PemSource, open_channel
from .wire import DownloadChunk, decode_download_response, encode_upload_chunk

__all__ = [
    "BackupClient",
    "ChannelSettings",
    "ChecksumMismatch",
    "DownloadChunk",
    "PemSource",
    "TransferError",
    "method_path",
    "open_channel",
    "pb",
]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Upload chunk size: large enough to amortise per-message cost, far below the 8 MiB message limit.
UPLOAD_CHUNK_BYTES = 1024 * 1024
_HASH_READ_BYTES = 1024 * 1024
_METHODS = pb.DESCRIPTOR.services_by_name["BackupService"].methods_by_name


class TransferError(Exception):
    """A download or upload did not give what the server promised (a gap, a short file)."""


class ChecksumMismatch(TransferError):
    """The downloaded file's SHA-256 differs from the one the server sent."""


def file_sha256(path: Path, *, limit: int | None = None) -> hashlib._Hash:
    """SHA-256 of a file (of its first `limit` bytes), read in bounded pieces."""
    digest = hashlib.sha256()
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            data = handle.read(_HASH_READ_BYTES if remaining is None else min(_HASH_READ_BYTES, remaining))
            if not data:
                break
            digest.update(data)
            if remaining is not None:
                remaining -= len(data)
    return digest


def method_path(method: str) -> str:
    """The gRPC path of a BackupService method ("/aperture.backup.v1.BackupService/List"), from the
    descriptor, for callables with serializers of their own."""
    return f"/{_METHODS[method].containing_service.full_name}/{_METHODS[method].name}"


class BackupClient:
    """Connects to one aperture-backup server. Methods raise grpc.RpcError with the server's status.

    `token` is sent as `authorization: Bearer <token>` with every call; `tls`, `ca_cert`, `client_cert`,
    `client_key` and `server_name` as for `open_channel` (PEM bytes or file paths)."""

    def __init__(
        self, target: str, *, channel: grpc.Channel | None = None, **settings: Unpack[ChannelSettings]
    ) -> None:
        self.channel = channel or open_channel(
            target,
            **settings,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = backup_pb2_grpc.BackupServiceStub(self.channel)
        # The two bulk RPCs, with the messages that carry archive bytes encoded and decoded by `wire`
        # instead of the generated classes (which copy each chunk several times; see wire.py).
        self._stream_download: grpc.UnaryStreamMultiCallable[pb.StreamDownloadRequest, DownloadChunk] = (
            self.channel.unary_stream(
                method_path("StreamDownload"),
                request_serializer=pb.StreamDownloadRequest.SerializeToString,
                response_deserializer=decode_download_response,
            )
        )
        self._upload: grpc.StreamStreamMultiCallable[bytes, pb.UploadAndRestoreResponse] = self.channel.stream_stream(
            method_path("UploadAndRestore"), response_deserializer=pb.UploadAndRestoreResponse.FromString
        )

    def __enter__(self) -> BackupClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def create(
        self,
        *,
        format: pb.BackupFormat.ValueType = pb.BACKUP_FORMAT_UNSPECIFIED,
        compression: pb.Compression.ValueType = pb.COMPRESSION_UNSPECIFIED,
        on_progress: Callable[[pb.CreateResponse], None] | None = None,
        timeout: float | None = None,
    ) -> pb.Backup:
        """Run a backup; returns the READY backup (the last message of the stream)."""
        last: pb.CreateResponse | None = None
        for message in self.stub.Create(pb.CreateRequest(format=format, compression=compression), timeout=timeout):
            last = message
            if on_progress is not None:
                on_progress(message)
        if last is None:
            raise RuntimeError("the server closed the Create stream without a result")
        return last.backup

    def list(self, *, page_size: int = 0) -> Iterator[pb.Backup]:
        """Every backup, newest first, following page tokens."""
        token = ""
        while True:
            response = self.stub.List(pb.ListRequest(page_size=page_size, page_token=token))
            yield from response.backups
            token = response.next_page_token
            if not token:
                return

    def get(self, backup_id: str) -> pb.Backup:
        return self.stub.Get(pb.GetRequest(id=backup_id)).backup

    def list_jobs(self, *, page_size: int = 0, limit: int | None = None) -> Iterator[pb.JobRecord]:
        """The job history, newest first, following page tokens; at most `limit` jobs when given."""
        token, seen = "", 0
        while True:
            response = self.stub.ListJobs(pb.ListJobsRequest(page_size=page_size, page_token=token))
            for job in response.jobs:
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield job
            token = response.next_page_token
            if not token:
                return

    def delete(self, backup_id: str) -> pb.Backup:
        return self.stub.Delete(pb.DeleteRequest(id=backup_id)).backup

    def set_retention(
        self,
        keep_last: int,
        *,
        keep_daily: int = 0,
        keep_weekly: int = 0,
        keep_monthly: int = 0,
        validate_only: bool = False,
    ) -> pb.SetRetentionResponse:
        """Keep the newest `keep_last` backups and the newest of each of the last `keep_daily` days,
        `keep_weekly` weeks and `keep_monthly` months; `deleted_ids` says what went (with `validate_only`:
        what would go, nothing changes)."""
        policy = pb.RetentionPolicy(
            keep_last=keep_last, keep_daily=keep_daily, keep_weekly=keep_weekly, keep_monthly=keep_monthly
        )
        return self.stub.SetRetention(pb.SetRetentionRequest(policy=policy, validate_only=validate_only))

    def get_retention(self) -> pb.RetentionPolicy:
        return self.stub.GetRetention(pb.GetRetentionRequest()).policy

    def set_schedule(
        self,
        *,
        enabled: bool | None = None,
        time_of_day: str | None = None,
        time_zone: str | None = None,
        catch_up: bool | None = None,
    ) -> pb.SetScheduleResponse:
        """Change what is given; unset arguments keep their current value."""
        request = pb.SetScheduleRequest()
        if enabled is not None:
            request.enabled = enabled
        if time_of_day is not None:
            request.time_of_day = time_of_day
        if time_zone is not None:
            request.time_zone = time_zone
        if catch_up is not None:
            request.catch_up = catch_up
        return self.stub.SetSchedule(request)

    def get_schedule(self) -> pb.GetScheduleResponse:
        return self.stub.GetSchedule(pb.GetScheduleRequest())

    def status(self) -> pb.GetStatusResponse:
        return self.stub.GetStatus(pb.GetStatusRequest())

    def restore(
        self,
        backup_id: str,
        *,
        skip_safety_backup: bool = False,
        on_progress: Callable[[pb.RestoreResponse], None] | None = None,
        timeout: float | None = None,
    ) -> pb.RestoreResult:
        """Restore a stored backup (after a safety backup, unless skipped); returns the result once committed."""
        last: pb.RestoreResponse | None = None
        request = pb.RestoreRequest(id=backup_id, skip_safety_backup=skip_safety_backup)
        for message in self.stub.Restore(request, timeout=timeout):
            last = message
            if on_progress is not None:
                on_progress(message)
        if last is None or not last.HasField("result"):
            raise TransferError("the server closed the Restore stream without a result")
        return last.result

    def verify(
        self,
        backup_id: str = "",
        *,
        on_progress: Callable[[pb.VerifyResponse], None] | None = None,
        timeout: float | None = None,
    ) -> pb.Backup:
        """Verify a backup (the newest READY one when `backup_id` is empty): restore it into a scratch
        database and check it. Returns the backup with its verification when it passed; a failed check
        raises grpc.RpcError DATA_LOSS (the verification is recorded all the same: `get` shows it)."""
        last: pb.VerifyResponse | None = None
        for message in self.stub.Verify(pb.VerifyRequest(id=backup_id), timeout=timeout):
            last = message
            if on_progress is not None:
                on_progress(message)
        if last is None or not last.HasField("backup"):
            raise TransferError("the server closed the Verify stream without a result")
        return last.backup

    def pin(self, backup_id: str, *, ttl: timedelta | None = None) -> pb.Backup:
        """Keep a backup from retention, for `ttl` or until `unpin`."""
        request = pb.PinRequest(id=backup_id)
        if ttl is not None:
            request.ttl.FromTimedelta(ttl)
        return self.stub.Pin(request).backup

    def unpin(self, backup_id: str) -> pb.Backup:
        return self.stub.Unpin(pb.UnpinRequest(id=backup_id)).backup

    def cancel(self, backup_id: str, *, timeout: float | None = 60) -> pb.CancelResponse:
        """Stop the running backup or restore of `backup_id`; waits a few seconds for it to stop."""
        return self.stub.Cancel(pb.CancelRequest(backup_id=backup_id), timeout=timeout)

    def stream_download(
        self, backup_id: str, *, offset: int = 0, chunk_size: int = 0, timeout: float | None = None
    ) -> Iterator[DownloadChunk]:
        """The chunks of a backup's archive from `offset` on, as they arrive; the first carries the backup
        (size, SHA-256). Each chunk's `data` is a view into the received message, not a copy. Raises
        TransferError when a chunk does not start where the previous one ended."""
        position = offset
        request = pb.StreamDownloadRequest(id=backup_id, offset=offset, chunk_size=chunk_size)
        for chunk in self._stream_download(request, timeout=timeout):
            if chunk.offset != position:
                raise TransferError(f"the server sent offset {chunk.offset} where {position} was expected")
            position += len(chunk.data)
            yield chunk

    def download(
        self,
        backup_id: str,
        dest_path: str | os.PathLike[str],
        *,
        offset: int = 0,
        chunk_size: int = 0,
        timeout: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> pb.Backup:
        """Save a backup's archive to `dest_path` and check its SHA-256; returns the backup. `on_progress`
        gets the bytes the file holds so far, after each chunk.

        To resume a broken download, pass `offset=` the size of the partial file: its bytes are kept (and
        hashed) and only the rest is fetched. Raises ChecksumMismatch when the result differs from the
        server's record, TransferError when the stream has a gap or ends short."""
        dest = Path(dest_path)
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        if offset and dest.stat().st_size < offset:
            raise ValueError(f"{dest} has only {dest.stat().st_size} bytes, fewer than offset {offset}")
        digest = file_sha256(dest, limit=offset) if offset else hashlib.sha256()
        backup: pb.Backup | None = None
        position = offset
        handle = None
        try:
            for chunk in self.stream_download(backup_id, offset=offset, chunk_size=chunk_size, timeout=timeout):
                if handle is None:
                    # Opened once the server has answered, so that an unknown id leaves no empty file.
                    handle = open(dest, "r+b" if offset else "wb")  # noqa: SIM115 - closed below
                    if offset:
                        # Bytes past the offset (from an earlier, longer attempt) are replaced by the server's.
                        handle.truncate(offset)
                        handle.seek(offset)
                if chunk.backup is not None:
                    backup = chunk.backup
                handle.write(chunk.data)
                digest.update(chunk.data)
                position += len(chunk.data)
                if on_progress is not None:
                    on_progress(position)
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if handle is not None:
                handle.close()
        if backup is None:
            raise TransferError("the server closed the download without the backup's metadata")
        if position != backup.size_bytes:
            raise TransferError(f"the download ended at byte {position} of {backup.size_bytes}; resume it")
        if digest.hexdigest() != backup.sha256:
            raise ChecksumMismatch(
                f"{dest} has SHA-256 {digest.hexdigest()}, the server's record says {backup.sha256}; "
                "download it again from offset 0"
            )
        return backup

    def upload(
        self,
        path: str | os.PathLike[str],
        *,
        restore: bool = False,
        skip_safety_backup: bool = False,
        sha256: str | None = None,
        on_progress: Callable[[pb.UploadAndRestoreResponse], None] | None = None,
        chunk_size: int = UPLOAD_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> pb.UploadAndRestoreResponse:
        """Upload an archive (with its size and SHA-256, so the server can check it), store it as a backup
        and, with `restore=True`, restore it. The SHA-256 is computed from the file unless the caller
        passes it. Returns the last message: `backup` is the stored upload, `result` the restore's outcome
        when one was asked for."""
        source = Path(path)
        size = source.stat().st_size
        digest = sha256 if sha256 is not None else file_sha256(source).hexdigest()

        def requests() -> Iterator[bytes]:
            # A generator: gRPC pulls one chunk at a time, so the file is never held in memory.
            metadata = pb.UploadMetadata(
                filename=source.name,
                size_bytes=size,
                sha256=digest,
                restore=restore,
                skip_safety_backup=skip_safety_backup,
            )
            yield pb.UploadAndRestoreRequest(metadata=metadata).SerializeToString()
            offset = 0
            with open(source, "rb") as handle:
                while data := handle.read(chunk_size):
                    yield encode_upload_chunk(offset, data)
                    offset += len(data)

        last: pb.UploadAndRestoreResponse | None = None
        for message in self._upload(requests(), timeout=timeout):
            last = message
            if on_progress is not None:
                on_progress(message)
        if last is None or not last.HasField("backup"):
            raise TransferError("the server closed the upload without reporting the stored backup")
        return last

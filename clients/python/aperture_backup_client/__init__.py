"""A small Python client of aperture-backup, over the generated stubs.

with BackupClient("127.0.0.1:50051") as client:
    backup = client.create()
    for b in client.list():
        print(b.id, b.size_bytes)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType

import grpc

from aperture.backup.v1 import backup_pb2 as pb
from aperture.backup.v1 import backup_pb2_grpc

__all__ = ["BackupClient", "pb"]

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class BackupClient:
    """Connects to one aperture-backup server. Methods raise grpc.RpcError with the server's status."""

    def __init__(self, target: str, *, channel: grpc.Channel | None = None):
        self.channel = channel or grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = backup_pb2_grpc.BackupServiceStub(self.channel)

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

    def delete(self, backup_id: str) -> pb.Backup:
        return self.stub.Delete(pb.DeleteRequest(id=backup_id)).backup

    def set_retention(self, keep_last: int) -> pb.SetRetentionResponse:
        return self.stub.SetRetention(pb.SetRetentionRequest(policy=pb.RetentionPolicy(keep_last=keep_last)))

    def get_retention(self) -> pb.RetentionPolicy:
        return self.stub.GetRetention(pb.GetRetentionRequest()).policy

    def set_schedule(self, **fields: object) -> pb.SetScheduleResponse:
        return self.stub.SetSchedule(pb.SetScheduleRequest(**fields))  # type: ignore[arg-type]

    def get_schedule(self) -> pb.GetScheduleResponse:
        return self.stub.GetSchedule(pb.GetScheduleRequest())

    def status(self) -> pb.GetStatusResponse:
        return self.stub.GetStatus(pb.GetStatusRequest())

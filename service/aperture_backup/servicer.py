"""The gRPC servicer: parses requests, calls the domain, converts results. Errors are mapped in one place
(`rpc_errors.ErrorInterceptor`), so no method here catches anything."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from aperture.backup.v1 import backup_pb2 as pb
from aperture.backup.v1 import backup_pb2_grpc
from aperture_backup_client import wire

from . import convert, transfer
from .app import App
from .backups import resolve_kind
from .errors import InvalidArgument
from .model import Trigger
from .restore import RestoreResult
from .rpc_limits import TransferSlots, with_idle_timeout

_logger = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
#: How long Cancel waits for the job to stop before it answers.
CANCEL_WAIT_SECONDS = 15.0
MAX_PAGE_SIZE = 1000


class BackupServicer(backup_pb2_grpc.BackupServiceServicer):
    def __init__(self, app: App):
        self._app = app
        self._uploads = TransferSlots("upload", app.config.max_transfers)
        self._downloads = TransferSlots("download", app.config.max_transfers)
        self._backup_pb = convert.BackupMessages()

    def Create(self, request: pb.CreateRequest, context: grpc.ServicerContext) -> Iterator[pb.CreateResponse]:
        kind = resolve_kind(convert.format_from_pb(request.format), convert.compression_from_pb(request.compression))
        job = self._app.backups.start_backup(kind, Trigger.MANUAL)
        last: pb.CreateResponse | None = None
        for state in job.watch():
            if state.done and state.error is not None:
                raise state.error
            if state.backup is None:  # not yet reserved: every message names the backup
                continue
            message = pb.CreateResponse(
                progress=convert.progress_to_pb(state.progress), backup=convert.backup_to_pb(state.backup)
            )
            if message != last:
                last = message
                yield message

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> bytes:  # type: ignore[override]
        """Answers with the ListResponse already serialized, from each backup's encoding kept while it is
        unchanged (`convert.BackupMessages.list_response`), which the generated signature does not foresee."""
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        backups, token = self._app.backups.page(size, request.page_token)
        return self._backup_pb.list_response(backups, token)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        return pb.GetResponse(backup=convert.backup_to_pb(self._app.backups.get(request.id)))

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        backup, removed = self._app.backups.delete(request.id)
        return pb.DeleteResponse(backup=convert.backup_to_pb(backup), removed_from=convert.locations_to_pb(removed))

    def StreamDownload(  # type: ignore[override]
        self, request: pb.StreamDownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Yields each StreamDownloadResponse already serialized (`wire`: 30 times cheaper per chunk than a
        message), which the generated base class's signature does not foresee."""
        with self._downloads.hold():
            chunks = self._app.transfers.download(request.id, offset=request.offset, chunk_size=request.chunk_size)
            # When the client cancels, gRPC drops this generator, which closes `chunks` and releases its pin.
            for chunk in chunks:
                backup = convert.backup_to_pb(chunk.backup) if chunk.backup is not None else None
                yield wire.encode_download_response(chunk.offset, chunk.data, backup)

    def UploadAndRestore(
        self, request_iterator: Iterator[pb.UploadAndRestoreRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.UploadAndRestoreResponse]:
        def messages() -> Iterator[transfer.UploadMessage]:
            # Lazily, one request at a time: the domain consumes the stream as it arrives, never as a list.
            for request in with_idle_timeout(request_iterator, self._app.config.upload_idle_timeout, "upload"):
                payload = request.WhichOneof("payload")
                if payload == "metadata":
                    meta = request.metadata
                    yield transfer.UploadMetadata(
                        filename=meta.filename,
                        size_bytes=meta.size_bytes,
                        sha256=meta.sha256,
                        restore=meta.restore,
                        skip_safety_backup=meta.skip_safety_backup,
                    )
                elif payload == "chunk":
                    yield transfer.UploadChunk(offset=request.chunk.offset, data=request.chunk.data)
                else:
                    raise InvalidArgument("an upload message must carry metadata or a chunk", reason="EMPTY_MESSAGE")

        with self._uploads.hold():
            for event in self._app.transfers.upload(messages()):
                response = pb.UploadAndRestoreResponse(progress=convert.progress_to_pb(event.progress))
                if event.backup is not None:
                    response.backup.CopyFrom(convert.backup_to_pb(event.backup))
                if event.result is not None:
                    response.result.CopyFrom(convert.restore_result_to_pb(event.result))
                yield response

    def Restore(self, request: pb.RestoreRequest, context: grpc.ServicerContext) -> Iterator[pb.RestoreResponse]:
        job = self._app.restores.start_restore(request.id, skip_safety_backup=request.skip_safety_backup)
        for state in job.watch():
            if state.done and state.error is not None:
                raise state.error
            response = pb.RestoreResponse(progress=convert.progress_to_pb(state.progress))
            if state.done and isinstance(state.result, RestoreResult):
                response.result.CopyFrom(convert.restore_result_to_pb(state.result))
            yield response

    def SetRetention(self, request: pb.SetRetentionRequest, context: grpc.ServicerContext) -> pb.SetRetentionResponse:
        if not request.HasField("policy"):
            raise InvalidArgument('policy is required, for example {"policy": {"keep_last": 7}}')
        policy, deleted = self._app.backups.set_retention(
            convert.policy_from_pb(request.policy), dry_run=request.validate_only
        )
        return pb.SetRetentionResponse(policy=convert.policy_to_pb(policy), deleted_ids=deleted)

    def GetRetention(self, request: pb.GetRetentionRequest, context: grpc.ServicerContext) -> pb.GetRetentionResponse:
        return pb.GetRetentionResponse(policy=convert.policy_to_pb(self._app.settings.current.policy))

    def SetSchedule(self, request: pb.SetScheduleRequest, context: grpc.ServicerContext) -> pb.SetScheduleResponse:
        settings = self._app.settings.set_schedule(
            enabled=request.enabled if request.HasField("enabled") else None,
            time_of_day=request.time_of_day if request.HasField("time_of_day") else None,
            time_zone=request.time_zone if request.HasField("time_zone") else None,
            catch_up=request.catch_up if request.HasField("catch_up") else None,
        )
        self._app.scheduler.reschedule()
        return pb.SetScheduleResponse(
            schedule=convert.schedule_to_pb(settings.schedule), next_run_time=self._next_run()
        )

    def GetSchedule(self, request: pb.GetScheduleRequest, context: grpc.ServicerContext) -> pb.GetScheduleResponse:
        return pb.GetScheduleResponse(
            schedule=convert.schedule_to_pb(self._app.settings.current.schedule), next_run_time=self._next_run()
        )

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.GetStatusResponse:
        status = self._app.backups.status()
        response = pb.GetStatusResponse(
            database=self._app.database.name,
            database_reachable=status.database_reachable,
            next_scheduled_run=self._next_run(),
        )
        if status.last_successful is not None:
            response.last_successful_backup.CopyFrom(self._backup_pb(status.last_successful))
            age = datetime.now(UTC) - status.last_successful.create_time
            response.last_successful_age.CopyFrom(convert.duration(max(age.total_seconds(), 0.0)))
        if status.last_failed is not None:
            response.last_failed_backup.CopyFrom(self._backup_pb(status.last_failed))
        if status.current_job is not None:
            response.current_job.CopyFrom(convert.job_to_pb(status.current_job))
        if status.last_verified is not None:
            response.last_verified_backup.CopyFrom(self._backup_pb(status.last_verified))
        if status.last_verify_success_time is not None:
            response.last_verify_success_time.CopyFrom(convert.timestamp(status.last_verify_success_time))
        interrupted = self._app.slot.journal.interrupted if self._app.slot.journal else None
        if interrupted is not None:
            response.interrupted_job.CopyFrom(convert.interrupted_job_to_pb(interrupted))
        if self._app.offsite is not None:
            response.offsite.CopyFrom(convert.offsite_to_pb(self._app.offsite.status()))
        silence = self._app.silence
        if silence.stale_after is not None:
            response.stale = silence.is_stale()
            response.stale_after.CopyFrom(convert.duration(silence.stale_after.total_seconds()))
        if self._app.notifier.enabled:
            response.notifications.CopyFrom(convert.notification_status_to_pb(self._app.notifier.status()))
        return response

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> Iterator[pb.VerifyResponse]:
        job = self._app.verifier.start_verify(request.id)
        for state in job.watch():
            if state.done and state.error is not None:
                raise state.error
            response = pb.VerifyResponse(progress=convert.progress_to_pb(state.progress))
            if state.backup is not None:
                response.backup.CopyFrom(convert.backup_to_pb(state.backup))
            yield response

    def Pin(self, request: pb.PinRequest, context: grpc.ServicerContext) -> pb.PinResponse:
        ttl = convert.ttl_from_pb(request.ttl) if request.HasField("ttl") else None
        return pb.PinResponse(backup=convert.backup_to_pb(self._app.backups.pin(request.id, ttl=ttl)))

    def Unpin(self, request: pb.UnpinRequest, context: grpc.ServicerContext) -> pb.UnpinResponse:
        return pb.UnpinResponse(backup=convert.backup_to_pb(self._app.backups.unpin(request.id)))

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        entries, token = self._app.history.page(size, request.page_token)
        return pb.ListJobsResponse(jobs=[convert.history_entry_to_pb(e) for e in entries], next_page_token=token)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelResponse:
        job = self._app.slot.cancel(request.backup_id, timeout=CANCEL_WAIT_SECONDS)
        return pb.CancelResponse(job=convert.job_to_pb(job), stopped=job.done)

    def _next_run(self) -> timestamp_pb2.Timestamp | None:
        when = self._app.scheduler.next_run_time()
        return convert.timestamp(when) if when else None

"""Moving archives in and out of the service: downloads in chunks that can resume at an offset, and uploads
that are checked while they arrive and stored (and, when asked, restored) only once every check passed.

Memory stays flat however large the archive: a download reads one chunk at a time from disk; an upload
keeps at most the first `archive_format.sniff_bytes` (to recognise the archive before anything is written)
and one chunk, and checks a compressed stream with a decompressor whose output is bounded and thrown away
(`compression.checker`).
An encrypted upload is decrypted on the way to that check, so it is checked like any other; without the
service's identity it cannot be, and is refused.

Every refused upload leaves nothing behind: no temporary file, no manifest, no listed backup, and the
database is unchanged. An upload to restore is inflated once, not twice: it is not inflated while it
arrives, the restore's own read (which hashes, decrypts and inflates every byte before it commits) is its
check, and the archive becomes a READY backup only once that read has passed (`_restore_upload`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from . import archive_format, toolchain
from .compression import Checker, checker
from .database import Database, first_line
from .encryption import AgeKeys
from .errors import (
    BackupError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    JobRunning,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    from_os_error,
)
from .jobs import JobSlot
from .model import ArchiveKind, Backup, Compression, Format, Location, Progress, State, Trigger
from .restore import Decrypt, RestoreManager, RestoreResult
from .storage.catalog import Archives
from .storage.local import ArchiveStore, ArchiveWriter

_logger = logging.getLogger(__name__)

#: Download chunk size when the caller leaves it at 0, and the largest one allowed. 1 MiB measured best
#: (214 MB archive, 3 rounds, medians): 64 KiB 299 MB/s, 256 KiB 771, 1 MiB 928, 2 MiB 738, 4 MiB 377.
#: The server's message limit is 8 MiB (server.py), so 4 MiB leaves ample room around the data.
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
#: Read size when hashing a file without a manifest.
HASH_READ_SIZE = 1024 * 1024
#: An upload reports progress after at least this many bytes (and once more at the end).
PROGRESS_EVERY_BYTES = 4 * 1024 * 1024
#: How much of the uploaded file's name is kept for logs and progress messages.
MAX_FILENAME_SHOWN = 200
#: Bound on how long the full read of a custom-format archive by pg_restore may take.
PG_RESTORE_CHECK_TIMEOUT = 3600

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# -- what the servicer passes in and gets back ----------------------------------------------------------


@dataclass(frozen=True)
class DownloadChunk:
    """One piece of a download. The first piece carries the backup (size, SHA-256) and may have no data."""

    offset: int
    data: bytes
    backup: Backup | None = None


@dataclass(frozen=True)
class UploadMetadata:
    """The first message of an upload."""

    filename: str
    size_bytes: int
    sha256: str = ""
    restore: bool = False
    skip_safety_backup: bool = False


@dataclass(frozen=True)
class UploadChunk:
    """Every later message of an upload."""

    offset: int
    data: bytes


UploadMessage = UploadMetadata | UploadChunk


@dataclass(frozen=True)
class UploadEvent:
    """One progress message of an upload; `backup` once it is stored, `result` when the restore succeeded."""

    progress: Progress
    backup: Backup | None = None
    result: RestoreResult | None = None


# -- checking a compressed stream as it arrives ----------------------------------------------------------


def _drain(pieces: Iterator[bytes]) -> None:
    """Run a check over data whose decompressed content nobody needs."""
    collections.deque(pieces, maxlen=0)


class _BackgroundCheck:
    """Decompresses an upload in a thread of its own, behind a bounded queue, so that the costliest check
    (a full inflate: about 1 s of CPU per 200 MB of gzip, measured) overlaps receiving and writing instead
    of adding to them. A corrupt stream is reported by the next `feed` or by `end`."""

    QUEUE_CHUNKS = 8  # at most this many received chunks wait for the check: memory stays bounded

    def __init__(self, stream: Checker, decrypt: Decrypt | None = None):
        self._stream = stream
        self._decrypt = decrypt
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.QUEUE_CHUNKS)
        self._error: BackupError | None = None
        self._abandoned = False
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="upload-check", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def end(self) -> None:
        """Wait for the check to finish; raise DataLoss when the stream was corrupt or incomplete."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abandon(self) -> None:
        self._abandoned = True
        self._queue.put(None)
        self._thread.join()

    def _received(self) -> Iterator[bytes]:
        while (data := self._queue.get()) is not None:
            yield data
        self._ended = True

    def _run(self) -> None:
        received: Iterator[bytes] = self._received()
        plain = self._decrypt(received) if self._decrypt is not None else received
        try:
            for data in plain:
                if self._abandoned:
                    break
                self._stream.feed(data)
            if not self._abandoned:
                self._stream.end()
        except BackupError as exc:  # DataLoss; or, decrypting, FailedPrecondition (a wrong identity)
            if not self._abandoned:
                self._error = exc
        finally:
            close = getattr(plain, "close", None)
            if close is not None:
                close()  # stops age's thread
        # Keep taking from the queue so that a waiting `feed` never blocks forever.
        while not self._ended and self._queue.get() is not None:
            pass


# -- an upload on its way to disk ------------------------------------------------------------------------


class _Incoming:
    """The bytes of one upload: the header kept until the archive is recognised, then a temporary file of
    the store, hashed, counted and checked as each chunk arrives."""

    def __init__(self, store: ArchiveStore, metadata: UploadMetadata, restores: RestoreManager):
        """An upload to restore is not inflated while it arrives: the restore's own read is its check
        (`TransferManager._restore_upload`), so the archive is inflated once."""
        self.store = store
        self.metadata = metadata
        self.restores = restores
        self.keys: AgeKeys = restores.keys
        self.received = 0
        self.sha256 = hashlib.sha256()
        self.writer: ArchiveWriter | None = None
        self._header = bytearray()
        self._check: _BackgroundCheck | None = None

    def add(self, chunk: UploadChunk) -> None:
        if chunk.offset != self.received:
            raise InvalidArgument(
                f"chunk at offset {chunk.offset} arrived where offset {self.received} was expected: chunks must "
                "arrive in order, without gaps or overlaps",
                reason="CHUNK_OUT_OF_ORDER",
                metadata={"expected_offset": str(self.received), "offset": str(chunk.offset)},
            )
        if self.received + len(chunk.data) > self.metadata.size_bytes:
            raise InvalidArgument(
                f"the upload carries more bytes than the {self.metadata.size_bytes} declared in its metadata",
                reason="UPLOAD_SIZE_MISMATCH",
                metadata={"declared_size_bytes": str(self.metadata.size_bytes)},
            )
        self.received += len(chunk.data)
        self.sha256.update(chunk.data)
        if self.writer is None:
            self._header += chunk.data
            if len(self._header) >= archive_format.sniff_bytes(self._header):
                self._recognise()
        else:
            self._write(self.writer, chunk.data)

    def finish(self) -> ArchiveWriter:
        """The client closed its side: the archive must be complete, match its checksum and read to the end.
        Returns the writer holding it (its backup knows the archive's kind)."""
        if self.received < self.metadata.size_bytes:
            # DATA_LOSS, not INVALID_ARGUMENT: bytes the caller announced never arrived (an interrupted
            # client, a cut connection), the same verdict as for a truncated archive file.
            raise DataLoss(
                f"the upload stopped after {self.received} of the {self.metadata.size_bytes} bytes declared: "
                "the archive is truncated",
                reason="UPLOAD_TRUNCATED",
                metadata={"declared_size_bytes": str(self.metadata.size_bytes), "received_bytes": str(self.received)},
            )
        writer = self.writer or self._recognise()
        digest = self.sha256.hexdigest()
        if self.metadata.sha256 and digest != self.metadata.sha256:
            raise DataLoss(
                f"the upload's SHA-256 is {digest}, not the {self.metadata.sha256} declared: the archive was "
                "damaged on its way",
                reason="CHECKSUM_MISMATCH",
            )
        if self._check is not None:
            self._check.end()
        return writer

    def abandon(self) -> None:
        """Forget everything: temporary file and reserved manifest."""
        if self._check is not None:
            self._check.abandon()
        if self.writer is not None and not self.writer.finished:
            self.writer.discard()

    def _recognise(self) -> ArchiveWriter:
        header = bytes(self._header)
        name = self.metadata.filename or "the upload"
        encrypted = archive_format.is_encrypted(header)
        if encrypted:
            # Without the identity nothing inside could be checked, so it is not taken at all.
            self.keys.require_identity(name)
        keys = self.keys

        def decrypt_head(prefix: bytes) -> bytes:
            return keys.decrypt_head(prefix, archive=name)

        kind = archive_format.sniff(
            header[: archive_format.sniff_bytes(header)], decrypt_head=decrypt_head if encrypted else None
        )
        if kind is None:
            raise InvalidArgument(
                f"{self.metadata.filename or 'the upload'} is not a pg_dump archive: its first bytes are neither "
                "pg_dump's custom format (PGDMP), nor plain SQL, nor gzip or zstd holding one of them (encrypted "
                "with age or not)",
                reason="NOT_AN_ARCHIVE",
            )
        # Only now is the id known (its extension follows the content), so only now is anything written.
        writer = self.writer = self.store.begin(kind, Trigger.UPLOADED)
        if (kind.compression is not Compression.NONE or kind.encrypted) and not self.metadata.restore:
            decrypt: Decrypt | None = None
            if kind.encrypted:

                def decrypt(ciphertext: Iterable[bytes]) -> Iterator[bytes]:
                    return keys.decrypting(ciphertext, archive=name)

            self._check = _BackgroundCheck(checker(kind.compression), decrypt)
        self._header = bytearray()
        self._write(writer, header)
        return writer

    def _write(self, writer: ArchiveWriter, data: bytes) -> None:
        if self._check is not None:
            self._check.feed(data)
        try:
            writer.file.write(data)
        except OSError as exc:
            raise from_os_error(exc, f"writing the upload {writer.backup.id}") from None


# -- the domain ------------------------------------------------------------------------------------------


class TransferManager:
    """Downloads and uploads of archives of the store."""

    def __init__(
        self,
        archives: Archives,
        database: Database,
        slot: JobSlot,
        restores: RestoreManager,
        *,
        max_upload_bytes: int,
        pg_bin_dir: Path | None = None,
    ):
        self.archives = archives
        #: Uploads are written to the directory.
        self.store = archives.local
        self.database = database
        self.slot = slot
        self.restores = restores
        self.max_upload_bytes = max_upload_bytes
        self._pg_bin_dir = pg_bin_dir

    # -- downloads -------------------------------------------------------------------------------------

    def download(self, backup_id: str, *, offset: int = 0, chunk_size: int = 0) -> Iterator[DownloadChunk]:
        """The archive from `offset` on, in chunks of `chunk_size` (0: 1 MiB). The first chunk carries the
        backup. The archive is marked in use, so that retention keeps it, until the generator is closed."""
        if offset < 0:
            raise InvalidArgument(f"offset must not be negative, got {offset}", reason="INVALID_OFFSET")
        if chunk_size < 0 or chunk_size > MAX_CHUNK_SIZE:
            raise InvalidArgument(
                f"chunk_size must be between 0 (the default, {DEFAULT_CHUNK_SIZE} bytes) and {MAX_CHUNK_SIZE}, "
                f"got {chunk_size}",
                reason="INVALID_CHUNK_SIZE",
            )
        size = chunk_size or DEFAULT_CHUNK_SIZE
        # Pin before looking the backup up: retention checks pins before it deletes, so from here on the
        # archive stays (and once it is open, even a deletion could not cut the stream short).
        with self.store.in_use(backup_id), self._open_for_download(backup_id, offset) as (backup, handle):
            position = offset
            sent_first = False
            while True:
                want = min(size, backup.size_bytes - position)
                data = handle.read(want) if want else b""
                if want and not data:
                    raise DataLoss(
                        f"archive {backup.id} ended at byte {position}, before the {backup.size_bytes} bytes its "
                        "manifest records",
                        reason="ARCHIVE_TRUNCATED",
                    )
                if data or not sent_first:
                    yield DownloadChunk(offset=position, data=data, backup=None if sent_first else backup)
                    sent_first = True
                position += len(data)
                if position >= backup.size_bytes:
                    break
        _logger.debug("download of %s from offset %d finished", backup_id, offset)

    @contextlib.contextmanager
    def _open_for_download(self, backup_id: str, offset: int) -> Iterator[tuple[Backup, BinaryIO]]:
        """The backup, and its archive positioned at `offset`."""
        backup = self.archives.get(backup_id)
        if backup.state is State.CREATING:
            raise FailedPrecondition(
                f"backup {backup.id} is still being created; download it once it is READY",
                reason="BACKUP_IN_PROGRESS",
            )
        if backup.state is State.FAILED:
            raise FailedPrecondition(
                f"backup {backup.id} failed and holds no archive to download ({backup.error or 'no reason recorded'})",
                reason="BACKUP_FAILED",
            )
        if offset > backup.size_bytes:
            raise OutOfRange(
                f"offset {offset} is past the end of {backup.id}, which has {backup.size_bytes} bytes",
                metadata={"size_bytes": str(backup.size_bytes)},
            )
        if Location.LOCAL not in backup.locations:
            # Only the bucket has it: streamed from there (`archives.reading` holds its read lock).
            with self.archives.reading(backup, offset) as stream:
                yield backup, stream
            return
        try:
            opened = self.store.open(backup.id)
        except FileNotFoundError:
            # Removed by hand between the look-up and here (the pin keeps the service's own deletions away).
            raise NotFound(f"the archive of {backup.id} is no longer in the backup directory") from None
        with opened as handle:
            on_disk = os.fstat(handle.fileno()).st_size
            if not backup.sha256:
                backup = self._adopt(backup, handle)
            elif on_disk != backup.size_bytes:
                raise DataLoss(
                    f"archive {backup.id} has {on_disk} bytes on disk but its manifest records {backup.size_bytes}; "
                    "the file was changed or damaged after it was written",
                    reason="ARCHIVE_SIZE_MISMATCH",
                )
            handle.seek(offset)
            yield backup, handle

    def _adopt(self, backup: Backup, handle: BinaryIO) -> Backup:
        """A file without a manifest (Aperture's own, or copied in by hand) has no recorded SHA-256, and the
        first message of a download must carry one. Hash it once and write a manifest for it, so later
        downloads and restores have the checksum at once. It stays EXTERNAL: the service did not make it."""
        before = os.fstat(handle.fileno())
        digest = hashlib.sha256()
        size = 0
        handle.seek(0)
        while data := handle.read(HASH_READ_SIZE):
            digest.update(data)
            size += len(data)
        after = os.fstat(handle.fileno())
        if size != after.st_size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise FailedPrecondition(
                f"{backup.id} is still being written (its size or time changed while it was read); try again "
                "once it is complete",
                reason="ARCHIVE_CHANGING",
            )
        adopted = backup.replace(size_bytes=size, sha256=digest.hexdigest())
        try:
            self.store.write_manifest(adopted, exclusive=True)
        except FileExistsError:
            # Another download adopted it first; its manifest is the record.
            recorded = self.store.get(backup.id)
            if recorded.sha256 and recorded.size_bytes == size:
                return recorded
            raise
        _logger.info("recorded SHA-256 %s of %s (%d bytes, found without a manifest)", adopted.sha256, backup.id, size)
        return adopted

    # -- uploads ---------------------------------------------------------------------------------------

    def upload(self, messages: Iterator[UploadMessage]) -> Iterator[UploadEvent]:
        """Receive an archive (metadata first, then chunks in order), check it while it arrives, store it as a
        READY backup with trigger UPLOADED and, when asked, restore it. Consumes `messages` lazily, one at
        a time. Raises (leaving nothing behind) on any problem found before the archive is stored."""
        started = time.monotonic()
        first = next(messages, None)
        if not isinstance(first, UploadMetadata):
            raise InvalidArgument(
                "the first message of an upload must carry its metadata (filename, size_bytes, ...); "
                + ("the stream was empty" if first is None else "it carried a chunk"),
                reason="METADATA_REQUIRED",
            )
        metadata = self._accept(first)
        # The name is the caller's and only informative: keep it short wherever it is shown.
        metadata = dataclasses.replace(metadata, filename=metadata.filename[:MAX_FILENAME_SHOWN])
        _logger.info(
            "receiving upload %r: %d bytes%s",
            metadata.filename,
            metadata.size_bytes,
            ", to restore" if metadata.restore else "",
        )

        def progress(phase: str, done: int, message: str = "") -> Progress:
            return Progress(
                phase=phase,
                bytes_done=done,
                bytes_total=metadata.size_bytes,
                elapsed_seconds=time.monotonic() - started,
                message=message,
            )

        incoming = _Incoming(self.store, metadata, self.restores)
        try:
            yield UploadEvent(progress("uploading", 0, f"receiving {metadata.filename}" if metadata.filename else ""))
            reported = 0
            for message in messages:
                if isinstance(message, UploadMetadata):
                    raise InvalidArgument(
                        "an upload carries its metadata in the first message only; a later message carried it again",
                        reason="UNEXPECTED_METADATA",
                    )
                incoming.add(message)
                if incoming.received - reported >= PROGRESS_EVERY_BYTES:
                    reported = incoming.received
                    yield UploadEvent(progress("uploading", reported))
            if reported != incoming.received:
                yield UploadEvent(progress("uploading", incoming.received))
            writer = incoming.finish()
            received = writer.backup.replace(size_bytes=incoming.received, sha256=incoming.sha256.hexdigest())
            if metadata.restore:
                # Not checked yet (beyond size and SHA-256): `_restore_upload` reads it once, restoring. The
                # messages carry the backup only once it is checked and stored, as the contract says.
                yield UploadEvent(progress("verifying", incoming.received, "checking the archive while it is restored"))
            else:
                yield UploadEvent(progress("verifying", incoming.received, "checking the archive reads to its end"))
                if received.kind.format is Format.CUSTOM:
                    self._check_custom(writer.temp_path, received.kind)
                backup = self._keep(writer, received, metadata, started)
        except BaseException:
            # Also on GeneratorExit (the client went away): a refused or abandoned upload leaves nothing.
            incoming.abandon()
            raise
        if not metadata.restore:
            yield UploadEvent(progress("done", backup.size_bytes), backup=backup)
            return
        yield from self._restore_upload(writer, received, metadata, started)

    def _keep(self, writer: ArchiveWriter, received: Backup, metadata: UploadMetadata, started: float) -> Backup:
        """The checked upload becomes a READY backup."""
        backup = writer.commit(
            size_bytes=received.size_bytes, sha256=received.sha256, duration_seconds=time.monotonic() - started
        )
        _logger.info(
            "stored upload %r as %s (%d bytes, %s)",
            metadata.filename,
            backup.id,
            backup.size_bytes,
            backup.kind.extension,
        )
        if self.archives.on_stored is not None:
            self.archives.on_stored(backup)
        return backup

    def _accept(self, metadata: UploadMetadata) -> UploadMetadata:
        """Refuse, before a byte is received, an upload that cannot succeed."""
        if metadata.size_bytes <= 0:
            raise InvalidArgument(
                f"metadata.size_bytes must be the archive's exact size in bytes (> 0), got {metadata.size_bytes}",
                reason="INVALID_SIZE",
            )
        sha256 = metadata.sha256.strip().lower()
        if sha256 and not _SHA256_RE.match(sha256):
            raise InvalidArgument("metadata.sha256 must be 64 hexadecimal digits (or empty)", reason="INVALID_CHECKSUM")
        if metadata.size_bytes > self.max_upload_bytes:
            raise ResourceExhausted(
                f"the upload is {metadata.size_bytes} bytes; this service accepts at most {self.max_upload_bytes} "
                "(APERTURE_BACKUP_MAX_UPLOAD_BYTES)",
                reason="UPLOAD_TOO_LARGE",
                metadata={"max_upload_bytes": str(self.max_upload_bytes)},
            )
        free = shutil.disk_usage(self.store.directory).free
        if metadata.size_bytes > free:
            raise ResourceExhausted(
                f"the upload is {metadata.size_bytes} bytes but the backup directory has only {free} bytes free",
                reason="INSUFFICIENT_DISK_SPACE",
                metadata={"free_bytes": str(free)},
            )
        if metadata.restore:
            # Fail fast rather than after receiving gigabytes; the slot is claimed for real before restoring.
            self.slot.ensure_free("an upload and restore")
        return dataclasses.replace(metadata, sha256=sha256)

    def _check_custom(self, path: Path, kind: ArchiveKind) -> None:
        """A full read of a custom-format archive by pg_restore, into /dev/null. `pg_restore --list` reads
        only the header and table of contents: measured, it accepts an archive cut to two thirds, or missing
        its last 50 bytes, with exit status 0; the full read refuses both. It needs no database and reads a
        few MB in a fraction of a second. The newest pg_restore installed reads archives of every older
        pg_dump, and the upload may be meant for another server: no need to match this one."""
        toolsets = toolchain.discover(self._pg_bin_dir)
        if not toolsets:
            raise FailedPrecondition(
                "no pg_restore is installed, so the custom-format upload cannot be checked; install the PostgreSQL "
                "client tools or point APERTURE_BACKUP_PG_BIN_DIR at them",
                reason="NO_PG_RESTORE",
            )
        toolset = max(toolsets)
        with tempfile.TemporaryFile() as err:
            # The file itself when stored as is, else its content on stdin (no file name: pg_restore takes
            # "-" for a file name).
            direct = kind.compression is Compression.NONE and not kind.encrypted
            proc = subprocess.Popen(
                [toolset.tool("pg_restore"), "--file", os.devnull, *([str(path)] if direct else [])],
                stdin=subprocess.DEVNULL if direct else subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                if proc.stdin is not None:
                    self._pipe_content(path, kind, proc.stdin)
                returncode = proc.wait(timeout=PG_RESTORE_CHECK_TIMEOUT)
            except BaseException:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                raise
            err.seek(0)
            message = first_line(err.read(64 * 1024).decode("utf-8", "replace"))
        if returncode != 0:
            raise DataLoss(
                f"pg_restore {toolset.version} cannot read the uploaded archive to its end (exit status "
                f"{returncode}): {message or 'no message'}; it is truncated, damaged or made by a newer pg_dump",
                reason="ARCHIVE_CORRUPT",
            )

    def _pipe_content(self, path: Path, kind: ArchiveKind, sink: IO[bytes]) -> None:
        """The archive's content (decrypted, decompressed) into pg_restore's stdin."""
        chunks = self.restores.reader(path, kind, recipients=()).chunks()
        try:
            for piece in chunks:
                sink.write(piece)
        except BrokenPipeError:
            pass  # pg_restore stopped reading: its exit status says why
        finally:
            chunks.close()
            with contextlib.suppress(BrokenPipeError):
                sink.close()

    def _restore_upload(
        self, writer: ArchiveWriter, received: Backup, metadata: UploadMetadata, started: float
    ) -> Iterator[UploadEvent]:
        """Restore the received archive through the same path as the Restore RPC, in a job of its own (it
        goes on if the caller disconnects, like every restore), with the restore's read as the archive's
        only full check: one inflate instead of two (issue #16).

        The archive stays CREATING (listed, but neither restorable nor downloadable) until that read has
        gone through every byte, matched the SHA-256 received and found the compressed (and encrypted)
        stream intact; it becomes READY then, just before the restore commits. When the restore fails:
        - after that point, the upload stays READY and the error says under which id (as when a restore of
          a sound archive fails, e.g. one the server cannot load);
        - because the read found the archive corrupt, truncated or not matching (DATA_LOSS), the upload is
          removed, as an upload refused while it arrives is: nothing unreadable is kept or listed;
        - before the read got to the end (a busy database, the safety backup, psql stopping at a statement
          of the archive), the check the restore did not finish runs alone, and the upload is kept READY
          when it passes, else removed and the check's DATA_LOSS is the answer.
        The database is untouched in every failure: the restore commits only after the read passed."""
        kept: list[Backup] = []

        def keep() -> Backup:
            kept.append(self._keep(writer, received, metadata, started))
            return kept[0]

        def settle(error: BackupError) -> BackupError:
            """What becomes of the upload when the restore failed; the error to report."""
            if kept:
                return self._stored_note(error, kept[0])
            if writer.finished:  # the commit itself failed half-way: nothing trustworthy to keep
                return error
            if isinstance(error, DataLoss):
                writer.discard()
                _logger.info("removed upload %r: %s", metadata.filename, error)
                return error
            try:
                self._check_archive(writer.temp_path, received.kind)
            except BaseException:
                writer.discard()
                raise
            return self._stored_note(error, keep())

        try:
            job = self.restores.start_restore_file(
                received,
                writer.temp_path,
                skip_safety_backup=metadata.skip_safety_backup,
                on_intact=keep,
                on_failure=settle,
            )
        except JobRunning as exc:
            # Another job took the slot after `_accept`: store the upload if it is sound, to restore later.
            raise settle(
                JobRunning(f"{exc}. Restore the upload with Restore once the job has finished", metadata=exc.metadata)
            ) from exc
        except BaseException:
            writer.discard()
            raise
        for state in job.watch():
            if state.done and state.error is not None:
                raise state.error
            progress = dataclasses.replace(state.progress, elapsed_seconds=time.monotonic() - started)
            result = state.result if state.done and isinstance(state.result, RestoreResult) else None
            yield UploadEvent(progress, backup=kept[0] if kept else None, result=result)

    def _check_archive(self, path: Path, kind: ArchiveKind) -> None:
        """The whole check of an upload, alone: the compressed (and encrypted) stream read to its end and,
        for a custom-format archive, pg_restore's full read."""
        if kind.format is Format.CUSTOM:
            self._check_custom(path, kind)
            return
        chunks = self.restores.reader(path, kind, recipients=()).chunks()
        try:
            _drain(chunks)
        finally:
            chunks.close()

    @staticmethod
    def _stored_note(error: BackupError, backup: Backup) -> BackupError:
        """The restore failed, but the upload itself is kept as a READY backup: say so, and under which id."""
        metadata = {**error.metadata, "backup_id": backup.id}
        return type(error)(f"{error} (the upload is stored as {backup.id})", reason=error.reason, metadata=metadata)

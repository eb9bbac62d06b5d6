"""An S3-compatible bucket (AWS S3, Backblaze B2, Cloudflare R2, MinIO, Ceph, Garage...) through boto3.

Layout: the archive `<prefix><id>` and, beside it, its manifest `<prefix><id>.manifest.json`, the same
JSON as in the backup directory. The manifest is written last, after the archive's upload has completed
and its size and checksum were checked, so an archive is listed only when it is whole: an interrupted
multipart upload is no object at all (S3 shows an object only once its upload is completed), and one that
completed without its manifest (the service stopped between the two) is not listed and is uploaded again.

Integrity, end to end: each part is sent with its SHA-256 (`ChecksumAlgorithm=SHA256`), which the storage
service checks as it receives it; the whole archive's SHA-256 goes into the manifest and into the object's
metadata (`x-amz-meta-sha256`), and after the upload the object's size and that metadata are compared with
the manifest. Every read back (a download, a restore) hashes the bytes again and refuses a mismatch.

Credentials and region come from boto3's standard chain (environment, shared files, instance roles).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils
from boto3.s3.transfer import TransferConfig

from aperture_backup.errors import Aborted, BackupError, DataLoss, FailedPrecondition, Internal, NotFound, Unavailable
from aperture_backup.model import Backup, Location, State

from .local import MANIFEST_SUFFIX, sort_key, validate_id

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_logger = logging.getLogger(__name__)

MIB = 1024 * 1024
#: S3 refuses a multipart upload of more than 10,000 parts; the part size grows so that an archive needs
#: at most this many, leaving room below the limit.
MAX_PARTS = 9_000
#: Smallest part (S3's own minimum is 5 MiB); also the size from which an upload is multipart.
MIN_PART_SIZE = 8 * MIB
#: Parts sent at once.
UPLOAD_CONCURRENCY = 4
#: An archive uploaded while it is written does not know its size: its parts start at MIN_PART_SIZE and
#: double every this many parts (S3 allows parts of different sizes), so 9,000 parts hold 4 TiB.
PARTS_PER_DOUBLING = 1_000
#: Parts of a growing archive held in memory at once, at most (one part when parts are larger).
IN_FLIGHT_BYTES = UPLOAD_CONCURRENCY * MIN_PART_SIZE
#: How often an upload of a growing archive looks whether a part's worth of it has been written.
GROWTH_POLL_SECONDS = 0.05
#: A listing older than this is renewed in the background at the next call (its callers are answered from it
#: meanwhile); the service's own uploads, manifests and deletions show in it at once.
LISTING_TTL_SECONDS = 5.0
#: After the bucket could not be reached, listings use the last one for this long instead of waiting for
#: the network again at every List call.
UNREACHABLE_BACKOFF_SECONDS = 30.0
#: Manifests read at once when a listing meets manifests it has not seen (the first listing after start-up
#: reads them all, one GET each: a thousand take a storage service seconds one after another).
MANIFEST_READERS = 8
#: Connections kept to the storage service: the manifest readers, and an upload's parts beside them.
MAX_POOL_CONNECTIONS = MANIFEST_READERS + UPLOAD_CONCURRENCY + 2
#: Where every backup of a bucket's listing is.
_IN_BUCKET = frozenset({Location.BUCKET})
#: Incomplete multipart uploads older than this are aborted (an interrupted upload of any replica).
STALE_UPLOAD_AGE = timedelta(hours=24)


def parse_timestamp(value: str) -> datetime:
    """A timestamp of a response, as botocore parses it. botocore's own parser goes through dateutil's
    general one, 0.1 ms a value here: two thirds of the CPU the service spent listing 2,000 objects. S3's
    listings give ISO 8601 with a zone, which the standard library parses 80 times faster (0.6 us); anything else
    (the RFC 1123 dates of headers, epochs, a time without a zone) is left to botocore."""
    with contextlib.suppress(ValueError):
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is not None:
            return parsed
    return botocore.utils.parse_timestamp(value)


def part_size_for(size: int) -> int:
    """The part size for an archive of `size` bytes: at least MIN_PART_SIZE, a whole number of MiB, and
    large enough that the archive fits in MAX_PARTS parts (a 5 TB archive, S3's largest object, too)."""
    needed = -(-size // MAX_PARTS)
    return max(MIN_PART_SIZE, -(-needed // MIB) * MIB)


@dataclass(frozen=True)
class BucketAddress:
    """`s3://bucket/optional/prefix`, parsed."""

    bucket: str
    #: '' or a prefix ending in '/'.
    prefix: str

    @classmethod
    def parse(cls, url: str) -> BucketAddress:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"{url!r} is not an s3://bucket/optional/prefix URL")
        prefix = parts.path.strip("/")
        if any(segment in {"", ".", ".."} for segment in prefix.split("/")) and prefix:
            raise ValueError(f"the prefix of {url!r} has an empty, '.' or '..' segment")
        return cls(parts.netloc, prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class Bucket:
    """The archives of one bucket (and prefix): list, read, upload, delete."""

    location = Location.BUCKET

    def __init__(
        self,
        address: BucketAddress,
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ):
        self.address = address
        config = botocore.config.Config(
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Services other than AWS mostly want bucket names in the path, not in the host name.
            s3={"addressing_style": "path"} if endpoint_url else {},
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        session = botocore.session.get_session()
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
        self._client: S3Client = boto3.session.Session(botocore_session=session).client(
            "s3", endpoint_url=endpoint_url, config=config
        )
        self._endpoint = endpoint_url
        self._lock = threading.Lock()
        #: Held while the bucket is listed: one listing at a time, whoever asks.
        self._listing_lock = threading.Lock()
        self._listing: tuple[Backup, ...] | None = None
        #: When the listing kept began (monotonic), and when the last attempt began, successful or not.
        self._listed_at = self._attempted_at = float("-inf")
        #: Whether a thread is listing the bucket in the background now.
        self._refreshing = False
        #: Why the last listing failed; None once one succeeded again.
        self._listing_error: BackupError | None = None
        #: This service's own changes (when, id, the backup now listed or None), applied to the listing kept
        #: at once, and again to a listing that began before them.
        self._changes: list[tuple[float, str, Backup | None]] = []
        #: Parsed manifests by key and ETag, each backup as listed: a listing reads only the manifests it has
        #: not seen, and lists the same Backup object for a manifest it has, so that what callers derive from
        #: a backup (List's encoding of it) is not made again whenever the listing changes.
        self._manifests: dict[str, tuple[str, Backup | None]] = {}
        self._unreachable: tuple[float, BackupError] | None = None
        #: Keys this service is uploading now: never "stale", whatever date the storage service gives them.
        self._uploading: set[str] = set()
        #: Set by `close()`: a listing under way stops at its next request.
        self._closing = threading.Event()

    def describe(self) -> str:
        return str(self.address) + (f" at {self._endpoint}" if self._endpoint else "")

    def key(self, backup_id: str) -> str:
        return self.address.prefix + validate_id(backup_id)

    def close(self) -> None:
        """The service is stopping: a listing under way stops before its next request (raising Aborted), so
        that a first listing of a thousand manifests does not hold up the shutdown."""
        self._closing.set()

    # -- checks ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Reach the bucket and list it once; a clear error when the credentials, the bucket or the network
        are wrong."""
        with self._translated("opening the bucket"):
            self._client.head_bucket(Bucket=self.address.bucket)
            self._client.list_objects_v2(Bucket=self.address.bucket, Prefix=self.address.prefix, MaxKeys=1)

    # -- reading ---------------------------------------------------------------------------------------

    def list_backups(self, *, fresh: bool = False) -> list[Backup]:
        """The READY archives the bucket holds whole, newest first (see `listing`)."""
        return list(self.listing(fresh=fresh))

    def listing(self, *, fresh: bool = False) -> tuple[Backup, ...]:
        """As `list_backups`, the same tuple while nothing changed. Listing a bucket of a thousand archives
        takes a storage service a second or more, so no caller waits for it once a listing exists: the one
        kept is answered at once, and when it is older than LISTING_TTL_SECONDS one thread lists the bucket
        again in the background (stale-while-revalidate). This service's own uploads, manifests and deletions
        show at once (`_changed`). `fresh` (and the first call) lists now; raises while the last listing
        failed, and the caller may fall back on `cached_listing`."""
        asked = time.monotonic()
        with self._lock:
            if not fresh and self._listing is not None:
                self._refresh_if_due(asked)
                if self._listing_error is not None:
                    raise self._listing_error
                return self._listing
            if self._unreachable is not None and asked < self._unreachable[0]:
                raise self._unreachable[1]
        return self._list_now(asked)

    def _refresh_if_due(self, now: float) -> None:
        """Start a background listing when the last attempt is old enough (the caller holds `_lock`)."""
        if self._refreshing or now - self._attempted_at < LISTING_TTL_SECONDS:
            return
        if self._unreachable is not None and now < self._unreachable[0]:
            return
        self._refreshing = True
        threading.Thread(target=self._refresh, name="bucket-listing", daemon=True).start()

    def _refresh(self) -> None:
        try:
            self._list_now(time.monotonic())
        except BackupError:
            pass  # kept in _listing_error: the next caller is told
        except Exception:  # a thread of its own: nobody else would see it
            _logger.exception("listing the bucket %s failed", self.address)
        finally:
            with self._lock:
                self._refreshing = False

    def _list_now(self, asked: float) -> tuple[Backup, ...]:
        """List the bucket, unless a listing that began after `asked` already did (callers that arrive
        together share one listing)."""
        with self._listing_lock:
            began = time.monotonic()
            with self._lock:
                if self._listing is not None and self._listed_at >= asked:
                    return self._listing
                self._attempted_at = began
            try:
                listing, keys = self._list_bucket()
            except BackupError as exc:
                with self._lock:
                    self._listing_error = exc
                raise
            with self._lock:
                for when, backup_id, backup in self._changes:
                    if when >= began:  # the bucket may have been listed before this change reached it
                        listing = _with_change(listing, backup_id, backup)
                self._changes = [change for change in self._changes if change[0] >= began]
                if listing != self._listing:  # else the same tuple: what callers derived from it stands
                    self._listing = listing
                self._listed_at = began
                self._listing_error = None
                self._manifests = {k: v for k, v in self._manifests.items() if k in keys}
                return self._listing

    def _list_bucket(self) -> tuple[tuple[Backup, ...], set[str]]:
        """The READY archives whose manifest and whole archive the bucket holds, and every key it holds."""
        objects: dict[str, tuple[int, str]] = {}
        with self._translated("listing the bucket"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.address.bucket, Prefix=self.address.prefix
            )
            for page in pages:
                self._stop_if_closing()
                for entry in page.get("Contents", []):
                    objects[entry["Key"]] = (entry.get("Size", 0), entry.get("ETag", ""))
        manifests = [(key, etag) for key, (_, etag) in objects.items() if key.endswith(MANIFEST_SUFFIX)]
        backups = []
        for backup in self._manifests_of(manifests):
            if backup is None:
                continue
            archive = objects.get(self.address.prefix + backup.id)
            if backup.state is State.READY and archive is not None and archive[0] == backup.size_bytes:
                backups.append(backup)
        backups.sort(key=sort_key, reverse=True)
        return tuple(backups), set(objects)

    def cached_listing(self) -> tuple[Backup, ...] | None:
        """The last listing, however old (None before the first): what List shows while the bucket is
        unreachable."""
        with self._lock:
            return self._listing

    def get(self, backup_id: str) -> Backup:
        key = self.key(backup_id)
        try:
            with self._translated(f"reading the manifest of {backup_id}"):
                body = self._client.get_object(Bucket=self.address.bucket, Key=key + MANIFEST_SUFFIX)["Body"]
                backup = _parse_manifest(body.read(), key)
                head = self._client.head_object(Bucket=self.address.bucket, Key=key)
        except NotFound:
            raise NotFound(f"the bucket {self.address} holds no backup {backup_id!r}") from None
        if backup is None or backup.state is not State.READY or head["ContentLength"] != backup.size_bytes:
            raise NotFound(f"the bucket {self.address} holds no complete backup {backup_id!r}")
        return backup.replace(locations=frozenset({Location.BUCKET}))

    @contextlib.contextmanager
    def reading(self, backup_id: str, offset: int = 0) -> Iterator[BinaryIO]:
        """The archive from `offset` on, streamed from the bucket."""
        key = self.key(backup_id)
        with self._translated(f"reading {backup_id} from the bucket"):
            body = self._client.get_object(Bucket=self.address.bucket, Key=key, Range=f"bytes={offset}-")["Body"]
        try:
            yield cast(BinaryIO, _TranslatingReader(body, self, backup_id))
        finally:
            body.close()

    # -- writing ---------------------------------------------------------------------------------------

    def put(self, backup: Backup, path: Path, *, on_progress: Callable[[int], None] | None = None) -> None:
        """Upload a READY archive and then its manifest; check what the bucket stored against the manifest."""
        if backup.state is not State.READY or not backup.sha256:
            raise Internal(f"only READY archives with a checksum go to the bucket, not {backup.id} ({backup.state})")
        key = self.key(backup.id)
        part = part_size_for(backup.size_bytes)
        with self._uploading_key(key):
            self._put(backup, path, key, part, on_progress)

    @contextlib.contextmanager
    def _uploading_key(self, key: str) -> Iterator[None]:
        self._upload_started(key)
        try:
            yield
        finally:
            self._upload_ended(key)

    def _upload_started(self, key: str) -> None:
        """`key` is being uploaded by this service: the sweep of stale uploads leaves it alone."""
        with self._lock:
            self._uploading.add(key)

    def _upload_ended(self, key: str) -> None:
        with self._lock:
            self._uploading.discard(key)

    def _check_stored(self, backup: Backup, key: str, *, sha256_in_metadata: bool) -> None:
        """The object the bucket now has under `key` is the archive of the manifest: its size, and the SHA-256
        its metadata carries when the upload set one."""
        with self._translated(f"checking the copy of {backup.id}"):
            head = self._client.head_object(Bucket=self.address.bucket, Key=key)
        stored_sha = head.get("Metadata", {}).get("sha256", "") if sha256_in_metadata else backup.sha256
        if head["ContentLength"] != backup.size_bytes or stored_sha != backup.sha256:
            raise DataLoss(
                f"the bucket stored {head['ContentLength']} bytes (SHA-256 {stored_sha or 'not recorded'}) for "
                f"{backup.id}, whose manifest has {backup.size_bytes} bytes and SHA-256 {backup.sha256}",
                reason="BUCKET_MISMATCH",
            )

    def _put(self, backup: Backup, path: Path, key: str, part: int, on_progress: Callable[[int], None] | None) -> None:
        self._abort_uploads(key)
        transfer = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=UPLOAD_CONCURRENCY, use_threads=True
        )
        sent = [0]

        def callback(count: int) -> None:
            sent[0] += count
            if on_progress is not None:
                on_progress(sent[0])

        with self._translated(f"uploading {backup.id}"):
            self._client.upload_file(
                str(path),
                self.address.bucket,
                key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": backup.sha256}},
                Config=transfer,
                Callback=callback,
            )
        self._check_stored(backup, key, sha256_in_metadata=True)
        self.write_manifest(backup)
        _logger.info(
            "copied %s to %s (%d bytes, parts of %d MiB)", backup.id, self.address, backup.size_bytes, part // MIB
        )

    def growing_upload(self, backup_id: str, path: Path) -> GrowingUpload:
        """Start uploading the archive `path` (its temporary file) while it is still being written."""
        return GrowingUpload(self, backup_id, path)

    def write_manifest(self, backup: Backup) -> None:
        body = json.dumps(backup.to_json(), indent=2).encode()
        key = self.key(backup.id) + MANIFEST_SUFFIX
        with self._translated(f"writing the manifest of {backup.id}"):
            answer = self._client.put_object(
                Bucket=self.address.bucket,
                Key=key,
                Body=body,
                ContentType="application/json",
                ChecksumAlgorithm="SHA256",
            )
        # Every caller writes the manifest of an archive the bucket holds whole: `put` and `finish` checked
        # it, `update` found it with `get`.
        listed = backup.replace(locations=_IN_BUCKET)
        self._changed(backup.id, listed if backup.state is State.READY else None)
        if answer.get("ETag"):  # the next listing's ETag for this manifest: it need not be read back
            with self._lock:
                self._manifests[key] = (answer["ETag"], listed)

    def delete(self, backup_id: str) -> None:
        """Manifest first (the archive stops being listed), then the archive."""
        key = self.key(backup_id)
        with self._translated(f"deleting {backup_id} from the bucket"):
            self._client.delete_object(Bucket=self.address.bucket, Key=key + MANIFEST_SUFFIX)
            self._client.delete_object(Bucket=self.address.bucket, Key=key)
        self._changed(backup_id, None)
        _logger.info("deleted %s from %s", backup_id, self.address)

    def abort_stale_uploads(self, *, now: datetime | None = None) -> int:
        """Abort incomplete multipart uploads under the prefix older than STALE_UPLOAD_AGE (their parts cost
        storage); returns how many."""
        cutoff = (now or datetime.now(UTC)) - STALE_UPLOAD_AGE
        aborted = 0
        with self._translated("listing incomplete uploads"):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.address.bucket, Prefix=self.address.prefix
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    with self._lock:
                        mine = upload["Key"] in self._uploading
                    if upload["Initiated"] < cutoff and not mine:
                        self._client.abort_multipart_upload(
                            Bucket=self.address.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        if aborted:
            _logger.info("aborted %d incomplete upload(s) older than %s in %s", aborted, STALE_UPLOAD_AGE, self.address)
        return aborted

    # -- internals -------------------------------------------------------------------------------------

    def _abort_uploads(self, key: str) -> None:
        """Ids are unique to the replica that made the archive, so an incomplete upload of this key is this
        service's own, left by a restart: start again cleanly."""
        with self._translated("listing incomplete uploads"):
            uploads = self._client.list_multipart_uploads(Bucket=self.address.bucket, Prefix=key).get("Uploads", [])
            for upload in uploads:
                if upload["Key"] == key:
                    _logger.info("aborting an earlier, interrupted upload of %s", key)
                    self._client.abort_multipart_upload(
                        Bucket=self.address.bucket, Key=key, UploadId=upload["UploadId"]
                    )

    def _manifests_of(self, manifests: list[tuple[str, str]]) -> list[Backup | None]:
        """The backup of each manifest (key, ETag), in order: the ones seen before from `_manifests`, the
        others read MANIFEST_READERS at a time. The first failure (or `close()`) stops the reads not begun."""
        with self._lock:
            known = {
                key: cached[1]
                for key, etag in manifests
                if (cached := self._manifests.get(key)) is not None and cached[0] == etag
            }
        unread = [(key, etag) for key, etag in manifests if key not in known]
        if unread:
            pool = ThreadPoolExecutor(min(MANIFEST_READERS, len(unread)), thread_name_prefix="bucket-manifests")
            try:
                for (key, _), backup in zip(unread, pool.map(lambda e: self._read_manifest(*e), unread), strict=True):
                    known[key] = backup
            finally:
                pool.shutdown(cancel_futures=True)
        return [known[key] for key, _ in manifests]

    def _stop_if_closing(self) -> None:
        if self._closing.is_set():
            raise Aborted(f"the listing of the bucket {self.address} stopped: the service is stopping")

    def _read_manifest(self, key: str, etag: str) -> Backup | None:
        self._stop_if_closing()
        try:
            with self._translated(f"reading {key}"):
                raw = self._client.get_object(Bucket=self.address.bucket, Key=key)["Body"].read()
        except NotFound:
            return None  # deleted between the listing and here
        backup = _parse_manifest(raw, key)
        listed = backup.replace(locations=_IN_BUCKET) if backup is not None else None
        with self._lock:
            self._manifests[key] = (etag, listed)
        return listed

    def _changed(self, backup_id: str, backup: Backup | None) -> None:
        """This service changed what the bucket holds of `backup_id`: its listing shows `backup` (READY, located
        in the bucket; None: no longer listed) from now on, without listing the bucket again."""
        when = time.monotonic()
        with self._lock:
            self._changes.append((when, backup_id, backup))
            if self._listing is not None:
                self._listing = _with_change(self._listing, backup_id, backup)

    @property
    def unreachable(self) -> bool:
        """Whether the last request could not reach the bucket, recently (UNREACHABLE_BACKOFF_SECONDS)."""
        with self._lock:
            return self._unreachable is not None and time.monotonic() < self._unreachable[0]

    @contextlib.contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            error = translate(exc, doing, self)
            if error.reason == "BUCKET_UNREACHABLE":
                with self._lock:
                    self._unreachable = (time.monotonic() + UNREACHABLE_BACKOFF_SECONDS, error)
            raise error from None
        with self._lock:
            self._unreachable = None


def growing_part_size(number: int) -> int:
    """Size of part `number` (from 1) of an upload whose total size is not known yet."""
    return MIN_PART_SIZE << ((number - 1) // PARTS_PER_DOUBLING)


class GrowingUpload:
    """A multipart upload of an archive while the dump still writes it, so that the offsite copy costs
    little more than the dump: a thread sends each part once that much of the file exists, and `finish`
    sends the rest once the archive is complete. The bytes sent are hashed and must equal the archive's
    SHA-256; each part carries its own SHA-256 for the storage service to check. Nothing is listed before
    `finish` has completed the upload and written the manifest; `abandon` aborts it."""

    def __init__(self, bucket: Bucket, backup_id: str, path: Path):
        self._bucket = bucket
        self.backup_id = backup_id
        self.key = bucket.key(backup_id)
        self._client = bucket._client
        bucket._upload_started(self.key)
        try:
            bucket._abort_uploads(self.key)
            with bucket._translated(f"starting the upload of {backup_id}"):
                self._upload_id = self._client.create_multipart_upload(
                    Bucket=bucket.address.bucket, Key=self.key, ChecksumAlgorithm="SHA256"
                )["UploadId"]
        except BackupError:
            bucket._upload_ended(self.key)
            raise
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._final: int | None = None
        self._written = threading.Event()
        self._stop = threading.Event()
        self._parts: list[dict[str, Any]] = []
        self._parts_lock = threading.Lock()
        #: Of the bytes read to be sent, in order (parts go up several at a time).
        self._digest = hashlib.sha256()
        #: Bytes the bucket has acknowledged.
        self.sent = 0
        self.error: BackupError | None = None
        self._thread = threading.Thread(target=self._run, name=f"upload {backup_id}", daemon=True)
        self._thread.start()

    def finish(self, backup: Backup, *, on_progress: Callable[[int], None] | None = None) -> None:
        """Send the rest of the complete archive, complete the upload, check it and write the manifest.
        Raises (having aborted the upload) when anything failed."""
        self._final = backup.size_bytes
        self._written.set()
        while self._thread.is_alive():
            self._thread.join(0.5)
            if on_progress is not None:
                on_progress(self.sent)
        os.close(self._fd)
        try:
            if self.error is not None:
                raise self.error
            if self.sent != backup.size_bytes or self._digest.hexdigest() != backup.sha256:
                raise DataLoss(
                    f"the upload of {backup.id} sent {self.sent} bytes with SHA-256 {self._digest.hexdigest()}, "
                    f"but the archive has {backup.size_bytes} bytes with SHA-256 {backup.sha256}",
                    reason="BUCKET_MISMATCH",
                )
            with self._bucket._translated(f"completing the upload of {backup.id}"):
                self._client.complete_multipart_upload(
                    Bucket=self._bucket.address.bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},  # type: ignore[typeddict-item]
                )
            # The SHA-256 was checked on the bytes sent, above: the object has no metadata of it.
            self._bucket._check_stored(backup, self.key, sha256_in_metadata=False)
        except BackupError:
            self._abort()
            raise
        self._done()
        self._bucket.write_manifest(backup)
        _logger.info(
            "copied %s to %s (%d bytes in %d parts, sent while it was written)",
            backup.id,
            self._bucket.address,
            backup.size_bytes,
            len(self._parts),
        )

    def abandon(self) -> None:
        """The archive will not be complete (the dump failed): stop and abort the upload."""
        self._stop.set()
        self._written.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._abort()

    def _done(self) -> None:
        self._bucket._upload_ended(self.key)

    def _abort(self) -> None:
        self._done()
        with contextlib.suppress(BackupError), self._bucket._translated(f"aborting the upload of {self.backup_id}"):
            self._client.abort_multipart_upload(
                Bucket=self._bucket.address.bucket, Key=self.key, UploadId=self._upload_id
            )

    def _run(self) -> None:
        """Read the file part by part as it grows (hashing it in order) and send up to UPLOAD_CONCURRENCY
        parts at once, holding at most IN_FLIGHT_BYTES of them in memory."""
        number, offset = 1, 0
        in_flight: set[Future[None]] = set()
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY, thread_name_prefix=f"upload {self.backup_id}") as pool:
            try:
                while not self._stop.is_set():
                    final = self._final
                    available = (final if final is not None else os.fstat(self._fd).st_size) - offset
                    want = growing_part_size(number)
                    if final is None and available < want:
                        self._written.wait(GROWTH_POLL_SECONDS)
                        continue
                    if final is not None and available == 0 and number > 1:
                        break
                    data = os.pread(self._fd, min(want, available), offset)
                    self._digest.update(data)
                    while in_flight and len(in_flight) * want >= max(IN_FLIGHT_BYTES, want):
                        done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        for future in done:
                            future.result()  # the first failed part stops the upload
                    in_flight.add(pool.submit(self._send, number, data))
                    number += 1
                    offset += len(data)
                    if final is not None and offset >= final:
                        break
                for future in in_flight:
                    future.result()
            except BackupError as exc:
                self.error = exc
                self._stop.set()
            except OSError as exc:
                self.error = Internal(f"reading {self.backup_id} to upload it: {exc}")
                self._stop.set()
        with self._parts_lock:
            self._parts.sort(key=lambda part: int(part["PartNumber"]))

    def _send(self, number: int, data: bytes) -> None:
        if self._stop.is_set():
            raise Aborted(f"the upload of {self.backup_id} stopped")
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        with self._bucket._translated(f"uploading part {number} of {self.backup_id}"):
            answer = self._client.upload_part(
                Bucket=self._bucket.address.bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        if answer.get("ChecksumSHA256", checksum) != checksum:
            raise DataLoss(f"the bucket's checksum of part {number} of {self.backup_id} differs from the part's")
        with self._parts_lock:
            self._parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum})
            self.sent += len(data)


class _TranslatingReader:
    """A streaming body whose read errors come out as the domain's errors."""

    def __init__(self, body: Any, bucket: Bucket, backup_id: str):
        self._body = body
        self._bucket = bucket
        self._doing = f"reading {backup_id} from the bucket"

    def read(self, size: int = -1) -> bytes:
        with self._bucket._translated(self._doing):
            return cast(bytes, self._body.read(size if size >= 0 else None))

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _TranslatingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _with_change(listing: tuple[Backup, ...], backup_id: str, backup: Backup | None) -> tuple[Backup, ...]:
    """`listing` with `backup_id` no longer listed, or listed as `backup`, in the listing's order."""
    rest = [b for b in listing if b.id != backup_id]
    if backup is not None:
        rest.append(backup)
        rest.sort(key=sort_key, reverse=True)
    return tuple(rest)


def _parse_manifest(raw: bytes, key: str) -> Backup | None:
    try:
        return Backup.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        _logger.warning("ignoring unreadable manifest %s in the bucket: %s", key, exc)
        return None


_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken", "ExpiredToken"}
_NO_BUCKET = {"NoSuchBucket"}
_NO_KEY = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def translate(exc: Exception, doing: str, bucket: Bucket) -> BackupError:
    """A botocore error as the domain's error, with what to do about it."""
    where = bucket.describe()
    if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return FailedPrecondition(
            f"{doing}: no credentials for {where}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a shared "
            "credentials file, or an instance role)",
            reason="BUCKET_NO_CREDENTIALS",
        )
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        message = str(exc.response.get("Error", {}).get("Message", "")) or code
        if code in _NO_BUCKET or (code == "404" and doing == "opening the bucket"):
            return FailedPrecondition(
                f"{doing}: the bucket {bucket.address.bucket!r} does not exist at {where}; create it, or correct "
                "APERTURE_BACKUP_S3_URL (and APERTURE_BACKUP_S3_ENDPOINT)",
                reason="BUCKET_NOT_FOUND",
            )
        if code in _DENIED:
            return FailedPrecondition(
                f"{doing}: {where} refused the credentials ({message}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and AWS_REGION, and that the key may list, read, write and delete in the bucket",
                reason="BUCKET_ACCESS_DENIED",
            )
        if code in _NO_KEY:
            return NotFound(f"{doing}: not in {where}")
        return Unavailable(f"{doing}: {where} answered {code}: {message}", reason="BUCKET_ERROR")
    return Unavailable(
        f"{doing}: cannot reach {where} ({exc}); check APERTURE_BACKUP_S3_ENDPOINT and the network; the archive "
        "stays in the backup directory and is copied when the bucket answers again",
        reason="BUCKET_UNREACHABLE",
    )

"""The bucket's listing (`storage.bucket.Bucket.listing`): listing a bucket of a thousand archives takes a
storage service a second or more, so callers are answered from the listing kept while it is renewed in the
background, and this service's own changes show at once without listing the bucket again.

Real S3 protocol: moto_server through the recording proxy of `tests.support.s3`, which also holds chosen
requests to make a listing slow."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from aperture_backup.errors import BackupError
from aperture_backup.model import ArchiveKind, Backup, Compression, Format, State, Trigger
from aperture_backup.storage import bucket as bucket_module
from aperture_backup.storage.bucket import Bucket, BucketAddress
from tests.support.s3 import FaultyProxy, S3Server
from tests.support.service import wait_for

#: The request that lists the bucket (ListObjectsV2), as the proxy sees its path.
LIST = "list-type=2"
KIND = ArchiveKind(Format.PLAIN, Compression.GZIP)


class Samples:
    """Small archives of distinct ids, each with the file `Bucket.put` uploads."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.made = 0

    def make(self) -> tuple[Backup, Path]:
        self.made += 1
        when = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=self.made)
        data = f"archive {self.made}".encode()
        backup = Backup(
            id=f"aperture-backup-{when.strftime('%Y-%m-%dT%H-%M-%S')}-000000Z-{self.made:04x}.sql.gz",
            state=State.READY,
            create_time=when,
            kind=KIND,
            trigger=Trigger.MANUAL,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        path = self.directory / backup.id
        path.write_bytes(data)
        return backup, path


@pytest.fixture
def setting(s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[str, FaultyProxy, Samples]]:
    """A new bucket, a proxy in front of the S3 server that records (and can hold) requests, and archives."""
    proxy = FaultyProxy(s3_server.port)
    yield s3_server.make_bucket(), proxy, Samples(tmp_path)
    proxy.close()


def _ids(backups: tuple[Backup, ...]) -> list[str]:
    return [b.id for b in backups]


def test_a_listing_past_its_age_is_answered_at_once_and_renewed_in_the_background(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, proxy, archives = setting
    monkeypatch.setattr(bucket_module, "LISTING_TTL_SECONDS", 0.2)
    mine = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=proxy.endpoint)
    replica = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=s3_server.endpoint)
    first, first_path = archives.make()
    replica.put(first, first_path)
    assert _ids(mine.listing()) == [first.id]

    # Another replica adds a backup; the listing kept is past its age, and the bucket is slow to list.
    second, second_path = archives.make()
    replica.put(second, second_path)
    time.sleep(0.3)
    proxy.hold(LIST)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(mine.listing).result(timeout=10)
        assert _ids(answer) == [first.id], "answered from the listing kept, not after the slow listing"
        proxy.wait_held()
        assert _ids(mine.listing()) == [first.id]
        assert proxy.count(LIST) == 2, "one listing in the background, however many callers"
        proxy.release()
    wait_for(lambda: _ids(mine.listing()) == [second.id, first.id], timeout=10)


def test_this_service_s_own_uploads_and_deletions_show_without_listing_the_bucket_again(
    setting: tuple[str, FaultyProxy, Samples],
) -> None:
    name, proxy, archives = setting
    mine = Bucket(BucketAddress.parse(f"s3://{name}/prefix/"), endpoint_url=proxy.endpoint)
    assert mine.listing() == ()
    first, first_path = archives.make()
    second, second_path = archives.make()
    mine.put(second, second_path)
    mine.put(first, first_path)
    assert _ids(mine.listing()) == [second.id, first.id], "newest first"
    pinned = mine.get(first.id).replace(database="changed")
    mine.write_manifest(pinned)
    assert [b.database for b in mine.listing()] == ["", "changed"]
    mine.delete(second.id)
    assert _ids(mine.listing()) == [first.id]
    assert proxy.count(LIST) == 1, "only the first listing went to the bucket"
    assert _ids(mine.listing(fresh=True)) == [first.id], "and the bucket agrees"


def test_an_upload_that_lands_while_the_bucket_is_listed_stays_listed(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server
) -> None:
    name, proxy, archives = setting
    mine = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=proxy.endpoint)
    replica = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=s3_server.endpoint)
    theirs, theirs_path = archives.make()
    replica.put(theirs, theirs_path)
    # The listing has its object list (without the upload below) and waits for the manifest of `theirs`.
    proxy.hold(theirs.id + ".manifest.json", method="GET")
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(mine.listing, fresh=True)
        proxy.wait_held()
        uploaded, uploaded_path = archives.make()
        mine.put(uploaded, uploaded_path)
        proxy.release()
        assert _ids(listing.result(timeout=30)) == [uploaded.id, theirs.id]
    assert _ids(mine.listing()) == [uploaded.id, theirs.id]


def test_a_failed_listing_is_reported_while_the_kept_one_stands(
    setting: tuple[str, FaultyProxy, Samples], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, proxy, archives = setting
    monkeypatch.setattr(bucket_module, "LISTING_TTL_SECONDS", 0.2)
    monkeypatch.setattr(bucket_module, "UNREACHABLE_BACKOFF_SECONDS", 0.2)
    mine = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=proxy.endpoint, max_attempts=1)
    backup, path = archives.make()
    mine.put(backup, path)
    assert _ids(mine.listing()) == [backup.id]
    time.sleep(0.3)
    proxy.drop(LIST, times=1000)  # the bucket stops answering lists

    def refused() -> bool:
        try:
            mine.listing()
        except BackupError as exc:
            return exc.reason == "BUCKET_UNREACHABLE"
        return False

    wait_for(refused, timeout=10)
    assert mine.cached_listing() is not None and _ids(mine.cached_listing() or ()) == [backup.id]
    # The bucket answers again: a later renewal clears the error.
    proxy.drop(LIST, times=0)
    wait_for(lambda: not refused() and _ids(mine.listing()) == [backup.id], timeout=10)

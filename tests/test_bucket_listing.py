"""The bucket's listing (`storage.bucket.Bucket.listing`): listing a bucket of a thousand archives takes a
storage service a second or more, so callers are answered from the listing kept while it is renewed in the
background, and this service's own changes show at once without listing the bucket again.

Real S3 protocol: moto_server through the recording proxy of `tests.support.s3`, which also holds chosen
requests to make a listing slow."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import botocore.utils
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aperture_backup.errors import Aborted, BackupError
from aperture_backup.model import ArchiveKind, Backup, Compression, Format, Location, State, Trigger
from aperture_backup.offsite import Offsite
from aperture_backup.storage import bucket as bucket_module
from aperture_backup.storage.bucket import Bucket, BucketAddress
from aperture_backup.storage.catalog import Archives
from aperture_backup.storage.local import MANIFEST_SUFFIX, ArchiveStore
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


def _this_service_and_a_replica(name: str, proxy: FaultyProxy, s3_server: S3Server) -> tuple[Bucket, Bucket]:
    """The bucket `name` as this service sees it, through the proxy, and as another replica does."""
    return (
        Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=proxy.endpoint),
        Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=s3_server.endpoint),
    )


def test_a_listing_past_its_age_is_answered_at_once_and_renewed_in_the_background(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, proxy, archives = setting
    monkeypatch.setattr(bucket_module, "LISTING_TTL_SECONDS", 0.2)
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
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
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
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


def _manifest_reads(proxy: FaultyProxy) -> int:
    return sum(entry.startswith("GET ") and entry.endswith(MANIFEST_SUFFIX) for entry in list(proxy.seen))


def test_the_manifests_a_listing_has_not_seen_are_read_several_at_once(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server
) -> None:
    """The first listing after start-up reads every manifest, one GET each: a thousand, one after another,
    take a storage service seconds (tens against a distant region)."""
    name, proxy, archives = setting
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
    made = [archives.make() for _ in range(bucket_module.MANIFEST_READERS + 4)]
    for backup, path in made:
        replica.put(backup, path)
    proxy.hold(MANIFEST_SUFFIX, method="GET")
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(mine.listing)
        wait_for(lambda: _manifest_reads(proxy) == bucket_module.MANIFEST_READERS, timeout=10)
        time.sleep(0.2)
        assert _manifest_reads(proxy) == bucket_module.MANIFEST_READERS, "so many at once, and no more"
        proxy.release()
        assert _ids(listing.result(timeout=30)) == [b.id for b, _ in reversed(made)], "all, newest first"
    assert _manifest_reads(proxy) == len(made)


def test_closing_the_bucket_stops_a_listing_under_way(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server, tmp_path: Path
) -> None:
    """The service stops while its first listing reads a thousand manifests: the reads in flight end, no
    other begins, and the offsite thread that was listing is free at once."""
    name, proxy, archives = setting
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
    for _ in range(3 * bucket_module.MANIFEST_READERS):
        replica.put(*archives.make())
    offsite = Offsite(Archives(ArchiveStore(tmp_path / "backups", watch=False), mine))
    proxy.hold(MANIFEST_SUFFIX, method="GET")
    offsite.start()  # its first look for archives to copy lists the bucket
    wait_for(lambda: _manifest_reads(proxy) == bucket_module.MANIFEST_READERS, timeout=10)
    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(offsite.stop)
        time.sleep(0.2)
        proxy.release()
        stopped.result(timeout=5)
    assert _manifest_reads(proxy) == bucket_module.MANIFEST_READERS, "no manifest read after the stop"
    with pytest.raises(Aborted, match="the service is stopping"):
        mine.listing(fresh=True)


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


# Timestamps: botocore parses each one with dateutil's general parser, two thirds of the CPU a listing of
# 2,000 objects cost in the service; the bucket's client parses S3's ISO 8601 with the standard library.

_HEADER_DATE = "Sun, 06 Dec 2026 18:09:45 GMT"


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)))
@settings(max_examples=300)
def test_s3_s_timestamps_parse_to_the_instant_botocore_parses(when: datetime) -> None:
    for text in (
        when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",  # listings' LastModified
        when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        when.astimezone(timezone(timedelta(hours=-5))).isoformat(),
    ):
        assert bucket_module.parse_timestamp(text) == botocore.utils.parse_timestamp(text), text


@pytest.mark.parametrize("text", [_HEADER_DATE, "1765044585", "2026-12-06T18:09:45"])
def test_other_timestamps_are_parsed_by_botocore(text: str) -> None:
    """Headers' dates, epochs and a time without its zone are left to botocore, which reads them as before."""
    parsed = bucket_module.parse_timestamp(text)
    expected = botocore.utils.parse_timestamp(text)
    assert (parsed, parsed.tzinfo) == (expected, expected.tzinfo)


def test_the_bucket_s_listings_use_the_fast_parser(setting: tuple[str, FaultyProxy, Samples]) -> None:
    name, proxy, archives = setting
    mine = Bucket(BucketAddress.parse(f"s3://{name}/"), endpoint_url=proxy.endpoint)
    backup, path = archives.make()
    mine.put(backup, path)
    (entry,) = mine._client.list_objects_v2(Bucket=name, Prefix=backup.id, MaxKeys=1)["Contents"]
    assert entry["LastModified"].tzinfo is UTC, "the standard library's UTC, not dateutil's"
    assert abs(entry["LastModified"] - datetime.now(UTC)) < timedelta(minutes=5)
    assert _ids(mine.listing()) == [backup.id]


# Identity: List keeps each backup's encoding while the listing hands out the same Backup object, so a
# listing that changed in one backup must still hand out the others' objects (else the 1,000 encodings are
# made again at every renewal, by every caller that arrives meanwhile).


def test_a_listing_keeps_the_objects_of_the_backups_that_did_not_change(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server
) -> None:
    name, proxy, archives = setting
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
    theirs, theirs_path = archives.make()
    replica.put(theirs, theirs_path)
    own, own_path = archives.make()
    mine.put(own, own_path)
    before = mine.listing(fresh=True)
    newer, newer_path = archives.make()
    replica.put(newer, newer_path)
    after = mine.listing(fresh=True)
    assert _ids(after) == [newer.id, own.id, theirs.id]
    assert after[1] is before[0] and after[2] is before[1], "unchanged backups are the same objects"
    assert all(b.locations == {Location.BUCKET} for b in after)
    manifest_reads = [f"GET /{name}/{b.id}{MANIFEST_SUFFIX}" for b in (theirs, own, newer)]
    assert [proxy.count(read) for read in manifest_reads] == [1, 0, 1], (
        "each manifest read once; this service's own not at all: it knows what it wrote"
    )


def test_the_merged_listing_keeps_the_objects_of_backups_in_both_places(
    setting: tuple[str, FaultyProxy, Samples], s3_server: S3Server, tmp_path: Path
) -> None:
    name, proxy, archives = setting
    store = ArchiveStore(tmp_path / "backups", watch=False)
    mine, replica = _this_service_and_a_replica(name, proxy, s3_server)
    catalog = Archives(store, mine)
    both, both_path = archives.make()
    (store.directory / both.id).write_bytes(both_path.read_bytes())
    store.write_manifest(both)
    settled = time.time() - 60  # the directory's cache trusts a file's signature once it is this old
    os.utime(store.manifest_path(both.id), (settled, settled))
    mine.put(both, both_path)
    before = catalog.listing(fresh=True)
    assert [(b.id, b.locations) for b in before] == [(both.id, frozenset({Location.LOCAL, Location.BUCKET}))]
    theirs, theirs_path = archives.make()
    replica.put(theirs, theirs_path)
    after = catalog.listing(fresh=True)
    assert _ids(after) == [theirs.id, both.id]
    assert after[1] is before[0], "the backup in both places is the same object while neither copy changed"

"""Offsite copies in an S3-compatible bucket, against a real S3 server on loopback (moto_server), through
the S3 protocol and boto3, as in production: copies with their manifests, integrity, encryption, listing
across locations, downloads and restores from the bucket, disaster recovery onto an empty machine,
retention in the bucket, and what happens when the bucket is unreachable, refuses the credentials, or
does not exist."""

from __future__ import annotations

import hashlib
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.storage.bucket import MAX_PARTS, MIB, MIN_PART_SIZE, BucketAddress, part_size_for
from tests.support.age import AgeKey, age_keygen
from tests.support.filesystem import small_filesystem
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.metrics import scrape
from tests.support.postgres import PgServer
from tests.support.receiver import Receiver
from tests.support.s3 import Credentials, FaultyProxy, S3Server, running_s3
from tests.support.service import StartService, free_port, service_process, wait_for
from tests.test_cli import cli

LOCAL, BUCKET = pb.STORAGE_LOCATION_LOCAL, pb.STORAGE_LOCATION_BUCKET


def _bucketed(server: S3Server, bucket: str, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"s3_url": f"s3://{bucket}/aperture/", "s3_endpoint": server.endpoint}
    settings.update(overrides)
    return settings


@pytest.fixture
def db16(pg16: PgServer, make_database: MakeDatabase) -> Database:
    """Aperture's PostgreSQL 16, seeded like Aperture's (where archives live does not depend on the major)."""
    return make_database(pg16, seeded=True)


@pytest.fixture
def key(tmp_path: Path) -> AgeKey:
    return age_keygen(tmp_path / "key.txt")


def test_part_size_keeps_every_archive_under_the_part_limit() -> None:
    for size in (0, 1, MIN_PART_SIZE, 50 * 1024**3, 200 * 1024**3, 5 * 1024**4):
        part = part_size_for(size)
        assert part >= MIN_PART_SIZE and part % MIB == 0
        assert -(-size // part) <= MAX_PARTS < 10_000
    # Fixed parts (8 MiB, as other tools use) would need more than 10,000 parts from about 80 GB on.
    assert part_size_for(200 * 1024**3) > MIN_PART_SIZE


@pytest.mark.parametrize("url", ["s3://", "http://bucket/x", "s3://bucket/a//b", "s3://bucket/../x", "s3://b?x=1"])
def test_bad_bucket_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        BucketAddress.parse(url)


def test_every_backup_goes_to_the_bucket_with_its_manifest_and_checksum(
    db16: Database,
    service_factory: StartService,
    s3_server: S3Server,
    s3_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="aperture_backup")
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket))
    backup = svc.client.create()

    assert set(backup.locations) == {LOCAL, BUCKET}, "Create returns once the offsite copy is made"
    assert set(svc.client.get(backup.id).locations) == {LOCAL, BUCKET}
    key = f"aperture/{backup.id}"
    objects = s3_server.objects(bucket)
    assert objects == {key: backup.size_bytes, key + ".manifest.json": objects[key + ".manifest.json"]}
    stored = s3_server.read(bucket, key)
    assert hashlib.sha256(stored).hexdigest() == backup.sha256 == s3_server.manifest(bucket, key)["sha256"]
    assert stored == (svc.backup_dir / backup.id).read_bytes()
    assert "sent while it was written" in "".join(r.getMessage() for r in caplog.records), "one pass, not two"
    status = svc.client.status()
    assert status.HasField("offsite") and status.offsite.reachable and not status.offsite.pending_ids
    assert status.offsite.bucket.startswith(f"s3://{bucket}/aperture/")


def test_with_age_recipients_only_encrypted_bytes_reach_the_bucket(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str], key: AgeKey
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(
        db16.uri,
        **_bucketed(s3_server, bucket, age_recipients=(key.public_key,), age_identity_file=key.identity_file),
    )
    backup = svc.client.create()
    assert backup.encrypted and BUCKET in backup.locations
    stored = s3_server.read(bucket, f"aperture/{backup.id}")
    assert stored.startswith(b"age-encryption.org/v1\n")
    assert all(k.endswith((".age", ".age.manifest.json")) for k in s3_server.objects(bucket))


def test_disaster_recovery_onto_an_empty_machine(
    db16: Database,
    make_database: MakeDatabase,
    service_factory: StartService,
    s3_server: S3Server,
    s3_env: dict[str, str],
    key: AgeKey,
    tmp_path: Path,
) -> None:
    """The README's recipe: the old machine is gone; a new one with an empty backup directory and an empty
    PostgreSQL of the same major gets the bucket and the age identity, lists the old backups and restores
    the newest to the exact fingerprint."""
    bucket = s3_server.make_bucket()
    encrypted: dict[str, Any] = {"age_recipients": (key.public_key,), "age_identity_file": key.identity_file}
    old = service_factory(db16.uri, backup_dir=tmp_path / "old-disk", **_bucketed(s3_server, bucket, **encrypted))
    expected = fingerprint(db16.uri)
    older = old.client.create()
    newest = old.client.create()
    old.stop()

    fresh_db = make_database(db16.server)  # empty, same major
    new_dir = tmp_path / "new-disk"
    new = service_factory(fresh_db.uri, backup_dir=new_dir, **_bucketed(s3_server, bucket, **encrypted))
    listed = list(new.client.list())
    assert [b.id for b in listed] == [newest.id, older.id]
    assert all(list(b.locations) == [BUCKET] for b in listed), "only the bucket has them"
    assert listed[0].sha256 == newest.sha256 and listed[0].encrypted

    # Downloading streams from the bucket, checked against the manifest's SHA-256 by the client.
    got = new.client.download(newest.id, tmp_path / "downloaded")
    assert got.sha256 == newest.sha256

    result = new.client.restore(newest.id, skip_safety_backup=True)
    assert result.restored.id == newest.id
    assert_same(expected, fingerprint(fresh_db.uri))
    assert not [p for p in new_dir.iterdir() if p.name.startswith(".tmp-")], "the fetched copy is removed"


def test_unreachable_bucket_keeps_the_backup_and_copies_it_when_the_bucket_answers(
    db16: Database, service_factory: StartService, s3_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    settings: dict[str, Any] = {"s3_url": "s3://later/", "s3_endpoint": f"http://127.0.0.1:{port}"}
    svc = service_factory(db16.uri, **settings)
    offsite = svc.server.app.offsite
    assert offsite is not None
    offsite.retry_initial = 0.5
    backup = svc.client.create()
    assert backup.state == pb.BACKUP_STATE_READY and list(backup.locations) == [LOCAL]
    status = svc.client.status()
    assert list(status.offsite.pending_ids) == [backup.id]
    assert not status.offsite.reachable and "cannot reach" in status.offsite.error

    with running_s3(tmp_path / "moto.log", port=port) as server:
        server.client(Credentials(s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"])).create_bucket(
            Bucket="later"
        )
        offsite.wake()
        wait_for(lambda: not svc.client.status().offsite.pending_ids, timeout=60)
        assert set(svc.client.get(backup.id).locations) == {LOCAL, BUCKET}
        assert server.objects("later")[backup.id] == backup.size_bytes
        status = svc.client.status()
        assert status.offsite.reachable and not status.offsite.error


@pytest.mark.parametrize("fault", ["wrong credentials", "missing bucket"])
def test_wrong_credentials_or_missing_bucket_are_reported(
    db16: Database,
    service_factory: StartService,
    s3_server: S3Server,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    bucket = s3_server.make_bucket()
    if fault == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "refused the credentials"
    else:
        bucket = "no-such-bucket"
        expected = "does not exist"
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket))
    wait_for(lambda: any(expected in r.getMessage() for r in caplog.records), timeout=30)  # start-up says so
    backup = svc.client.create()
    assert backup.state == pb.BACKUP_STATE_READY and list(backup.locations) == [LOCAL], "the backup is kept"
    status = svc.client.status()
    assert expected in status.offsite.error and list(status.offsite.pending_ids) == [backup.id]
    assert [b.id for b in svc.client.list()] == [backup.id]


def test_delete_removes_both_copies(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket))
    backup = svc.client.create()
    response = svc.client.stub.Delete(pb.DeleteRequest(id=backup.id))
    assert set(response.removed_from) == {LOCAL, BUCKET}
    assert s3_server.objects(bucket) == {}
    assert not (svc.backup_dir / backup.id).exists()
    with pytest.raises(grpc.RpcError) as caught:
        svc.client.get(backup.id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_retention_applies_to_the_directory_and_the_bucket_each_with_its_own_count(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket, keep=0, s3_keep=2))
    made = [svc.client.create() for _ in range(3)]
    # keep=0: the directory keeps nothing once an archive is offsite; the bucket keeps the newest two.
    archives = [p.name for p in svc.backup_dir.iterdir() if not p.name.startswith(".")]
    assert archives == []
    in_bucket = {k.removeprefix("aperture/") for k in s3_server.objects(bucket) if not k.endswith(".json")}
    assert in_bucket == {made[2].id, made[1].id}
    listed = list(svc.client.list())
    assert [b.id for b in listed] == [made[2].id, made[1].id]
    assert all(list(b.locations) == [BUCKET] for b in listed)


def test_the_directory_keeps_an_archive_until_it_is_offsite(
    db16: Database, service_factory: StartService, s3_env: dict[str, str]
) -> None:
    svc = service_factory(db16.uri, s3_url="s3://unreachable/", s3_endpoint=f"http://127.0.0.1:{free_port()}", keep=0)
    first, second = svc.client.create(), svc.client.create()
    assert {first.id, second.id} <= {p.name for p in svc.backup_dir.iterdir()}, "nothing is lost"
    assert [b.id for b in svc.client.list()] == [second.id, first.id]


def test_config_refuses_half_a_bucket_configuration(tmp_path: Path) -> None:
    from aperture_backup.config import Config, ConfigError

    with pytest.raises(ConfigError, match="S3_URL"):
        Config(backup_dir=tmp_path, s3_endpoint="http://127.0.0.1:9").validate()
    with pytest.raises(ConfigError, match="S3_ENDPOINT"):
        Config(backup_dir=tmp_path, s3_url="s3://b/", s3_endpoint="ftp://x").validate()
    with pytest.raises(ConfigError, match="or with APERTURE_BACKUP_S3_URL"):
        Config(backup_dir=tmp_path, keep=0).validate()
    Config(backup_dir=tmp_path, s3_url="s3://b/p", keep=0).validate()


# -- faults in the middle of a multipart upload -----------------------------------------------------------


@pytest.fixture
def big_db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    """A database whose plain dump (about 27 MB) takes several parts of a multipart upload."""
    db = make_database(pg16, seeded=True, rows=50)
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE public.big AS SELECT g AS id, repeat(md5(g::text), 8) AS t FROM generate_series(1, 100000) g"
        )
    return db


def _complete_in(server: S3Server, bucket: str, backup: pb.Backup, key: str) -> None:
    """The bucket holds the whole archive, byte for byte, and no incomplete upload."""
    assert server.objects(bucket)[key] == backup.size_bytes
    assert hashlib.sha256(server.read(bucket, key)).hexdigest() == backup.sha256
    assert server.manifest(bucket, key)["state"] == "ready"
    assert not server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_a_part_that_fails_is_sent_again(
    big_db: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    bucket = s3_server.make_bucket()
    proxy = FaultyProxy(s3_server.port)
    try:
        proxy.drop("partNumber=2", times=2)
        svc = service_factory(big_db.uri, s3_url=f"s3://{bucket}/", s3_endpoint=proxy.endpoint)
        backup = svc.client.create(compression=pb.COMPRESSION_NONE)
        assert backup.size_bytes > 3 * MIN_PART_SIZE
        assert set(backup.locations) == {LOCAL, BUCKET}
        assert proxy.count("partNumber=2") == 3, "dropped twice, then sent again and stored"
        _complete_in(s3_server, bucket, backup, backup.id)
    finally:
        proxy.close()


def test_s3_server_killed_during_a_multipart_upload_and_started_again(
    big_db: Database, service_factory: StartService, s3_env: dict[str, str], tmp_path: Path
) -> None:
    with running_s3(tmp_path / "moto.log") as server:
        server.client().create_bucket(Bucket="restarted")
        proxy = FaultyProxy(server.port)
        try:
            svc = service_factory(big_db.uri, s3_url="s3://restarted/", s3_endpoint=proxy.endpoint)
            offsite = svc.server.app.offsite
            assert offsite is not None
            offsite.retry_initial = 0.5
            proxy.hold("partNumber=2")
            with ThreadPoolExecutor(1) as pool:
                creating = pool.submit(svc.client.create, compression=pb.COMPRESSION_NONE)
                proxy.wait_held()
                server.kill()  # in the middle of the upload: part 1 stored, part 2 on its way
                proxy.release()
                backup = creating.result(timeout=300)
            assert backup.state == pb.BACKUP_STATE_READY and list(backup.locations) == [LOCAL]
            assert [b.id for b in svc.client.list()] == [backup.id]
            assert list(svc.client.get(backup.id).locations) == [LOCAL], "no half object is listed"
            assert list(svc.client.status().offsite.pending_ids) == [backup.id]

            server.start()  # an S3 server keeps its buckets; moto's memory is new, so make it again
            server.client().create_bucket(Bucket="restarted")
            offsite.wake()
            wait_for(lambda: not svc.client.status().offsite.pending_ids, timeout=120)
            _complete_in(server, "restarted", backup, backup.id)
            assert set(svc.client.get(backup.id).locations) == {LOCAL, BUCKET}
        finally:
            proxy.close()


def test_service_killed_during_an_upload_starts_it_again_cleanly_after_the_restart(
    big_db: Database, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    proxy = FaultyProxy(s3_server.port)
    backup_dir = tmp_path / "backups"
    settings = {"DATABASE_URL": big_db.uri, "S3_URL": f"s3://{bucket}/", "S3_ENDPOINT": proxy.endpoint, **s3_env}
    try:
        # The request that completes the multipart upload: the archive is whole and READY in the directory,
        # every part is in the bucket, and the object does not exist yet.
        proxy.hold("?uploadId=", method="POST")
        with (
            service_process(backup_dir, tmp_path / "first.log", **settings) as first,
            ThreadPoolExecutor(1) as pool,
        ):
            creating = pool.submit(first.client.create, compression=pb.COMPRESSION_NONE)
            proxy.wait_held()
            first.kill()
            with pytest.raises(grpc.RpcError):
                creating.result(timeout=60)
        proxy.release(drop=True)  # the completion the killed service asked for never arrives
        uploads = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        assert len(uploads) == 1, "the killed service left an incomplete upload behind"
        assert not s3_server.objects(bucket), "which is no object: nothing is listed"

        with service_process(backup_dir, tmp_path / "second.log", **settings) as second:
            ready = [b for b in second.client.list() if b.state == pb.BACKUP_STATE_READY]
            assert len(ready) == 1, "the archive was complete before its upload began"
            backup = ready[0]
            wait_for(lambda: BUCKET in second.client.get(backup.id).locations, timeout=120)
            _complete_in(s3_server, bucket, backup, backup.id)
            # Aborted by the start-up sweep of old uploads (moto dates every upload 2010) or, on a service that
            # dates them truly, before this archive's new upload.
            assert re.search(r"abort(ed 1 incomplete upload|ing an earlier, interrupted upload)", second.log())
    finally:
        proxy.close()


def test_the_cli_shows_where_each_backup_is_and_the_offsite_state(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket))
    backup = svc.client.create()
    listing = cli(svc, "list")
    assert listing.returncode == 0, listing.stderr
    assert "WHERE" in listing.stdout and "local+bucket" in listing.stdout.split(backup.id)[1].splitlines()[0]
    status = cli(svc, "status")
    assert f"offsite: s3://{bucket}/aperture/" in status.stdout and "every archive copied" in status.stdout
    deleted = cli(svc, "delete", backup.id, "--yes")
    assert deleted.returncode == 0 and "(local+bucket)" in deleted.stdout, deleted.stdout + deleted.stderr


def test_uploads_and_safety_backups_go_to_the_bucket_too(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, **_bucketed(s3_server, bucket))
    made = svc.client.create()
    copy = tmp_path / "copy.sql.gz"
    copy.write_bytes((svc.backup_dir / made.id).read_bytes())
    uploaded = svc.client.upload(copy).backup
    wait_for(lambda: BUCKET in svc.client.get(uploaded.id).locations, timeout=30)
    safety = svc.client.restore(made.id).safety_backup
    wait_for(lambda: BUCKET in svc.client.get(safety.id).locations, timeout=30)
    assert {f"aperture/{b}" for b in (made.id, uploaded.id, safety.id)} <= set(s3_server.objects(bucket))


def test_metrics_count_archives_by_location_and_those_waiting_for_the_bucket(
    db16: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str]
) -> None:
    bucket = s3_server.make_bucket()
    svc = service_factory(db16.uri, metrics_listen=f"127.0.0.1:{free_port()}", **_bucketed(s3_server, bucket))
    svc.client.create()
    samples = scrape(svc)
    assert samples[("aperture_backup_archives", (("location", "local"),))] == 1
    assert samples[("aperture_backup_archives", (("location", "bucket"),))] == 1
    assert samples[("aperture_backup_offsite_pending", ())] == 0

    down = service_factory(
        db16.uri,
        metrics_listen=f"127.0.0.1:{free_port()}",
        s3_url="s3://nowhere/",
        s3_endpoint=f"http://127.0.0.1:{free_port()}",
    )
    down.client.create()
    samples = scrape(down)
    assert samples[("aperture_backup_offsite_pending", ())] == 1
    assert samples[("aperture_backup_archives", (("location", "bucket"),))] == 0


def test_a_bucket_without_encryption_is_warned_about_at_start_up(
    db16: Database,
    service_factory: StartService,
    s3_server: S3Server,
    s3_env: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    key: AgeKey,
) -> None:
    bucket = s3_server.make_bucket()
    service_factory(db16.uri, **_bucketed(s3_server, bucket))
    assert any("unencrypted" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    caplog.clear()
    service_factory(db16.uri, **_bucketed(s3_server, bucket, age_recipients=(key.public_key,)))
    assert not any("unencrypted" in r.getMessage() for r in caplog.records)


def test_a_backup_that_fails_leaves_no_upload_behind(
    big_db: Database, service_factory: StartService, s3_server: S3Server, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """The dump runs out of disk after its first parts went up (a real, small file system): the backup is
    FAILED, and the bucket holds neither an object nor an incomplete upload of it."""
    bucket = s3_server.make_bucket()
    proxy = FaultyProxy(s3_server.port)
    with small_filesystem(tmp_path / "small", size_kib=20 * 1024) as small:
        try:
            svc = service_factory(big_db.uri, backup_dir=small, s3_url=f"s3://{bucket}/", s3_endpoint=proxy.endpoint)
            # Whether the first part leaves before the disk is full is a race between the upload and the
            # dump (0.1 s of writing here). Every try must leave nothing behind; at least one must be a try
            # in which a part went up, the case this test is for.
            for _ in range(5):
                parts_before = proxy.count("partNumber=1")
                with pytest.raises(grpc.RpcError) as caught:
                    svc.client.create(compression=pb.COMPRESSION_NONE)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # (On a full disk even the FAILED record may find no room: then the backup is not listed.)
                assert all(b.state == pb.BACKUP_STATE_FAILED and not b.locations for b in svc.client.list())
                assert not s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
                assert s3_server.objects(bucket) == {}, "nothing of the failed backup is in the bucket"
                if proxy.count("partNumber=1") > parts_before:
                    break
            else:
                pytest.fail("in five tries no part went up before the disk was full")
        finally:
            proxy.close()


def test_a_failing_offsite_copy_reaches_a_person_and_so_does_its_recovery(
    db16: Database, service_factory: StartService, s3_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    with Receiver() as receiver:
        svc = service_factory(
            db16.uri,
            s3_url="s3://later/",
            s3_endpoint=f"http://127.0.0.1:{port}",
            notify_urls=(receiver.url,),
            notify_on="all",
        )
        offsite = svc.server.app.offsite
        assert offsite is not None
        offsite.retry_initial = 0.5
        backup = svc.client.create()

        def about_offsite() -> list[dict[str, Any]]:
            return [m for m in receiver.received() if "offsite" in (m["title"] + m["message"]).lower()]

        wait_for(about_offsite, timeout=60)
        failing = about_offsite()
        assert len(failing) == 1 and backup.id in failing[0]["message"], failing
        with running_s3(tmp_path / "moto.log", port=port) as server:
            creds = Credentials(s3_env["AWS_ACCESS_KEY_ID"], s3_env["AWS_SECRET_ACCESS_KEY"])
            server.client(creds).create_bucket(Bucket="later")
            offsite.wake()
            wait_for(lambda: len(about_offsite()) == 2, timeout=60)
            recovered = about_offsite()[1]
            assert recovered["type"] != "failure", recovered

"""List reads the backup directory through a cache of what each file said (issue 16: List and GetStatus with
1,000 archives). Whatever changes on disk, by the store or by hand, the next listing shows it: these tests
change files between two listings of the same store and fail if a listing served what the cache had."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.convert import BackupMessages, backup_to_pb
from aperture_backup.model import ArchiveKind, Backup, Compression, Format, Pin, State, Trigger
from aperture_backup.storage import PerListing
from aperture_backup.storage.local import MANIFEST_SUFFIX, ArchiveStore
from aperture_backup.storage.watch import DirectoryWatch

SQL = b"--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n"
KIND = ArchiveKind(Format.PLAIN, Compression.GZIP)
AN_HOUR_AGO = time.time() - 3600


def _make(store: ArchiveStore, when: datetime, data: bytes = SQL) -> Backup:
    """A READY archive written by the store's own code, as a backup job writes one."""
    writer = store.begin(KIND, Trigger.MANUAL, now=when)
    writer.file.write(gzip.compress(data))
    return writer.commit(size_bytes=len(data))


def _age(*paths: Path) -> None:
    """Make files look written an hour ago, so that the cache trusts their stat (it does not trust a file
    changed in the last moments)."""
    for path in paths:
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))


def _listed(store: ArchiveStore) -> dict[str, Backup]:
    return {b.id: b for b in store.list_backups()}


@pytest.fixture(params=[True, False], ids=["inotify", "scan-always"])
def watch(request: pytest.FixtureRequest) -> bool:
    """Each test runs with the listing reused while inotify reports no change, and without."""
    return bool(request.param)


def _stores(directory: Path, watch: bool) -> tuple[ArchiveStore, list[Backup]]:
    store = ArchiveStore(directory, watch=watch)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = [_make(store, start + timedelta(hours=i)) for i in range(3)]
    _age(*directory.iterdir())
    assert set(_listed(store)) == {b.id for b in made}  # the listing that fills the cache
    return store, made


def test_a_manifest_edited_on_disk_is_seen(tmp_path: Path, watch: bool) -> None:
    store, made = _stores(tmp_path, watch)
    manifest = store.manifest_path(made[1].id)
    data = json.loads(manifest.read_text())
    data["database"] = "edited-by-hand"
    with open(manifest, "r+") as f:  # in place: the same inode, as an editor that does not rename writes it
        f.write(json.dumps(data, indent=2))
        f.truncate()
    assert _listed(store)[made[1].id].database == "edited-by-hand"


def test_a_manifest_rewritten_twice_within_the_same_moment_shows_the_second_write(tmp_path: Path, watch: bool) -> None:
    """Two writes in place within one tick of the file system's clock, of the same size: mtime and size
    alone do not tell them apart, so a file this fresh is read again."""
    store, made = _stores(tmp_path, watch)
    manifest = store.manifest_path(made[0].id)
    data = json.loads(manifest.read_text())
    for name in ("first-edit-aaaa", "second-edit-bb"):
        data["database"] = name
        text = json.dumps(data, indent=2)
        with open(manifest, "r+") as f:
            f.write(text.ljust(len(text) + 16 - len(name)))  # the same size both times
            f.truncate()
        assert _listed(store)[made[0].id].database == name


def test_a_manifest_changed_by_the_store_is_seen(tmp_path: Path, watch: bool) -> None:
    store, made = _stores(tmp_path, watch)
    store.update(made[2].id, lambda b: b.replace(error="noted"))
    assert _listed(store)[made[2].id].error == "noted"


def test_an_archive_removed_by_hand_is_failed_and_a_removed_manifest_disappears(tmp_path: Path, watch: bool) -> None:
    store, made = _stores(tmp_path, watch)
    (tmp_path / made[0].id).unlink()
    listed = _listed(store)
    assert listed[made[0].id].state is State.FAILED
    assert "missing" in listed[made[0].id].error
    (tmp_path / made[1].id).unlink()
    store.manifest_path(made[1].id).unlink()
    assert made[1].id not in _listed(store)
    store.delete(made[2].id)
    assert set(_listed(store)) == {made[0].id}


def test_files_copied_in_are_listed_and_a_replaced_one_is_read_again(tmp_path: Path, watch: bool) -> None:
    store, made = _stores(tmp_path, watch)
    copied = tmp_path / "aperture_backup_20260101_000000.sql.gz"
    shutil.copyfile(tmp_path / made[0].id, copied)
    _age(copied)
    listed = _listed(store)
    assert listed[copied.name].trigger is Trigger.EXTERNAL
    assert listed[copied.name].kind == KIND
    # Replaced by something that is not an archive (a new file under the same name): no longer listed.
    replacement = tmp_path / "replacement"
    replacement.write_bytes(b"not an archive")
    _age(replacement)
    os.replace(replacement, copied)
    assert copied.name not in _listed(store)
    # A manifest copied in with its archive (from another machine's directory) is listed as it says.
    other = ArchiveStore(tmp_path / "other")
    theirs = _make(other, datetime(2027, 1, 1, tzinfo=UTC))
    for name in (theirs.id, theirs.id + MANIFEST_SUFFIX):
        shutil.copy2(other.directory / name, tmp_path / name)
    listed = _listed(store)
    assert next(iter(listed)) == theirs.id, "newest first"
    assert listed[theirs.id].trigger is Trigger.MANUAL


def test_a_file_without_a_manifest_that_gets_one_is_listed_as_the_manifest_says(tmp_path: Path, watch: bool) -> None:
    store, _ = _stores(tmp_path, watch)
    copied = tmp_path / "aperture_backup_20250101_000000.sql.gz"
    copied.write_bytes(gzip.compress(SQL))
    _age(copied)
    assert _listed(store)[copied.name].trigger is Trigger.EXTERNAL
    store.update(copied.name, lambda b: b.replace(sha256="ab" * 32))
    assert _listed(store)[copied.name].sha256 == "ab" * 32


def test_a_listing_repeated_without_changes_is_the_same_and_a_later_change_is_seen(tmp_path: Path, watch: bool) -> None:
    store, _ = _stores(tmp_path, watch)
    first = store.list_backups()
    assert store.list_backups() == first
    later = tmp_path / "aperture_backup_20990101_000000.sql"
    later.write_bytes(SQL)
    assert store.list_backups()[0].id == later.name


def test_a_directory_replaced_under_the_store_is_listed_as_it_is_now(tmp_path: Path, watch: bool) -> None:
    """The watch follows the directory it was opened on; once that is renamed away, listings scan the path."""
    directory = tmp_path / "backups"
    store, made = _stores(directory, watch)
    directory.rename(tmp_path / "old")
    directory.mkdir()
    shutil.copyfile(tmp_path / "old" / made[0].id, directory / "aperture_backup_20260101_000000.sql.gz")
    assert set(_listed(store)) == {"aperture_backup_20260101_000000.sql.gz"}
    (directory / "aperture_backup_20260101_000000.sql.gz").unlink()
    assert _listed(store) == {}


def test_callers_at_the_same_time_each_see_what_was_written_before_they_asked(tmp_path: Path, watch: bool) -> None:
    """Listings shared between threads: each thread writes an archive, then lists; its own must be there."""
    store, _ = _stores(tmp_path, watch)
    missing: list[str] = []

    def write_then_list(i: int) -> None:
        for j in range(5):
            name = f"aperture_backup_2030{i:02d}{j:02d}_000000.sql"
            (tmp_path / name).write_bytes(SQL)
            if name not in _listed(store):
                missing.append(name)

    threads = [threading.Thread(target=write_then_list, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert missing == []


def test_an_unchanged_directory_hands_out_one_listing_and_what_is_derived_from_it_follows_a_change(
    tmp_path: Path, watch: bool
) -> None:
    """`listing()` is the same tuple while the watch reports nothing (so GetStatus's summary is computed once
    per listing, `PerListing`); a change gives a new tuple, and the derived value follows it."""
    store, made = _stores(tmp_path, watch)
    passes: list[int] = []

    def newest(backups: tuple[Backup, ...]) -> str:
        passes.append(len(backups))
        return backups[0].id

    derived = PerListing(newest)
    first = store.listing()
    assert derived(first) == made[-1].id
    if watch:
        assert store.listing() is first
        assert derived(store.listing()) == made[-1].id
        assert len(passes) == 1
    later = _make(store, datetime(2027, 1, 1, tzinfo=UTC))
    assert store.listing() is not first
    assert derived(store.listing()) == later.id


def test_pages_by_token_follow_the_listing_also_after_the_token_s_backup_is_gone(tmp_path: Path, watch: bool) -> None:
    store = ArchiveStore(tmp_path, watch=watch)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = [_make(store, start + timedelta(hours=i)) for i in range(7)]
    newest_first = [b.id for b in reversed(made)]
    seen: list[str] = []
    tokens: list[str] = []
    token = ""
    while True:
        page, token = store.page(2, token)
        seen += [b.id for b in page]
        if not token:
            break
        tokens.append(token)
    assert seen == newest_first
    # The backup a token points after is deleted: the next page still starts below it (keyset paging).
    store.delete(newest_first[1])
    page, _ = store.page(2, tokens[0])
    assert [b.id for b in page] == newest_first[2:4]
    assert store.page(2, tokens[-1]) == ([store.get(newest_first[-1])], "")


def test_list_responses_joined_from_kept_encodings_are_protobuf_s_own_and_follow_a_pin_s_expiry() -> None:
    """List answers with each backup's encoding kept (`BackupMessages.list_response`): byte for byte what
    protobuf writes for the same ListResponse, pinned backups included, and a pin that expires meanwhile is
    shown unpinned once it has."""
    now = datetime.now(UTC)
    plain = Backup(
        id="aperture-backup-a.sql.gz",
        state=State.READY,
        create_time=now,
        kind=KIND,
        trigger=Trigger.MANUAL,
        size_bytes=12,
    )
    forever = plain.replace(id="aperture-backup-b.sql.gz", pin=Pin())
    expiry = now + timedelta(seconds=1)
    soon = plain.replace(id="aperture-backup-c.sql.gz", pin=Pin(expire_time=expiry))
    expired = plain.replace(id="aperture-backup-d.sql.gz", pin=Pin(expire_time=now - timedelta(days=1)))
    backups = [plain, forever, soon, expired]
    messages = BackupMessages()

    def expected(token: str) -> bytes:
        return pb.ListResponse(backups=[backup_to_pb(b) for b in backups], next_page_token=token).SerializeToString()

    for token in ("", "next-page"):
        assert messages.list_response(backups, token) == expected(token)
    parsed = pb.ListResponse.FromString(messages.list_response(backups, ""))
    assert [m.pinned for m in parsed.backups] == [False, True, True, False]
    time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 0.05)
    parsed = pb.ListResponse.FromString(messages.list_response(backups, ""))
    assert [m.pinned for m in parsed.backups] == [False, True, False, False]
    assert messages.list_response(backups, "") == expected("")
    assert messages(soon) == backup_to_pb(soon)


def test_the_watch_names_what_changed_and_says_when_it_cannot_tell(tmp_path: Path) -> None:
    """The names the watch reports are what the next scan looks at again: each listed name changed, hidden
    ones never, and None (look at everything) once the directory is gone from under it."""
    directory = tmp_path / "backups"
    directory.mkdir()
    watch = DirectoryWatch.open(directory)
    if watch is None:
        pytest.skip("no inotify here")
    assert watch.changes() == set()
    (directory / ".tmp-partial").write_bytes(SQL)
    assert watch.changes() == set()
    (directory / "a.sql").write_bytes(SQL)
    (directory / "b.sql").write_bytes(SQL)
    os.replace(directory / "b.sql", directory / "c.sql")
    assert watch.changes() == {"a.sql", "b.sql", "c.sql"}
    assert not watch.changed()
    directory.rename(tmp_path / "moved")
    assert watch.changes() is None
    assert watch.changes() is None


def test_a_listing_after_a_change_reads_only_what_changed_and_still_sees_everything(tmp_path: Path) -> None:
    """With the watch, a scan after a change stats the changed names only; a store that lists after files
    were added, replaced, renamed and removed by hand shows exactly what a fresh store shows."""
    store, made = _stores(tmp_path, True)
    shutil.copyfile(tmp_path / made[0].id, tmp_path / "aperture_backup_20260101_000000.sql.gz")
    (tmp_path / (made[1].id + MANIFEST_SUFFIX)).unlink()
    os.replace(tmp_path / made[2].id, tmp_path / "aperture_backup_20260102_000000.sql.gz")
    _make(store, datetime(2027, 1, 1, tzinfo=UTC))
    fresh = ArchiveStore(tmp_path, watch=False)
    assert store.listing() == fresh.listing()


def test_a_listing_after_one_change_places_only_that_backup_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: with 1,000 backups, a pass over all of them after each change of a running backup's files
    cost milliseconds of the interpreter that every List and GetStatus waited for. A scan after one change
    looks at that change's backup only, and the listing is still exactly a fresh store's."""
    store = ArchiveStore(tmp_path)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = [_make(store, start + timedelta(hours=i)) for i in range(200)]
    _age(*tmp_path.iterdir())
    assert len(store.listing()) == 200
    looked_at: list[str] = []
    as_found = ArchiveStore._as_found

    def counting(self: ArchiveStore, backup: Backup, *, has_file: bool | None = None) -> Backup | None:
        looked_at.append(backup.id)
        return as_found(self, backup, has_file=has_file)

    monkeypatch.setattr(ArchiveStore, "_as_found", counting)
    store.update(made[50].id, lambda b: b.replace(sha256="cd" * 32))
    newest = _make(store, start + timedelta(days=30))
    listing = store.listing()
    assert sorted(set(looked_at)) == sorted({made[50].id, newest.id}), f"looked at {len(looked_at)} backups"
    assert listing[0].id == newest.id and listing[150].sha256 == "cd" * 32
    assert listing == ArchiveStore(tmp_path, watch=False).listing()


_STEPS = ("make", "edit", "remove-archive", "remove-manifest", "copy-in", "not-an-archive", "misnamed-manifest")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_STEPS), st.integers(0, 5)), min_size=1, max_size=12))
def test_a_listing_kept_up_to_date_change_by_change_is_what_a_fresh_store_lists(steps: list[tuple[str, int]]) -> None:
    """Whatever happens to the directory (by the store or by hand, a manifest that names another backup
    included), the store that places the changed backups again into its kept listing lists exactly what a
    store that reads the whole directory lists."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        # Made first: a store opened on the directory changes its mode, which makes the other scan it whole.
        fresh = ArchiveStore(directory, watch=False)
        store = ArchiveStore(directory)
        start = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(3):
            _make(store, start + timedelta(hours=i))
        store.listing()
        for number, (step, pick) in enumerate(steps):
            ids = sorted(b.id for b in fresh.listing()) or ["none"]
            target = ids[pick % len(ids)]
            manifest, archive = directory / (target + MANIFEST_SUFFIX), directory / target
            if step == "make":
                _make(store, start + timedelta(days=1 + pick, minutes=number))
            elif step == "edit" and manifest.exists():
                data = json.loads(manifest.read_text())
                data["database"] = f"edited-{number}"
                manifest.write_text(json.dumps(data))
            elif step == "remove-archive":
                archive.unlink(missing_ok=True)
            elif step == "remove-manifest":
                manifest.unlink(missing_ok=True)
            elif step == "copy-in":
                (directory / f"aperture_backup_2025010{pick}_00000{number % 10}.sql.gz").write_bytes(gzip.compress(SQL))
            elif step == "not-an-archive" and archive.exists():
                archive.write_bytes(b"not an archive")
            elif step == "misnamed-manifest" and manifest.exists():
                shutil.copyfile(manifest, directory / f"copy-{number}.sql.gz{MANIFEST_SUFFIX}")
            assert store.listing() == fresh.listing(), (number, step, target)

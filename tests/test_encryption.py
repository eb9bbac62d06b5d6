"""Encryption at rest with age, end to end: real PostgreSQL, real pg_dump/psql/pg_restore, keys made by the
real age-keygen and archives decrypted or encrypted by hand with the real age binary.

What must hold: with recipients configured every new archive is an age file (`.age`, the SHA-256 of the
stored ciphertext, the recipients in the manifest); a downloaded one decrypts with `age` and then restores
by hand to the same fingerprint; the service restores it with its identity; without an identity or with a
wrong one the restore is refused with a status that says what to do, before the database is touched;
uploads encrypted by hand are checked and restored like any other, and damaged ones are refused, leaving
nothing behind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aperture_backup import cli
from aperture_backup.app import App
from aperture_backup.config import Config, ConfigError
from aperture_backup.encryption import AGE_MAGIC
from aperture_backup.model import Backup, Compression, Format, Trigger
from aperture_backup_client import pb
from tests.support import service as service_support
from tests.support.age import AgeKey, age_decrypt, age_encrypt, age_keygen
from tests.support.archives import restore_by_hand
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import RunningService, StartApp, StartService

KiB = 1024


# -- helpers -------------------------------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> AgeKey:
    return age_keygen(tmp_path / "key.txt")


@pytest.fixture
def other_key(tmp_path: Path) -> AgeKey:
    return age_keygen(tmp_path / "other-key.txt")


def _encrypting(key: AgeKey, *, identity: AgeKey | None = None, decrypt: bool = True) -> dict[str, Any]:
    """Service settings: encrypt to `key`, decrypt with `identity` (default: `key`; none when not `decrypt`)."""
    settings: dict[str, Any] = {"age_recipients": (key.public_key,)}
    if decrypt:
        settings["age_identity_file"] = (identity or key).identity_file
    return settings


def _status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    reason = ""
    status = rpc_status.from_call(error)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
    return error.code(), reason, error.details() or ""


def _restore(svc: RunningService, backup_id: str, *, skip_safety_backup: bool = False) -> list[pb.RestoreResponse]:
    request = pb.RestoreRequest(id=backup_id, skip_safety_backup=skip_safety_backup)
    return list(svc.client.stub.Restore(request, timeout=240))


def _refused_restore(svc: RunningService, backup_id: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        _restore(svc, backup_id)  # with a safety backup asked for: it must not even be taken
    return _status(info.value)


def _upload(svc: RunningService, data: bytes, *, name: str, restore: bool) -> list[pb.UploadAndRestoreResponse]:
    requests = [
        pb.UploadAndRestoreRequest(
            metadata=pb.UploadMetadata(filename=name, size_bytes=len(data), restore=restore, skip_safety_backup=True)
        ),
        *(
            pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=i, data=data[i : i + 64 * KiB]))
            for i in range(0, len(data), 64 * KiB)
        ),
    ]
    return list(svc.client.stub.UploadAndRestore(iter(requests), timeout=240))


def _refused_upload(svc: RunningService, data: bytes, *, name: str) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        _upload(svc, data, name=name, restore=True)
    return _status(info.value)


def _files(svc: RunningService) -> set[str]:
    """Everything in the backup directory, hidden temporary files included, but not the `.state` folder."""
    return {p.name for p in svc.backup_dir.iterdir() if p.name != ".state"}


def _change(uri: str) -> None:
    """What happens to a database after a backup: a new table, changed and deleted rows."""
    with psycopg.connect(uri) as conn:
        conn.execute("CREATE TABLE public.added_later (id int PRIMARY KEY)")
        conn.execute("UPDATE public.movies SET title = title || ' (edited)'")
        conn.execute("DELETE FROM public.ratings")
        conn.commit()


def _plain_dump(server: PgServer, uri: str) -> bytes:
    return server.run("pg_dump", "--no-owner", "--no-acl", "-d", uri).stdout.encode()


def _assert_sealed(path: Path) -> None:
    """An age file, with none of the dump's text readable in it."""
    data = path.read_bytes()
    assert data.startswith(AGE_MAGIC + b"\n")
    # Texts long enough that random ciphertext does not contain them by chance (a 3-byte gzip magic would,
    # about once in a hundred archives of this size).
    for plaintext in (b"PostgreSQL database dump", b"PGDMP\x01", b"CREATE TABLE", b"public.movies"):
        assert plaintext not in data


CREATE_KINDS = pytest.mark.parametrize(
    ("fmt", "extension"),
    [(pb.BACKUP_FORMAT_PLAIN, ".sql.gz.age"), (pb.BACKUP_FORMAT_CUSTOM, ".dump.age")],
    ids=["sql.gz", "custom"],
)


# -- making encrypted backups --------------------------------------------------------------------------------


@CREATE_KINDS
def test_a_downloaded_backup_decrypts_with_age_and_restores_by_hand(
    seeded_db: Database,
    make_database: MakeDatabase,
    service_factory: StartService,
    key: AgeKey,
    tmp_path: Path,
    fmt: pb.BackupFormat.ValueType,
    extension: str,
) -> None:
    # Encrypting needs no identity: the backup host can hold only the public key.
    svc = service_factory(seeded_db.uri, **_encrypting(key, decrypt=False))
    expected = fingerprint(seeded_db.uri)
    backup = svc.client.create(format=fmt)

    assert backup.id.endswith(extension) and backup.encrypted
    assert list(backup.age_recipients) == [key.public_key]
    stored = svc.backup_dir / backup.id
    _assert_sealed(stored)
    manifest = json.loads((svc.backup_dir / f"{backup.id}.manifest.json").read_text())
    assert manifest["encrypted"] is True and manifest["age_recipients"] == [key.public_key]
    assert "AGE-SECRET-KEY" not in json.dumps(manifest)
    listed = svc.client.get(backup.id)
    assert listed.encrypted and list(listed.age_recipients) == [key.public_key]

    downloaded = tmp_path / backup.id
    got = svc.client.download(backup.id, downloaded)  # checks size and the SHA-256, of the ciphertext
    assert got.sha256 == backup.sha256 and downloaded.read_bytes() == stored.read_bytes()

    # What a user does with the file, by hand: `age -d -i key.txt F | gunzip | psql`, or pg_restore.
    decrypted = tmp_path / backup.id.removesuffix(".age")
    age_decrypt(key, downloaded, decrypted)
    target = make_database(seeded_db.server)
    restore_by_hand(decrypted, target)
    assert_same(expected, fingerprint(target.uri))


@CREATE_KINDS
def test_the_service_restores_an_encrypted_backup_and_its_safety_backup_is_encrypted(
    seeded_db: Database,
    service_factory: StartService,
    key: AgeKey,
    tmp_path: Path,
    fmt: pb.BackupFormat.ValueType,
    extension: str,
) -> None:
    svc = service_factory(seeded_db.uri, **_encrypting(key))
    expected = fingerprint(seeded_db.uri)
    backup = svc.client.create(format=fmt)
    _change(seeded_db.uri)
    changed = fingerprint(seeded_db.uri)

    messages = _restore(svc, backup.id)

    assert_same(expected, fingerprint(seeded_db.uri))
    safety = messages[-1].result.safety_backup
    assert safety.id.endswith(".sql.gz.age") and safety.encrypted  # every new archive is encrypted
    _assert_sealed(svc.backup_dir / safety.id)
    # The safety backup is a real, restorable backup of the changed database.
    _restore(svc, safety.id, skip_safety_backup=True)
    assert_same(changed, fingerprint(seeded_db.uri))


def test_a_scheduled_backup_is_encrypted_too(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp, key: AgeKey
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    app = app_factory(db.uri, **_encrypting(key, decrypt=False))

    app.scheduler._run_scheduled()  # what the schedule thread runs at the configured time

    (backup,) = app.store.list_backups()
    assert backup.trigger is Trigger.SCHEDULED and backup.kind.encrypted and backup.id.endswith(".sql.gz.age")
    assert backup.age_recipients == (key.public_key,)
    _assert_sealed(app.store.path_of(backup.id))


def test_retention_and_resumed_downloads_work_on_encrypted_archives(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, key: AgeKey, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=50)
    svc = service_factory(db.uri, **_encrypting(key))
    older, newer = svc.client.create(), svc.client.create()

    # A download cut short resumes at its offset; the pieces make the stored ciphertext.
    stored = (svc.backup_dir / newer.id).read_bytes()
    partial = tmp_path / "partial"
    partial.write_bytes(stored[: len(stored) // 3])
    svc.client.download(newer.id, partial, offset=partial.stat().st_size)
    assert partial.read_bytes() == stored

    response = svc.client.set_retention(1)
    assert list(response.deleted_ids) == [older.id]
    assert [b.id for b in svc.client.list()] == [newer.id]
    assert not (svc.backup_dir / older.id).exists()


def test_restore_without_an_identity_or_with_a_wrong_one_is_refused_and_changes_nothing(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    key: AgeKey,
    other_key: AgeKey,
    tmp_path: Path,
) -> None:
    db = make_database(pg16, seeded=True, rows=50)
    shared = tmp_path / "shared"
    maker = service_factory(db.uri, shared, **_encrypting(key))
    backup = maker.client.create()
    maker.stop()
    _change(db.uri)
    before = fingerprint(db.uri)
    files = {p.name for p in shared.iterdir()}

    # No identity: the message names the variable to set.
    keyless = service_factory(db.uri, shared, **_encrypting(key, decrypt=False))
    code, reason, message = _refused_restore(keyless, backup.id)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ENCRYPTION_KEY_MISSING")
    assert "APERTURE_BACKUP_AGE_IDENTITY_FILE" in message and key.public_key in message
    keyless.stop()

    # A wrong identity: the message names the key the archive was encrypted to and the one configured.
    wrong = service_factory(db.uri, shared, **_encrypting(key, identity=other_key))
    code, reason, message = _refused_restore(wrong, backup.id)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "WRONG_ENCRYPTION_KEY")
    assert key.public_key in message and other_key.public_key in message
    assert wrong.server.app.slot.current is None
    wrong.stop()

    # Either way: the database as it was, no safety backup taken, nothing half-written.
    assert_same(before, fingerprint(db.uri))
    assert {p.name for p in shared.iterdir()} == files


def test_a_damaged_stored_archive_without_manifest_is_data_loss(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, key: AgeKey, tmp_path: Path
) -> None:
    """A file copied in by hand (no manifest, so no recorded checksum): age's authentication catches it."""
    db = make_database(pg16, seeded=True, rows=50)
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    sealed = bytearray(age_encrypt(key.public_key, gzip.compress(_plain_dump(pg16, db.uri))))
    sealed[len(sealed) // 2] ^= 0x01
    (backup_dir / "copied-in.sql.gz.age").write_bytes(bytes(sealed))
    _change(db.uri)
    before = fingerprint(db.uri)
    svc = service_factory(db.uri, backup_dir, **_encrypting(key))

    listed = svc.client.get("copied-in.sql.gz.age")
    assert listed.encrypted and listed.format == pb.BACKUP_FORMAT_PLAIN and listed.compression == pb.COMPRESSION_GZIP
    code, reason, _ = _refused_restore(svc, "copied-in.sql.gz.age")

    assert (code, reason) == (grpc.StatusCode.DATA_LOSS, "ARCHIVE_CORRUPT")
    assert_same(before, fingerprint(db.uri))
    assert _files(svc) == {"copied-in.sql.gz.age"}


# -- uploads -------------------------------------------------------------------------------------------------


def test_uploads_encrypted_by_hand_with_age_are_checked_and_restored(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, key: AgeKey, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=50)
    expected = fingerprint(db.uri)
    # `pg_dump | gzip | age -r KEY`, and `pg_dump -F c | age -r KEY`, by hand.
    sql_gz_age = age_encrypt(key.public_key, gzip.compress(_plain_dump(pg16, db.uri)))
    custom = tmp_path / "x.dump"
    pg16.run("pg_dump", "--no-owner", "--no-acl", "-F", "c", "-f", custom, "-d", db.uri)
    dump_age = age_encrypt(key.public_key, custom.read_bytes())
    _change(db.uri)
    svc = service_factory(db.uri, **_encrypting(key))

    messages = _upload(svc, sql_gz_age, name="by-hand.sql.gz.age", restore=True)

    assert_same(expected, fingerprint(db.uri))
    stored = messages[-1].backup
    assert stored.id.endswith(".sql.gz.age") and stored.encrypted and stored.trigger == pb.BACKUP_TRIGGER_UPLOADED
    assert (stored.format, stored.compression) == (pb.BACKUP_FORMAT_PLAIN, pb.COMPRESSION_GZIP)
    assert (svc.backup_dir / stored.id).read_bytes() == sql_gz_age  # stored as it came: ciphertext

    # Recognised by content, not by name; custom format read to its end by pg_restore through age.
    _change(db.uri)
    stored = _upload(svc, dump_age, name="no-extension", restore=False)[-1].backup
    assert stored.id.endswith(".dump.age") and stored.format == pb.BACKUP_FORMAT_CUSTOM
    _restore(svc, stored.id, skip_safety_backup=True)
    assert_same(expected, fingerprint(db.uri))


def test_an_encrypted_backup_downloaded_from_one_service_restores_through_another(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, key: AgeKey, tmp_path: Path
) -> None:
    source = make_database(pg16, seeded=True, rows=50)
    target = make_database(pg16)
    made = service_factory(source.uri, **_encrypting(key, decrypt=False))
    backup = made.client.create(format=pb.BACKUP_FORMAT_CUSTOM)
    path = tmp_path / backup.id
    made.client.download(backup.id, path)

    svc = service_factory(target.uri, **_encrypting(key))
    last = svc.client.upload(path, restore=True, skip_safety_backup=True)

    assert_same(fingerprint(source.uri), fingerprint(target.uri))
    assert last.backup.encrypted and last.backup.sha256 == backup.sha256


def test_bad_encrypted_uploads_are_refused_and_leave_no_trace(
    pg16: PgServer,
    make_database: MakeDatabase,
    service_factory: StartService,
    key: AgeKey,
    other_key: AgeKey,
    tmp_path: Path,
) -> None:
    db = make_database(pg16, seeded=True, rows=200)
    # Plain SQL, uncompressed inside age (`.sql.age`): its integrity rests on age's authentication alone.
    good = age_encrypt(key.public_key, _plain_dump(pg16, db.uri))
    assert len(good) > 3 * 64 * KiB, "the cases below need several age chunks"
    tampered = bytearray(good)
    tampered[len(good) * 2 // 3] ^= 0x01
    header_end = good.index(b"\n---") + 1
    tampered_header = bytearray(good)
    tampered_header[header_end + 5] ^= 0x01  # the header's MAC
    # Encrypted, authentic, but not an archive inside.
    letter = age_encrypt(key.public_key, b"Dear administrator, this is a letter.\n" * 1000)
    # Authentic age around a damaged gzip stream: age's check passes, gzip's must not.
    inner = bytearray(gzip.compress(_plain_dump(pg16, db.uri)))
    inner[len(inner) // 2 : len(inner) // 2 + 16] = bytes(16)
    bad_gzip = age_encrypt(key.public_key, bytes(inner))

    svc = service_factory(db.uri, **_encrypting(key))
    kept = svc.client.create()
    _change(db.uri)
    before = fingerprint(db.uri)
    files = _files(svc)
    cases: dict[str, tuple[bytes, grpc.StatusCode, str]] = {
        "tampered ciphertext": (bytes(tampered), grpc.StatusCode.DATA_LOSS, "ARCHIVE_CORRUPT"),
        "truncated ciphertext": (good[: len(good) - 100], grpc.StatusCode.DATA_LOSS, "ARCHIVE_CORRUPT"),
        "tampered header": (bytes(tampered_header), grpc.StatusCode.DATA_LOSS, "ARCHIVE_CORRUPT"),
        "not an archive inside": (letter, grpc.StatusCode.INVALID_ARGUMENT, "NOT_AN_ARCHIVE"),
        "damaged gzip inside": (bad_gzip, grpc.StatusCode.DATA_LOSS, "ARCHIVE_CORRUPT"),
        "encrypted to another key": (
            age_encrypt(other_key.public_key, gzip.compress(b"-- x\nSELECT 1;\n")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "WRONG_ENCRYPTION_KEY",
        ),
    }
    for name, (data, want_code, want_reason) in cases.items():
        code, reason, message = _refused_upload(svc, data, name=f"{name}.sql.age")
        assert (code, reason) == (want_code, want_reason), f"{name}: {code} {reason} {message}"
        assert _files(svc) == files, f"{name} left something behind"
        assert [b.id for b in svc.client.list()] == [kept.id], name
    assert_same(before, fingerprint(db.uri))

    # Without an identity an encrypted upload cannot be checked, so it is not taken.
    keyless = service_factory(db.uri, **_encrypting(key, decrypt=False))
    files = _files(keyless)
    code, reason, message = _refused_upload(keyless, good, name="x.sql.gz.age")
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ENCRYPTION_KEY_MISSING")
    assert "APERTURE_BACKUP_AGE_IDENTITY_FILE" in message
    assert _files(keyless) == files
    assert_same(before, fingerprint(db.uri))


# -- configuration and the manifest --------------------------------------------------------------------------


def test_age_configuration_from_the_environment(key: AgeKey, other_key: AgeKey, tmp_path: Path) -> None:
    recipients_file = tmp_path / "recipients.txt"
    recipients_file.write_text(f"# offsite copy\n\n{other_key.public_key}\n")
    config = Config.from_env(
        {
            "APERTURE_BACKUP_AGE_RECIPIENTS": f" {key.public_key} , {other_key.public_key}",
            "APERTURE_BACKUP_AGE_RECIPIENTS_FILE": str(recipients_file),
            "APERTURE_BACKUP_AGE_IDENTITY_FILE": str(key.identity_file),
        }
    )
    keys = config.age_keys()
    assert keys.recipients == (key.public_key, other_key.public_key)
    assert keys.identity_public_keys == (key.public_key,)
    assert not Config.from_env({}).age_keys().encrypts


def test_serve_flags_set_the_age_keys(
    key: AgeKey, other_key: AgeKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("APERTURE_BACKUP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("APERTURE_BACKUP_AGE_RECIPIENTS", "age1notakey")  # the flags win over it
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    flags = ["--age-recipient", key.public_key, "--age-recipient", other_key.public_key]
    flags += ["--age-identity-file", str(key.identity_file)]
    args = parser.parse_args(["serve", "--dir", str(tmp_path), *flags])
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_AGE_RECIPIENTS"):
        cli.config_from_args(args)  # the environment is read, and checked, first
    monkeypatch.delenv("APERTURE_BACKUP_AGE_RECIPIENTS")
    keys = cli.config_from_args(args).age_keys()
    assert keys.recipients == (key.public_key, other_key.public_key)
    assert keys.identity_public_keys == (key.public_key,)


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("APERTURE_BACKUP_AGE_RECIPIENTS", "age1notakey", "age1notakey"),
        ("APERTURE_BACKUP_AGE_RECIPIENTS", "ssh-ed25519 AAAA", "not an age public key"),
        ("APERTURE_BACKUP_AGE_RECIPIENTS_FILE", "{missing}", "cannot read"),
        ("APERTURE_BACKUP_AGE_RECIPIENTS_FILE", "{empty}", "no age public key"),
        ("APERTURE_BACKUP_AGE_IDENTITY_FILE", "{missing}", "cannot read"),
        ("APERTURE_BACKUP_AGE_IDENTITY_FILE", "{bad_identity}", "line 2"),
        ("APERTURE_BACKUP_AGE_IDENTITY_FILE", "{empty}", "no age identity"),
    ],
)
def test_bad_age_settings_stop_start_up_naming_the_variable(
    tmp_path: Path, variable: str, value: str, needle: str
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    bad_identity = tmp_path / "bad.txt"
    bad_identity.write_text("# created by hand\nAGE-SECRET-KEY-1TYPOTYPOTYPO\n")
    value = value.format(missing=tmp_path / "missing.txt", empty=empty, bad_identity=bad_identity)
    with pytest.raises(ConfigError) as info:
        Config.from_env({variable: value})
    assert variable in str(info.value) and needle in str(info.value)
    assert "TYPOTYPO" not in str(info.value)  # never echo what may be a secret key


def test_an_identity_that_cannot_read_new_backups_is_warned_about(
    pg16: PgServer,
    make_database: MakeDatabase,
    key: AgeKey,
    other_key: AgeKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db = make_database(pg16)
    with caplog.at_level(logging.WARNING, logger="aperture_backup.app"):
        App.build(service_support.test_config(db.uri, tmp_path / "a", **_encrypting(key, identity=key)))
        assert not [r for r in caplog.records if "not among the recipients" in r.message]
        App.build(service_support.test_config(db.uri, tmp_path / "b", **_encrypting(key, identity=other_key)))
    assert [r for r in caplog.records if "not among the recipients" in r.message]


def test_manifests_written_before_encryption_read_as_unencrypted() -> None:
    old = {
        "manifest_version": 1,
        "id": "aperture-backup-2026-11-28T01-00-00-123456Z-7f3a.sql.gz",
        "state": "ready",
        "create_time": "2026-11-28T01:00:00+00:00",
        "format": "plain",
        "compression": "gzip",
        "trigger": "scheduled",
    }
    backup = Backup.from_json(old)
    assert not backup.kind.encrypted and backup.age_recipients == ()
    assert backup.kind.extension == ".sql.gz"
    encrypted = backup.replace(kind=backup.kind.with_encryption(True), age_recipients=("age1x",))
    again = Backup.from_json(encrypted.to_json())
    assert again.kind.encrypted and again.age_recipients == ("age1x",)
    assert again.kind.extension == ".sql.gz.age"
    assert (again.kind.format, again.kind.compression) == (Format.PLAIN, Compression.GZIP)


# -- streaming -----------------------------------------------------------------------------------------------

_STREAM_SCRIPT = r"""
import io, os, sys
from pathlib import Path
from aperture_backup.compression import HashingFile
from aperture_backup.encryption import AgeKeys

keys = AgeKeys.load([sys.argv[1]], identity_file=Path(sys.argv[2]))
total, piece = int(sys.argv[3]), os.urandom(1 << 20)


class Null(io.RawIOBase):
    def writable(self):
        return True

    def write(self, data):
        return len(data)


ciphertext = Path(sys.argv[4])
with open(ciphertext, "wb") as target:
    sink = HashingFile(target)
    stage = keys.encrypting(sink)
    for _ in range(total // len(piece)):
        stage.write(piece)
    stage.close()


def pieces():
    with open(ciphertext, "rb") as source:
        while data := source.read(1 << 20):
            yield data


plain = sum(len(p) for p in keys.decrypting(pieces(), archive="x"))
# VmHWM, the peak of this program's memory: ru_maxrss would also count the parent's RSS at fork, which
# Linux carries over exec.
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(sink.size, plain, peak_kb // 1024)
"""


def test_encryption_and_decryption_stream_in_flat_memory(key: AgeKey, tmp_path: Path) -> None:
    """600 MB through the encrypting stage to disk and back through the decrypting one, in a process of its
    own: its peak RSS stays far below the data (measured: 27 MB for 600 MiB and for 3 GiB, the interpreter
    included)."""
    total = 600 * 1024 * 1024
    script = tmp_path / "stream.py"
    script.write_text(_STREAM_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), key.public_key, str(key.identity_file), str(total), str(tmp_path / "x.age")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    stored, plain, peak_mb = (int(v) for v in done.stdout.split())
    assert plain == total and stored > total  # age adds a header and 16 bytes per 64 KiB chunk
    assert peak_mb < 100, f"peak RSS {peak_mb} MB for {total // 2**20} MiB streamed"

"""Restoring archives by hand, the way an administrator would without the service: `gunzip -c | psql`,
`zstd -dc | psql`, `psql -f`, or `pg_restore` for custom format. Used to prove an archive is complete."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
from pathlib import Path

import zstandard

from aperture_backup.archive_format import sniff
from aperture_backup.model import Compression, Format
from tests.support.fixtures import Database


def _env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def restore_by_hand(archive: Path, target: Database) -> None:
    """Load `archive` into the (empty) database `target` with the server's own client tools; raises
    CalledProcessError with stderr when the tools fail."""
    with open(archive, "rb") as handle:
        kind = sniff(handle.read(65536))
    assert kind is not None, f"{archive.name} is not recognised as an archive"
    psql = [str(target.server.tool("psql")), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.uri]
    if kind.format is Format.CUSTOM:
        assert kind.compression is Compression.NONE
        command = [
            str(target.server.tool("pg_restore")),
            "--no-owner",
            "--no-acl",
            "--exit-on-error",
            "-d",
            target.uri,
            str(archive),
        ]
        subprocess.run(command, env=_env(), check=True, capture_output=True, timeout=300)
        return
    if kind.compression is Compression.GZIP:
        gunzip = subprocess.Popen(["gunzip", "-c", str(archive)], stdout=subprocess.PIPE)
        result = subprocess.run(psql, stdin=gunzip.stdout, env=_env(), capture_output=True, timeout=300, check=False)
        assert gunzip.wait() == 0, "gunzip failed"
    elif kind.compression is Compression.ZSTD:
        data = zstandard.ZstdDecompressor().stream_reader(open(archive, "rb")).read()  # noqa: SIM115
        result = subprocess.run(psql, input=data, env=_env(), capture_output=True, timeout=300, check=False)
    else:
        result = subprocess.run([*psql, "-f", str(archive)], env=_env(), capture_output=True, timeout=300, check=False)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, psql, result.stdout, result.stderr)


#: A seeded table no foreign key points at: rows can go without breaking the restore itself.
TABLE_WITHOUT_REFERENCES = "public.system_settings"


def drop_copy_rows(archive: Path, table: str, count: int) -> None:
    """Edit a .sql.gz archive by hand: gunzip, delete `count` data lines of `table`'s COPY block, gzip."""
    lines = gzip.decompress(archive.read_bytes()).split(b"\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(f"COPY {table} ".encode()))
    assert lines[start + count] != b"\\.", "the table has fewer rows than the edit removes"
    del lines[start + 1 : start + 1 + count]
    archive.write_bytes(gzip.compress(b"\n".join(lines)))


def reseal_manifest(backup_dir: Path, backup_id: str) -> None:
    """Give an edited archive's size and SHA-256 to its manifest, as someone editing it by hand would: the
    checksum no longer catches the edit."""
    archive = backup_dir / backup_id
    manifest_path = backup_dir / f"{backup_id}.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest["size_bytes"] = archive.stat().st_size
    manifest_path.write_text(json.dumps(manifest))

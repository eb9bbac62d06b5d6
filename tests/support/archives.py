"""Restoring archives by hand, the way an administrator would without the service: `gunzip -c | psql`,
`zstd -dc | psql`, `psql -f`, or `pg_restore` for custom format. Used to prove an archive is complete."""

from __future__ import annotations

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

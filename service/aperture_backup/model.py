"""The domain's vocabulary: what a backup is, independent of protobuf and of the disk layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class State(StrEnum):
    """Life cycle of a backup."""

    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


class Format(StrEnum):
    """pg_dump output format."""

    PLAIN = "plain"
    CUSTOM = "custom"


class Compression(StrEnum):
    """Compression of the archive file as a whole (custom-format archives compress inside)."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class Trigger(StrEnum):
    """What started a backup."""

    MANUAL = "manual"
    SCHEDULED = "scheduled"
    PRE_RESTORE = "pre-restore"
    UPLOADED = "uploaded"
    EXTERNAL = "external"


class Location(StrEnum):
    """Where a copy of an archive lives."""

    LOCAL = "local"
    BUCKET = "bucket"


#: Added to the extension of an archive encrypted with age, as the `age` tool's own convention has it.
AGE_EXTENSION = ".age"


@dataclass(frozen=True)
class ArchiveKind:
    """Format, compression and encryption together decide the file extension and how to load the archive.
    Encryption wraps the compressed file as a whole (`.sql.gz.age`: decrypt, then gunzip)."""

    format: Format
    compression: Compression
    encrypted: bool = False

    @property
    def extension(self) -> str:
        if self.format is Format.CUSTOM:
            base = {Compression.NONE: ".dump", Compression.GZIP: ".dump.gz", Compression.ZSTD: ".dump.zst"}[
                self.compression
            ]
        else:
            base = {Compression.NONE: ".sql", Compression.GZIP: ".sql.gz", Compression.ZSTD: ".sql.zst"}[
                self.compression
            ]
        return base + AGE_EXTENSION if self.encrypted else base

    def with_encryption(self, encrypted: bool) -> ArchiveKind:
        return dataclasses.replace(self, encrypted=encrypted)


def kind_from_name(name: str) -> ArchiveKind | None:
    """The kind a file name claims, by its extension. Only a hint, for the one case content cannot tell:
    an encrypted file this service has no identity for."""
    encrypted = name.endswith(AGE_EXTENSION)
    stem = name.removesuffix(AGE_EXTENSION)
    for fmt in Format:
        for compression in Compression:
            kind = ArchiveKind(fmt, compression, encrypted)
            if stem.endswith(kind.with_encryption(False).extension):
                return kind
    return None


DEFAULT_KIND = ArchiveKind(Format.PLAIN, Compression.GZIP)


@dataclass(frozen=True)
class Contents:
    """What an archive holds, read from the dump as it streamed through (contents.py): rows by table and
    the tables, indexes and extensions it creates. Names as pg_dump writes them (`public.users`, quoted
    where PostgreSQL's quote_ident would quote). Verify compares a restored scratch database with this."""

    rows: Mapping[str, int] = field(default_factory=dict)
    tables: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": dict(self.rows),
            "tables": list(self.tables),
            "indexes": list(self.indexes),
            "extensions": list(self.extensions),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Contents:
        return cls(
            rows={str(k): int(v) for k, v in (data.get("rows") or {}).items()},
            tables=tuple(str(t) for t in data.get("tables") or ()),
            indexes=tuple(str(i) for i in data.get("indexes") or ()),
            extensions=tuple(str(e) for e in data.get("extensions") or ()),
        )


@dataclass(frozen=True)
class Verification:
    """The outcome of restoring an archive into a scratch database and checking it (verify.py)."""

    time: datetime
    passed: bool
    #: The check that failed ("restore", "tables", "row_counts", "indexes", "extensions", "verify_sql").
    failed_check: str = ""
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time.isoformat(),
            "passed": self.passed,
            "failed_check": self.failed_check,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verification:
        return cls(
            time=datetime.fromisoformat(data["time"]),
            passed=bool(data["passed"]),
            failed_check=str(data.get("failed_check") or ""),
            message=str(data.get("message") or ""),
        )


@dataclass(frozen=True)
class Pin:
    """A person's wish that retention keep a backup: until `expire_time`, or for ever when it is None."""

    expire_time: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.expire_time is None or self.expire_time > now


@dataclass(frozen=True)
class Backup:
    """One archive in the backup directory, as its manifest (or, without one, its content) describes it."""

    id: str
    state: State
    create_time: datetime
    kind: ArchiveKind
    trigger: Trigger
    size_bytes: int = 0
    sha256: str = ""
    database: str = ""
    server_version: str = ""
    pg_dump_version: str = ""
    duration_seconds: float | None = None
    error: str = ""
    #: The age public keys an encrypted archive was encrypted to, when known (never an identity).
    age_recipients: tuple[str, ...] = ()
    #: Where copies of it are now (not stored in a manifest: each location tells for itself).
    locations: frozenset[Location] = frozenset()
    #: What the archive holds, counted while it was written; None when unknown (older or foreign files).
    contents: Contents | None = None
    #: The last verification, when there was one.
    verification: Verification | None = None
    #: Set by Pin (or for the safety backup before a restore); retention keeps the backup while it is active.
    pin: Pin | None = None

    def pinned_at(self, now: datetime) -> bool:
        """Whether retention must keep the backup at `now` because of its pin."""
        return self.pin is not None and self.pin.active(now)

    @property
    def verified(self) -> bool:
        """Whether its last verification passed."""
        return self.verification is not None and self.verification.passed

    @property
    def filename(self) -> str:
        return self.id

    def replace(self, **changes: Any) -> Backup:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest_version": 1,
            "id": self.id,
            "state": self.state.value,
            "create_time": self.create_time.isoformat(),
            "format": self.kind.format.value,
            "compression": self.kind.compression.value,
            "trigger": self.trigger.value,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "database": self.database,
            "server_version": self.server_version,
            "pg_dump_version": self.pg_dump_version,
            "duration_seconds": self.duration_seconds,
            "error": self.error,
            "encrypted": self.kind.encrypted,
            "age_recipients": list(self.age_recipients),
            "contents": self.contents.to_json() if self.contents is not None else None,
            "verification": self.verification.to_json() if self.verification is not None else None,
            "pin": (
                {"expire_time": self.pin.expire_time.isoformat() if self.pin.expire_time else None}
                if self.pin is not None
                else None
            ),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Backup:
        return cls(
            id=str(data["id"]),
            state=State(data["state"]),
            create_time=datetime.fromisoformat(data["create_time"]),
            # Manifests written before encryption existed have neither field: unencrypted.
            kind=ArchiveKind(Format(data["format"]), Compression(data["compression"]), bool(data.get("encrypted"))),
            trigger=Trigger(data["trigger"]),
            size_bytes=int(data.get("size_bytes") or 0),
            sha256=str(data.get("sha256") or ""),
            database=str(data.get("database") or ""),
            server_version=str(data.get("server_version") or ""),
            pg_dump_version=str(data.get("pg_dump_version") or ""),
            duration_seconds=data.get("duration_seconds"),
            error=str(data.get("error") or ""),
            age_recipients=tuple(str(r) for r in data.get("age_recipients") or ()),
            # Manifests written before rows were counted, verified or pinned have none of these.
            contents=Contents.from_json(data["contents"]) if data.get("contents") else None,
            verification=Verification.from_json(data["verification"]) if data.get("verification") else None,
            pin=(
                Pin(datetime.fromisoformat(data["pin"]["expire_time"]) if data["pin"].get("expire_time") else None)
                if data.get("pin")
                else None
            ),
        )


@dataclass(frozen=True)
class Progress:
    """Where a long operation stands."""

    phase: str
    bytes_done: int = 0
    bytes_total: int = 0
    tables_done: int = 0
    tables_total: int = 0
    elapsed_seconds: float = 0.0
    message: str = ""

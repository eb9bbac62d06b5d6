"""Configuration: one frozen dataclass, built from the environment and overridden by command-line flags.

Every value is validated at start-up; a bad one raises `ConfigError` naming the variable, so that a
misconfigured container stops at once with a message an administrator can act on.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg.conninfo

from .encryption import AgeKeyError, AgeKeys

ENV_PREFIX = "APERTURE_BACKUP_"

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SCHEDULE = "01:00"
DEFAULT_KEEP = 7
MIN_KEEP = 1
MAX_KEEP = 100
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024**3

_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the variable."""


@dataclass(frozen=True)
class Config:
    """Everything the service needs to know at start-up."""

    #: libpq URI or key=value string of the database to back up; None starts an embedded PostgreSQL.
    database_url: str | None = None
    #: Where archives and their manifests live.
    backup_dir: Path = Path("./backups")
    #: host:port the gRPC server listens on; port 0 picks a free port (tests).
    listen: str = DEFAULT_LISTEN
    #: Daily backup time of day, in `time_zone`.
    schedule_time: time = time(1, 0)
    #: Whether the daily backup runs at all.
    schedule_enabled: bool = True
    #: IANA time zone of the schedule.
    time_zone: str = "UTC"
    #: After start-up, run one backup when the newest successful one is more than a day old.
    catch_up: bool = True
    #: Retention: keep the newest N READY backups.
    keep: int = DEFAULT_KEEP
    #: A directory holding pg_dump, pg_restore and psql, searched before any other.
    pg_bin_dir: Path | None = None
    #: Largest archive UploadAndRestore accepts.
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    #: Logging level name.
    log_level: str = "INFO"
    #: "text" or "json" (one object per line).
    log_format: str = "text"

    # -- encryption at rest (age); kept together, last --------------------------------------------------
    #: age public keys (`age1...`) every new archive is encrypted to; none: archives are not encrypted.
    age_recipients: tuple[str, ...] = ()
    #: A file of more such keys, one a line (`#` comments), as age's `-R` reads it.
    age_recipients_file: Path | None = None
    #: The age identity file (as age-keygen writes it) that decrypts archives to restore and check them.
    age_identity_file: Path | None = None

    @property
    def state_dir(self) -> Path:
        """Service state (settings, embedded database) lives beside the archives but is never listed."""
        return self.backup_dir / ".state"

    def with_overrides(self, **changes: object) -> Config:
        """A copy with some fields replaced (flags over environment), validated again."""
        updated = dataclasses.replace(self, **changes)  # type: ignore[arg-type]
        updated.validate()
        return updated

    def validate(self) -> None:
        """Raise ConfigError when a value cannot work."""
        if self.database_url is not None:
            try:
                params = psycopg.conninfo.conninfo_to_dict(self.database_url)
            except psycopg.ProgrammingError as exc:
                raise ConfigError(
                    f"{ENV_PREFIX}DATABASE_URL is not a valid libpq connection string: {_redact(str(exc))}"
                ) from None
            ports = str(params.get("port") or "5432").split(",")
            if not all(p.strip().isdigit() for p in ports):
                raise ConfigError(f"{ENV_PREFIX}DATABASE_URL has a port that is not a number: {params['port']!r}")
        parse_listen(self.listen)
        if not MIN_KEEP <= self.keep <= MAX_KEEP:
            raise ConfigError(f"{ENV_PREFIX}KEEP must be between {MIN_KEEP} and {MAX_KEEP}, got {self.keep}")
        parse_time_zone(self.time_zone, variable="TZ")
        if self.max_upload_bytes <= 0:
            raise ConfigError(f"{ENV_PREFIX}MAX_UPLOAD_BYTES must be positive, got {self.max_upload_bytes}")
        if self.pg_bin_dir is not None and not self.pg_bin_dir.is_dir():
            raise ConfigError(f"{ENV_PREFIX}PG_BIN_DIR is not a directory: {self.pg_bin_dir}")
        if self.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.backup_dir.exists() and not self.backup_dir.is_dir():
            raise ConfigError(f"{ENV_PREFIX}DIR exists but is not a directory: {self.backup_dir}")
        self.age_keys()

    def age_keys(self) -> AgeKeys:
        """The age keys the configuration names, parsed and read (ConfigError naming the variable)."""
        try:
            return AgeKeys.load(self.age_recipients, self.age_recipients_file, self.age_identity_file)
        except AgeKeyError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from environment variables (defaults where unset)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value.strip() if value is not None and value.strip() else None

        schedule = get("SCHEDULE") or DEFAULT_SCHEDULE
        enabled = schedule.lower() not in {"off", "disabled", "none"}
        config = cls(
            database_url=get("DATABASE_URL"),
            backup_dir=Path(get("DIR") or "./backups"),
            listen=get("LISTEN") or DEFAULT_LISTEN,
            schedule_time=parse_hhmm(schedule, variable=ENV_PREFIX + "SCHEDULE") if enabled else time(1, 0),
            schedule_enabled=enabled,
            time_zone=(env.get("TZ") or "").strip() or "UTC",
            catch_up=parse_bool(get("CATCH_UP"), default=True, variable=ENV_PREFIX + "CATCH_UP"),
            keep=parse_int(get("KEEP"), default=DEFAULT_KEEP, variable=ENV_PREFIX + "KEEP"),
            pg_bin_dir=Path(p) if (p := get("PG_BIN_DIR")) else None,
            max_upload_bytes=parse_int(
                get("MAX_UPLOAD_BYTES"), default=DEFAULT_MAX_UPLOAD_BYTES, variable=ENV_PREFIX + "MAX_UPLOAD_BYTES"
            ),
            log_level=(get("LOG_LEVEL") or "INFO").upper(),
            log_format=(get("LOG_FORMAT") or "text").lower(),
            age_recipients=tuple(r.strip() for r in (get("AGE_RECIPIENTS") or "").split(",") if r.strip()),
            age_recipients_file=Path(p) if (p := get("AGE_RECIPIENTS_FILE")) else None,
            age_identity_file=Path(p) if (p := get("AGE_IDENTITY_FILE")) else None,
        )
        config.validate()
        return config


def parse_hhmm(value: str, *, variable: str) -> time:
    """Parse a 24-hour "HH:MM" time of day."""
    match = _HHMM.match(value.strip())
    if not match:
        raise ConfigError(f'{variable} must be a time of day "HH:MM" (24-hour clock), got {value!r}')
    return time(int(match.group(1)), int(match.group(2)))


def parse_time_zone(value: str, *, variable: str) -> ZoneInfo:
    """Parse an IANA time zone name such as "Europe/Berlin"."""
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f'{variable} must be an IANA time zone such as "Europe/Berlin", got {value!r}') from None


def parse_int(value: str | None, *, default: int, variable: str) -> int:
    """Parse a whole number, or return the default when unset."""
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{variable} must be a whole number, got {value!r}") from None


def parse_bool(value: str | None, *, default: bool, variable: str) -> bool:
    """Parse true/false, yes/no, on/off, 1/0."""
    if value is None:
        return default
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{variable} must be true or false, got {value!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets) and check the port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f'{ENV_PREFIX}LISTEN must be "host:port", for example "0.0.0.0:50051", got {value!r}')
    return host, int(port_text)


def _redact(message: str) -> str:
    """libpq error messages can echo the connection string; never let a password through."""
    return re.sub(r"(password\s*=\s*|://[^:/@]*:)[^@\s]*", r"\1***", message)

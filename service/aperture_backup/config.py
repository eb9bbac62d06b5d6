"""Configuration: one frozen dataclass, built from the environment and overridden by command-line flags.

Every value is validated at start-up; a bad one raises `ConfigError` naming the variable, so that a
misconfigured container stops at once with a message an administrator can act on.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import psycopg.conninfo
import pytz

from .encryption import AgeKeyError, AgeKeys

ENV_PREFIX = "APERTURE_BACKUP_"

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SCHEDULE = "01:00"
DEFAULT_KEEP = 7
MIN_KEEP = 1
MAX_KEEP = 100
#: Most periods (days, weeks, months) one GFS rule may keep.
MAX_KEEP_PERIODS = 1000
VERIFY_SCHEDULES = ("weekly", "daily", "off")
DEFAULT_MAX_UPLOAD_BYTES = 64 * 1024**3
DEFAULT_MAX_TRANSFERS = 4
DEFAULT_RESTORE_TIMEOUT = 6 * 3600
RESTORE_ISOLATIONS = ("auto", "staging", "in-place")
#: The server's threads (server.WORKERS) must leave room for control calls beside both kinds of transfer.
MAX_TRANSFERS = 6
DEFAULT_UPLOAD_IDLE_TIMEOUT = 120.0
#: No successful backup for this long raises the silence alarm (a day, plus slack for a slow run).
DEFAULT_STALE_AFTER = 26 * 3600.0
#: A fresh install (no READY backup yet) makes its first backup this many seconds after start-up: long
#: enough for the database and Aperture's migrations to be up when both start together, soon enough that
#: nobody waits for 01:00 without a backup.
DEFAULT_FIRST_BACKUP_DELAY = 60.0
NOTIFY_ON_CHOICES = ("failure", "all")
#: Shortest token accepted: a short token can be guessed, and one is enough to read every user's data.
MIN_TOKEN_LENGTH = 16

#: A PostgreSQL memory size, as RESTORE_MAINTENANCE_WORK_MEM takes it (it goes into a SET: nothing else).
_MEMORY = re.compile(r"^[1-9][0-9]{0,6}(kB|MB|GB)$")
MAX_RESTORE_WORKERS = 16
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
    #: Retention: also keep the newest backup of each of the last N days, weeks, months (0: no such rule).
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    #: After a scheduled backup, verify the newest backup "weekly", "daily", or never ("off").
    verify: str = "weekly"
    #: An operator's query that must return true in a verified scratch database, e.g.
    #: `SELECT count(*) > 0 FROM users`; None: no such check.
    verify_sql: str | None = None
    #: A directory holding pg_dump, pg_restore and psql, searched before any other.
    pg_bin_dir: Path | None = None
    #: Largest archive UploadAndRestore accepts.
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    #: Uploads, and downloads, that may run at once (each kind); more are RESOURCE_EXHAUSTED.
    max_transfers: int = DEFAULT_MAX_TRANSFERS
    #: An upload that sends nothing for this many seconds is dropped.
    upload_idle_timeout: float = DEFAULT_UPLOAD_IDLE_TIMEOUT
    #: A restore that loads for longer than this many seconds is stopped and rolled back.
    restore_timeout: float = float(DEFAULT_RESTORE_TIMEOUT)
    #: "staging" (a database of its own, loaded by a role without the service's powers, swapped in by
    #: rename; isolation.py), "in-place" (one transaction in the live database), or "auto": staging where
    #: the service's role is a superuser, whose powers an archive must not have, in place elsewhere.
    restore_isolation: str = "auto"
    #: `maintenance_work_mem` of a restore's session (index builds); "" leaves the server's setting.
    restore_maintenance_work_mem: str = "256MB"
    #: `max_parallel_maintenance_workers` of a restore's session; None leaves the server's setting.
    restore_workers: int | None = 1
    #: host:port of the Prometheus metrics endpoint; None: no metrics served.
    metrics_listen: str | None = None
    #: Apprise URLs notifications go to (ntfy://, discord://, mailto://, json://...). They hold secrets: never
    #: shown in a repr, a log or an error.
    notify_urls: tuple[str, ...] = field(default=(), repr=False)
    #: "failure": notify what went wrong; "all": successes too (for dead-man's-switch services).
    notify_on: str = "failure"
    #: Seconds without a successful backup before the silence alarm; None: no silence detection.
    stale_after: float | None = DEFAULT_STALE_AFTER
    #: Seconds after start-up a fresh install (no READY backup) makes its first backup; None: it waits for
    #: the schedule.
    first_backup_delay: float | None = DEFAULT_FIRST_BACKUP_DELAY
    #: Logging level name.
    log_level: str = "INFO"
    #: "text" or "json" (one object per line).
    log_format: str = "text"
    #: Bearer token of the admin role (every RPC). Never shown in a repr, a log or an error.
    token: str | None = field(default=None, repr=False)
    #: Bearer token of the read-only role (List, Get, StreamDownload, Get* status calls).
    read_token: str | None = field(default=None, repr=False)
    #: Serve on a non-loopback address without any authentication (an explicit, logged choice).
    insecure: bool = False
    #: PEM certificate chain and private key: serve TLS. Re-read on SIGHUP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: PEM CA bundle: require client certificates signed by it (mutual TLS).
    tls_client_ca: Path | None = None

    # -- offsite copies in an S3-compatible bucket -----------------------------------------------------
    #: `s3://bucket/optional/prefix`: copy every archive there; None: the backup directory only.
    s3_url: str | None = None
    #: Endpoint of a service other than AWS (`https://...`); path-style addressing is used with one.
    s3_endpoint: str | None = None
    #: Retention in the bucket: keep the newest N READY backups there; None: the same as `keep`.
    s3_keep: int | None = None

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
                reason = _redact(str(exc))
                if "percent-encod" in reason:
                    reason += " (in a URL, write % as %25, @ as %40, : as %3A and / as %2F, in the password too)"
                raise ConfigError(
                    f"{ENV_PREFIX}DATABASE_URL is not a valid libpq connection string: {reason}"
                ) from None
            ports = str(params.get("port") or "5432").split(",")
            if not all(p.strip().isdigit() for p in ports):
                raise ConfigError(f"{ENV_PREFIX}DATABASE_URL has a port that is not a number: {params['port']!r}")
        parse_listen(self.listen)
        periods = self.keep_daily or self.keep_weekly or self.keep_monthly
        if not (0 if periods or self.s3_url else MIN_KEEP) <= self.keep <= MAX_KEEP:
            raise ConfigError(
                f"{ENV_PREFIX}KEEP must be between {MIN_KEEP} and {MAX_KEEP} (0 only with {ENV_PREFIX}KEEP_DAILY, "
                f"_WEEKLY or _MONTHLY, or with {ENV_PREFIX}S3_URL: the bucket only), got {self.keep}"
            )
        for name, value in (("DAILY", self.keep_daily), ("WEEKLY", self.keep_weekly), ("MONTHLY", self.keep_monthly)):
            if not 0 <= value <= MAX_KEEP_PERIODS:
                raise ConfigError(f"{ENV_PREFIX}KEEP_{name} must be between 0 and {MAX_KEEP_PERIODS}, got {value}")
        if self.verify not in VERIFY_SCHEDULES:
            raise ConfigError(f"{ENV_PREFIX}VERIFY must be one of {', '.join(VERIFY_SCHEDULES)}, got {self.verify!r}")
        self._validate_bucket()
        parse_time_zone(self.time_zone, variable="TZ")
        if self.max_upload_bytes <= 0:
            raise ConfigError(f"{ENV_PREFIX}MAX_UPLOAD_BYTES must be positive, got {self.max_upload_bytes}")
        if not 1 <= self.max_transfers <= MAX_TRANSFERS:
            raise ConfigError(
                f"{ENV_PREFIX}MAX_TRANSFERS must be between 1 and {MAX_TRANSFERS}, got {self.max_transfers}"
            )
        if not 0 < self.upload_idle_timeout <= 86400:
            raise ConfigError(
                f"{ENV_PREFIX}UPLOAD_IDLE_TIMEOUT must be a number of seconds from 1 to 86400, "
                f"got {self.upload_idle_timeout:g}"
            )
        if not 0 < self.restore_timeout <= 7 * 86400:
            raise ConfigError(
                f"{ENV_PREFIX}RESTORE_TIMEOUT must be a number of seconds from 1 to 604800, "
                f"got {self.restore_timeout:g}"
            )
        if self.metrics_listen is not None:
            parse_listen(self.metrics_listen, variable=ENV_PREFIX + "METRICS_LISTEN")
        if self.restore_maintenance_work_mem and not _MEMORY.match(self.restore_maintenance_work_mem):
            raise ConfigError(
                f"{ENV_PREFIX}RESTORE_MAINTENANCE_WORK_MEM must be a size such as 256MB or 1GB (kB, MB, GB), or "
                f"'server' to leave PostgreSQL's setting; got {self.restore_maintenance_work_mem!r}"
            )
        if self.restore_workers is not None and not 0 <= self.restore_workers <= MAX_RESTORE_WORKERS:
            raise ConfigError(
                f"{ENV_PREFIX}RESTORE_WORKERS must be between 0 and {MAX_RESTORE_WORKERS}, or 'server'; "
                f"got {self.restore_workers}"
            )
        self._validate_notifications()
        if self.restore_isolation not in RESTORE_ISOLATIONS:
            raise ConfigError(
                f"{ENV_PREFIX}RESTORE_ISOLATION must be one of {', '.join(RESTORE_ISOLATIONS)}, "
                f"got {self.restore_isolation!r}"
            )
        if self.pg_bin_dir is not None and not self.pg_bin_dir.is_dir():
            raise ConfigError(f"{ENV_PREFIX}PG_BIN_DIR is not a directory: {self.pg_bin_dir}")
        if self.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"{ENV_PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.log_format not in {"text", "json"}:
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT must be text or json, got {self.log_format!r}")
        if self.backup_dir.exists() and not self.backup_dir.is_dir():
            raise ConfigError(f"{ENV_PREFIX}DIR exists but is not a directory: {self.backup_dir}")
        self._validate_security()
        self.age_keys()

    def _validate_bucket(self) -> None:
        if self.s3_url is None:
            for name, value in (("S3_ENDPOINT", self.s3_endpoint), ("S3_KEEP", self.s3_keep)):
                if value is not None:
                    raise ConfigError(f"{ENV_PREFIX}{name} is set but {ENV_PREFIX}S3_URL is not; set both, or neither")
            return
        from .storage.bucket import BucketAddress  # the S3 library loads only when a bucket is configured

        try:
            BucketAddress.parse(self.s3_url)
        except ValueError as exc:
            raise ConfigError(f"{ENV_PREFIX}S3_URL: {exc}") from None
        if self.s3_endpoint is not None:
            parts = urlsplit(self.s3_endpoint)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ConfigError(
                    f"{ENV_PREFIX}S3_ENDPOINT must be an http:// or https:// URL, got {self.s3_endpoint!r}"
                )
        if self.s3_keep is not None and not MIN_KEEP <= self.s3_keep <= MAX_KEEP:
            raise ConfigError(f"{ENV_PREFIX}S3_KEEP must be between {MIN_KEEP} and {MAX_KEEP}, got {self.s3_keep}")

    def age_keys(self) -> AgeKeys:
        """The age keys the configuration names, parsed and read (ConfigError naming the variable)."""
        try:
            return AgeKeys.load(self.age_recipients, self.age_recipients_file, self.age_identity_file)
        except AgeKeyError as exc:
            raise ConfigError(str(exc)) from None

    def _validate_notifications(self) -> None:
        if self.notify_on not in NOTIFY_ON_CHOICES:
            raise ConfigError(
                f"{ENV_PREFIX}NOTIFY_ON must be one of {', '.join(NOTIFY_ON_CHOICES)}, got {self.notify_on!r}"
            )
        if self.stale_after is not None and not 60 <= self.stale_after <= 366 * 86400:
            raise ConfigError(
                f"{ENV_PREFIX}STALE_AFTER must be from 1m to 366d (for example 26h), or off; "
                f"got {self.stale_after:g} seconds"
            )
        if self.first_backup_delay is not None and not 0 <= self.first_backup_delay <= 86400:
            raise ConfigError(
                f"{ENV_PREFIX}FIRST_BACKUP_DELAY must be from 0s to 24h, or off; "
                f"got {self.first_backup_delay:g} seconds"
            )
        from .notify import parse_targets

        parse_targets(self.notify_urls, variable=ENV_PREFIX + "NOTIFY_URLS")

    @property
    def authenticated(self) -> bool:
        """Whether callers must prove who they are (a token, or a client certificate under mutual TLS)."""
        return self.token is not None or self.tls_client_ca is not None

    def _validate_security(self) -> None:
        for variable, value in (("TOKEN", self.token), ("READ_TOKEN", self.read_token)):
            if value is not None:
                check_token(value, variable=ENV_PREFIX + variable)
        if self.read_token is not None and self.token is None:
            raise ConfigError(
                f"{ENV_PREFIX}READ_TOKEN is set but {ENV_PREFIX}TOKEN is not: set an admin token too, "
                "or no caller could ever create or restore a backup"
            )
        if self.token is not None and self.token == self.read_token:
            raise ConfigError(f"{ENV_PREFIX}TOKEN and {ENV_PREFIX}READ_TOKEN are the same; give each role its own")
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "TLS_KEY" if self.tls_key is None else "TLS_CERT"
            raise ConfigError(f"{ENV_PREFIX}{missing} is not set: TLS needs both TLS_CERT and TLS_KEY")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                f"{ENV_PREFIX}TLS_CLIENT_CA requires {ENV_PREFIX}TLS_CERT and {ENV_PREFIX}TLS_KEY: "
                "client certificates are checked only over TLS"
            )
        host, _ = parse_listen(self.listen)
        if not self.authenticated and not self.insecure and not is_loopback(host):
            raise ConfigError(
                f"refusing to listen on {self.listen} without authentication: anyone who reaches that "
                "address could download and replace the whole database. Set a token of at least "
                f"{MIN_TOKEN_LENGTH} characters in {ENV_PREFIX}TOKEN or, better, in a file named by "
                f"{ENV_PREFIX}TOKEN_FILE (for example `openssl rand -hex 32`); or listen on 127.0.0.1; "
                f"or set {ENV_PREFIX}INSECURE=true if something else in front of the service does this job"
            )

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
            database_url=(url.strip() or None) if (url := secret_from_env(env, "DATABASE_URL")) else None,
            backup_dir=Path(get("DIR") or "./backups"),
            listen=get("LISTEN") or DEFAULT_LISTEN,
            schedule_time=parse_hhmm(schedule, variable=ENV_PREFIX + "SCHEDULE") if enabled else time(1, 0),
            schedule_enabled=enabled,
            time_zone=(env.get("TZ") or "").strip() or "UTC",
            catch_up=parse_bool(get("CATCH_UP"), default=True, variable=ENV_PREFIX + "CATCH_UP"),
            keep=parse_int(get("KEEP"), default=DEFAULT_KEEP, variable=ENV_PREFIX + "KEEP"),
            keep_daily=parse_int(get("KEEP_DAILY"), default=0, variable=ENV_PREFIX + "KEEP_DAILY"),
            keep_weekly=parse_int(get("KEEP_WEEKLY"), default=0, variable=ENV_PREFIX + "KEEP_WEEKLY"),
            keep_monthly=parse_int(get("KEEP_MONTHLY"), default=0, variable=ENV_PREFIX + "KEEP_MONTHLY"),
            verify=(get("VERIFY") or "weekly").lower(),
            verify_sql=get("VERIFY_SQL"),
            pg_bin_dir=Path(p) if (p := get("PG_BIN_DIR")) else None,
            max_upload_bytes=parse_int(
                get("MAX_UPLOAD_BYTES"), default=DEFAULT_MAX_UPLOAD_BYTES, variable=ENV_PREFIX + "MAX_UPLOAD_BYTES"
            ),
            max_transfers=parse_int(
                get("MAX_TRANSFERS"), default=DEFAULT_MAX_TRANSFERS, variable=ENV_PREFIX + "MAX_TRANSFERS"
            ),
            upload_idle_timeout=float(
                parse_int(
                    get("UPLOAD_IDLE_TIMEOUT"),
                    default=int(DEFAULT_UPLOAD_IDLE_TIMEOUT),
                    variable=ENV_PREFIX + "UPLOAD_IDLE_TIMEOUT",
                )
            ),
            restore_timeout=float(
                parse_int(
                    get("RESTORE_TIMEOUT"), default=DEFAULT_RESTORE_TIMEOUT, variable=ENV_PREFIX + "RESTORE_TIMEOUT"
                )
            ),
            restore_isolation=(get("RESTORE_ISOLATION") or "auto").lower(),
            metrics_listen=get("METRICS_LISTEN"),
            restore_maintenance_work_mem=_server_or(get("RESTORE_MAINTENANCE_WORK_MEM"), "256MB"),
            restore_workers=(
                None
                if (workers := get("RESTORE_WORKERS")) is not None and workers.lower() == "server"
                else parse_int(workers, default=1, variable=ENV_PREFIX + "RESTORE_WORKERS")
            ),
            notify_urls=split_urls(secret_from_env(env, "NOTIFY_URLS")),
            notify_on=(get("NOTIFY_ON") or "failure").lower(),
            stale_after=parse_duration(
                get("STALE_AFTER"), default=DEFAULT_STALE_AFTER, variable=ENV_PREFIX + "STALE_AFTER"
            ),
            first_backup_delay=parse_duration(
                get("FIRST_BACKUP_DELAY"),
                default=DEFAULT_FIRST_BACKUP_DELAY,
                variable=ENV_PREFIX + "FIRST_BACKUP_DELAY",
            ),
            log_level=(get("LOG_LEVEL") or "INFO").upper(),
            log_format=(get("LOG_FORMAT") or "text").lower(),
            token=secret_from_env(env, "TOKEN"),
            read_token=secret_from_env(env, "READ_TOKEN"),
            insecure=parse_bool(get("INSECURE"), default=False, variable=ENV_PREFIX + "INSECURE"),
            tls_cert=Path(p) if (p := get("TLS_CERT")) else None,
            tls_key=Path(p) if (p := get("TLS_KEY")) else None,
            tls_client_ca=Path(p) if (p := get("TLS_CLIENT_CA")) else None,
            s3_url=get("S3_URL"),
            s3_endpoint=get("S3_ENDPOINT"),
            s3_keep=parse_int(s3_keep, default=0, variable=ENV_PREFIX + "S3_KEEP")
            if (s3_keep := get("S3_KEEP"))
            else None,
            age_recipients=tuple(r.strip() for r in (get("AGE_RECIPIENTS") or "").split(",") if r.strip()),
            age_recipients_file=Path(p) if (p := get("AGE_RECIPIENTS_FILE")) else None,
            age_identity_file=Path(p) if (p := get("AGE_IDENTITY_FILE")) else None,
        )
        config.validate()
        return config


def _server_or(value: str | None, default: str) -> str:
    """A setting that may say 'server' (leave PostgreSQL's own): '' then."""
    if value is None:
        return default
    return "" if value.lower() == "server" else value


def secret_from_env(env: Mapping[str, str], name: str) -> str | None:
    """A secret from `APERTURE_BACKUP_<name>`, or read from the file `APERTURE_BACKUP_<name>_FILE` names
    (as Docker and Kubernetes secrets provide it; one trailing newline ignored). Setting both is refused:
    which one wins would be a guess."""
    variable, file_variable = ENV_PREFIX + name, ENV_PREFIX + name + "_FILE"
    value, path = env.get(variable) or None, (env.get(file_variable) or "").strip() or None
    if value is not None and path is not None:
        raise ConfigError(f"both {variable} and {file_variable} are set; set only one")
    if path is not None:
        return read_secret_file(Path(path), variable=file_variable)
    return value


def read_secret_file(path: Path, *, variable: str) -> str:
    """The secret a file holds, without its trailing newline."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise ConfigError(f"{variable} names {path}, which cannot be read: {reason}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ConfigError(f"{variable} names {path}, which is empty")
    return secret


def check_token(token: str, *, variable: str) -> None:
    """A token must be long enough not to be guessed and sendable as a gRPC metadata value (visible ASCII);
    the message never repeats it."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{variable} is {len(token)} characters long; tokens need at least {MIN_TOKEN_LENGTH} "
            "(make one with `openssl rand -hex 32`)"
        )
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(
            f"{variable} contains spaces, control or non-ASCII characters, which cannot travel in a gRPC "
            "header; use letters, digits and punctuation (for example `openssl rand -hex 32`)"
        )


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable only from this machine. Host names other than localhost count as
    reachable from outside: what they resolve to can change."""
    name = host.strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_hhmm(value: str, *, variable: str) -> time:
    """Parse a 24-hour "HH:MM" time of day."""
    match = _HHMM.match(value.strip())
    if not match:
        raise ConfigError(f'{variable} must be a time of day "HH:MM" (24-hour clock), got {value!r}')
    return time(int(match.group(1)), int(match.group(2)))


@functools.cache
def known_time_zones() -> frozenset[str]:
    """Zone names both zoneinfo and the scheduler's pytz know. This leaves out names that are files of the
    zone database but not zones a schedule can use (`right/UTC`, `posix/...`, `localtime`, `Factory`,
    `posixrules`), which zoneinfo opens but pytz refuses."""
    return frozenset(available_timezones() & pytz.all_timezones_set)


def parse_time_zone(value: str, *, variable: str) -> ZoneInfo:
    """Parse an IANA time zone name such as "Europe/Berlin". The name is checked against the known names
    before anything opens a file by it, so no input reaches the file system."""
    if value not in known_time_zones():
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise ConfigError(f'{variable} must be an IANA time zone such as "Europe/Berlin", got {shown!r}')
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(f'{variable} must be an IANA time zone such as "Europe/Berlin", got {value!r}') from None


def parse_int(value: str | None, *, default: int, variable: str) -> int:
    """Parse a whole number, or return the default when unset."""
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{variable} must be a whole number, got {value!r}") from None


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | None, *, default: float | None, variable: str) -> float | None:
    """Parse "26h", "90m", "2d", "30s" or a number of seconds; "off" gives None. The default when unset."""
    if value is None:
        return default
    if value.lower() in {"off", "none", "disabled"}:
        return None
    match = _DURATION.match(value.strip().lower())
    if not match:
        raise ConfigError(f'{variable} must be a duration such as "26h", "90m", "2d" or "30s", or off; got {value!r}')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def split_urls(value: str | None) -> tuple[str, ...]:
    """Notification URLs, separated by commas or line breaks (a file may hold one a line; `#` starts a comment
    line there)."""
    if value is None:
        return ()
    pieces = [p.strip() for line in value.splitlines() if not line.strip().startswith("#") for p in line.split(",")]
    return tuple(p for p in pieces if p)


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


def parse_listen(value: str, *, variable: str = ENV_PREFIX + "LISTEN") -> tuple[str, int]:
    """Split "host:port" (IPv6 hosts in brackets) and check the port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f'{variable} must be "host:port", for example "0.0.0.0:50051", got {value!r}')
    return host, int(port_text)


def _redact(message: str) -> str:
    """libpq error messages can echo the connection string or quote the piece they could not parse (which
    may be the password); never let either through."""
    message = re.sub(r"(password\s*=\s*|://[^:/@]*:)[^@\s]*", r"\1***", message)
    return re.sub(r'"[^"]*"', '"***"', message)


def has_password(conninfo: str) -> bool:
    """Whether a connection string carries a password (for the warning about command lines)."""
    try:
        return bool(psycopg.conninfo.conninfo_to_dict(conninfo).get("password"))
    except psycopg.ProgrammingError:
        return "@" in conninfo or "password" in conninfo

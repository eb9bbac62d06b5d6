"""The `aperture-backup` command: `serve` runs the service; the other commands (cli_client.py) are a client
for administrators and their scripts (the same calls grpcurl makes, with progress bars, tables, --json
and distinct exit codes)."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cli_client, logs, memory
from .config import Config, ConfigError, has_password, parse_bool, parse_hhmm, read_secret_file

_logger = logging.getLogger(__name__)


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the gRPC service (flags override APERTURE_BACKUP_* variables)")
    serve.add_argument(
        "--database-url",
        help="libpq URI of the database; a password here shows in `ps`, so prefer APERTURE_BACKUP_DATABASE_URL "
        "or a file named by APERTURE_BACKUP_DATABASE_URL_FILE",
    )
    serve.add_argument("--dir", type=Path, help="backup directory (APERTURE_BACKUP_DIR)")
    serve.add_argument("--listen", help="host:port to listen on (APERTURE_BACKUP_LISTEN)")
    serve.add_argument("--schedule", help='daily time "HH:MM" or "off" (APERTURE_BACKUP_SCHEDULE)')
    serve.add_argument("--time-zone", help="IANA time zone of the schedule (TZ)")
    serve.add_argument("--keep", type=int, help="retention: keep the newest N backups (APERTURE_BACKUP_KEEP)")
    for period, unit in (("daily", "days"), ("weekly", "weeks"), ("monthly", "months")):
        serve.add_argument(
            f"--keep-{period}",
            type=int,
            help=f"retention: also keep the newest backup of each of the last N {unit} "
            f"(APERTURE_BACKUP_KEEP_{period.upper()})",
        )
    serve.add_argument("--verify", help="verify the newest backup after a scheduled one: weekly, daily, off")
    serve.add_argument("--catch-up", help="run a missed daily backup after start-up: true/false")
    serve.add_argument("--pg-bin-dir", type=Path, help="directory with pg_dump/pg_restore/psql")
    serve.add_argument("--token-file", type=Path, help="file holding the admin token (APERTURE_BACKUP_TOKEN_FILE)")
    serve.add_argument(
        "--read-token-file", type=Path, help="file holding the read-only token (APERTURE_BACKUP_READ_TOKEN_FILE)"
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS (APERTURE_BACKUP_TLS_CERT)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert (APERTURE_BACKUP_TLS_KEY)")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA: require client certificates it signed (APERTURE_BACKUP_TLS_CLIENT_CA)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback address without any token (APERTURE_BACKUP_INSECURE)",
    )
    # Encryption at rest (age).
    serve.add_argument(
        "--age-recipient",
        action="append",
        help="encrypt new archives to this age public key, repeatable (APERTURE_BACKUP_AGE_RECIPIENTS)",
    )
    serve.add_argument(
        "--age-recipients-file", type=Path, help="file of age public keys (APERTURE_BACKUP_AGE_RECIPIENTS_FILE)"
    )
    serve.add_argument(
        "--age-identity-file",
        type=Path,
        help="age identity that decrypts archives to restore them (APERTURE_BACKUP_AGE_IDENTITY_FILE)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    config = Config.from_env()
    changes: dict[str, object] = {}
    if args.database_url:
        changes["database_url"] = args.database_url
    if args.dir:
        changes["backup_dir"] = args.dir
    if args.listen:
        changes["listen"] = args.listen
    if args.schedule:
        if args.schedule.lower() in {"off", "disabled", "none"}:
            changes["schedule_enabled"] = False
        else:
            changes["schedule_time"] = parse_hhmm(args.schedule, variable="--schedule")
            changes["schedule_enabled"] = True
    if args.time_zone:
        changes["time_zone"] = args.time_zone
    if args.keep is not None:
        changes["keep"] = args.keep
    for period in ("daily", "weekly", "monthly"):
        if getattr(args, f"keep_{period}") is not None:
            changes[f"keep_{period}"] = getattr(args, f"keep_{period}")
    if args.verify:
        changes["verify"] = args.verify.lower()
    if args.catch_up is not None:
        changes["catch_up"] = parse_bool(args.catch_up, default=True, variable="--catch-up")
    if args.pg_bin_dir:
        changes["pg_bin_dir"] = args.pg_bin_dir
    if args.token_file:
        changes["token"] = read_secret_file(args.token_file, variable="--token-file")
    if args.read_token_file:
        changes["read_token"] = read_secret_file(args.read_token_file, variable="--read-token-file")
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, flag):
            changes[flag] = getattr(args, flag)
    if args.insecure:
        changes["insecure"] = True
    if args.age_recipient:
        changes["age_recipients"] = tuple(args.age_recipient)
    if args.age_recipients_file:
        changes["age_recipients_file"] = args.age_recipients_file
    if args.age_identity_file:
        changes["age_identity_file"] = args.age_identity_file
    return config.with_overrides(**changes) if changes else config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aperture-backup",
        description=__doc__,
        epilog=cli_client.EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aperture-backup {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    cli_client.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command != "serve":
        return cli_client.run(args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"aperture-backup: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    if args.database_url and has_password(args.database_url):
        _logger.warning(
            "--database-url carries a password, which every user of this machine can read with `ps`; "
            "pass it in APERTURE_BACKUP_DATABASE_URL or a file named by APERTURE_BACKUP_DATABASE_URL_FILE"
        )
    memory.limit_malloc_arenas()  # before the server starts its threads
    from .server import serve

    try:
        serve(config)
    except ConfigError as exc:  # the TLS files are read as the server starts
        print(f"aperture-backup: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aperture-backup: {exc}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("aperture-backup")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())

"""The `aperture-backup` command: `serve` runs the service; the other commands are a small client for
administrators (the same calls grpcurl makes, with friendlier output)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from . import logs, memory
from .config import Config, ConfigError, parse_bool, parse_hhmm

if TYPE_CHECKING:
    from aperture_backup_client import BackupClient, pb

_logger = logging.getLogger(__name__)


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the gRPC service (flags override APERTURE_BACKUP_* variables)")
    serve.add_argument("--database-url", help="libpq URI of the database (APERTURE_BACKUP_DATABASE_URL)")
    serve.add_argument("--dir", type=Path, help="backup directory (APERTURE_BACKUP_DIR)")
    serve.add_argument("--listen", help="host:port to listen on (APERTURE_BACKUP_LISTEN)")
    serve.add_argument("--schedule", help='daily time "HH:MM" or "off" (APERTURE_BACKUP_SCHEDULE)')
    serve.add_argument("--time-zone", help="IANA time zone of the schedule (TZ)")
    serve.add_argument("--keep", type=int, help="retention: keep the newest N backups (APERTURE_BACKUP_KEEP)")
    serve.add_argument("--catch-up", help="run a missed daily backup after start-up: true/false")
    serve.add_argument("--pg-bin-dir", type=Path, help="directory with pg_dump/pg_restore/psql")
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
    if args.catch_up is not None:
        changes["catch_up"] = parse_bool(args.catch_up, default=True, variable="--catch-up")
    if args.pg_bin_dir:
        changes["pg_bin_dir"] = args.pg_bin_dir
    if args.age_recipient:
        changes["age_recipients"] = tuple(args.age_recipient)
    if args.age_recipients_file:
        changes["age_recipients_file"] = args.age_recipients_file
    if args.age_identity_file:
        changes["age_identity_file"] = args.age_identity_file
    return config.with_overrides(**changes) if changes else config


def _print(message: object) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))  # type: ignore[arg-type]


def _client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, help_text in [
        ("create", "make a backup now"),
        ("list", "list backups, newest first"),
        ("get", "show one backup"),
        ("delete", "delete one backup"),
        ("status", "last backup, next scheduled run, running job"),
        ("retention", "show or set retention (--keep N)"),
        ("health", "exit 0 when the service reports SERVING (for container health checks)"),
        ("download", "save a backup's archive to a file, checking its SHA-256 (--resume continues a partial file)"),
        ("upload", "upload an archive, store it as a backup and, with --restore, restore it"),
        ("restore", "restore a stored backup into the database (a safety backup is taken first)"),
    ]:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--server", default="127.0.0.1:50051", help="host:port of the service")
        if name in {"get", "delete"}:
            cmd.add_argument("id")
        if name == "create":
            cmd.add_argument("--format", choices=["plain", "custom"], default="plain")
            cmd.add_argument("--compression", choices=["gzip", "zstd", "none"], default=None)
        if name == "retention":
            cmd.add_argument("--keep", type=int)
        if name in {"download", "restore"}:
            cmd.add_argument("id")
        if name == "download":
            cmd.add_argument("-o", "--output", type=Path, help="file to write (default: the backup's id, here)")
            cmd.add_argument("--resume", action="store_true", help="continue a partial file instead of starting over")
        if name == "upload":
            cmd.add_argument("path", type=Path)
            cmd.add_argument("--restore", action="store_true", help="restore the archive once it is stored")
        if name in {"upload", "restore"}:
            cmd.add_argument("--skip-safety-backup", action="store_true", help="do not take a safety backup first")


def run_health(server: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if serving else 1


def run_client(args: argparse.Namespace) -> int:
    from aperture_backup_client import BackupClient, pb

    if args.command == "health":
        return run_health(args.server)

    with BackupClient(args.server) as client:
        if args.command == "create":
            fmt = pb.BACKUP_FORMAT_CUSTOM if args.format == "custom" else pb.BACKUP_FORMAT_PLAIN
            compression = {
                None: pb.COMPRESSION_UNSPECIFIED,
                "gzip": pb.COMPRESSION_GZIP,
                "zstd": pb.COMPRESSION_ZSTD,
                "none": pb.COMPRESSION_NONE,
            }[args.compression]

            def show(message: pb.CreateResponse) -> None:
                p = message.progress
                print(
                    f"\r{pb.Phase.Name(p.phase)} {p.bytes_done / 1e6:.1f} MB, tables {p.tables_done}/{p.tables_total}",
                    end="",
                    file=sys.stderr,
                )

            backup = client.create(format=fmt, compression=compression, on_progress=show)
            print(file=sys.stderr)
            _print(backup)
        elif args.command == "list":
            for backup in client.list():
                print(f"{backup.id}\t{pb.BackupState.Name(backup.state)}\t{backup.size_bytes}")
        elif args.command == "get":
            _print(client.get(args.id))
        elif args.command == "delete":
            _print(client.delete(args.id))
        elif args.command == "status":
            _print(client.status())
        elif args.command == "retention":
            _print(client.set_retention(args.keep) if args.keep is not None else client.get_retention())
        elif args.command in {"download", "upload", "restore"}:
            return run_transfer(client, args)
    return 0


def _show_progress(progress: pb.Progress) -> None:
    from aperture_backup_client import pb

    total = f"/{progress.bytes_total / 1e6:.1f}" if progress.bytes_total else ""
    print(f"\r{pb.Phase.Name(progress.phase)} {progress.bytes_done / 1e6:.1f}{total} MB   ", end="", file=sys.stderr)


def run_transfer(client: BackupClient, args: argparse.Namespace) -> int:
    """download, upload and restore: long calls that show their progress on stderr."""
    from aperture_backup_client import ChecksumMismatch, TransferError, pb

    if args.command == "download":
        output: Path = args.output or Path(args.id)
        offset = output.stat().st_size if args.resume and output.exists() else 0
        try:
            backup = client.download(args.id, output, offset=offset)
        except (ChecksumMismatch, TransferError) as exc:
            print(f"aperture-backup: {exc}", file=sys.stderr)
            return 1
        print(f"{output}: {backup.size_bytes} bytes, SHA-256 {backup.sha256} (verified)", file=sys.stderr)
        return 0
    if args.command == "upload":
        last = client.upload(
            args.path,
            restore=args.restore,
            skip_safety_backup=args.skip_safety_backup,
            on_progress=lambda message: _show_progress(message.progress),
        )
        print(file=sys.stderr)
        _print(last)
        return 0
    final: pb.RestoreResponse | None = None
    for message in client.stub.Restore(pb.RestoreRequest(id=args.id, skip_safety_backup=args.skip_safety_backup)):
        _show_progress(message.progress)
        final = message
    print(file=sys.stderr)
    if final is not None:
        _print(final.result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aperture-backup", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config = config_from_args(args)
        except ConfigError as exc:
            print(f"aperture-backup: configuration error: {exc}", file=sys.stderr)
            return 2
        logs.configure(config.log_level, config.log_format)
        memory.limit_malloc_arenas()  # before the server starts its threads
        from .server import serve

        serve(config)
        return 0
    try:
        return run_client(args)
    except grpc.RpcError as exc:
        print(f"aperture-backup: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

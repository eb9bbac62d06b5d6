"""The `aperture-backup` command: `serve` runs the service; the other commands are a small client for
administrators (the same calls grpcurl makes, with friendlier output)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from . import logs, memory
from .config import (
    ENV_PREFIX,
    Config,
    ConfigError,
    has_password,
    parse_bool,
    parse_hhmm,
    read_secret_file,
    secret_from_env,
)

if TYPE_CHECKING:
    from aperture_backup_client import BackupClient, ChannelSettings, pb

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
    if args.token_file:
        changes["token"] = read_secret_file(args.token_file, variable="--token-file")
    if args.read_token_file:
        changes["read_token"] = read_secret_file(args.read_token_file, variable="--read-token-file")
    for flag in ("tls_cert", "tls_key", "tls_client_ca"):
        if getattr(args, flag):
            changes[flag] = getattr(args, flag)
    if args.insecure:
        changes["insecure"] = True
    return config.with_overrides(**changes) if changes else config


def _print(message: object) -> None:
    print(json.dumps(json_format.MessageToDict(message), indent=2))  # type: ignore[arg-type]


def _connection_options() -> argparse.ArgumentParser:
    """How the client commands reach the service: flags, or the same APERTURE_BACKUP_* variables."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=os.environ.get(ENV_PREFIX + "ADDRESS") or "127.0.0.1:50051",
        help="host:port of the service (APERTURE_BACKUP_ADDRESS; default 127.0.0.1:50051)",
    )
    group.add_argument("--token", help="bearer token; prefer --token-file (APERTURE_BACKUP_TOKEN)")
    group.add_argument("--token-file", type=Path, help="file holding the token (APERTURE_BACKUP_TOKEN_FILE)")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    group.add_argument("--ca-cert", type=Path, help="PEM CA that signed the server's certificate; implies TLS")
    group.add_argument("--client-cert", type=Path, help="PEM client certificate for mutual TLS")
    group.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    group.add_argument("--tls-server-name", help="name the server's certificate must carry, if not the host")
    return common


def connection_settings(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ChannelSettings:
    """BackupClient's keyword arguments from flags, falling back to the environment."""
    from aperture_backup_client import ChannelSettings

    env = os.environ if env is None else env
    if args.token is not None and args.token_file is not None:
        raise ConfigError("pass --token or --token-file, not both")
    if args.token_file is not None:
        token: str | None = read_secret_file(args.token_file, variable="--token-file")
    elif args.token is not None:
        token = args.token
    else:
        token = secret_from_env(env, "TOKEN")

    def path(flag: Path | None, variable: str) -> Path | None:
        value = flag or (Path(v) if (v := env.get(ENV_PREFIX + variable, "").strip()) else None)
        if value is not None and not value.is_file():
            name = f"--{variable.lower().replace('_', '-')}" if flag else ENV_PREFIX + variable
            raise ConfigError(f"{name} names {value}, which is not a readable file")
        return value

    return ChannelSettings(
        token=token,
        tls=args.tls,
        ca_cert=path(args.ca_cert, "CA_CERT"),
        client_cert=path(args.client_cert, "CLIENT_CERT"),
        client_key=path(args.client_key, "CLIENT_KEY"),
        server_name=args.tls_server_name or env.get(ENV_PREFIX + "TLS_SERVER_NAME") or None,
    )


def _client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = _connection_options()
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
        ("cancel", "stop the running backup or restore (by its backup id; default: whatever runs now)"),
    ]:
        cmd = sub.add_parser(name, help=help_text, parents=[common])
        if name in {"get", "delete"}:
            cmd.add_argument("id")
        if name == "create":
            cmd.add_argument("--format", choices=["plain", "custom"], default="plain")
            cmd.add_argument("--compression", choices=["gzip", "zstd", "none"], default=None)
        if name == "retention":
            cmd.add_argument("--keep", type=int)
        if name in {"download", "restore"}:
            cmd.add_argument("id")
        if name == "cancel":
            cmd.add_argument("id", nargs="?", help="the backup being made or restored (GetStatus shows it)")
        if name == "download":
            cmd.add_argument("-o", "--output", type=Path, help="file to write (default: the backup's id, here)")
            cmd.add_argument("--resume", action="store_true", help="continue a partial file instead of starting over")
        if name == "upload":
            cmd.add_argument("path", type=Path)
            cmd.add_argument("--restore", action="store_true", help="restore the archive once it is stored")
        if name in {"upload", "restore"}:
            cmd.add_argument("--skip-safety-backup", action="store_true", help="do not take a safety backup first")


def run_health(server: str, settings: ChannelSettings) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from aperture_backup_client import open_channel

    with open_channel(server, **settings) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return 0 if serving else 1


def run_client(args: argparse.Namespace) -> int:
    from aperture_backup_client import BackupClient, pb

    settings = connection_settings(args)
    if args.command == "health":
        return run_health(args.server, settings)

    with BackupClient(args.server, **settings) as client:
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
        elif args.command == "cancel":
            backup_id = args.id or client.status().current_job.backup_id
            if not backup_id:
                print("aperture-backup: no backup or restore is running", file=sys.stderr)
                return 1
            response = client.cancel(backup_id)
            print(f"{'stopped' if response.stopped else 'stopping'}: {backup_id}", file=sys.stderr)
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
    try:
        return run_client(args)
    except ConfigError as exc:
        print(f"aperture-backup: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"aperture-backup: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

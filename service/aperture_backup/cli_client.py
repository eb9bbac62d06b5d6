"""The client commands of `aperture-backup`: what an administrator (or a script) does with a running
service. Humans get progress bars and tables on a terminal; scripts get `--json` (one JSON document, or
JSON lines for streams, with the API's field names) and exit codes that tell outcomes apart."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from .config import ENV_PREFIX, ConfigError, parse_hhmm, parse_listen, read_secret_file, secret_from_env

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

    from aperture_backup_client import BackupClient, ChannelSettings, pb

# -- exit codes ------------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5
EXIT_DENIED = 6
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the server failed (or a download did not match its checksum, or a backup failed verification)
  2    usage error: bad arguments or configuration, a file that cannot be read, a refused confirmation
  3    not found: no backup with that id
  4    refused: another job runs, the backup is in use or not ready, no room, cancelled
  5    the server cannot be reached (or did not answer in time)
  6    not allowed: no token, a wrong token, or a read-only token for a change
  130  interrupted (Ctrl-C)"""

_STATUS_EXIT = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_USAGE,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.ABORTED: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNREACHABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
}


def exit_code(code: grpc.StatusCode) -> int:
    return _STATUS_EXIT.get(code, EXIT_FAILED)


class UsageError(Exception):
    """A mistake of the caller's that the CLI finds itself (exit code 2)."""


# -- words for people ----------------------------------------------------------------------------------------

_PHASE_WORDS = {
    "PHASE_PREPARING": "preparing",
    "PHASE_DUMPING": "dumping",
    "PHASE_FINALIZING": "finishing the archive",
    "PHASE_UPLOADING": "uploading",
    "PHASE_VERIFYING": "checking the archive",
    "PHASE_SAFETY_BACKUP": "safety backup",
    "PHASE_RESTORING": "restoring",
    "PHASE_DONE": "done",
    "PHASE_CHECKING": "checking the restored copy",
}


def phase_words(progress: pb.Progress) -> str:
    from aperture_backup_client import pb

    words = _PHASE_WORDS.get(pb.Phase.Name(progress.phase), "working")
    return f"{words}: {progress.message}" if progress.message else words


def human_size(size: int) -> str:
    if size >= 1024**3:
        return f"{size / 1024**3:.2f} GB"
    if size >= 1024**2:
        return f"{size / 1024**2:.1f} MB"
    if size >= 1024:
        return f"{size / 1024:.0f} kB"
    return f"{size} B"


def local_time(timestamp: Any) -> str:
    """A protobuf Timestamp as local time, minutes precision."""
    when: datetime = timestamp.ToDatetime(tzinfo=UTC)
    return when.astimezone().strftime("%Y-%m-%d %H:%M")


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", "-")


# -- output ------------------------------------------------------------------------------------------------------


class Output:
    """Where results go: JSON for scripts, words and tables for people; progress on stderr only on a
    terminal (elsewhere the final line says it all)."""

    def __init__(self, *, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.as_json = as_json
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stderr.isatty() and not as_json

    def document(self, message: Message | Mapping[str, Any]) -> None:
        """One JSON document (--json)."""
        data = message if isinstance(message, Mapping) else json_format.MessageToDict(message)
        self.stdout.write(json.dumps(data, indent=2) + "\n")

    def line(self, message: Message) -> None:
        """One JSON line of a stream (--json)."""
        self.stdout.write(json.dumps(json_format.MessageToDict(message), separators=(",", ":")) + "\n")
        self.stdout.flush()

    def table(self, rows: Sequence[Sequence[str]]) -> None:
        """Rows of cells in aligned columns; the last column runs free (messages, errors)."""
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            self.text("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])

    def text(self, text: str) -> None:
        self.stdout.write(text + "\n")

    def note(self, text: str) -> None:
        self.stderr.write(text + "\n")

    @contextlib.contextmanager
    def progress(self, title: str) -> Iterator[Callable[[pb.Progress], None]]:
        """A live progress bar on a terminal: phase in words, bytes, rate and, where the total is known,
        the time left. Off a terminal, nothing until the command's final line."""
        if not self.interactive:
            yield lambda progress: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar: RichProgress = Progress(
            TextColumn("[bold]{task.fields[title]}[/]"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[phase]}"),
            console=Console(file=self.stderr),
            transient=True,
        )
        with bar:
            task = bar.add_task(title, total=None, title=title, phase="starting")

            def update(progress: pb.Progress) -> None:
                total = progress.bytes_total or None
                bar.update(task, completed=progress.bytes_done, total=total, phase=phase_words(progress))

            yield update


# -- the commands ------------------------------------------------------------------------------------------------


DEFAULT_ADDRESS = "127.0.0.1:50051"


def default_address(env: Mapping[str, str]) -> str:
    """Where the client commands go without --server: APERTURE_BACKUP_ADDRESS, else the service this
    environment configures (APERTURE_BACKUP_LISTEN, reached over loopback when it listens on every
    address), so that `aperture-backup health` in the image follows a changed port."""
    if address := env.get(ENV_PREFIX + "ADDRESS", "").strip():
        return address
    try:
        host, port = parse_listen(env.get(ENV_PREFIX + "LISTEN", "").strip())
    except ConfigError:  # unset or malformed: the service would not start on it either
        return DEFAULT_ADDRESS
    if port == 0:
        return DEFAULT_ADDRESS
    with contextlib.suppress(ValueError):
        listening = ipaddress.ip_address(host.strip("[]"))
        if listening.is_unspecified:  # every address: this machine's loopback of the same family
            host = "127.0.0.1" if listening.version == 4 else "[::1]"
    return f"{host}:{port}"


def connection_options() -> argparse.ArgumentParser:
    """How the client commands reach the service: flags, or the same APERTURE_BACKUP_* variables."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output (JSON; JSON lines for streams)")
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server",
        default=default_address(os.environ),
        help=f"host:port of the service (APERTURE_BACKUP_ADDRESS; else the port of APERTURE_BACKUP_LISTEN on "
        f"loopback; default {DEFAULT_ADDRESS})",
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


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = connection_options()

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    cmd = command("create", "make a backup now")
    cmd.add_argument("--format", choices=["plain", "custom"], default="plain")
    cmd.add_argument("--compression", choices=["gzip", "zstd", "none"], default=None)
    command("list", "list backups, newest first")
    command("get", "show one backup").add_argument("id")
    cmd = command("delete", "delete one backup (asks first on a terminal)")
    cmd.add_argument("id")
    cmd.add_argument("-y", "--yes", action="store_true", help="do not ask")
    command("status", "last backup, next scheduled run, running job")
    cmd = command("jobs", "the last jobs that ended: what, started by whom, when, how long, how it ended")
    cmd.add_argument("-n", "--limit", type=int, default=20, help="show the newest N jobs (default 20; 0: all)")
    cmd = command("retention", "show or set which backups to keep (rules not given keep their value)")
    cmd.add_argument("--keep", type=int, help="keep the newest N backups")
    cmd.add_argument("--daily", type=int, help="keep the newest backup of each of the last N days")
    cmd.add_argument("--weekly", type=int, help="keep the newest backup of each of the last N weeks")
    cmd.add_argument("--monthly", type=int, help="keep the newest backup of each of the last N months")
    cmd.add_argument("--dry-run", action="store_true", help="only say what --keep would delete")
    cmd.add_argument("-y", "--yes", action="store_true", help="do not ask before deleting")
    cmd = command("schedule", "show or change the daily backup")
    cmd.add_argument("time", nargs="?", help='time of day "HH:MM" (turns the schedule on)')
    cmd.add_argument("--tz", help='IANA time zone, e.g. "Europe/Berlin"')
    cmd.add_argument("--off", action="store_true", help="no daily backup")
    cmd.add_argument("--on", action="store_true", help="daily backup at the time set")
    command("health", "exit 0 when the service reports SERVING (for container health checks)")
    cmd = command("download", "save a backup's archive to a file, checking size and SHA-256")
    cmd.add_argument("id")
    cmd.add_argument("-o", "--output", type=Path, help="file to write (default: the backup's id, here)")
    cmd.add_argument("--resume", action="store_true", help="continue the partial download (FILE.part)")
    cmd = command("upload", "upload an archive and store it as a backup; --restore also restores it")
    cmd.add_argument("path", type=Path)
    cmd.add_argument("--restore", action="store_true", help="restore the archive once it is stored")
    cmd.add_argument("--skip-safety-backup", action="store_true", help="do not take a safety backup first")
    cmd.add_argument("-y", "--yes", action="store_true", help="do not ask before replacing the database")
    cmd = command("restore", "replace the database with a stored backup (a safety backup is taken first)")
    cmd.add_argument("id")
    cmd.add_argument("--skip-safety-backup", action="store_true", help="do not take a safety backup first")
    cmd.add_argument("-y", "--yes", action="store_true", help="do not ask before replacing the database")
    cmd = command("verify", "restore a backup into a scratch database and check it (the live one is untouched)")
    cmd.add_argument("id", nargs="?", default="", help="the backup to verify (default: the newest READY one)")
    cmd = command("pin", "keep a backup from retention")
    cmd.add_argument("id")
    cmd.add_argument("--for", dest="ttl", help='how long, e.g. "12h", "30d", "2w" (default: until unpin)')
    command("unpin", "let retention delete a pinned backup again").add_argument("id")
    cmd = command("cancel", "stop the running backup or restore")
    cmd.add_argument("id", nargs="?", help="the backup being made or restored (default: whatever runs now)")


def run(args: argparse.Namespace, out: Output | None = None) -> int:
    """Run one client command; returns the exit code. Errors a person can fix become a message and an exit
    code, never a traceback."""
    out = out or Output(as_json=args.json)
    try:
        result = _dispatch(args, out)
        out.stdout.flush()  # here, where a closed pipe can still be answered quietly
        return result
    except grpc.RpcError as exc:
        code = exc.code()
        out.note(f"aperture-backup: {_status_words(code)}: {exc.details()}")
        return exit_code(code)
    except (ConfigError, UsageError) as exc:
        out.note(f"aperture-backup: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command in {"create", "restore", "upload", "verify"}:
            out.note(
                "aperture-backup: interrupted. The service goes on with the job on its own; "
                "`aperture-backup status` shows it, `aperture-backup cancel` stops it"
            )
        else:
            out.note("aperture-backup: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `aperture-backup list | head`: the reader has all it wanted.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit flush quiet
        return EXIT_OK


def _status_words(code: grpc.StatusCode) -> str:
    return {
        grpc.StatusCode.UNAVAILABLE: "the server cannot be reached",
        grpc.StatusCode.UNAUTHENTICATED: "not allowed",
        grpc.StatusCode.PERMISSION_DENIED: "not allowed",
    }.get(code, code.name)


def _dispatch(args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import BackupClient

    settings = connection_settings(args)
    if args.command == "health":
        return _health(args.server, settings, out)
    if args.command == "upload":
        _check_readable(args.path)
    with BackupClient(args.server, **settings) as client:
        handler: Callable[[BackupClient, argparse.Namespace, Output], int] = _HANDLERS[args.command]
        return handler(client, args, out)


def _check_readable(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{path} is a directory; upload takes an archive file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _confirm(out: Output, question: str, *, yes: bool) -> None:
    """Ask on a terminal; without one, refuse unless --yes: a script must say what it means."""
    if yes:
        return
    if not (sys.stdin.isatty() and out.stderr.isatty()):
        raise UsageError(f"{question.rstrip('?')}: refused without a terminal to ask on; pass --yes to do it")
    out.stderr.write(f"{question} [y/N] ")
    out.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in {"y", "yes"}:
        raise UsageError("not confirmed; nothing was changed")


def _health(server: str, settings: ChannelSettings, out: Output) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from aperture_backup_client import open_channel

    with open_channel(server, **settings) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    if out.as_json:
        out.document(response)
    else:
        out.text(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    return EXIT_OK if serving else EXIT_FAILED


def _describe(backup: pb.Backup) -> str:
    from aperture_backup_client import pb

    return (
        f"{backup.id} ({human_size(backup.size_bytes)}, {local_time(backup.create_time)}, "
        f"{_name(pb.BackupTrigger, backup.trigger, 'BACKUP_TRIGGER_')})"
    )


def _create(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import pb

    fmt = pb.BACKUP_FORMAT_CUSTOM if args.format == "custom" else pb.BACKUP_FORMAT_PLAIN
    compression = {
        None: pb.COMPRESSION_UNSPECIFIED,
        "gzip": pb.COMPRESSION_GZIP,
        "zstd": pb.COMPRESSION_ZSTD,
        "none": pb.COMPRESSION_NONE,
    }[args.compression]
    with out.progress("backup") as show:

        def on_message(message: pb.CreateResponse) -> None:
            if out.as_json:
                out.line(message)
            show(message.progress)

        backup = client.create(format=fmt, compression=compression, on_progress=on_message)
    if not out.as_json:
        seconds = backup.duration.ToTimedelta().total_seconds()
        out.text(f"{backup.id}: READY, {human_size(backup.size_bytes)} in {seconds:.1f} s")
    return EXIT_OK


def _list(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import pb

    backups = list(client.list())
    if out.as_json:
        out.document({"backups": [json_format.MessageToDict(b) for b in backups]})
        return EXIT_OK
    if not backups:
        out.note("no backups yet (aperture-backup create makes one)")
        return EXIT_OK
    rows = [("ID", "CREATED", "SIZE", "FORMAT", "TRIGGER", "STATE", "WHERE", "ERROR")]
    for b in backups:
        kind = _name(pb.BackupFormat, b.format, "BACKUP_FORMAT_")
        if b.compression not in (pb.COMPRESSION_NONE, pb.COMPRESSION_UNSPECIFIED):
            kind += "+" + _name(pb.Compression, b.compression, "COMPRESSION_")
        state = _name(pb.BackupState, b.state, "BACKUP_STATE_").upper()
        if b.pinned:
            state += " pinned"
        if b.verify_result == pb.VERIFY_RESULT_PASSED:
            state += " verified"
        elif b.verify_result == pb.VERIFY_RESULT_FAILED:
            state += f" VERIFY-FAILED({b.verify_failed_check})"
        rows.append(
            (
                b.id,
                local_time(b.create_time),
                human_size(b.size_bytes) if b.state == pb.BACKUP_STATE_READY else "-",
                kind,
                _name(pb.BackupTrigger, b.trigger, "BACKUP_TRIGGER_"),
                state,
                _where(b) or "-",
                b.error if b.state == pb.BACKUP_STATE_FAILED else "",
            )
        )
    out.table(rows)
    return EXIT_OK


def _where(backup: pb.Backup) -> str:
    """Where copies are: "local", "bucket" or "local+bucket"."""
    from aperture_backup_client import pb

    return "+".join(_name(pb.StorageLocation, where, "STORAGE_LOCATION_") for where in backup.locations)


def _get(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    backup = client.get(args.id)
    if out.as_json:
        out.document(backup)
    else:
        for key, value in json_format.MessageToDict(backup).items():
            out.text(f"{key}: {value}")
    return EXIT_OK


def _delete(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    backup = client.get(args.id)
    _confirm(out, f"Delete the backup {_describe(backup)}?", yes=args.yes)
    deleted = client.delete(args.id)
    if out.as_json:
        out.document(deleted)
    else:
        out.text(f"deleted {deleted.id}" + (f" ({_where(deleted)})" if deleted.locations else ""))
    return EXIT_OK


def _status(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import pb

    status = client.status()
    if out.as_json:
        out.document(status)
        return EXIT_OK
    out.text(f"database: {status.database} ({'reachable' if status.database_reachable else 'NOT reachable'})")
    if status.HasField("last_successful_backup"):
        age = status.last_successful_age.ToTimedelta()
        out.text(f"last backup: {_describe(status.last_successful_backup)}, {age.total_seconds() / 3600:.1f} h ago")
    else:
        out.text("last backup: none")
    if status.HasField("last_failed_backup"):
        out.text(f"last failure: {status.last_failed_backup.id}: {status.last_failed_backup.error}")
    if status.HasField("next_scheduled_run"):
        out.text(f"next scheduled backup: {local_time(status.next_scheduled_run)}")
    if status.HasField("current_job"):
        job = status.current_job
        out.text(f"running: {job.backup_id} ({phase_words(job.progress)})")
    if status.HasField("last_verified_backup"):
        verified = status.last_verified_backup
        outcome = "passed" if verified.verify_result == pb.VERIFY_RESULT_PASSED else "FAILED"
        out.text(
            f"last verification: {verified.id} {outcome} {local_time(verified.verify_time)}: {verified.verify_message}"
        )
    if status.HasField("interrupted_job"):
        out.text(f"interrupted: {status.interrupted_job.progress.message}")
    if status.HasField("offsite"):
        offsite = status.offsite
        pending = f"{len(offsite.pending_ids)} waiting: {', '.join(offsite.pending_ids)}" if offsite.pending_ids else ""
        out.text(
            f"offsite: {offsite.bucket} ({'reachable' if offsite.reachable else 'NOT reachable'})"
            + (f", {pending}" if pending else ", every archive copied")
        )
        if offsite.error:
            out.text(f"offsite error: {offsite.error}")
    if status.stale:
        out.text(
            f"SILENT: no successful backup for longer than {_hours(status.stale_after.ToTimedelta().total_seconds())}"
        )
    if status.HasField("notifications"):
        n = status.notifications
        line = f"notifications: {n.targets} URL(s), {n.pending} waiting, {n.given_up} given up"
        if n.last_error:
            line += f"; last failure {local_time(n.last_error_time)}: {n.last_error}"
        out.text(line)
    return EXIT_OK


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def _jobs(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import pb

    if args.limit < 0:
        out.note("aperture-backup: --limit must be 0 (all) or more")
        return EXIT_USAGE
    jobs = list(client.list_jobs(limit=args.limit or None))
    if out.as_json:
        out.document({"jobs": [json_format.MessageToDict(j) for j in jobs]})
        return EXIT_OK
    if not jobs:
        out.note("no jobs have ended yet")
        return EXIT_OK
    rows = [("STARTED", "KIND", "TRIGGER", "CALLER", "DURATION", "OUTCOME", "BACKUP", "DETAIL")]
    for j in jobs:
        caller = " ".join(part for part in (j.caller_role, j.caller_address) if part) or "-"
        kind = _name(pb.JobKind, j.kind, "JOB_KIND_") if j.kind else j.description
        rows.append(
            (
                local_time(j.start_time),
                kind,
                _name(pb.BackupTrigger, j.trigger, "BACKUP_TRIGGER_") if j.trigger else "-",
                caller,
                f"{j.duration.ToTimedelta().total_seconds():.1f} s",
                _name(pb.JobOutcome, j.outcome, "JOB_OUTCOME_").upper(),
                j.backup_id or "-",
                j.error or j.summary,
            )
        )
    out.table(rows)
    return EXIT_OK


def _policy_words(policy: pb.RetentionPolicy) -> str:
    words = [f"the newest {policy.keep_last} backups"] if policy.keep_last else []
    periods = [
        f"{count} {unit}"
        for count, unit in ((policy.keep_daily, "days"), (policy.keep_weekly, "weeks"), (policy.keep_monthly, "months"))
        if count
    ]
    if periods:
        words.append("the newest backup of each of the last " + ", ".join(periods))
    return "keep " + " and ".join(words)


def _retention(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import pb

    current = client.get_retention()
    changes = {
        "keep_last": args.keep,
        "keep_daily": args.daily,
        "keep_weekly": args.weekly,
        "keep_monthly": args.monthly,
    }
    if all(value is None for value in changes.values()):
        if out.as_json:
            out.document(current)
        else:
            out.text(_policy_words(current))
        return EXIT_OK
    policy = pb.RetentionPolicy()
    policy.CopyFrom(current)
    for field, value in changes.items():
        if value is not None:
            setattr(policy, field, value)

    def apply(*, validate_only: bool) -> pb.SetRetentionResponse:
        return client.set_retention(
            policy.keep_last,
            keep_daily=policy.keep_daily,
            keep_weekly=policy.keep_weekly,
            keep_monthly=policy.keep_monthly,
            validate_only=validate_only,
        )

    preview = apply(validate_only=True)
    if args.dry_run:
        if out.as_json:
            out.document(preview)
        else:
            gone = ", ".join(preview.deleted_ids) or "nothing"
            out.text(f"{_policy_words(policy)} would delete: {gone}")
        return EXIT_OK
    if preview.deleted_ids:
        listed = "\n  ".join(preview.deleted_ids)
        _confirm(
            out,
            f"To {_policy_words(policy)} deletes {len(preview.deleted_ids)} backups:\n  {listed}\nGo on?",
            yes=args.yes,
        )
    response = apply(validate_only=False)
    if out.as_json:
        out.document(response)
    else:
        out.text(f"{_policy_words(response.policy)}; deleted: {', '.join(response.deleted_ids) or 'nothing'}")
    return EXIT_OK


def _schedule(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    if args.on and args.off:
        raise UsageError("pass --on or --off, not both")
    if args.time is not None:
        parse_hhmm(args.time, variable="the time")
    changes = args.time is not None or args.tz is not None or args.on or args.off
    if changes:
        enabled = False if args.off else True if (args.on or args.time) else None
        response = client.set_schedule(enabled=enabled, time_of_day=args.time, time_zone=args.tz)
        schedule, next_run = response.schedule, response.next_run_time if response.HasField("next_run_time") else None
    else:
        got = client.get_schedule()
        schedule, next_run = got.schedule, got.next_run_time if got.HasField("next_run_time") else None
    if out.as_json:
        document = {"schedule": json_format.MessageToDict(schedule)}
        if next_run is not None:
            document["nextRunTime"] = json_format.MessageToDict(next_run)
        out.document(document)
    elif schedule.enabled:
        when = f"; next {local_time(next_run)}" if next_run is not None else ""
        out.text(f"daily at {schedule.time_of_day} {schedule.time_zone}{when}")
    else:
        out.text(f"off (would run at {schedule.time_of_day} {schedule.time_zone})")
    return EXIT_OK


def _download(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    from aperture_backup_client import ChecksumMismatch, TransferError

    output: Path = args.output or Path(args.id)
    if output.is_dir():
        raise UsageError(f"{output} is a directory; pass -o FILE")
    # Written to FILE.part and renamed once size and SHA-256 match: the final name only ever holds a whole,
    # checked archive.
    partial = output.with_name(output.name + ".part")
    offset = partial.stat().st_size if args.resume and partial.exists() else 0
    backup = client.get(args.id)
    with out.progress("download") as show:
        from aperture_backup_client import pb

        def on_chunk(done: int) -> None:
            show(pb.Progress(phase=pb.PHASE_UNSPECIFIED, bytes_done=done, bytes_total=backup.size_bytes))

        try:
            result = client.download(args.id, partial, offset=offset, on_progress=on_chunk)
        except ChecksumMismatch as exc:
            partial.unlink(missing_ok=True)
            out.note(f"aperture-backup: {exc}")
            return EXIT_FAILED
        except TransferError as exc:
            out.note(f"aperture-backup: {exc} (the partial file {partial} is kept: --resume continues it)")
            return EXIT_FAILED
    os.replace(partial, output)
    if out.as_json:
        out.document(result)
    else:
        out.text(f"{output}: {human_size(result.size_bytes)}, SHA-256 {result.sha256} (verified)")
    return EXIT_OK


def _replacing(client: BackupClient) -> str:
    status = client.status()
    return f"the database {status.database!r}" if status.database else "the database"


def _upload(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    if args.restore:
        _confirm(out, f"Replace {_replacing(client)} with {args.path}?", yes=args.yes)
    with out.progress("upload") as show:

        def on_message(message: pb.UploadAndRestoreResponse) -> None:
            if out.as_json:
                out.line(message)
            show(message.progress)

        last = client.upload(
            args.path, restore=args.restore, skip_safety_backup=args.skip_safety_backup, on_progress=on_message
        )
    if not out.as_json:
        out.text(f"stored as {last.backup.id}" + (", and restored" if last.HasField("result") else ""))
    return EXIT_OK


def _restore(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    backup = client.get(args.id)
    _confirm(out, f"Replace {_replacing(client)} with the backup {_describe(backup)}?", yes=args.yes)
    with out.progress("restore") as show:

        def on_message(message: pb.RestoreResponse) -> None:
            if out.as_json:
                out.line(message)
            show(message.progress)

        result = client.restore(args.id, skip_safety_backup=args.skip_safety_backup, on_progress=on_message)
    if not out.as_json:
        safety = f"; safety backup {result.safety_backup.id}" if result.HasField("safety_backup") else ""
        out.text(f"restored {result.restored.id} in {result.duration.ToTimedelta().total_seconds():.1f} s{safety}")
    return EXIT_OK


def _verify(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    with out.progress("verify") as show:

        def on_message(message: pb.VerifyResponse) -> None:
            if out.as_json:
                out.line(message)
            show(message.progress)

        backup = client.verify(args.id, on_progress=on_message)
    if not out.as_json:
        out.text(f"{backup.id}: verification {backup.verify_message}")
    return EXIT_OK


_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """ "30d", "12h", "2w": a whole number and one unit (s, m, h, d, w)."""
    match = _DURATION_RE.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise UsageError(f'--for takes a positive number and a unit (s, m, h, d, w), e.g. "30d"; got {text!r}')
    return timedelta(**{_DURATION_UNITS[match.group(2)]: int(match.group(1))})


def _pin(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    ttl = parse_duration(args.ttl) if args.ttl is not None else None
    backup = client.pin(args.id, ttl=ttl)
    if out.as_json:
        out.document(backup)
    else:
        until = f" until {local_time(backup.pin_expire_time)}" if backup.HasField("pin_expire_time") else ""
        out.text(f"pinned {backup.id}{until}: retention keeps it")
    return EXIT_OK


def _unpin(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    backup = client.unpin(args.id)
    if out.as_json:
        out.document(backup)
    else:
        out.text(f"unpinned {backup.id}: retention may delete it")
    return EXIT_OK


def _cancel(client: BackupClient, args: argparse.Namespace, out: Output) -> int:
    backup_id = args.id or client.status().current_job.backup_id
    if not backup_id:
        raise UsageError("no backup or restore is running")
    response = client.cancel(backup_id)
    if out.as_json:
        out.document(response)
    else:
        out.text(f"{'stopped' if response.stopped else 'stopping'}: {backup_id}")
    return EXIT_OK


_HANDLERS: dict[str, Callable[[BackupClient, argparse.Namespace, Output], int]] = {
    "create": _create,
    "list": _list,
    "get": _get,
    "delete": _delete,
    "status": _status,
    "jobs": _jobs,
    "retention": _retention,
    "schedule": _schedule,
    "download": _download,
    "upload": _upload,
    "restore": _restore,
    "cancel": _cancel,
    "verify": _verify,
    "pin": _pin,
    "unpin": _unpin,
}

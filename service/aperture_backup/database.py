"""The database side: connections, server facts, the cross-replica job lock, notifications.

Connection parameters travel to child processes through the environment (PGPASSWORD) and a connection
string without the password, so a password never shows in a process list, a log or a manifest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg.conninfo

from .errors import FailedPrecondition, JobRunning, Unavailable

_logger = logging.getLogger(__name__)

#: Advisory lock key shared by every replica: hash of "aperture-backup" folded into a bigint.
JOB_LOCK_KEY = 0x61706572_74757265 & 0x7FFFFFFFFFFFFFFF
#: First key of the two-key advisory locks on one archive of the bucket (the second: hashtext of its id).
#: Readers hold it shared while they read the archive from the bucket; retention takes it exclusively,
#: without waiting, before it deletes the archive, so no replica deletes what another one reads.
ARCHIVE_LOCK_CLASS = 0x61627570  # "abup"
#: Held while one replica applies retention to the shared bucket.
BUCKET_RETENTION_LOCK_KEY = (JOB_LOCK_KEY + 1) & 0x7FFFFFFFFFFFFFFF
#: Channel of the NOTIFY sent after a successful restore.
NOTIFY_CHANNEL = "aperture_backup_restored"
CONNECT_TIMEOUT_SECONDS = 5
#: A ping that ended this recently answers for the callers who ask meanwhile: GetStatus from 20 monitors at
#: once opens one connection (a backend process on the server), not 20.
PING_REUSE_SECONDS = 1.0


@dataclass(frozen=True)
class ServerInfo:
    """Facts about the server, read when a job starts."""

    version: str
    major: int
    database: str


class Database:
    """One PostgreSQL database, reached through a libpq connection string."""

    def __init__(self, conninfo: str):
        self._params = psycopg.conninfo.conninfo_to_dict(conninfo)
        self._params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_SECONDS))
        self._params.setdefault("application_name", "aperture-backup")
        self._ping_cond = threading.Condition()
        self._pinging = False
        self._last_ping: tuple[float, bool] | None = None  # (monotonic time it ended, the answer)

    def with_dbname(self, dbname: str) -> Database:
        """The same server and credentials, another database."""
        params = {k: v for k, v in self._params.items() if v is not None}
        params["dbname"] = dbname
        return Database(psycopg.conninfo.make_conninfo(**params))  # type: ignore[arg-type]

    def with_login(self, user: str, password: str, dbname: str) -> Database:
        """The same server, logging in as another role (a staging restore's, isolation.py)."""
        params = {k: v for k, v in self._params.items() if v is not None}
        params.update(user=user, password=password, dbname=dbname)
        return Database(psycopg.conninfo.make_conninfo(**params))  # type: ignore[arg-type]

    def maintenance(self) -> Database:
        """The database from which databases are created, renamed and dropped: the server's `postgres`, or
        `template1` when `postgres` is the one backed up (the embedded server's)."""
        return self.with_dbname("template1" if self.name == "postgres" else "postgres")

    @property
    def name(self) -> str:
        return str(self._params.get("dbname") or self._params.get("user") or os.environ.get("PGDATABASE", ""))

    def describe(self) -> str:
        """Where the database is, for logs: host, port and name, never the password."""
        host = self._params.get("host") or "localhost"
        port = self._params.get("port") or "5432"
        return f"database {self.name!r} on {host}:{port}"

    def child_env(self) -> dict[str, str]:
        """Environment for pg_dump/psql/pg_restore: the password goes here, not on the command line."""
        env = dict(os.environ)
        password = self._params.get("password")
        if password:
            env["PGPASSWORD"] = str(password)
        env.setdefault("PGCONNECT_TIMEOUT", str(CONNECT_TIMEOUT_SECONDS))
        return env

    def child_conninfo(self) -> str:
        """Connection string for child processes, without the password."""
        params = {k: v for k, v in self._params.items() if k != "password" and v is not None}
        return psycopg.conninfo.make_conninfo(**params)  # type: ignore[arg-type]

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            return psycopg.connect(**self._params, autocommit=autocommit)  # type: ignore[arg-type]
        except psycopg.OperationalError as exc:
            raise Unavailable(
                f"cannot connect to {self.describe()}: {first_line(str(exc))}", reason="DATABASE_UNAVAILABLE"
            ) from None

    def ping(self) -> bool:
        """True when the database answers a query now (or answered within PING_REUSE_SECONDS; callers who
        ask while a ping runs wait for it and share its answer). For the health check and start-up waits."""
        with self._ping_cond:
            while self._pinging:
                self._ping_cond.wait()
            if self._last_ping is not None and time.monotonic() - self._last_ping[0] < PING_REUSE_SECONDS:
                return self._last_ping[1]
            self._pinging = True
        return self._ping_and_share()

    def reachable(self) -> bool:
        """The latest ping's answer, at once; for GetStatus, which monitors call often and must not wait on a
        connection. Only the first call waits for a ping. When the answer is older than PING_REUSE_SECONDS,
        one background thread asks again and later calls get its answer; the health check's pings (every
        few seconds) keep it fresh as well."""
        with self._ping_cond:
            while self._last_ping is None and self._pinging:
                self._ping_cond.wait()
            last = self._last_ping
            if last is not None and (self._pinging or time.monotonic() - last[0] < PING_REUSE_SECONDS):
                return last[1]
            self._pinging = True
        if last is None:
            return self._ping_and_share()
        threading.Thread(target=self._ping_and_share, name="database-ping", daemon=True).start()
        return last[1]

    def _ping_and_share(self) -> bool:
        """Ping now, for the caller that set _pinging, and hand the answer to the callers waiting."""
        ok = False
        try:
            ok = self._ping_now()
        finally:
            with self._ping_cond:
                self._pinging = False
                self._last_ping = (time.monotonic(), ok)
                self._ping_cond.notify_all()
        return ok

    def _ping_now(self) -> bool:
        try:
            with self.connect() as conn:
                conn.execute("SELECT 1")
            return True
        except (Unavailable, psycopg.Error):
            return False

    def server_info(self) -> ServerInfo:
        with self.connect() as conn:
            version_num = conn.info.server_version
            row = conn.execute("SELECT current_setting('server_version'), current_database()").fetchone()
        if row is None:
            raise Unavailable(f"{self.describe()} returned no server version")
        version = str(row[0]).split()[0]
        return ServerInfo(version=version, major=version_num // 10000, database=str(row[1]))

    def count_tables(self) -> int:
        """Tables pg_dump will dump the data of: ordinary tables outside the system schemas, not owned by
        an extension. Used only as the denominator of progress."""
        with self.connect() as conn:
            row = conn.execute(
                """
                SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg_toast%'
                  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                  AND d.objid = c.oid AND d.deptype = 'e')
                """
            ).fetchone()
        return int(row[0]) if row else 0

    @contextlib.contextmanager
    def job_lock(self, description: str) -> Iterator[JobLock]:
        """Hold the cross-replica advisory lock for the duration of a job; refuse when another replica
        holds it. The lock lives in its own session and disappears if this process dies. A staging restore
        releases it early (`JobLock.release`), at the swap, when no one can connect to the database."""
        conn = self.connect()
        handle = JobLock(conn)
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (JOB_LOCK_KEY,)).fetchone()
            if not row or not row[0]:
                raise JobRunning(
                    f"cannot start {description}: another replica of aperture-backup is running a backup or "
                    "restore of this database; try again when it has finished",
                    metadata={"holder": "another replica"},
                )
            try:
                yield handle
            finally:
                handle.release()
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    @contextlib.contextmanager
    def reading_archive(self, backup_id: str) -> Iterator[None]:
        """Hold the shared lock of an archive of the bucket while it is read (see ARCHIVE_LOCK_CLASS)."""
        conn = self.connect()
        try:
            conn.execute("SELECT pg_advisory_lock_shared(%s, hashtext(%s))", (ARCHIVE_LOCK_CLASS, backup_id))
            yield
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_advisory_unlock_shared(%s, hashtext(%s))", (ARCHIVE_LOCK_CLASS, backup_id))
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    @contextlib.contextmanager
    def try_exclusive(self, key: int, backup_id: str | None = None) -> Iterator[bool]:
        """Try an exclusive advisory lock without waiting: the bucket's retention lock (`key` alone), or an
        archive's lock (ARCHIVE_LOCK_CLASS and its id). Yields whether it was taken; released on exit."""
        conn = self.connect()
        args: tuple[object, ...] = (key,) if backup_id is None else (key, backup_id)
        expression = "%s" if backup_id is None else "%s, hashtext(%s)"
        try:
            row = conn.execute(f"SELECT pg_try_advisory_lock({expression})", args).fetchone()
            taken = bool(row and row[0])
            yield taken
            if taken:
                with contextlib.suppress(psycopg.Error):
                    conn.execute(f"SELECT pg_advisory_unlock({expression})", args)
        finally:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def notify_restored(self, payload: str) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, payload))


class JobLock:
    """The session holding the job lock."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]):
        self._conn = conn
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        # Unlocked explicitly, not only by closing: the server drops a closed session's locks only when its
        # backend has exited, after close() returned, so a job started right after this one (a client's
        # next Create) could find the lock still held and be refused.
        with contextlib.suppress(psycopg.Error):
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (JOB_LOCK_KEY,))
        with contextlib.suppress(psycopg.Error):
            self._conn.close()


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else message


def require_reachable(database: Database) -> ServerInfo:
    """Server facts, or a clear UNAVAILABLE/FAILED_PRECONDITION."""
    try:
        return database.server_info()
    except psycopg.Error as exc:
        raise FailedPrecondition(f"cannot read the server version of {database.describe()}: {exc}") from None

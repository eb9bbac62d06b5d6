"""Where an archive's SQL runs: a restore must not be able to do what its SQL asks beyond the database.

A dump is a program. Restored by a superuser, `COPY ... TO PROGRAM` runs a command on the database host,
`pg_read_file` reads its files, `CREATE ROLE ... SUPERUSER` makes a new superuser, `ALTER SYSTEM` changes
the server; statements assembled in a `DO` block or run by an index expression pass any text filter. So
when the service's role is a superuser (what the `postgres` image's POSTGRES_USER gives Aperture), the
archive runs without those powers:

1. A role of its own (`aperture_backup_restore`: LOGIN with a fresh random password, nothing else: not
   superuser, no CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, member of no role) owns a new, empty
   *staging* database, made from template0 with the live database's encoding and locale.
2. The privileged session creates there the extensions the archive's head or table of contents names
   (an untrusted extension such as pgvector needs a superuser), owned by itself; the archive's own
   `CREATE EXTENSION IF NOT EXISTS` then finds them, and its `COMMENT ON EXTENSION` lines (which only an
   owner may run) are left out: they repeat the extension's own comment.
3. psql logs in *as that role* to the staging database and loads the archive in one transaction. Being
   the session user, the role cannot regain more (`SET ROLE`, `SET SESSION AUTHORIZATION` need it).
4. Only when every check passed: the objects are given to the live database's owner (`REASSIGN OWNED`),
   the live database's privileges, settings and comment are copied over, new connections to it are
   refused, its sessions ended, and the staging database takes its name (the old one is dropped). The
   application's connections are cut at the swap; Aperture reconnects after a restore anyway.

A failure before the swap drops the staging database; the live one was never touched. Where the role is
not a superuser, the archive cannot do these things anyway and the restore stays in place, in one
transaction (`restore.py`).

Verify (verify.py) loads archives the same way into a staging database it checks and drops, never swaps.
Where the service's role is no superuser but may create databases, its scratch database is made and
loaded by that role itself (`own_role`): it has no powers to take away.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .database import Database, first_line
from .errors import FailedPrecondition, Internal, Unavailable

_logger = logging.getLogger(__name__)

#: The role the archive's SQL runs as in a staging restore.
RESTORE_ROLE = "aperture_backup_restore"
#: Marks staging databases (and the old database between the two renames) in pg_database.
STAGING_MARK = "_aperture_restore_"
_MAX_NAME = 63


@dataclass(frozen=True)
class RolePowers:
    """What the service's own role may do, read from the server."""

    superuser: bool
    createdb: bool


def role_powers(database: Database) -> RolePowers:
    with database.connect() as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb FROM pg_catalog.pg_roles WHERE rolname = current_user"
        ).fetchone()
    if row is None:
        raise Internal("the server does not know the service's own role")
    return RolePowers(superuser=bool(row[0]), createdb=bool(row[1]))


def _name(live: str, suffix: str) -> str:
    """A database name derived from the live one, within PostgreSQL's 63 bytes."""
    tail = f"{STAGING_MARK}{suffix}"
    head = live.encode()[: _MAX_NAME - len(tail)].decode("utf-8", "ignore")
    return head + tail


class StagingRestore:
    """One staging database and the restore role's way into it; `swap()` makes it the live database."""

    def __init__(self, database: Database, *, own_role: bool = False):
        self._database = database
        #: Made, owned and loaded by the service's own role (not a superuser) instead of the restore role.
        self.own_role = own_role
        self._maintenance = database.maintenance()
        self.live = database.name
        token = secrets.token_hex(4)
        self.name = _name(self.live, token)
        self._old_name = _name(self.live, f"old_{token}")
        self._password = secrets.token_urlsafe(24)
        self.created = False
        self.dropper: threading.Thread | None = None

    # -- preparing -------------------------------------------------------------------------------------------

    def create(self, extensions: Sequence[str] = ()) -> Database:
        """Make the role and the staging database with the archive's `extensions` (which need a superuser);
        the Database through which the archive's SQL runs (as the restore role)."""
        with self._maintenance.connect() as conn:
            if not self.own_role:
                self._prepare_role(conn)
            live = conn.execute(
                "SELECT pg_catalog.pg_encoding_to_char(encoding), datcollate, datctype "
                "FROM pg_catalog.pg_database WHERE datname = %s",
                (self.live,),
            ).fetchone()
            if live is None:
                raise Unavailable(f"the database {self.live!r} does not exist on the server")
            # Without OWNER, the database belongs to the role that creates it (CREATE DATABASE knows no
            # OWNER CURRENT_USER).
            owner = sql.SQL("") if self.own_role else sql.SQL(" OWNER {}").format(sql.Identifier(RESTORE_ROLE))
            conn.execute(
                sql.SQL("CREATE DATABASE {}{} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                    sql.Identifier(self.name),
                    owner,
                    sql.Literal(live[0]),
                    sql.Literal(live[1]),
                    sql.Literal(live[2]),
                )
            )
            self.created = True
        with self._database.with_dbname(self.name).connect() as conn:
            for name in extensions:
                try:
                    conn.execute(
                        sql.SQL("CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA public").format(sql.Identifier(name))
                    )
                except psycopg.Error as exc:
                    raise FailedPrecondition(
                        f"the archive needs the extension {name!r}, which this server cannot create: "
                        f"{first_line(str(exc))}; install it on the database server first",
                        reason="EXTENSION_UNAVAILABLE",
                    ) from None
        _logger.info(
            "staging database %s made, owned by %s (extensions: %s)",
            self.name,
            "the service's role" if self.own_role else RESTORE_ROLE,
            ", ".join(extensions) or "none",
        )
        if self.own_role:
            return self._database.with_dbname(self.name)
        return self._database.with_login(RESTORE_ROLE, self._password, self.name)

    def _prepare_role(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        # INHERIT: the privileges of the staging database's owner come through the implicit pg_database_owner
        # membership, which a NOINHERIT role does not use on PostgreSQL 15. It is a member of nothing else.
        attributes = sql.SQL(
            "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT PASSWORD {}"
        ).format(sql.Literal(self._password))
        exists = conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (RESTORE_ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(sql.SQL(verb + " ROLE {} ").format(sql.Identifier(RESTORE_ROLE)) + attributes)
        # Whatever someone granted it since: it must be a member of nothing.
        for (granted,) in conn.execute(
            "SELECT r.rolname FROM pg_catalog.pg_auth_members m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid "
            "JOIN pg_catalog.pg_roles u ON u.oid = m.member WHERE u.rolname = %s",
            (RESTORE_ROLE,),
        ).fetchall():
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(granted), sql.Identifier(RESTORE_ROLE)))

    # -- after the load --------------------------------------------------------------------------------------

    def swap(self, *, release_lock: Callable[[], None] | None = None) -> None:
        """Give everything to the live database's owner and put the staging database in its place.
        `release_lock` ends the job lock's session on the live database once no one can connect to it any
        more (a rename needs it empty), so no other replica can take the lock in between."""
        with self._database.with_dbname(self.name).connect() as conn:
            owner = self._live_owner()
            conn.execute(
                sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(RESTORE_ROLE), sql.Identifier(owner))
            )
        with self._maintenance.connect() as conn:
            self._copy_database_properties(conn)
            conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(self.live)))
            try:
                if release_lock is not None:
                    release_lock()
                conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid, 10000) FROM pg_catalog.pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_catalog.pg_backend_pid()",
                    (self.live,),
                )
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(self.live), sql.Identifier(self._old_name)
                    )
                )
            except psycopg.Error:
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(self.live)))
                raise
            try:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(self.name), sql.Identifier(self.live)
                    )
                )
            except psycopg.Error:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(self._old_name), sql.Identifier(self.live)
                    )
                )
                conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(self.live)))
                raise
            self.created = False
        _logger.info("the restored database replaced %s (the staging database took its name)", self.live)
        # The old database goes in the background: DROP DATABASE waits for a checkpoint, which writes out
        # what the load left in shared buffers, and the restore is done without it. Should the process stop
        # first, the start-up sweep drops it (`drop_leftovers`).
        self.dropper = threading.Thread(
            target=drop_staging, args=(self._database, self._old_name), name="drop-old-database", daemon=True
        )
        self.dropper.start()

    def _live_owner(self) -> str:
        with self._maintenance.connect() as conn:
            row = conn.execute(
                "SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_catalog.pg_database WHERE datname = %s",
                (self.live,),
            ).fetchone()
        if row is None:
            raise Unavailable(f"the database {self.live!r} does not exist on the server")
        return str(row[0])

    def _copy_database_properties(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """What belongs to the database itself rather than to its contents: privileges, settings, comment."""
        staging = sql.Identifier(self.name)
        for grantee, privilege, grantable in conn.execute(
            "SELECT a.grantee, a.privilege_type, a.is_grantable FROM pg_catalog.pg_database d, "
            "pg_catalog.aclexplode(d.datacl) a WHERE d.datname = %s",
            (self.live,),
        ).fetchall():
            target = sql.SQL("PUBLIC") if grantee == 0 else sql.Identifier(self._role_name(conn, grantee))
            conn.execute(
                sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                    sql.SQL(privilege), staging, target, sql.SQL(" WITH GRANT OPTION" if grantable else "")
                )
            )
        for role, setting in conn.execute(
            "SELECT s.setrole, unnest(s.setconfig) FROM pg_catalog.pg_db_role_setting s "
            "JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase WHERE d.datname = %s",
            (self.live,),
        ).fetchall():
            key, _, value = str(setting).partition("=")
            prefix = sql.SQL("ALTER DATABASE {} ").format(staging)
            if role:
                prefix = sql.SQL("ALTER ROLE {} IN DATABASE {} ").format(
                    sql.Identifier(self._role_name(conn, role)), staging
                )
            conn.execute(prefix + sql.SQL("SET {} = {}").format(sql.Identifier(key), sql.Literal(value)))
        row = conn.execute(
            "SELECT pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database WHERE datname = %s",
            (self.live,),
        ).fetchone()
        if row is not None and row[0] is not None:
            conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(staging, sql.Literal(row[0])))

    @staticmethod
    def _role_name(conn: psycopg.Connection[tuple[Any, ...]], oid: int) -> str:
        row = conn.execute("SELECT pg_catalog.pg_get_userbyid(%s)", (oid,)).fetchone()
        return str(row[0]) if row else str(oid)

    # -- giving up -------------------------------------------------------------------------------------------

    def drop(self) -> None:
        """Remove the staging database (after a failure); the live database was never touched."""
        if not self.created:
            return
        drop_staging(self._database, self.name)
        self.created = False


def drop_leftovers(database: Database, *, staging: bool) -> None:
    """At start-up: drop the replaced databases a stopped process had not dropped yet (garbage, whoever made
    them) and, with `staging`, the staging databases of an interrupted restore (only then: another replica
    may be loading one right now)."""
    prefix = database.name.encode()[: _MAX_NAME - len(STAGING_MARK) - 12].decode("utf-8", "ignore") + STAGING_MARK
    try:
        with database.maintenance().connect() as conn:
            names = [
                str(row[0])
                for row in conn.execute(
                    "SELECT datname FROM pg_catalog.pg_database WHERE starts_with(datname, %s)", (prefix,)
                ).fetchall()
            ]
    except (Unavailable, psycopg.Error) as exc:
        _logger.info("could not look for databases a stopped restore left: %s", exc)
        return
    for name in names:
        if staging or name.rpartition(STAGING_MARK)[2].startswith("old_"):
            _logger.warning("dropping %s, left by a restore that did not finish", name)
            drop_staging(database, name)


def drop_staging(database: Database, name: str) -> None:
    """Drop a staging database (by name; only ones that carry the mark), quietly if it is gone."""
    if STAGING_MARK not in name:
        raise FailedPrecondition(f"{name!r} is not a staging database of aperture-backup")
    with contextlib.suppress(Unavailable, psycopg.Error), database.maintenance().connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def staging(database: Database, *, own_role: bool = False) -> Iterator[StagingRestore]:
    """A staging restore that is dropped unless it was swapped in."""
    restore = StagingRestore(database, own_role=own_role)
    try:
        yield restore
    finally:
        restore.drop()

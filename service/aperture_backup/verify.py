"""Verified restorability: a backup nobody has restored is a hope.

A verification restores an archive into a scratch database on the same server (or, where the service's
role may not create databases, on a throwaway server of the same major, throwaway.py), through exactly the
path a staging restore takes (`RestoreManager.load_staging`, isolation.py), then checks it and drops it:

1. `restore`: the archive loads, in one transaction, with its checksum and format intact;
2. `tables`: every table the dump created exists;
3. `row_counts`: every table holds the rows counted as the dump streamed through (contents.py);
4. `indexes` and `extensions`: the ones the dump created exist;
5. `verify_sql`: the operator's query (APERTURE_BACKUP_VERIFY_SQL), run as the role that loaded the
   archive in a read-only transaction, returns true.

The live database is never touched: nothing is read from or locked in it, and the database-wide job lock
is not taken. Checks 2 to 4 need the manifest's record, so a file found in the directory without one gets
checks 1 and 5 only (the message says so).

The outcome is written into the backup's manifest (`Backup.verification`) whether it passed or failed. A
failed check ends the job with DataLoss (reason VERIFY_FAILED, metadata `check`); a verification that could
not run (the database down, cancelled) records nothing, since it says nothing about the backup.

Whoever must hear of the outcome (metrics, notifications) listens on `JobSlot.on_end`: a job of kind
VERIFY carries the verified backup, its `verification` filled in, in `job.backup`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from . import isolation, throwaway, toolchain
from .backups import BackupManager
from .database import Database, first_line
from .errors import Aborted, BackupError, DataLoss, DeadlineExceeded, FailedPrecondition, JobRunning, NotFound
from .jobs import Job, JobKind, JobSlot
from .model import Backup, Contents, Progress, Trigger, Verification
from .restore import RestoreManager
from .storage.local import ArchiveStore

_logger = logging.getLogger(__name__)

#: A weekly verification is due this long after the last one (an hour short of a week, so that one made at
#: the same scheduled time a week later is due).
WEEKLY_INTERVAL = timedelta(days=7) - timedelta(hours=1)
#: Longest list of names a failure message spells out.
_SHOWN = 5


@dataclass(frozen=True)
class _Checked:
    """One check's finding: None when it passed, else why not."""

    check: str
    problem: str | None


class VerifyManager:
    """Verifies backups of the store (see the module's description)."""

    def __init__(
        self,
        store: ArchiveStore,
        database: Database,
        slot: JobSlot,
        backups: BackupManager,
        restores: RestoreManager,
        *,
        verify_sql: str | None = None,
        schedule: str = "weekly",
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        scratch_on_live_server: bool = True,
    ):
        self.store = store
        self.database = database
        self.slot = slot
        self.backups = backups
        self.restores = restores
        self.verify_sql = verify_sql
        self.schedule = schedule
        self.clock = clock
        #: Where to look for a server of the live one's major for a throwaway server; None: where the
        #: client tools are looked for.
        self.server_tool_dirs: list[Path] | None = None
        #: False: never make the scratch database on the live server, always in a throwaway one (the
        #: embedded server, which a DROP DATABASE's checkpoint stops when run as root, see app.py).
        self.scratch_on_live_server = scratch_on_live_server

    # -- starting --------------------------------------------------------------------------------------

    def start_verify(self, backup_id: str = "", *, trigger: Trigger = Trigger.MANUAL) -> Job:
        """Start verifying `backup_id` (the newest READY backup when empty) in its own thread. Raises at once
        for a bad id, an unknown backup, one that is not READY, or while another job runs."""
        backup = self._pick(backup_id)
        self.slot.ensure_free(f"a verification of {backup.id}")
        job = Job(
            kind=JobKind.VERIFY,
            trigger=trigger,
            description=f"a verification of {backup.id}",
            backup=backup,
            subject=backup,
        )

        def body(job: Job) -> Backup:
            with self.store.in_use(backup.id):
                # Again, now that it is in use: a Delete may have come in between.
                return self._verify(job, self.restores.restorable(backup.id))

        # Background work like a backup: its load into a scratch database (or a throwaway server, which
        # inherits the priority) must not slow the calls people wait on.
        return self.slot.start(job, body, background=True)

    def due(self) -> bool:
        """Whether the schedule (APERTURE_BACKUP_VERIFY) wants the newest backup verified now."""
        if self.schedule == "off":
            return False
        if self.schedule == "daily":
            return True
        # Weekly, and after a failed verification at each scheduled backup until one passes again.
        done = [b.verification for b in self.backups.list_backups() if b.verification is not None]
        latest = max(done, key=lambda v: v.time, default=None)
        return latest is None or not latest.passed or self.clock() - latest.time >= WEEKLY_INTERVAL

    def after_scheduled_backup(self) -> None:
        """Called by the scheduler once its backup is READY: verify the newest backup when due, and wait.
        A failure is recorded (manifest, metrics, job listeners) and logged; it never raises."""
        if not self.due():
            return
        try:
            job = self.start_verify(trigger=Trigger.SCHEDULED)
        except BackupError as exc:
            _logger.warning("the scheduled verification did not start: %s", exc)
            return
        job.wait()
        if job.error is None:
            _logger.info("scheduled verification of %s passed", job.backup_id)

    def _pick(self, backup_id: str) -> Backup:
        if backup_id:
            return self.restores.restorable(backup_id)
        newest = self.backups.newest_ready()
        if newest is None:
            raise NotFound("there is no READY backup to verify; make one with Create", reason="NO_BACKUP")
        return newest

    # -- running ---------------------------------------------------------------------------------------

    def _scratch_server(self, stack: contextlib.ExitStack, major: int) -> tuple[Database, bool]:
        """Where the scratch database goes, and whether the service's own role makes and loads it (True) or
        the restore role does (False): the live server when the role is a superuser or may create
        databases; else a throwaway server of the same major (throwaway.py) when one is installed; else
        FAILED_PRECONDITION saying why."""
        if self.scratch_on_live_server:
            powers = isolation.role_powers(self.database)
            if powers.superuser:
                return self.database, False
            if powers.createdb:
                return self.database, True
        bin_dir = throwaway.find_server_tools(major, self.restores.pg_bin_dir, self.server_tool_dirs)
        if bin_dir is None:
            raise FailedPrecondition(
                "cannot verify: Verify restores into a scratch database, never into the live one, and the "
                f"service's role on {self.database.describe()} may not create databases, nor is a PostgreSQL "
                f"{major} server (initdb, postgres) installed here to start a throwaway one. Grant the role "
                "that right (ALTER ROLE ... CREATEDB), or install PostgreSQL's server binaries of that version "
                "(or name their directory in APERTURE_BACKUP_PG_BIN_DIR)",
                reason="VERIFY_UNAVAILABLE",
            )
        server = stack.enter_context(throwaway.throwaway_server(bin_dir, self.restores.work_dir))
        return server, False

    def _verify(self, job: Job, backup: Backup) -> Backup:
        with contextlib.ExitStack() as stack:
            # An archive only the bucket has is fetched into the directory first (its checksum checked).
            path = stack.enter_context(self.backups.archives.local_file(backup))
            return self._verify_on(job, backup, path, stack)

    def _verify_on(self, job: Job, backup: Backup, path: Path, stack: contextlib.ExitStack) -> Backup:
        job.update(progress=Progress(phase="preparing", elapsed_seconds=job.elapsed()))
        info = self.database.server_info()
        server, own_role = self._scratch_server(stack, info.major)
        toolset = toolchain.for_server(info.major, self.restores.pg_bin_dir)
        if backup.kind.encrypted:
            self.restores.keys.require_identity(backup.id, backup.age_recipients)
        findings: list[_Checked] = []
        try:
            archive = self.restores.inspect(
                path, backup.kind, server_major=info.major, toolset=toolset, recipients=backup.age_recipients
            )
            with isolation.staging(server, own_role=own_role) as stage:
                loader = self.restores.load_staging(
                    job,
                    stage,
                    path,
                    backup.kind,
                    expected_sha256=backup.sha256,
                    toolset=toolset,
                    recipients=backup.age_recipients,
                    extensions=archive.extensions,
                )
                job.update(progress=Progress(phase="checking", elapsed_seconds=job.elapsed()))
                findings = self._check(server.with_dbname(stage.name), loader, backup.contents)
        except (Aborted, DeadlineExceeded, JobRunning):
            raise  # says nothing about the backup
        except FailedPrecondition as exc:
            if exc.reason != "EXTENSION_UNAVAILABLE":
                # The archive did not load (not atomic, needs a newer server...): that is the verdict.
                findings = [_Checked("restore", str(exc))]
            else:
                # This server (a throwaway one, say) lacks what the archive needs: no verdict on the backup.
                raise FailedPrecondition(
                    f"cannot verify {backup.id} here: {exc}", reason="VERIFY_UNAVAILABLE", metadata=exc.metadata
                ) from exc
        except DataLoss as exc:
            # Damaged, truncated, not what its manifest says: that is the verdict.
            findings = [_Checked("restore", str(exc))]
        failed = next((f for f in findings if f.problem is not None), None)
        if failed is None:
            passed = [f.check for f in findings]
            note = "" if backup.contents is not None else " (no row counts recorded for this file: checked less)"
            verification = Verification(time=self.clock(), passed=True, message=f"passed: {', '.join(passed)}{note}")
        else:
            verification = Verification(
                time=self.clock(), passed=False, failed_check=failed.check, message=failed.problem or ""
            )
        recorded = self.backups.archives.update(backup.id, lambda b: b.replace(verification=verification))
        job.update(
            backup=recorded,
            progress=Progress(phase="done", elapsed_seconds=job.elapsed(), message=verification.message),
        )
        if not verification.passed:
            _logger.error(
                "backup %s failed verification (%s): %s", backup.id, failed and failed.check, verification.message
            )
            raise DataLoss(
                f"backup {backup.id} failed verification, check {verification.failed_check}: {verification.message}",
                reason="VERIFY_FAILED",
                metadata={"check": verification.failed_check, "backup_id": backup.id},
            )
        _logger.info("backup %s passed verification: %s", backup.id, verification.message)
        return recorded

    # -- checking --------------------------------------------------------------------------------------

    def _check(self, scratch: Database, loader: Database, contents: Contents | None) -> list[_Checked]:
        """The checks after the restore. Catalog reads and counts run as the service's own session (which a
        table's row security does not filter); the operator's query as the role that loaded the archive, so
        that functions the archive defined never run with more powers than that role's."""
        findings = [_Checked("restore", None)]
        if contents is not None:
            with scratch.connect() as conn:
                findings += self._check_contents(conn, contents)
                if any(f.problem for f in findings):
                    return findings
        if self.verify_sql:
            findings.append(self._check_sql(loader))
        return findings

    def _check_contents(self, conn: psycopg.Connection[tuple[Any, ...]], contents: Contents) -> list[_Checked]:
        tables = _names(
            conn,
            "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
        )
        missing = [t for t in (*contents.tables, *contents.rows) if t not in tables]
        if missing:
            return [_Checked("tables", f"tables missing after the restore: {_list(dict.fromkeys(missing))}")]
        findings = [_Checked("tables", None)]
        wrong = []
        for table, expected in contents.rows.items():
            # The name is one the catalog itself quoted (checked just above), so it is safe as SQL.
            row = conn.execute(sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.SQL(table))).fetchone()
            found = int(row[0]) if row else 0
            if found != expected:
                wrong.append(f"{table} has {found} rows, the backup recorded {expected}")
        findings.append(_Checked("row_counts", f"row counts differ: {_list(wrong)}" if wrong else None))
        if wrong:
            return findings
        indexes = _names(
            conn,
            "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('i', 'I')",
        )
        missing = [i for i in contents.indexes if i not in indexes]
        findings.append(
            _Checked("indexes", f"indexes missing after the restore: {_list(missing)}" if missing else None)
        )
        if missing:
            return findings
        extensions = _names(conn, "SELECT extname::text FROM pg_catalog.pg_extension")
        missing = [e for e in contents.extensions if e not in extensions]
        findings.append(
            _Checked("extensions", f"extensions missing after the restore: {_list(missing)}" if missing else None)
        )
        return findings

    def _check_sql(self, loader: Database) -> _Checked:
        query = self.verify_sql or ""
        try:
            with loader.connect(autocommit=False) as conn:
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SET LOCAL statement_timeout = '300s'")
                rows = conn.execute(query).fetchall()
                conn.rollback()
        except psycopg.Error as exc:
            return _Checked("verify_sql", f"APERTURE_BACKUP_VERIFY_SQL failed: {first_line(str(exc))}")
        if len(rows) != 1 or len(rows[0]) != 1 or rows[0][0] is not True:
            shown = repr(rows[0][0]) if len(rows) == 1 and len(rows[0]) == 1 else f"{len(rows)} rows"
            return _Checked(
                "verify_sql", f"APERTURE_BACKUP_VERIFY_SQL returned {shown}; it must return one row holding true"
            )
        return _Checked("verify_sql", None)


def _names(conn: psycopg.Connection[tuple[Any, ...]], query: str) -> set[str]:
    return {str(row[0]) for row in conn.execute(query).fetchall()}


def _list(items: Iterable[str]) -> str:
    values = list(items)
    shown = ", ".join(str(v) for v in values[:_SHOWN])
    return shown + (f" and {len(values) - _SHOWN} more" if len(values) > _SHOWN else "")

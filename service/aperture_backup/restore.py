"""Restores: an archive goes into the database atomically, or not at all.

One psql session gets, on its stdin: `BEGIN;`, a preamble that empties the database (every user schema,
extension, large object, publication and event trigger), the archive's SQL, and — only after every check
of the archive has passed — a final check and `COMMIT;`. Any failure before that closes or kills the
session without COMMIT, so PostgreSQL rolls the whole transaction back and the database is exactly as it
was. Success leaves exactly the archive's content: nothing created after the backup survives the preamble.

Why one psql session and not `psql --single-transaction` or `pg_restore --single-transaction --clean`
(measured, see design.md): `--single-transaction` without ON_ERROR_STOP rolls back yet exits 0; a plain
dump with large objects carries its own `BEGIN;`/`COMMIT;`, which would commit half a restore (the
`sqlfilter` removes exactly that pair); and `--clean` drops only what the archive contains, so tables a
later migration added would survive. Custom-format archives are turned into the same SQL by
`pg_restore -f -` and take the same path.

Checks happen while the data streams, not in a second pass: the SHA-256 of the file as read from disk, the
authenticity of its age encryption (every chunk, and the end) and the integrity of its gzip/zstd stream
(CRC, complete end) are known when the last byte has gone to psql,
and decide whether COMMIT is sent. Success is decided by exit statuses and by asking the server whether
our transaction committed (`pg_xact_status`), never by reading tool output for words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg

from . import isolation, priority, throwaway, toolchain
from .backups import SAFETY_BACKUP_PIN, BackupManager
from .compression import decompressor
from .database import NOTIFY_CHANNEL, Database, JobLock, first_line
from .encryption import AgeKeys
from .errors import BackupError, DataLoss, DeadlineExceeded, FailedPrecondition, Internal, Unavailable
from .jobs import Job, JobKind, JobSlot
from .journal import JobRecord
from .model import DEFAULT_KIND, ArchiveKind, Backup, Compression, Format, Progress, State, Trigger
from .pipes import StderrTail, enlarge_pipe, kill
from .sqlfilter import SqlFilter, SqlFilterError
from .storage.local import ArchiveStore
from .toolchain import Toolset

_logger = logging.getLogger(__name__)

#: Read size from the archive file and from pg_restore's pipe (large reads amortise Python's per-call cost).
READ_SIZE = 1024 * 1024
#: How much of a plain archive to read before touching the database, to find pg_dump's header.
HEAD_BYTES = 64 * 1024
#: How long the preamble waits for locks the application holds before the restore gives up (and rolls back).
DEFAULT_LOCK_TIMEOUT_SECONDS = 60.0
#: Longest a restore may load before it is stopped and rolled back (APERTURE_BACKUP_RESTORE_TIMEOUT).
DEFAULT_RESTORE_TIMEOUT_SECONDS = 6 * 3600.0
#: How long to wait for the server to finish rolling back after psql ended without COMMIT.
ROLLBACK_WAIT_SECONDS = 30.0
_PROGRESS_INTERVAL = 0.25

#: Memory for the index builds of a restore: four times PostgreSQL's default, modest for a host with 1 GB.
DEFAULT_MAINTENANCE_WORK_MEM = "256MB"
#: Parallel workers per index build: one besides the leader (PostgreSQL's default is 2, capped by its pool).
DEFAULT_PARALLEL_MAINTENANCE_WORKERS = 1
#: With workers: the smallest table (its heap, not its TOAST) whose pgvector index builds get them.
#: PostgreSQL's 8MB (`min_parallel_table_scan_size`) never gives an embeddings table one: a halfvec(1536)
#: is 3 KB, stored out of line in the TOAST table, so 100,000 embeddings leave a heap of about 12 MB and
#: 20,000 of 2.5 MB, and pgvector builds their HNSW graphs on one core. 64kB is about 500 such rows. Only
#: for those builds: a worker costs 0.1-0.4 s to start here, more than a small btree build takes.
PARALLEL_BUILD_MIN_TABLE_SIZE = "64kB"
#: Prefix of the application_name of a restore's psql session.
APPLICATION_NAME_PREFIX = "aperture-backup-restore-"
#: pg_dump's extensions, in plain SQL (they come right after the schemas, well within the head read) and in
#: the list `pg_restore --list` prints of a custom archive.
_SQL_EXTENSION_RE = re.compile(rb"^CREATE EXTENSION IF NOT EXISTS ([A-Za-z_][A-Za-z0-9_]*) WITH SCHEMA public;", re.M)
_TOC_EXTENSION_RE = re.compile(rb"^\d+; \d+ \d+ EXTENSION - ([A-Za-z_][A-Za-z0-9_]*)", re.M)
_DUMPED_BY_RE = re.compile(rb"Dumped by pg_dump version:? (\d+)(?:\.(\d+))?")
#: First minor release of each major whose psql knows `\restrict` (August 2025 security releases).
_RESTRICT_SINCE = {13: 22, 14: 19, 15: 14, 16: 10, 17: 6}

#: Empties the database inside the restore's transaction. Runs before the archive, while search_path is
#: still the default. The lock timeout makes a restore fail cleanly, rather than hang, when the
#: application holds locks on what must be dropped; once dropped, everything the archive creates is ours.
_PREAMBLE = r"""
SET client_min_messages = warning;
SET lock_timeout = '@LOCK_TIMEOUT_MS@ms';
DO $aperture_backup$
DECLARE
    item record;
    public_owner name;
    public_acl aclitem[];
BEGIN
    -- Archives made with --no-owner --no-acl say nothing about the public schema's owner and privileges,
    -- and the application's role depends on them: keep the ones this database has now.
    SELECT pg_catalog.pg_get_userbyid(n.nspowner), n.nspacl INTO public_owner, public_acl
    FROM pg_catalog.pg_namespace AS n WHERE n.nspname = 'public';

    -- Event triggers first: the application's own would otherwise fire on every DDL statement below.
    FOR item IN SELECT evtname FROM pg_catalog.pg_event_trigger LOOP
        EXECUTE pg_catalog.format('DROP EVENT TRIGGER %I', item.evtname);
    END LOOP;
    FOR item IN SELECT pubname FROM pg_catalog.pg_publication LOOP
        EXECUTE pg_catalog.format('DROP PUBLICATION %I', item.pubname);
    END LOOP;
    FOR item IN SELECT extname FROM pg_catalog.pg_extension WHERE extname <> 'plpgsql' LOOP
        EXECUTE pg_catalog.format('DROP EXTENSION IF EXISTS %I CASCADE', item.extname);
    END LOOP;
    FOR item IN SELECT nspname FROM pg_catalog.pg_namespace
                WHERE nspname NOT IN ('pg_catalog', 'information_schema')
                  AND nspname !~ '^pg_(toast|temp_|toast_temp_)'
    LOOP
        EXECUTE pg_catalog.format('DROP SCHEMA IF EXISTS %I CASCADE', item.nspname);
    END LOOP;
    PERFORM pg_catalog.lo_unlink(m.oid) FROM pg_catalog.pg_largeobject_metadata AS m;

    -- pg_dump never creates the public schema: it expects the one of a new database, with its standard
    -- comment, and emits only differences from it.
    CREATE SCHEMA public;
    COMMENT ON SCHEMA public IS 'standard public schema';
    IF public_owner IS NOT NULL AND public_owner <> current_user THEN
        BEGIN
            EXECUTE pg_catalog.format('ALTER SCHEMA public OWNER TO %I', public_owner);
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'could not give the public schema back to %: %', public_owner, SQLERRM;
        END;
    END IF;
    -- A new schema's ACL is NULL (owner only); spell the old one out again.
    FOR item IN SELECT a.grantee, a.privilege_type, a.is_grantable
                FROM pg_catalog.aclexplode(public_acl) AS a LOOP
        EXECUTE pg_catalog.format('GRANT %s ON SCHEMA public TO %s%s', item.privilege_type,
            CASE WHEN item.grantee = 0 THEN 'PUBLIC'
                 ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(item.grantee)) END,
            CASE WHEN item.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$aperture_backup$;
"""

#: Sent after the archive, before COMMIT: a hand-made archive may contain its own COMMIT or ROLLBACK,
#: after which psql would go on in autocommit mode. The transaction-local token is gone then, and the
#: server refuses to go on (the transaction ids written before and after the archive tell the rest).
_FINAL_CHECK = r"""
DO $aperture_backup$
BEGIN
    IF pg_catalog.current_setting('aperture_backup.restore_token', true) IS DISTINCT FROM '{token}' THEN
        RAISE EXCEPTION 'the archive ended the restore''s transaction itself (it contains COMMIT or ROLLBACK)';
    END IF;
END
$aperture_backup$;
COMMIT;
"""


@dataclass(frozen=True)
class RestoreResult:
    """What a successful restore reports."""

    restored: Backup
    safety_backup: Backup | None
    duration_seconds: float
    notify_channel: str = NOTIFY_CHANNEL


@dataclass(frozen=True)
class ArchiveInfo:
    """What the up-front check learnt about an archive."""

    pg_dump_major: int | None
    pg_dump_version: str
    #: Extensions its table of contents (or head) creates in the public schema, for a staging restore.
    extensions: tuple[str, ...] = ()


# -- reading archives ------------------------------------------------------------------------------------


#: Turns ciphertext pieces into plaintext pieces (`encryption.AgeKeys.decrypting`, bound to an archive).
Decrypt = Callable[[Iterable[bytes]], Iterator[bytes]]


class ArchiveReader:
    """Reads an archive once: hashes the bytes as they come from disk, decrypts them (`decrypt`, for an
    encrypted archive), decompresses them, and checks that the stream is authentic, intact and complete.
    `verify()` after the last chunk decides."""

    def __init__(
        self,
        path: Path,
        compression: Compression,
        *,
        on_read: Callable[[int], None] | None = None,
        decrypt: Decrypt | None = None,
    ):
        self.path = path
        self.compression = compression
        self.bytes_read = 0
        self.complete = False
        self._sha256 = hashlib.sha256()
        self._on_read = on_read
        self._decrypt = decrypt

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def chunks(self, *, stop: threading.Event | None = None) -> Generator[bytes, None, None]:
        """The decompressed content; raises DataLoss on a corrupt or truncated stream."""
        stream = decompressor(self.compression)
        stopped = threading.Event()
        raw = self._raw(stop, stopped)
        plain = self._decrypt(raw) if self._decrypt is not None else raw
        try:
            for piece in plain:
                yield from stream.feed(piece)
        except DataLoss:
            if stopped.is_set():
                return  # age saw the input end early because we stopped reading: not damage
            raise
        finally:
            close = getattr(plain, "close", None)
            if close is not None:
                close()  # stops and joins age's thread, so the file's generator is free to close
            raw.close()
        if stopped.is_set():
            return
        if self.bytes_read == 0:
            raise DataLoss(f"the archive {self.path.name} is empty")
        stream.end()
        self.complete = True

    def _raw(self, stop: threading.Event | None, stopped: threading.Event) -> Generator[bytes, None, None]:
        """The file's bytes as stored, hashed and counted (in age's thread, for an encrypted archive)."""
        with open(self.path, "rb", buffering=0) as handle:
            while True:
                if stop is not None and stop.is_set():
                    stopped.set()
                    return
                raw = handle.read(READ_SIZE)
                if not raw:
                    break
                self._sha256.update(raw)
                self.bytes_read += len(raw)
                if self._on_read is not None:
                    self._on_read(self.bytes_read)
                yield raw

    def verify(self, expected_sha256: str) -> None:
        """Raise unless the whole file was read intact and matches `expected_sha256` (when known)."""
        if not self.complete:
            raise Internal(f"the archive {self.path.name} was not read to its end")
        if expected_sha256 and self.sha256 != expected_sha256.lower():
            raise DataLoss(
                f"the archive {self.path.name} does not match its manifest: SHA-256 is {self.sha256}, "
                f"expected {expected_sha256}; the file is damaged, the database was left unchanged",
                reason="CHECKSUM_MISMATCH",
            )


# -- child processes -------------------------------------------------------------------------------------


def _read_xid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _PsqlGone(Exception):
    """psql stopped reading its input (it exited); its exit status says why."""


def _supports_restrict(toolset: Toolset) -> bool:
    if toolset.major >= 18:
        return True
    since = _RESTRICT_SINCE.get(toolset.major)
    return since is not None and toolset.minor >= since


@dataclass(frozen=True)
class BuildSettings:
    """What the restore's session gives the index builds and constraint checks that end a load: pgvector's
    HNSW builds, Aperture's longest step, are much slower once the graph outgrows `maintenance_work_mem`
    (about 3.5 KB an embedding of 1536 dimensions), and use a parallel worker only on tables that qualify
    (PARALLEL_BUILD_MIN_TABLE_SIZE). For the restore's transaction only; the server's own settings stay as
    they are. Values are checked by the configuration (APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM,
    _WORKERS)."""

    #: e.g. "256MB"; "" leaves the server's setting.
    maintenance_work_mem: str = DEFAULT_MAINTENANCE_WORK_MEM
    #: None leaves the server's setting.
    parallel_workers: int | None = DEFAULT_PARALLEL_MAINTENANCE_WORKERS

    def as_settings(self) -> dict[str, str]:
        settings = {}
        if self.maintenance_work_mem:
            settings["maintenance_work_mem"] = self.maintenance_work_mem
        if self.parallel_workers is not None:
            settings["max_parallel_maintenance_workers"] = str(self.parallel_workers)
        return settings

    def around_vector_index(self) -> tuple[bytes, bytes] | None:
        """SQL before and after each pgvector index build of the archive (SqlFilter), or None."""
        if not self.parallel_workers:
            return None
        return (
            f"SET LOCAL min_parallel_table_scan_size = '{PARALLEL_BUILD_MIN_TABLE_SIZE}';\n".encode(),
            b"SET LOCAL min_parallel_table_scan_size TO DEFAULT;\n",
        )


class _PsqlSession:
    """The one psql process a restore talks to. Opens the transaction and empties the database on start;
    `commit()` sends the final check and COMMIT; `kill()` ends it without (PostgreSQL rolls back)."""

    def __init__(
        self,
        toolset: Toolset,
        database: Database,
        workdir: Path,
        *,
        lock_timeout_seconds: float,
        empty_first: bool = True,
        settings: Mapping[str, str] | None = None,
    ):
        self._database = database
        #: Names the session in pg_stat_activity, so that a restarted service can find and end it (journal.py).
        self.application_name = f"{APPLICATION_NAME_PREFIX}{secrets.token_hex(8)}"
        self._start_xid_file = workdir / "xid-start"
        self._end_xid_file = workdir / "xid-end"
        self._backend_pid_file = workdir / "backend-pid"
        self._token = secrets.token_hex(16)
        self._restrict_key = secrets.token_hex(16)
        self.commit_sent = False
        self.restricted = _supports_restrict(toolset)
        command = [
            toolset.tool("psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set",
            "ON_ERROR_STOP=1",
            "--dbname",
            psycopg.conninfo.make_conninfo(database.child_conninfo(), application_name=self.application_name),
        ]
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=database.child_env(),
        )
        if self._proc.stdin is None or self._proc.stderr is None:  # pragma: no cover - PIPE gives streams
            raise Internal("psql started without pipes")
        self._stdin = self._proc.stdin
        enlarge_pipe(self._stdin)
        self.stderr = StderrTail(self._proc.stderr, "psql")
        self.stderr.start()
        prologue = (
            # The server process of this session, so that a cancelled restore can end it even while it
            # runs a statement that takes forever (psql gone, the server would go on holding every lock).
            f"SELECT pg_catalog.pg_backend_pid() \\g '{self._backend_pid_file}'\n"
            "BEGIN;\n"
            # Our transaction id, into a file of ours: after psql ends, the server says whether it committed.
            f"SELECT pg_catalog.pg_current_xact_id() \\g '{self._start_xid_file}'\n"
            f"SELECT pg_catalog.set_config('aperture_backup.restore_token', '{self._token}', true);\n"
            # For this transaction only: what index builds (HNSW above all) may use (BuildSettings).
            + "".join(
                f"SELECT pg_catalog.set_config('{name}', '{value}', true);\n"
                for name, value in (settings or {}).items()
            )
            # A staging database is new and empty: nothing to drop (and nothing its role could).
            + (
                _PREAMBLE.replace("@LOCK_TIMEOUT_MS@", str(max(1, int(lock_timeout_seconds * 1000))))
                if empty_first
                else ""
            )
        )
        if self.restricted:
            # From here on psql refuses every backslash command (`\!` would run a shell command): an
            # archive, perhaps uploaded, is data, not a script allowed to touch this machine.
            prologue += f"\\restrict {self._restrict_key}\n"
        self.write(prologue.encode())

    def write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self._stdin.write(data)
        except (BrokenPipeError, ValueError):
            raise _PsqlGone from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise _PsqlGone from None
            raise

    def commit(self) -> None:
        """After the archive: record the transaction id again (the same one unless the archive ended our
        transaction), check the token, COMMIT."""
        # A newline first: the archive's last line may lack one.
        epilogue = "\n"
        if self.restricted:
            epilogue += f"\\unrestrict {self._restrict_key}\n"
        epilogue += f"SELECT pg_catalog.pg_current_xact_id() \\g '{self._end_xid_file}'\n"
        self.write((epilogue + _FINAL_CHECK.format(token=self._token)).encode())
        self.commit_sent = True
        self.close_input()

    def close_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()

    def kill(self) -> None:
        """End psql and the server process behind it; PostgreSQL rolls back what was not committed."""
        self.close_input()
        kill(self._proc)
        self.terminate_backend()

    def terminate_backend(self) -> None:
        pid = _read_xid(self._backend_pid_file)
        if pid is None:
            return
        try:
            with self._database.connect() as conn:
                conn.execute("SELECT pg_catalog.pg_terminate_backend(%s, 10000)", (pid,))
        except (Unavailable, psycopg.Error) as exc:
            _logger.warning("could not end the restore's server process %d: %s", pid, exc)

    def watch(self, cancel: threading.Event, deadline: float) -> threading.Event:
        """Kill the session as soon as `cancel` is set or `deadline` (monotonic) passes, even while psql sits
        in a statement and reads nothing; returns an event to set when the session is over."""
        over = threading.Event()

        def run() -> None:
            while not over.wait(0.2):
                if cancel.is_set() or time.monotonic() >= deadline:
                    why = "cancelled" if cancel.is_set() else "past its time limit"
                    _logger.info("stopping psql (pid %d): the restore was %s", self._proc.pid, why)
                    self.kill()
                    return

        threading.Thread(target=run, name="psql-cancel", daemon=True).start()
        return over

    def wait(self) -> int:
        self.close_input()
        returncode = self._proc.wait()
        self.stderr.join(5)
        return returncode

    @property
    def start_xid(self) -> int | None:
        """Id of the restore's transaction; None when psql never got that far."""
        return _read_xid(self._start_xid_file)

    @property
    def end_xid(self) -> int | None:
        """Transaction id after the archive ran; None when psql never got there."""
        return _read_xid(self._end_xid_file)

    def transaction_status(self, *, settle: bool) -> str | None:
        """'committed', 'aborted' or 'in progress' for our transaction; None when psql never got that far.
        With `settle`, wait (bounded) while the server is still rolling back a closed session."""
        xid = self.start_xid
        if xid is None:
            return None
        deadline = time.monotonic() + (ROLLBACK_WAIT_SECONDS if settle else 0.0)
        while True:
            try:
                with self._database.connect() as conn:
                    row = conn.execute("SELECT pg_catalog.pg_xact_status(%s::text::xid8)", (str(xid),)).fetchone()
            except (Unavailable, psycopg.Error) as exc:
                _logger.warning("cannot ask the server about the restore's transaction %d: %s", xid, exc)
                return None
            status = str(row[0]) if row and row[0] is not None else None
            if status != "in progress" or time.monotonic() >= deadline:
                return status
            time.sleep(0.1)


# -- the domain ----------------------------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


class _RestoreProgress:
    """The one progress a restore shows while its safety backup and its load run at once (a staging restore):
    the safety backup's, as phase "safety_backup" (as when it ran first), with the load's in its message,
    until the safety backup is stored; then the load's, as phase "restoring". Without a load beside it (in
    place), just the safety backup's."""

    def __init__(self, job: Job, restored: Backup):
        self._job = job
        self._restored = restored
        self._lock = threading.Lock()
        self._safety: Progress | None = None
        self._load: Progress | None = None
        self._safety_running = False

    def safety_started(self) -> None:
        with self._lock:
            self._safety_running = True

    def from_safety(self, progress: Progress | None, backup: Backup | None) -> None:
        with self._lock:
            if progress is not None:
                self._safety = progress
            if self._safety_running:
                self._publish(backup)

    def from_load(self, progress: Progress | None) -> None:
        with self._lock:
            if progress is not None:
                self._load = progress
            self._publish(None)

    def safety_ended(self) -> None:
        """The safety backup is stored, failed or was stopped: the job shows the restored backup again."""
        with self._lock:
            self._safety_running = False
            self._publish(self._restored)

    def _publish(self, backup: Backup | None) -> None:
        shown: Progress | None = None
        elapsed = self._job.elapsed()
        if self._safety_running:
            safety = self._safety or Progress(phase="preparing")
            # As the safety backup's own progress read before it ran beside the load (the CLI shows the phase
            # in words before the message).
            message = safety.message or f"safety backup: {safety.phase}"
            if self._load is not None:
                load = self._load
                if load.message:
                    message += f"; restoring alongside: {load.message}"
                else:
                    message += (
                        f"; restoring alongside: {_megabytes(load.bytes_done)} of {_megabytes(load.bytes_total)} read"
                    )
            shown = dataclasses.replace(safety, phase="safety_backup", elapsed_seconds=elapsed, message=message)
        elif self._load is not None:
            shown = dataclasses.replace(self._load, elapsed_seconds=elapsed)
        self._job.update(progress=shown, backup=backup)


@dataclass
class _PartJob(Job):
    """One part of a restore's job (its safety backup, or its load beside it): it stops with the restore
    (its `cancel` is a child of the restore's), or alone; it reports into the restore's one progress."""

    parent: Job | None = None
    report: Callable[[Progress | None, Backup | None], None] | None = None

    def update(self, *, progress: Progress | None = None, backup: Backup | None = None) -> None:
        super().update(progress=progress, backup=backup)
        if self.report is not None:
            self.report(progress, backup)

    def note(self, key: str, value: str) -> None:
        # The restore's journal entry keeps what a restarted service needs (psql's session, the staging name).
        if self.parent is not None:
            self.parent.note(key, value)
        else:  # pragma: no cover - parts always have a parent
            super().note(key, value)

    def elapsed(self) -> float:
        return self.parent.elapsed() if self.parent is not None else super().elapsed()


#: Why a restore stopped its safety backup, or its load.
_LOAD_FAILED = "the restore could not load the archive, so the safety backup was not needed"
_SAFETY_FAILED = "its safety backup failed"


class _SafetyBackupRun:
    """The safety backup of a staging restore, in a thread of its own beside the load. `result()` waits for
    it: the stored (READY, pinned) backup, or its error, worded for the restore. `stop()` ends it early and
    leaves nothing behind (a safety backup is only ever listed READY if it is complete)."""

    def __init__(
        self,
        take: Callable[[Job], Backup],
        job: Job,
        progress: _RestoreProgress,
        *,
        on_failure: Callable[[], None],
    ):
        self._take = take
        self._progress = progress
        self._on_failure = on_failure
        self.job = _PartJob(
            kind=JobKind.BACKUP,
            trigger=Trigger.PRE_RESTORE,
            description="the safety backup before a restore",
            cancel=job.cancel.child(),
            parent=job,
            report=progress.from_safety,
        )
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stopped = False
        self._on_its_own = False
        self.backup: Backup | None = None
        self.error: BackupError | None = None
        self._thread = threading.Thread(target=self._run, name="safety-backup", daemon=True)

    def start(self) -> None:
        self._progress.safety_started()
        self._thread.start()

    def _run(self) -> None:
        # Beside the restore it guards, whose load is the critical path (priority.py).
        priority.lower_this_thread()
        try:
            backup = self._take(self.job)
        except BackupError as exc:
            error: BackupError | None = exc
            backup = None
        except Exception as exc:  # the restore waits for this thread: every failure must reach it
            _logger.exception("the safety backup failed unexpectedly")
            error = Internal(
                f"the safety backup failed, so the restore was not applied and the database is unchanged: {exc}"
            )
            backup = None
        else:
            error = None
        with self._lock:
            self.backup, self.error = backup, error
            self._on_its_own = error is not None and not self._stopped and not self.job.cancel.is_set()
            self._done.set()
        self._progress.safety_ended()
        if self._on_its_own:
            # No swap can follow: the load is stopped rather than left to run to its end for nothing.
            self._on_failure()

    @property
    def failed_on_its_own(self) -> bool:
        """It failed (a full disk, pg_dump's error), not because the restore stopped it or was cancelled."""
        with self._lock:
            return self._done.is_set() and self._on_its_own

    def stop(self, reason: str) -> None:
        """Stop it, if it still runs, and wait until it has cleaned up."""
        with self._lock:
            if not self._done.is_set():
                self._stopped = True
                self.job.cancel.request(reason)
        self._thread.join()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> Backup:
        self._thread.join()
        if self.error is not None:
            raise self.error
        if self.backup is None:  # pragma: no cover - _run sets one or the other
            raise Internal("the safety backup ended without a result")
        return self.backup


class RestoreManager:
    """Restores archives of the store into the configured database."""

    def __init__(
        self,
        store: ArchiveStore,
        database: Database,
        slot: JobSlot,
        backups: BackupManager,
        *,
        pg_bin_dir: Path | None = None,
        keys: AgeKeys | None = None,
        restore_timeout_seconds: float = DEFAULT_RESTORE_TIMEOUT_SECONDS,
        build_settings: BuildSettings | None = None,
        work_dir: Path | None = None,
        isolation: str = "auto",
    ):
        self.store = store
        #: Where restores keep their small working files, swept at start-up (`sweep_leftovers`); without
        #: one, the system's temporary directory, where nothing is swept.
        self.work_dir = work_dir
        self.database = database
        self.slot = slot
        self.backups = backups
        self._pg_bin_dir = pg_bin_dir
        self.keys = keys or AgeKeys()
        self.lock_timeout_seconds = DEFAULT_LOCK_TIMEOUT_SECONDS
        self.restore_timeout_seconds = restore_timeout_seconds
        self.build_settings = build_settings or BuildSettings()
        #: "staging": the archive runs as a role without the service's powers in a database that replaces the
        #: live one (isolation.py); "in-place": in the live database, in one transaction; "auto": staging
        #: where the service's role is a superuser.
        self.isolation = isolation

    @property
    def pg_bin_dir(self) -> Path | None:
        """The configured directory of client tools, searched first (toolchain.py)."""
        return self._pg_bin_dir

    def start_restore(self, backup_id: str, *, skip_safety_backup: bool, trigger: Trigger = Trigger.MANUAL) -> Job:
        """Start restoring a stored backup in its own thread. Raises at
        once (before any job starts) for a bad id, an unknown backup, one that is not READY, or while another
        job runs."""
        backup = self.restorable(backup_id)
        subject = f"the upload {backup.id}" if trigger is Trigger.UPLOADED else backup.id
        job = Job(
            kind=JobKind.RESTORE, trigger=trigger, description=f"a restore of {subject}", backup=backup, subject=backup
        )

        def body(job: Job) -> RestoreResult:
            with self.database.job_lock(job.description) as lock, self.store.in_use(backup.id):
                # Again, now that it is in use: a Delete may have come between the request and this mark.
                in_use = self.restorable(backup.id)
                return self.restore_stored(job, in_use, skip_safety_backup=skip_safety_backup, lock=lock)

        return self.slot.start(job, body)

    def start_restore_file(
        self,
        backup: Backup,
        path: Path,
        *,
        skip_safety_backup: bool,
        on_intact: Callable[[], Backup],
        on_failure: Callable[[BackupError], BackupError],
    ) -> Job:
        """Start restoring an archive that is not a READY backup yet (an upload, `backup` still CREATING,
        its file at `path`), trigger UPLOADED. The restore's own read is the archive's check: `on_intact` is
        called once the whole file read intact and matched `backup.sha256`, before the restore commits, and
        returns the backup as now stored; `on_failure`, in the job's thread, gets the restore's error and
        returns the one the job reports (it decides what becomes of the archive). Raises JobRunning at once
        while another job runs."""
        job = Job(
            kind=JobKind.RESTORE,
            trigger=Trigger.UPLOADED,
            description=f"a restore of the upload {backup.id}",
            backup=backup,
            subject=backup,
        )

        def body(job: Job) -> RestoreResult:
            try:
                with self.database.job_lock(job.description) as lock, self.store.in_use(backup.id):
                    return self._restore_from(
                        job, backup, path, skip_safety_backup=skip_safety_backup, lock=lock, on_intact=on_intact
                    )
            except BackupError as exc:
                raise on_failure(exc) from exc
            except Exception as exc:  # a bug: recorded as Internal, and the archive is decided all the same
                _logger.exception("%s failed unexpectedly", job.description)
                raise on_failure(Internal(f"{job.description} failed: {exc}")) from exc

        return self.slot.start(job, body)

    def sweep_leftovers(self, interrupted: JobRecord | None) -> None:
        """At start-up: remove the working files of restores a dead process left, and end the server process
        of an interrupted restore that still runs (it would hold its locks until its statement ends)."""
        # Before the working files: a verification's throwaway server may live among them, still running.
        throwaway.sweep_orphans(self.work_dir)
        if self.work_dir is not None and self.work_dir.is_dir():
            for entry in self.work_dir.iterdir():
                _logger.info("removing %s, left by a restore that did not finish", entry)
                shutil.rmtree(entry, ignore_errors=True)
        isolation.drop_leftovers(
            self.database, staging=interrupted is not None and bool(interrupted.notes.get("staging_database"))
        )
        name = interrupted.notes.get("application_name", "") if interrupted else ""
        if not name.startswith(APPLICATION_NAME_PREFIX):
            return
        try:
            with self.database.connect() as conn:
                ended = conn.execute(
                    "SELECT pg_catalog.pg_terminate_backend(pid, 10000) FROM pg_catalog.pg_stat_activity "
                    "WHERE application_name = %s",
                    (name,),
                ).fetchall()
        except (Unavailable, psycopg.Error) as exc:
            _logger.warning("could not look for the interrupted restore's server process: %s", exc)
            return
        if ended:
            _logger.warning("ended the server process of the interrupted restore (%s); it was rolled back", name)

    def restorable(self, backup_id: str) -> Backup:
        """The backup, or NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION when it cannot be restored."""
        backup = self.backups.get(backup_id)
        if backup.state is State.CREATING:
            raise FailedPrecondition(
                f"backup {backup.id} is still being created; wait for it to finish", reason="BACKUP_IN_PROGRESS"
            )
        if backup.state is State.FAILED:
            raise FailedPrecondition(
                f"backup {backup.id} failed and holds no archive to restore ({backup.error or 'no reason recorded'})",
                reason="BACKUP_FAILED",
            )
        return backup

    def restore_stored(
        self, job: Job, backup: Backup, *, skip_safety_backup: bool, lock: JobLock | None = None
    ) -> RestoreResult:
        """Check the archive, take the safety backup, restore, notify. The caller holds the job slot, the
        database lock and a pin on `backup`. An archive only the bucket has is fetched into the backup
        directory first (its checksum checked)."""
        with self.backups.archives.local_file(backup) as path:
            return self._restore_from(job, backup, path, skip_safety_backup=skip_safety_backup, lock=lock)

    def _restore_from(
        self,
        job: Job,
        backup: Backup,
        path: Path,
        *,
        skip_safety_backup: bool,
        lock: JobLock | None,
        on_intact: Callable[[], Backup] | None = None,
    ) -> RestoreResult:
        started = time.monotonic()
        stored: list[Backup] = []
        intact = None if on_intact is None else (lambda: stored.append(on_intact()))
        info = self.database.server_info()
        toolset = toolchain.for_server(info.major, self._pg_bin_dir)
        job.update(progress=Progress(phase="verifying", bytes_total=backup.size_bytes, elapsed_seconds=job.elapsed()))
        if backup.kind.encrypted:
            self.keys.require_identity(backup.id, backup.age_recipients)
        # A wrong identity shows here, at the first chunk, before the safety backup or the database.
        archive = self.inspect(
            path, backup.kind, server_major=info.major, toolset=toolset, recipients=backup.age_recipients
        )

        staged = self._staged()
        with contextlib.ExitStack() as stack:
            safety = None
            if not skip_safety_backup and staged:
                safety = self._restore_beside_safety_backup(
                    job,
                    stack,
                    backup,
                    path,
                    toolset=toolset,
                    lock=lock,
                    extensions=archive.extensions,
                    on_intact=intact,
                )
            else:
                if not skip_safety_backup:
                    # In place the load drops and re-creates the live tables in its transaction: it needs
                    # ACCESS EXCLUSIVE locks, which pg_dump's ACCESS SHARE locks would keep it from (it would
                    # wait, then fail at the lock timeout). So the safety backup comes first, whole.
                    progress = _RestoreProgress(job, backup)
                    progress.safety_started()
                    safety_job = _PartJob(
                        kind=JobKind.BACKUP,
                        trigger=Trigger.PRE_RESTORE,
                        description="the safety backup before a restore",
                        cancel=job.cancel.child(),
                        parent=job,
                        report=progress.from_safety,
                    )
                    try:
                        safety = self._take_safety_backup(safety_job)
                    finally:
                        progress.safety_ended()
                    stack.enter_context(self.store.in_use(safety.id))
                self.restore_file(
                    job,
                    path,
                    backup.kind,
                    expected_sha256=backup.sha256,
                    toolset=toolset,
                    recipients=backup.age_recipients,
                    lock=lock,
                    extensions=archive.extensions,
                    staged=staged,
                    on_intact=intact,
                )
        if stored:
            backup = stored[0]
        try:
            self.database.notify_restored(backup.id)
        except (Unavailable, psycopg.Error) as exc:
            # The restore is committed; a lost notification must not turn it into a failure.
            _logger.warning("restored %s but could not send NOTIFY %s: %s", backup.id, NOTIFY_CHANNEL, exc)
        result = RestoreResult(restored=backup, safety_backup=safety, duration_seconds=time.monotonic() - started)
        _logger.info(
            "restored %s into %s in %.1f s (safety backup: %s)",
            backup.id,
            self.database.describe(),
            result.duration_seconds,
            safety.id if safety else "skipped",
        )
        job.update(
            progress=Progress(
                phase="done", bytes_done=backup.size_bytes, bytes_total=backup.size_bytes, elapsed_seconds=job.elapsed()
            )
        )
        return result

    def _restore_beside_safety_backup(
        self,
        job: Job,
        stack: contextlib.ExitStack,
        backup: Backup,
        path: Path,
        *,
        toolset: Toolset,
        lock: JobLock | None,
        extensions: Sequence[str],
        on_intact: Callable[[], object] | None = None,
    ) -> Backup:
        """A staging restore with its safety backup made at the same time as the staging database is loaded:
        nothing changes the live database before the swap, so pg_dump's snapshot, taken as it starts, is the
        database as it was just before the restore, whatever the load does meanwhile. The swap (the only
        change to the live database, which also ends every session there, pg_dump's too) waits until the
        safety backup is stored: READY, its checksum written, pinned. Should it fail, the load is stopped, the
        staging database dropped and nothing swapped. Should the load fail (or the restore be cancelled), the
        safety backup is stopped too and leaves nothing behind: the database is unchanged, so there is
        nothing to go back to. The stored safety backup is returned."""
        progress = _RestoreProgress(job, backup)
        load_job = _PartJob(
            kind=JobKind.RESTORE,
            trigger=job.trigger,
            description=job.description,
            cancel=job.cancel.child(),
            parent=job,
            report=lambda shown, _backup: progress.from_load(shown),
        )
        safety_run = _SafetyBackupRun(
            self._take_safety_backup, job, progress, on_failure=lambda: load_job.cancel.request(_SAFETY_FAILED)
        )
        stored: list[Backup] = []

        def before_swap() -> None:
            if not safety_run.done:
                _logger.info("the staging database is loaded; the swap waits for the safety backup")
                progress.from_load(
                    Progress(
                        phase="restoring",
                        bytes_done=backup.size_bytes,
                        bytes_total=backup.size_bytes,
                        message="loaded into the staging database, which replaces the live one once the safety "
                        "backup is stored",
                    )
                )
            safety = safety_run.result()
            stack.enter_context(self.store.in_use(safety.id))
            stored.append(safety)
            progress.from_load(
                Progress(
                    phase="restoring",
                    bytes_done=backup.size_bytes,
                    bytes_total=backup.size_bytes,
                    message="the safety backup is stored; the restored database replaces the live one",
                )
            )

        safety_run.start()
        try:
            self.restore_file(
                load_job,
                path,
                backup.kind,
                expected_sha256=backup.sha256,
                toolset=toolset,
                recipients=backup.age_recipients,
                lock=lock,
                extensions=extensions,
                staged=True,
                before_swap=before_swap,
                on_intact=on_intact,
            )
        except BaseException as exc:
            safety_run.stop(_LOAD_FAILED)
            if job.cancel.is_set():
                raise job.cancel.error("the restore") from None
            if safety_run.failed_on_its_own and safety_run.error is not None:
                raise safety_run.error from None
            if isinstance(exc, BackupError) and safety_run.backup is not None:
                _logger.info("the restore failed; its safety backup %s is kept all the same", safety_run.backup.id)
            raise
        return stored[0]

    def _take_safety_backup(self, safety_job: Job) -> Backup:
        """One safety backup, reported through `safety_job` (a part of the restore's job), pinned once stored.
        Stopped through its cancellation, it leaves nothing behind; any other failure is recorded as a FAILED
        backup and raised worded for the restore."""
        try:
            safety = self.backups.dump_into_store(
                safety_job, DEFAULT_KIND, Trigger.PRE_RESTORE, forget_when_cancelled=True
            )
            # Pinned, so that a week of retention after a restore that went wrong cannot delete the way back.
            return self.backups.pin(safety.id, ttl=SAFETY_BACKUP_PIN)
        except BackupError as exc:
            raise type(exc)(
                f"the safety backup failed, so the restore was not applied and the database is unchanged: {exc}",
                reason=exc.reason,
                metadata=exc.metadata,
            ) from exc

    # -- checking an archive before touching the database ----------------------------------------------

    def reader(
        self,
        path: Path,
        kind: ArchiveKind,
        *,
        recipients: Sequence[str] = (),
        on_read: Callable[[int], None] | None = None,
    ) -> ArchiveReader:
        """A reader of the archive's content: decrypted with the service's identity when it is encrypted."""
        decrypt: Decrypt | None = None
        if kind.encrypted:
            keys = self.keys

            def decrypt(ciphertext: Iterable[bytes]) -> Iterator[bytes]:
                return keys.decrypting(ciphertext, archive=path.name, recipients=recipients)

        return ArchiveReader(path, kind.compression, on_read=on_read, decrypt=decrypt)

    def inspect(
        self, path: Path, kind: ArchiveKind, *, server_major: int, toolset: Toolset, recipients: Sequence[str] = ()
    ) -> ArchiveInfo:
        """Refuse, before the database is touched, an archive this server cannot load: one made by a newer
        pg_dump major (pg_dump 18 writes `SET transaction_timeout`, which 15 and 16 reject), or one the
        chosen pg_restore cannot read. Also catches a corrupt start of a compressed file."""
        if kind.format is Format.CUSTOM:
            text = self._pg_restore_list(path, kind, toolset, recipients)
        else:
            text = self._head(self.reader(path, kind, recipients=recipients))
        pattern = _TOC_EXTENSION_RE if kind.format is Format.CUSTOM else _SQL_EXTENSION_RE
        extensions = tuple(dict.fromkeys(m.decode() for m in pattern.findall(text)))
        match = _DUMPED_BY_RE.search(text)
        if match is None:
            # Hand-written SQL has no pg_dump header; the restore itself will tell whether it loads.
            return ArchiveInfo(pg_dump_major=None, pg_dump_version="", extensions=extensions)
        major = int(match.group(1))
        version = match.group(1).decode() + (f".{match.group(2).decode()}" if match.group(2) else "")
        if major > server_major:
            raise FailedPrecondition(
                f"archive {path.name} was made by pg_dump {version}, newer than this PostgreSQL {server_major} "
                f"server; it uses settings PostgreSQL {server_major} rejects (pg_dump 18 writes "
                f"SET transaction_timeout, for one). Restore it into a PostgreSQL {major} or newer server, or "
                f"make the backup with pg_dump {server_major}",
                reason="ARCHIVE_TOO_NEW",
                metadata={"archive_pg_dump_version": version, "server_major": str(server_major)},
            )
        return ArchiveInfo(pg_dump_major=major, pg_dump_version=version, extensions=extensions)

    @staticmethod
    def _head(reader: ArchiveReader) -> bytes:
        head = bytearray()
        chunks = reader.chunks()
        try:
            for chunk in chunks:
                head += chunk
                if len(head) >= HEAD_BYTES:
                    break
        finally:
            chunks.close()
        return bytes(head[:HEAD_BYTES])

    def _pg_restore_list(self, path: Path, kind: ArchiveKind, toolset: Toolset, recipients: Sequence[str]) -> bytes:
        """`pg_restore --list`: it reads only the archive's header and table of contents."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            # Output to files, not pipes: pg_restore prints while we may still be writing its stdin.
            # pg_restore reads the file itself when it is stored as is, else its content from stdin (no
            # file name: pg_restore takes "-" for a file name).
            direct = kind.compression is Compression.NONE and not kind.encrypted
            proc = subprocess.Popen(
                [toolset.tool("pg_restore"), "--list", *([str(path)] if direct else [])],
                stdin=subprocess.DEVNULL if direct else subprocess.PIPE,
                stdout=out,
                stderr=err,
            )
            try:
                if proc.stdin is not None:
                    chunks = self.reader(path, kind, recipients=recipients).chunks()
                    try:
                        for chunk in chunks:
                            proc.stdin.write(chunk)
                    except BrokenPipeError:
                        pass  # it has read the table of contents and exited
                    finally:
                        chunks.close()
                        with contextlib.suppress(BrokenPipeError):
                            proc.stdin.close()
                returncode = proc.wait(timeout=300)
            except BaseException:
                kill(proc)
                raise
            out.seek(0)
            err.seek(0)
            listing, errors = out.read(), err.read().decode("utf-8", "replace").strip()
        if returncode != 0:
            raise FailedPrecondition(
                f"pg_restore {toolset.version} cannot read archive {path.name} (exit status {returncode}): "
                f"{first_line(errors) or 'no message'}; it may be damaged or made by a newer pg_dump",
                reason="ARCHIVE_UNREADABLE",
            )
        return listing

    # -- loading -----------------------------------------------------------------------------------------

    def restore_file(
        self,
        job: Job,
        path: Path,
        kind: ArchiveKind,
        *,
        expected_sha256: str = "",
        toolset: Toolset | None = None,
        recipients: Sequence[str] = (),
        lock: JobLock | None = None,
        extensions: Sequence[str] = (),
        staged: bool | None = None,
        before_swap: Callable[[], None] | None = None,
        on_intact: Callable[[], object] | None = None,
    ) -> None:
        """Load `path` into the database in one transaction, replacing everything in it; commit only when
        the archive read intact (and matches `expected_sha256`, when given), after calling `on_intact`.
        Raises on any failure, after the server has rolled back. The caller holds the job slot and the
        database lock (`lock`, which a staging restore gives up at the swap), and has `inspect`ed the archive.

        Where the service's role is a superuser, the archive runs as a role without its powers in a staging
        database that then replaces the live one (isolation.py); elsewhere in place (`staged`, when the
        caller has decided already). A staging restore calls `before_swap` once the staging database is
        loaded, and swaps only if it returns."""
        if toolset is None:
            toolset = toolchain.for_server(self.database.server_info().major, self._pg_bin_dir)
        if staged is None:
            staged = self._staged()
        if not staged:
            reader, total = self._progress_reader(job, path, kind, recipients)
            deadline = time.monotonic() + self.restore_timeout_seconds
            _logger.info("restoring %s into %s with psql %s", path.name, self.database.describe(), toolset.version)
            self._load(
                job,
                reader,
                kind=kind,
                target=self.database,
                sql_filter=SqlFilter(around_vector_index=self.build_settings.around_vector_index()),
                toolset=toolset,
                expected_sha256=expected_sha256,
                total=total,
                deadline=deadline,
                on_intact=on_intact,
            )
            return
        with isolation.staging(self.database) as stage:
            self.load_staging(
                job,
                stage,
                path,
                kind,
                expected_sha256=expected_sha256,
                toolset=toolset,
                recipients=recipients,
                extensions=extensions,
                on_intact=on_intact,
            )
            if before_swap is not None:
                before_swap()
            stage.swap(release_lock=lock.release if lock is not None else None)

    def _staged(self) -> bool:
        """Whether a restore goes through a staging database (APERTURE_BACKUP_RESTORE_ISOLATION)."""
        return self.isolation == "staging" or (
            self.isolation == "auto" and isolation.role_powers(self.database).superuser
        )

    def load_staging(
        self,
        job: Job,
        stage: isolation.StagingRestore,
        path: Path,
        kind: ArchiveKind,
        *,
        expected_sha256: str,
        toolset: Toolset,
        recipients: Sequence[str] = (),
        extensions: Sequence[str] = (),
        on_intact: Callable[[], object] | None = None,
    ) -> Database:
        """Create `stage` with the archive's `extensions` and load `path` into it in one transaction; the
        Database its SQL ran as. The one loading path of a restore (which then swaps the stage in) and of a
        verification (which checks it and drops it). Raises after the rollback on any failure."""
        target = stage.create(extensions)
        job.note("staging_database", stage.name)
        _logger.info(
            "restoring %s into the staging database %s as %s with psql %s",
            path.name,
            stage.name,
            "the service's role" if stage.own_role else isolation.RESTORE_ROLE,
            toolset.version,
        )
        reader, total = self._progress_reader(job, path, kind, recipients)
        self._load(
            job,
            reader,
            kind=kind,
            target=target,
            sql_filter=SqlFilter(staging=True, around_vector_index=self.build_settings.around_vector_index()),
            toolset=toolset,
            expected_sha256=expected_sha256,
            total=total,
            deadline=time.monotonic() + self.restore_timeout_seconds,
            empty_first=False,
            on_intact=on_intact,
        )
        return target

    def _progress_reader(
        self, job: Job, path: Path, kind: ArchiveKind, recipients: Sequence[str]
    ) -> tuple[ArchiveReader, int]:
        """A reader of the archive that reports the bytes read as phase "restoring" on `job`; and its size."""
        total = path.stat().st_size
        last_report = [0.0]

        def on_read(done: int) -> None:
            now = time.monotonic()
            if now - last_report[0] >= _PROGRESS_INTERVAL or done >= total:
                last_report[0] = now
                job.update(
                    progress=Progress(
                        phase="restoring", bytes_done=done, bytes_total=total, elapsed_seconds=job.elapsed()
                    )
                )

        on_read(0)
        return self.reader(path, kind, recipients=recipients, on_read=on_read), total

    def _load(
        self,
        job: Job,
        reader: ArchiveReader,
        *,
        kind: ArchiveKind,
        target: Database,
        sql_filter: SqlFilter,
        toolset: Toolset,
        expected_sha256: str,
        total: int,
        deadline: float,
        empty_first: bool = True,
        on_intact: Callable[[], object] | None = None,
    ) -> None:
        """One psql session loads the archive into `target` in one transaction; raises unless it committed.
        `on_intact` runs once every byte is read and checked, before COMMIT is sent: what it raises rolls
        the restore back like any other failure."""
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryDirectory(prefix="aperture-restore-", dir=self.work_dir) as workdir:
            session = _PsqlSession(
                toolset,
                target,
                Path(workdir),
                lock_timeout_seconds=self.lock_timeout_seconds,
                empty_first=empty_first,
                settings=self.build_settings.as_settings(),
            )
            job.note("application_name", session.application_name)
            watching = session.watch(job.cancel, deadline)
            try:
                try:
                    if kind.format is Format.CUSTOM:
                        self._feed_custom(job, reader, session, sql_filter, toolset)
                    else:
                        self._feed_plain(job, reader, session, sql_filter)
                    reader.verify(expected_sha256)
                    if on_intact is not None:
                        on_intact()
                    session.commit()
                except _PsqlGone:
                    pass  # psql stopped at an error; its exit status and the server tell the rest
                except SqlFilterError as exc:
                    raise exc.to_error() from None
            except BaseException:
                session.kill()
                session.transaction_status(settle=True)  # return only once the rollback is done
                watching.set()
                raise
            if session.commit_sent:
                # Every byte is read, but psql is still at work on what the archive ends with: pg_dump puts
                # index builds and constraint checks after the data, and they can take longest.
                job.update(
                    progress=Progress(
                        phase="restoring",
                        bytes_done=total,
                        bytes_total=total,
                        elapsed_seconds=job.elapsed(),
                        message="all data sent; PostgreSQL is building indexes and checking constraints",
                    )
                )
            returncode = session.wait()
            watching.set()
            status = session.transaction_status(settle=not session.commit_sent or returncode != 0)
            if status != "committed":
                # A stop asked for (or a time limit passed) explains the failure better than psql's exit.
                if job.cancel.is_set():
                    raise job.cancel.error("the restore") from None
                if time.monotonic() >= deadline:
                    raise DeadlineExceeded(
                        f"the restore took longer than its limit of {self.restore_timeout_seconds:g} s "
                        "(APERTURE_BACKUP_RESTORE_TIMEOUT) and was rolled back; the database is unchanged",
                        reason="RESTORE_TIMEOUT",
                    )
            self._judge(session, returncode, status)  # while the transaction id files still exist

    @staticmethod
    def _judge(session: _PsqlSession, returncode: int, status: str | None) -> None:
        """Success only when our COMMIT committed the very transaction that ran the preamble and the whole
        archive: the server says it committed, and it was still the current one after the archive."""
        start, end = session.start_xid, session.end_xid
        own_transaction = start is not None and end == start
        if status == "committed" and session.commit_sent and own_transaction:
            if returncode != 0:  # e.g. the connection broke after COMMIT was processed
                _logger.warning("psql exited with status %d after the restore committed", returncode)
            return
        detail = session.stderr.summary()
        if status == "committed" or (end is not None and not own_transaction):
            raise FailedPrecondition(
                "the archive ended the restore's transaction itself (it contains COMMIT or ROLLBACK), so it "
                "cannot be restored atomically; the database may hold part of it: restore the safety backup "
                f"(psql exit status {returncode}: {detail})",
                reason="ARCHIVE_NOT_ATOMIC",
            )
        if status is None and returncode == 0:
            raise Internal(f"the restore ended without a transaction status (psql: {detail})")
        if session.commit_sent and returncode == 0:
            raise Internal(f"psql reported success but the restore's transaction is {status}: {detail}")
        raise FailedPrecondition(
            f"the archive could not be loaded (psql exit status {returncode}): {detail}; the restore was rolled "
            "back and the database is unchanged",
            reason="RESTORE_FAILED",
        )

    def _feed_plain(self, job: Job, reader: ArchiveReader, session: _PsqlSession, sql_filter: SqlFilter) -> None:
        for chunk in reader.chunks():
            _check_cancel(job)
            for piece in sql_filter.feed(chunk):
                session.write(piece)
        session.write(sql_filter.finish())

    def _feed_custom(
        self, job: Job, reader: ArchiveReader, session: _PsqlSession, sql_filter: SqlFilter, toolset: Toolset
    ) -> None:
        """pg_restore turns the archive into SQL (with --no-owner --no-acl, like Aperture's own dumps, and
        without --single-transaction, so its output is shaped exactly like a plain dump). The archive is
        fed to its stdin by a thread, so the file is read, hashed and checked once."""
        proc = subprocess.Popen(
            [toolset.tool("pg_restore"), "--no-owner", "--no-acl", "--exit-on-error", "--file", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if proc.stdin is None or proc.stdout is None or proc.stderr is None:  # pragma: no cover
            raise Internal("pg_restore started without pipes")
        enlarge_pipe(proc.stdin)
        enlarge_pipe(proc.stdout)
        stderr = StderrTail(proc.stderr, "pg_restore")
        stderr.start()
        stop = threading.Event()
        feeder = _Feeder(reader, proc.stdin, stop)
        feeder.start()
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        try:
            while True:
                _check_cancel(job)
                n = proc.stdout.readinto(view)  # type: ignore[attr-defined]
                if not n:
                    break
                for piece in sql_filter.feed(view[:n]):
                    session.write(piece)
            returncode = proc.wait()
            feeder.join()
            stderr.join(5)
        except BaseException:
            stop.set()
            kill(proc)
            feeder.join()
            raise
        if feeder.error is not None:
            raise feeder.error
        if returncode != 0:
            raise DataLoss(
                f"pg_restore {toolset.version} could not read the archive (exit status {returncode}): "
                f"{stderr.summary()}; the database was left unchanged",
                reason="ARCHIVE_CORRUPT",
            )
        session.write(sql_filter.finish())


class _Feeder(threading.Thread):
    """Copies the decompressed archive into pg_restore's stdin. When pg_restore stops reading early, the
    rest of the file is still read (not written), so that the checksum covers every byte."""

    def __init__(self, reader: ArchiveReader, sink: IO[bytes], stop: threading.Event):
        super().__init__(name="restore-feeder", daemon=True)
        self._reader = reader
        self._sink = sink
        self._halt = stop
        self.error: BackupError | None = None

    def run(self) -> None:
        writing = True
        try:
            for chunk in self._reader.chunks(stop=self._halt):
                if writing:
                    try:
                        self._sink.write(chunk)
                    except BrokenPipeError:
                        writing = False
        except BackupError as exc:
            self.error = exc
        except OSError as exc:
            self.error = Internal(f"reading the archive failed: {exc}")
        finally:
            with contextlib.suppress(OSError):
                self._sink.close()


def _check_cancel(job: Job) -> None:
    if job.cancel.is_set():
        raise job.cancel.error("the restore")

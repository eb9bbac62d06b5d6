"""The archive store: the backup directory on disk, the single source of truth about backups.

Layout: each archive `<id>` has a manifest `<id>.manifest.json` beside it. Archive data is written to a
hidden temporary name (`.tmp-<id>`) in the same directory, fsynced, then renamed into place, so a listed
READY archive is always complete. Files without a manifest (Aperture's own, or copied in by hand) are
listed too, recognised by content (an encrypted one is looked into with the service's identity, when it
has one). Dot-files (temporaries, the `.state` folder) are never listed.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from aperture_backup import archive_format
from aperture_backup.errors import BackupError, InvalidArgument, NotFound, from_os_error
from aperture_backup.fsutil import WritebackFile, fsync_directory, write_json
from aperture_backup.model import ArchiveKind, Backup, Location, State, Trigger

from .watch import DirectoryWatch

_logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
TEMP_PREFIX = ".tmp-"
MAX_ID_LENGTH = 200
ID_PREFIX = "aperture-backup-"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_HERE = frozenset({Location.LOCAL})
#: A file changed this recently (nanoseconds) is read again at every listing, whatever its stat says: a
#: second write within the file system's timestamp granularity could leave mtime and size unchanged.
_SETTLE_NS = 2_000_000_000

#: What identifies one version of a file for the listing cache: inode (an atomic rename makes a new one),
#: modification time and size.
_Signature = tuple[int, int, int]


def _signature(stat: os.stat_result) -> _Signature:
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class _SharedScan:
    """The listing of the directory, made by scanning it, shared by callers.

    A caller never gets a scan that began before it asked, unless the directory's watch (inotify) says
    nothing List shows has changed since that scan began, and that scan is less than RESCAN_SECONDS old
    (inotify misses what other machines change on a network file system). Otherwise it waits for the scan
    in progress, if any, then takes the next one's result (or makes it): 20 callers at once cost at most
    two scans, and each sees every change made before its call.

    The result is a tuple handed out as it is, not a copy: while nothing changed, callers get the very same
    object, so what they derive from it (a page's messages, GetStatus's summary) can be kept per listing."""

    #: However quiet the watch, scan again after this long.
    RESCAN_SECONDS = 2.0

    def __init__(self, scan: Callable[[set[str] | None], tuple[Backup, ...]], watch: DirectoryWatch | None):
        """`scan(names)`: the listing, looking again at `names` only (the rest as the last scan saw it), or at
        the whole directory when `names` is None."""
        self._scan = scan
        self._watch = watch
        self._cond = threading.Condition()
        self._running = False
        self._started = 0  # scans begun so far
        self._finished = 0  # the number of the scan whose outcome is kept below
        self._finished_began = 0.0  # when that scan began (time.monotonic)
        self._stale_below = 1  # scans numbered below this may have missed a change
        self._result: tuple[Backup, ...] = ()
        self._error: BaseException | None = None
        #: Names changed since the last scan began, for the next one; None: it must look at every file.
        self._pending: set[str] | None = None

    def invalidate(self, *names: str) -> None:
        """This store changed these names of the directory (or, without names, anything): the next caller
        scans."""
        with self._cond:
            self._stale_below = self._started + 1
            self._note(set(names) if names else None)

    def _note(self, changes: set[str] | None) -> None:
        if changes is None:
            self._pending = None
        elif self._pending is not None:
            self._pending |= changes

    def __call__(self) -> tuple[Backup, ...]:
        with self._cond:
            if self._watch is None:
                self._note(None)
            else:
                changes = self._watch.changes()
                if changes is None or changes:
                    self._note(changes)
                    self._stale_below = self._started + 1
                elif self._error is None and self._finished >= self._stale_below:
                    if time.monotonic() - self._finished_began < self.RESCAN_SECONDS:
                        return self._result
                    if self._running:
                        # The look at the whole directory that RESCAN_SECONDS asks for is under way: nothing
                        # the watch sees changed, so the last listing stands until it ends.
                        return self._result
                    self._note(None)
            wanted = self._started + 1  # the first scan to begin from now on
            while self._finished < wanted:
                if not self._running:
                    self._running = True
                    self._started += 1
                    mine = self._started
                    began = time.monotonic()
                    names, self._pending = self._pending, set()
                    break
                self._cond.wait()
            else:
                if self._error is not None:
                    raise self._error
                return self._result
        result: tuple[Backup, ...] = ()
        error: BaseException | None = None
        try:
            result = self._scan(names)
        except BaseException as exc:
            error = exc
        with self._cond:
            self._running = False
            self._finished, self._finished_began, self._result, self._error = mine, began, result, error
            if error is not None:
                self._pending = None
            self._cond.notify_all()
        if error is not None:
            raise error
        return result


class _ParsedFiles:
    """What List learnt from each file of the directory (a manifest parsed, a file without one looked
    into), kept while the file's signature is unchanged, so that a listing costs one directory scan and a
    stat per file rather than reading and parsing every manifest. A file changed by anyone (this store, a
    person, another program) gets a new signature and is read again; a file gone is forgotten."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[_Signature, Backup | None]] = {}

    def get(self, name: str, stat: os.stat_result) -> tuple[bool, Backup | None]:
        """(found, what was learnt); found is False when the file must be read."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or entry[0] != _signature(stat):
            return False, None
        return True, entry[1]

    def put(self, name: str, stat: os.stat_result, value: Backup | None) -> None:
        if time.time_ns() - stat.st_mtime_ns < _SETTLE_NS:
            return  # too fresh to trust its signature; read again next time
        with self._lock:
            self._entries[name] = (_signature(stat), value)

    def forget(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)

    def keep_only(self, names: Collection[str]) -> None:
        with self._lock:
            for gone in self._entries.keys() - names:
                del self._entries[gone]


def validate_id(backup_id: str) -> str:
    """Refuse anything that is not a plain file name of this directory: no empty ids, no `..`, no slashes
    or other path syntax, nothing over-long. Returns the id."""
    if not backup_id:
        raise InvalidArgument("backup id is empty; pass the id shown by List", reason="INVALID_BACKUP_ID")
    if len(backup_id) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"backup id is {len(backup_id)} characters long; ids are at most {MAX_ID_LENGTH}",
            reason="INVALID_BACKUP_ID",
        )
    if ".." in backup_id or not _ID_RE.match(backup_id) or backup_id.endswith(MANIFEST_SUFFIX):
        raise InvalidArgument(
            f"{backup_id!r} is not a backup id: ids are file names in the backup directory "
            "(letters, digits, '.', '_', '-', no paths)",
            reason="INVALID_BACKUP_ID",
        )
    return backup_id


@dataclass(frozen=True)
class PageToken:
    """Keyset position in the newest-first order, so pages stay stable while new backups arrive."""

    create_time: datetime
    id: str

    def encode(self) -> str:
        raw = json.dumps([self.create_time.isoformat(), self.id]).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @classmethod
    def decode(cls, token: str) -> PageToken:
        try:
            when, backup_id = json.loads(base64.urlsafe_b64decode(token.encode()))
            create_time = datetime.fromisoformat(when)
            if create_time.tzinfo is None or not isinstance(backup_id, str):
                # List's own tokens carry an aware time and a string; a naive one cannot be compared.
                raise ValueError("not a token of List")
            return cls(create_time, backup_id)
        except (ValueError, TypeError):
            raise InvalidArgument(
                "page_token is not a token returned by List; start again with an empty token",
                reason="INVALID_PAGE_TOKEN",
            ) from None


def sort_key(backup: Backup) -> tuple[datetime, str]:
    """The order of every listing (the directory's, the bucket's, both merged): newest first is this key
    in reverse."""
    return (backup.create_time, backup.id)


def _first_after(backups: Sequence[Backup], key: tuple[datetime, str]) -> int:
    """The index of the first backup below `key` in `backups` (newest first): a binary search, so a page
    deep into 1,000 backups costs no pass over all of them."""
    low, high = 0, len(backups)
    while low < high:
        middle = (low + high) // 2
        if sort_key(backups[middle]) < key:
            high = middle
        else:
            low = middle + 1
    return low


class ArchiveWriter:
    """An archive being written: a hidden temporary file that becomes the archive only on `commit`."""

    def __init__(self, store: ArchiveStore, backup: Backup):
        self.store = store
        self.backup = backup
        self.temp_path = store.directory / (TEMP_PREFIX + backup.id)
        try:
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            store.manifest_path(backup.id).unlink(missing_ok=True)
            raise from_os_error(exc, f"creating the archive {backup.id}") from None
        self.file: BinaryIO = WritebackFile(fd)
        self._done = False

    def commit(self, **fields: object) -> Backup:
        """fsync the data, rename it into place, fsync the directory, then mark the manifest READY. When the
        manifest cannot be written (a full disk), the archive goes back to its temporary name and the writer
        stays unfinished, so that `abort` or `discard` removes it as for any archive that failed: no archive
        is left in place with a manifest that says it is still being made."""
        final = self.store.directory / self.backup.id
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp_path, final)
            self.store.fsync_directory()
        except OSError as exc:
            raise from_os_error(exc, f"saving the archive {self.backup.id}") from None
        ready = self.backup.replace(state=State.READY, locations=_HERE, **fields)
        try:
            self.store.write_manifest(ready)
        except BaseException:
            try:
                os.replace(final, self.temp_path)
            except OSError:
                with contextlib.suppress(OSError):
                    final.unlink(missing_ok=True)
            raise
        self._done = True
        self.backup = ready
        return ready

    @property
    def finished(self) -> bool:
        """True once committed, aborted or discarded."""
        return self._done

    def discard(self) -> None:
        """Forget the reservation entirely (nothing ran, so there is nothing to record)."""
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self.temp_path.unlink(missing_ok=True)
        self.store.manifest_path(self.backup.id).unlink(missing_ok=True)

    def abort(self, error: str) -> Backup:
        """Throw the partial data away and record why, so the failure stays visible in List."""
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        self.temp_path.unlink(missing_ok=True)
        self.backup = self.backup.replace(state=State.FAILED, error=error, size_bytes=0, sha256="")
        try:
            self.store.write_manifest(self.backup)
        except BackupError as exc:
            # No room even for the record (a full disk): drop the reservation rather than leave it CREATING
            # forever; the caller still gets the failure.
            _logger.warning("could not record the failure of %s (%s); removing its manifest", self.backup.id, exc)
            self.store.manifest_path(self.backup.id).unlink(missing_ok=True)
        return self.backup


#: What the last scan saw of each listed name: whether it is a file, and its stat once taken.
_Files = dict[str, tuple[bool, os.stat_result | None]]


class _IrregularManifest(Exception):
    """A manifest names another backup than its file's: only a look at every file can place it."""


class _Listing:
    """The backups of the last scan in List's order, kept so that a scan after a few names changed places
    those backups again (a binary search each) rather than sorting every backup: with 1,000 backups a
    whole pass costs milliseconds of the interpreter, which every List and GetStatus waits for while a
    backup's files change."""

    def __init__(self) -> None:
        self._by_id: dict[str, Backup] = {}
        self._ascending: list[Backup] = []  # oldest first: `bisect` wants ascending keys
        #: Whether each manifest names the backup of its own file name, so that a backup depends only on
        #: the files of its id (see `ArchiveStore._backup_of`).
        self.regular = True

    def rebuild(self, found: tuple[dict[str, Backup], bool]) -> tuple[Backup, ...]:
        self._by_id, self.regular = found
        self._ascending = sorted(self._by_id.values(), key=sort_key)
        return self.newest_first()

    def update(self, placed: dict[str, Backup | None]) -> tuple[Backup, ...]:
        """Each id's backup replaced by the one given (None: it is gone)."""
        for backup_id, backup in placed.items():
            old = self._by_id.pop(backup_id, None)
            if old is not None:
                at = bisect.bisect_left(self._ascending, sort_key(old), key=sort_key)
                del self._ascending[at]
            if backup is not None:
                self._by_id[backup_id] = backup
                bisect.insort(self._ascending, backup, key=sort_key)
        return self.newest_first()

    def newest_first(self) -> tuple[Backup, ...]:
        return tuple(reversed(self._ascending))


class ArchiveStore:
    """The backup directory: create, list, read and delete archives, safely."""

    location = Location.LOCAL

    def __init__(self, directory: Path, *, decrypt_head: archive_format.DecryptHead | None = None, watch: bool = True):
        """`watch`: reuse a listing while inotify reports no change (off: scan at every listing)."""
        self.directory = directory
        self._decrypt_head = decrypt_head
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self._lock = threading.Lock()
        self._manifest_lock = threading.Lock()
        self._users: Counter[str] = Counter()
        self._parsed = _ParsedFiles()
        self._files: _Files | None = None  # as the last scan saw the directory
        self._listing = _Listing()
        self._shared_scan = _SharedScan(self._scan, DirectoryWatch.open(directory) if watch else None)

    # -- writing ---------------------------------------------------------------------------------------

    def begin(
        self, kind: ArchiveKind, trigger: Trigger, *, now: datetime | None = None, **fields: object
    ) -> ArchiveWriter:
        """Reserve a new unique id (the manifest is created exclusively, so two backups in the same
        microsecond, or from two replicas, can never share a name) and open its temporary file."""
        when = (now or datetime.now(UTC)).astimezone(UTC)
        while True:
            stamp = when.strftime("%Y-%m-%dT%H-%M-%S") + f"-{when.microsecond:06d}Z"
            backup_id = f"{ID_PREFIX}{stamp}-{secrets.token_hex(2)}{kind.extension}"
            backup = Backup(id=backup_id, state=State.CREATING, create_time=when, kind=kind, trigger=trigger)
            backup = backup.replace(**fields)
            try:
                self.write_manifest(backup, exclusive=True)
            except FileExistsError:
                continue
            return ArchiveWriter(self, backup)

    def write_manifest(self, backup: Backup, *, exclusive: bool = False) -> None:
        """Write the manifest atomically (temporary file, fsync, rename), readable by the owner only."""
        # The temporary name starts with TEMP_PREFIX, so the start-up sweep removes one a crash left.
        temp = self.directory / f"{TEMP_PREFIX}{backup.id}{MANIFEST_SUFFIX}"
        try:
            write_json(self.manifest_path(backup.id), backup.to_json(), temp=temp, exclusive=exclusive)
        except OSError as exc:
            raise from_os_error(exc, f"writing the manifest of {backup.id}") from None
        finally:
            self._parsed.forget(backup.id + MANIFEST_SUFFIX)
            # The archive's name too: a commit renamed it into place just before.
            self._shared_scan.invalidate(backup.id + MANIFEST_SUFFIX, backup.id)

    def update(self, backup_id: str, change: Callable[[Backup], Backup]) -> Backup:
        """Change what the manifest of a backup says (its verification, its pin), one caller at a time so
        that two changes do not undo each other. A file found without a manifest gets one."""
        with self._manifest_lock:
            updated = change(self.get(backup_id))
            self.write_manifest(updated)
            return updated

    def fsync_directory(self) -> None:
        fsync_directory(self.directory)

    def sweep(self, *, running_ids: frozenset[str] = frozenset()) -> None:
        """Start-up clean-up: remove temporary files left by a crash and mark interrupted backups FAILED."""
        for entry in self.directory.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file():
                _logger.info("removing leftover temporary file %s", entry.name)
                entry.unlink(missing_ok=True)
        for backup in self._manifest_backups():
            if backup.trigger is Trigger.EXTERNAL and not (self.directory / backup.id).exists():
                _logger.info("removing the manifest of %s: the file is gone", backup.id)
                self.manifest_path(backup.id).unlink(missing_ok=True)
                continue
            if backup.state is State.CREATING and backup.id not in running_ids:
                _logger.warning("backup %s was interrupted (service stopped); marking it FAILED", backup.id)
                self.write_manifest(
                    backup.replace(state=State.FAILED, error="interrupted: the service stopped while it ran")
                )

    # -- reading ---------------------------------------------------------------------------------------

    def list_backups(self) -> list[Backup]:
        """Every backup, newest first (a list of the caller's own; `listing` shares one)."""
        return list(self._shared_scan())

    def listing(self) -> tuple[Backup, ...]:
        """Every backup, newest first. One scan of the directory, shared by callers who ask at the same time
        (see `_SharedScan`); manifests and files without one are read only when they changed since the
        last scan (see `_ParsedFiles`). The same tuple while the directory is unchanged."""
        return self._shared_scan()

    def _scan(self, changed: set[str] | None = None) -> tuple[Backup, ...]:
        """The listing. With `changed` (the names the watch or this store saw change since the last scan),
        only those names are looked at again, the rest of the directory is as the last scan saw it: a file
        system call per changed name rather than per file (each costs tens of microseconds on a virtual
        machine, a whole scan of 2,000 files tens of milliseconds), and only the backups of those names are
        placed again in the kept order (`_Listing`). Without, the whole directory."""
        files = self._files
        try:
            if changed is None or files is None:
                files = self._scan_directory()
                self._files = files
                return self._listing.rebuild(self._all_backups(files))
            files = dict(files)
            for name in changed:
                # Read again, whatever its signature says: a second write within the file system's timestamp
                # granularity could leave it unchanged.
                self._parsed.forget(name)
                try:
                    stat = os.stat(self.directory / name)
                except OSError:
                    files.pop(name, None)  # gone
                    continue
                files[name] = (S_ISREG(stat.st_mode), stat)
            self._files = files
            if self._listing.regular:
                ids = {name.removesuffix(MANIFEST_SUFFIX) for name in changed}
                with contextlib.suppress(_IrregularManifest):
                    return self._listing.update({backup_id: self._backup_of(files, backup_id) for backup_id in ids})
            return self._listing.rebuild(self._all_backups(files))
        except BaseException:
            self._files = None  # what was kept may be half updated: the next scan looks at everything
            raise

    def _scan_directory(self) -> _Files:
        files: _Files = {}
        with os.scandir(self.directory) as scan:
            for entry in scan:
                if entry.name.startswith("."):
                    continue
                try:
                    is_file = entry.is_file()
                    # A manifest is always read through the cache, which needs its signature.
                    stat = entry.stat() if entry.name.endswith(MANIFEST_SUFFIX) else None
                except OSError:
                    continue  # removed since the scan
                files[entry.name] = (is_file, stat)
        return files

    def _all_backups(self, files: _Files) -> tuple[dict[str, Backup], bool]:
        """Every backup of the directory as `files` has it, by id; and whether each manifest names the
        backup of its own file name (as every manifest this store writes does), which `_backup_of` needs."""
        backups: dict[str, Backup] = {}
        claims: dict[str, tuple[bool, str]] = {}  # by id: (not the manifest of that id's file, manifest name)
        regular = True
        for name, (_, stat) in files.items():
            if name.endswith(MANIFEST_SUFFIX) and stat is not None:
                backup = self._cached(name, stat, self._read_manifest_here)
                if backup is None:
                    continue
                # Where two manifests name one backup (a manifest copied under another name), the backup's
                # own manifest wins, else the first name: the same answer whatever order the directory has.
                claim = (backup.id != name.removesuffix(MANIFEST_SUFFIX), name)
                regular = regular and not claim[0]
                if backup.id not in claims or claim < claims[backup.id]:
                    claims[backup.id] = claim
                    backups[backup.id] = backup
        for name, (is_file, known) in files.items():
            if name.endswith(MANIFEST_SUFFIX) or name in backups:
                continue
            external = self._external_of(files, name, is_file, known)
            if external is not None:
                backups[name] = external
        self._parsed.keep_only(files.keys())
        found = {}
        for backup_id, backup in backups.items():
            shown = self._as_found(backup, has_file=files.get(backup_id, (False, None))[0])
            if shown is not None:
                found[backup_id] = shown
        return found, regular

    def _backup_of(self, files: _Files, backup_id: str) -> Backup | None:
        """The backup of one id as `files` has it, as `_all_backups` would find it when every manifest names
        its own file's backup: its manifest's, else the file recognised by content. Raises _IrregularManifest
        when the manifest names another backup."""
        known = files.get(backup_id + MANIFEST_SUFFIX)
        backup = None
        if known is not None and known[1] is not None:
            backup = self._cached(backup_id + MANIFEST_SUFFIX, known[1], self._read_manifest_here)
            if backup is not None and backup.id != backup_id:
                raise _IrregularManifest(backup_id)
        if backup is None and backup_id in files and not backup_id.endswith(MANIFEST_SUFFIX):
            backup = self._external_of(files, backup_id, *files[backup_id])
        if backup is None:
            return None
        return self._as_found(backup, has_file=files.get(backup_id, (False, None))[0])

    def _external_of(self, files: _Files, name: str, is_file: bool, known: os.stat_result | None) -> Backup | None:
        """A file without a manifest, recognised by content (through the cache); its stat taken when the
        directory scan did not."""
        stat = known
        if stat is None:
            try:
                stat = os.stat(self.directory / name)
            except OSError:
                return None  # removed since the scan
            files[name] = (is_file, stat)
        return self._cached(name, stat, self._external)

    def _cached(self, name: str, stat: os.stat_result, read: Callable[[Path], Backup | None]) -> Backup | None:
        """What `read` makes of the file, from the cache while the file is unchanged."""
        known, value = self._parsed.get(name, stat)
        if known:
            return value
        value = read(self.directory / name)
        self._parsed.put(name, stat, value)
        return value

    def page_of(self, backups: Sequence[Backup], page_size: int, page_token: str) -> tuple[list[Backup], str]:
        """One page of `backups` (newest first), and the token of the next page ('' on the last)."""
        start = 0
        if page_token:
            after = PageToken.decode(page_token)
            start = _first_after(backups, (after.create_time, after.id))
        page = list(backups[start : start + page_size])
        more = len(backups) > start + page_size
        return page, PageToken(page[-1].create_time, page[-1].id).encode() if more and page else ""

    def page(self, page_size: int, page_token: str) -> tuple[list[Backup], str]:
        """One page of `list()`, and the token of the next page ('' on the last)."""
        return self.page_of(self.listing(), page_size, page_token)

    def get(self, backup_id: str) -> Backup:
        validate_id(backup_id)
        manifest = self.manifest_path(backup_id)
        recorded = self._read_manifest(manifest) if manifest.is_file() else None
        if recorded is not None:
            found = self._as_found(recorded)
        else:  # no manifest, or an unreadable one: recognise the file by content, as List does
            path = self.directory / backup_id
            found = self._external(path) if path.is_file() else None
        if found is None:
            raise NotFound(f"no backup with id {backup_id!r}; List shows the ids there are")
        return found

    def path_of(self, backup_id: str) -> Path:
        return self.directory / validate_id(backup_id)

    def open(self, backup_id: str) -> BinaryIO:
        """Open a READY archive for reading."""
        return open(self.path_of(backup_id), "rb")

    @contextlib.contextmanager
    def reading(self, backup_id: str, offset: int = 0) -> Iterator[BinaryIO]:
        with self.open(backup_id) as handle:
            handle.seek(offset)
            yield handle

    def has_file(self, backup_id: str) -> bool:
        return (self.directory / validate_id(backup_id)).is_file()

    def delete(self, backup_id: str) -> Backup:
        backup = self.get(backup_id)
        (self.directory / backup_id).unlink(missing_ok=True)
        self.manifest_path(backup_id).unlink(missing_ok=True)
        self._parsed.forget(backup_id)
        self._parsed.forget(backup_id + MANIFEST_SUFFIX)
        self._shared_scan.invalidate(backup_id, backup_id + MANIFEST_SUFFIX)
        self.fsync_directory()
        _logger.info("deleted backup %s", backup_id)
        return backup

    # -- archives in use (downloaded, restored, verified), which neither retention nor Delete may remove --
    # (Not to be confused with a backup's `pinned` flag, which a person sets to keep it from retention.)

    @contextlib.contextmanager
    def in_use(self, backup_id: str) -> Iterator[None]:
        with self._lock:
            self._users[backup_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._users[backup_id] -= 1
                if self._users[backup_id] <= 0:
                    del self._users[backup_id]

    def is_in_use(self, backup_id: str) -> bool:
        with self._lock:
            return self._users[backup_id] > 0

    # -- internals -------------------------------------------------------------------------------------

    def manifest_path(self, backup_id: str) -> Path:
        return self.directory / (backup_id + MANIFEST_SUFFIX)

    def _manifest_backups(self) -> list[Backup]:
        backups = []
        for entry in self.directory.iterdir():
            if entry.name.endswith(MANIFEST_SUFFIX) and not entry.name.startswith("."):
                backup = self._read_manifest(entry)
                if backup is not None:
                    backups.append(backup)
        return backups

    def _as_found(self, backup: Backup, *, has_file: bool | None = None) -> Backup | None:
        """A manifest's backup as the directory has it now: a READY archive whose file is gone is FAILED, or
        not there at all when someone else made it (Aperture prunes its own files). `has_file`: whether the
        archive file is there, when the caller has just scanned the directory."""
        if has_file is None:
            has_file = (self.directory / backup.id).is_file()
        if has_file:
            # Listings cache manifests already located here: no copy per backup and call.
            return backup if backup.locations == _HERE else backup.replace(locations=_HERE)
        if backup.state is not State.READY:
            return backup.replace(locations=frozenset()) if backup.locations else backup
        if backup.trigger is Trigger.EXTERNAL:
            return None
        return backup.replace(
            state=State.FAILED, error="the archive file is missing from the backup directory", locations=frozenset()
        )

    def _read_manifest_here(self, path: Path) -> Backup | None:
        backup = self._read_manifest(path)
        return backup.replace(locations=_HERE) if backup is not None else None

    def _read_manifest(self, path: Path) -> Backup | None:
        try:
            return Backup.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _logger.warning("ignoring unreadable manifest %s: %s", path.name, exc)
            return None

    def _external(self, path: Path) -> Backup | None:
        """A file without a manifest, recognised by content; None when it is not an archive."""
        try:
            if not path.is_file() or len(path.name) > MAX_ID_LENGTH or not _ID_RE.match(path.name):
                return None
            with open(path, "rb") as handle:
                header = handle.read(archive_format.SNIFF_BYTES)
                if archive_format.is_encrypted(header):
                    header += handle.read(archive_format.sniff_bytes(header) - len(header))
            stat = path.stat()
        except OSError:
            return None
        try:
            kind = archive_format.sniff(header, decrypt_head=self._decrypt_head, name=path.name)
        except BackupError as exc:
            # Not for this identity, or damaged: still listed (its name hints at the kind); a restore or a
            # download's check says what is wrong with it.
            _logger.info("cannot look into the encrypted file %s: %s", path.name, exc)
            kind = archive_format.sniff(header, name=path.name)
        if kind is None:
            return None
        return Backup(
            id=path.name,
            state=State.READY,
            create_time=datetime.fromtimestamp(stat.st_mtime, UTC),
            kind=kind,
            trigger=Trigger.EXTERNAL,
            size_bytes=stat.st_size,
            locations=_HERE,
        )

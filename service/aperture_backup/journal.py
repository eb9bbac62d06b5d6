"""A record of the running job on disk, so that a job the service could not finish (SIGKILL, a crash, a
power cut) is known after the restart: shown in GetStatus, logged, and its leftovers cleaned up.

`<state dir>/job.json` is written when a job starts (and when it learns something worth keeping, such as
the application name of a restore's psql session) and removed when it ends. Finding it at start-up means
the previous process died during that job: it becomes `<state dir>/interrupted.json` until a later job of
the same kind ends, and the restore's server process, if it still runs (PostgreSQL does not notice a
client that vanished while a statement runs), is ended so that it does not hold its locks.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .fsutil import write_json

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobRecord:
    """What the journal knows of a job."""

    kind: str
    trigger: str
    description: str
    start_time: datetime
    backup_id: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    #: Who asked for the job (callers.py), for the job history of an interrupted one.
    caller_role: str = ""
    caller_address: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["start_time"] = self.start_time.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobRecord:
        return cls(
            kind=str(data["kind"]),
            trigger=str(data["trigger"]),
            description=str(data["description"]),
            start_time=datetime.fromisoformat(str(data["start_time"])),
            backup_id=str(data.get("backup_id") or ""),
            notes={str(k): str(v) for k, v in (data.get("notes") or {}).items()},
            caller_role=str(data.get("caller_role") or ""),
            caller_address=str(data.get("caller_address") or ""),
        )


class JobJournal:
    """The running job's record, and the one the last process left unfinished."""

    def __init__(self, state_dir: Path):
        self._current = state_dir / "job.json"
        self._interrupted_path = state_dir / "interrupted.json"
        self._lock = threading.Lock()
        self.interrupted: JobRecord | None = None

    def recover(self) -> JobRecord | None:
        """At start-up: the job the previous process did not finish, if any (also kept in `interrupted`)."""
        with self._lock:
            found = self._read(self._current)
            if found is not None:
                _logger.warning(
                    "the service stopped during %s (started %s) without finishing it%s",
                    found.description,
                    found.start_time.isoformat(timespec="seconds"),
                    "; a restore is rolled back by PostgreSQL, the database is unchanged"
                    if found.kind == "restore"
                    else "",
                )
                self._write(self._interrupted_path, found)
                self._current.unlink(missing_ok=True)
                self.interrupted = found
            else:
                self.interrupted = self._read(self._interrupted_path)
            return found

    def begin(self, record: JobRecord) -> None:
        with self._lock:
            self._write(self._current, record)

    def end(self, record: JobRecord) -> None:
        """The job ended (however): forget it, and the interrupted one of its kind, which it supersedes."""
        with self._lock:
            self._current.unlink(missing_ok=True)
            if self.interrupted is not None and self.interrupted.kind == record.kind:
                self.interrupted = None
                self._interrupted_path.unlink(missing_ok=True)

    def _write(self, path: Path, record: JobRecord) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_json(path, record.to_json())
        except OSError as exc:
            # The journal helps after a crash; a full disk must not stop the job itself.
            _logger.warning("could not write the job journal %s: %s", path, exc)

    @staticmethod
    def _read(path: Path) -> JobRecord | None:
        try:
            return JobRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            _logger.warning("ignoring unreadable job journal %s: %s", path, exc)
            return None

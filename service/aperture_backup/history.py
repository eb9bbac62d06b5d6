"""The job history: the last jobs that ended (backups, restores, verifications, deletes, retention runs),
with what started them, who asked, when, how long they took and how they ended.

Kept in `<state dir>/history.json` beside the job journal, rewritten atomically after each job, so it
survives restarts and a crash never leaves half a file; bounded to the newest `DEFAULT_LIMIT` entries. A
job the previous process did not finish (journal.py) is added as INTERRUPTED at start-up.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import InvalidArgument
from .fsutil import write_json
from .jobs import Job
from .journal import JobRecord

_logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 200
_FILE_VERSION = 1


class Outcome:
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class HistoryEntry:
    """One job that ended. `seq` numbers entries in the order they ended, across restarts."""

    seq: int
    kind: str
    trigger: str
    description: str
    start_time: datetime
    duration_seconds: float
    outcome: str
    backup_id: str = ""
    caller_role: str = ""
    caller_address: str = ""
    error: str = ""
    error_reason: str = ""
    summary: str = ""

    @property
    def id(self) -> str:
        return f"job-{self.seq:06d}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["start_time"] = self.start_time.isoformat()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryEntry:
        return cls(
            seq=int(data["seq"]),
            kind=str(data["kind"]),
            trigger=str(data["trigger"]),
            description=str(data.get("description") or ""),
            start_time=datetime.fromisoformat(str(data["start_time"])),
            duration_seconds=float(data.get("duration_seconds") or 0.0),
            outcome=str(data["outcome"]),
            backup_id=str(data.get("backup_id") or ""),
            caller_role=str(data.get("caller_role") or ""),
            caller_address=str(data.get("caller_address") or ""),
            error=str(data.get("error") or ""),
            error_reason=str(data.get("error_reason") or ""),
            summary=str(data.get("summary") or ""),
        )


def entry_of(job: Job) -> HistoryEntry:
    """The history entry of a job that has ended (seq filled in by `JobHistory.add`)."""
    error = job.error
    if error is None:
        outcome = Outcome.SUCCEEDED
    elif error.reason == "CANCELLED":
        outcome = Outcome.CANCELLED
    else:
        outcome = Outcome.FAILED
    return HistoryEntry(
        seq=0,
        kind=job.kind.value,
        trigger=job.trigger.value,
        description=job.description,
        start_time=job.start_time,
        duration_seconds=job.elapsed(),
        outcome=outcome,
        backup_id=job.subject_id or job.backup_id,
        caller_role=job.caller.role if job.caller else "",
        caller_address=job.caller.address if job.caller else "",
        error=str(error) if error is not None else "",
        error_reason=(error.reason or "") if error is not None else "",
        summary=job.summary,
    )


class JobHistory:
    """The newest `limit` jobs that ended, newest first, on disk and in memory."""

    def __init__(self, path: Path, *, limit: int = DEFAULT_LIMIT):
        self._path = path
        self._limit = limit
        self._lock = threading.Lock()
        self._entries: list[HistoryEntry] = self._load()  # oldest first

    def job_ended(self, job: Job) -> None:
        """A `JobSlot.on_end` listener."""
        self.add(entry_of(job))

    def interrupted(self, record: JobRecord) -> None:
        """A job the previous process did not finish (found by the journal at start-up)."""
        self.add(
            HistoryEntry(
                seq=0,
                kind=record.kind,
                trigger=record.trigger,
                description=record.description,
                start_time=record.start_time,
                duration_seconds=0.0,
                outcome=Outcome.INTERRUPTED,
                backup_id=record.backup_id,
                caller_role=record.caller_role,
                caller_address=record.caller_address,
                error=f"the service stopped during {record.description} before it finished",
                error_reason="INTERRUPTED",
            )
        )

    def add(self, entry: HistoryEntry) -> HistoryEntry:
        with self._lock:
            entry = replace(entry, seq=(self._entries[-1].seq + 1) if self._entries else 1)
            self._entries = [*self._entries, entry][-self._limit :]
            self._save()
            return entry

    def entries(self) -> list[HistoryEntry]:
        """Newest first."""
        with self._lock:
            return list(reversed(self._entries))

    def page(self, page_size: int, page_token: str) -> tuple[list[HistoryEntry], str]:
        """Up to `page_size` entries, newest first, from where `page_token` left off; the token of the next
        page, empty after the last. The token names the entry to go on from, so pages stay right while jobs
        end between calls."""
        below: int | None = None
        if page_token:
            if not page_token.startswith("job-") or not page_token[4:].isdigit():
                raise InvalidArgument(
                    "page_token is not one this service gave out; pass the next_page_token of the previous "
                    "ListJobs response, or nothing for the first page",
                    reason="INVALID_PAGE_TOKEN",
                )
            below = int(page_token[4:]) + 1
        newest_first = self.entries()
        if below is not None:
            newest_first = [e for e in newest_first if e.seq < below]
        page, rest = newest_first[:page_size], newest_first[page_size:]
        return page, rest[0].id if rest else ""

    def _load(self) -> list[HistoryEntry]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            _logger.warning("ignoring unreadable job history %s: %s", self._path, exc)
            return []
        try:
            entries = [HistoryEntry.from_json(item) for item in data["jobs"]]
        except (KeyError, TypeError, ValueError) as exc:
            _logger.warning("ignoring invalid job history %s: %s", self._path, exc)
            return []
        return sorted(entries, key=lambda e: e.seq)[-self._limit :]

    def _save(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_json(self._path, {"version": _FILE_VERSION, "jobs": [e.to_json() for e in self._entries]})
        except OSError as exc:
            # The history helps people; a full disk must not fail the job it records.
            _logger.warning("could not write the job history %s: %s", self._path, exc)

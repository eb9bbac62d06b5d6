"""Which backups a retention policy keeps, and why: a pure function of the backups, the policy, the time
zone and the time, with no store and no clock of its own, so that every storage location (the local
directory, an offsite bucket with its own policy) is pruned by the same rules.

The rules combine as restic's `forget` combines them: a backup kept by any rule is kept.

- `keep_last`: the newest N candidates.
- `keep_daily` / `keep_weekly` / `keep_monthly`: walking from the newest candidate to the oldest, the
  first one of each day (ISO week from Monday, month) not yet seen, until N days (weeks, months) are
  covered. Periods are those of the schedule's time zone, so a backup at 00:30 in Berlin counts for that
  day in Berlin, not for the day before in UTC.

Candidates are the READY backups except uploads. Whatever the rules, these are never deleted: a pinned
backup (its pin not expired), the newest READY backup, the newest verified one, an upload, anything still
being made, and anything the caller says is in use. FAILED entries are never candidates, so however many
there are they cannot push a good backup out; they are deleted once older than the oldest kept candidate
(they are records of what went wrong, worth keeping as long as the backups around them).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo

from .model import Backup, State, Trigger

#: Backups that are never candidates and never deleted by retention: whoever uploads can upload many, and
#: uploads must not push out the backups of this database. They stay until deleted by hand.
UNCOUNTED_TRIGGERS = frozenset({Trigger.UPLOADED})

#: Reasons a backup is kept, as `Decision.reasons` names them.
LAST = "last"
DAILY = "daily"
WEEKLY = "weekly"
MONTHLY = "monthly"
PINNED = "pinned"
NEWEST = "newest"
NEWEST_VERIFIED = "newest verified"
IN_USE = "in use"
UPLOAD = "upload"
CREATING = "creating"
#: A FAILED entry no older than the oldest kept backup.
RECENT_FAILURE = "recent failure"


@dataclass(frozen=True)
class Policy:
    """How many backups, and of how many days, weeks and months, to keep."""

    keep_last: int
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0


@dataclass(frozen=True)
class Decision:
    """What retention does with one backup: keep it (for these reasons) or delete it (no reasons)."""

    backup: Backup
    reasons: tuple[str, ...]

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


Period = Callable[[datetime], tuple[int, ...]]


def _day(when: datetime) -> tuple[int, ...]:
    return (when.year, when.month, when.day)


def _week(when: datetime) -> tuple[int, ...]:
    iso = when.isocalendar()
    return (iso.year, iso.week)


def _month(when: datetime) -> tuple[int, ...]:
    return (when.year, when.month)


def decide(
    backups: Sequence[Backup],
    policy: Policy,
    zone: tzinfo,
    *,
    now: datetime,
    in_use: Collection[str] = frozenset(),
    keep_newest: bool = True,
) -> list[Decision]:
    """A decision for every backup in `backups`, newest first. `keep_newest=False` lets the newest READY
    and the newest verified backup go too (the directory's copies, when the bucket keeps those)."""
    ordered = sorted(backups, key=lambda b: (b.create_time, b.id), reverse=True)
    reasons: dict[str, list[str]] = {b.id: [] for b in ordered}
    candidates = [b for b in ordered if b.state is State.READY and b.trigger not in UNCOUNTED_TRIGGERS]

    for backup in candidates[: policy.keep_last]:
        reasons[backup.id].append(LAST)
    for reason, count, period in (
        (DAILY, policy.keep_daily, _day),
        (WEEKLY, policy.keep_weekly, _week),
        (MONTHLY, policy.keep_monthly, _month),
    ):
        seen: set[tuple[int, ...]] = set()
        for backup in candidates:
            if len(seen) >= count:
                break
            bucket = period(backup.create_time.astimezone(zone))
            if bucket not in seen:
                seen.add(bucket)
                reasons[backup.id].append(reason)

    ready = [b for b in ordered if b.state is State.READY]
    if ready and keep_newest:
        reasons[ready[0].id].append(NEWEST)
    verified = next((b for b in ready if b.verified), None)
    if verified is not None and keep_newest:
        reasons[verified.id].append(NEWEST_VERIFIED)
    for backup in ordered:
        if backup.pinned_at(now):
            reasons[backup.id].append(PINNED)
        if backup.id in in_use:
            reasons[backup.id].append(IN_USE)
        if backup.state is State.CREATING:
            reasons[backup.id].append(CREATING)
        if backup.trigger in UNCOUNTED_TRIGGERS:
            reasons[backup.id].append(UPLOAD)

    kept_times = [b.create_time for b in candidates if reasons[b.id]]
    oldest_kept = min(kept_times) if kept_times else None
    for backup in ordered:
        if backup.state is State.FAILED and (oldest_kept is None or backup.create_time >= oldest_kept):
            reasons[backup.id].append(RECENT_FAILURE)
    return [Decision(b, tuple(reasons[b.id])) for b in ordered]


def to_delete(decisions: Sequence[Decision]) -> list[Backup]:
    """The backups the decisions delete, newest first."""
    return [d.backup for d in decisions if not d.keep]

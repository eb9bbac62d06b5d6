"""Settings an administrator changes at run time (retention, schedule), persisted across restarts.

The environment gives the initial values; once changed through the API, the stored value wins, so that a
restart does not silently undo what an administrator set.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import time
from pathlib import Path

from .config import MAX_KEEP, MAX_KEEP_PERIODS, Config, ConfigError, parse_hhmm, parse_time_zone
from .errors import InvalidArgument, from_os_error
from .fsutil import write_json
from .retention import Policy

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    enabled: bool
    time_of_day: str
    time_zone: str
    catch_up: bool

    @property
    def time(self) -> time:
        return parse_hhmm(self.time_of_day, variable="time_of_day")


@dataclass(frozen=True)
class Settings:
    keep: int
    schedule: Schedule
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    @property
    def policy(self) -> Policy:
        return Policy(self.keep, self.keep_daily, self.keep_weekly, self.keep_monthly)


def check_policy(policy: Policy, *, bucket: bool = False) -> None:
    """Refuse a policy that cannot be meant: counts out of range, or one that keeps nothing by any rule (which
    with a bucket is the directory keeping each archive only until it is offsite)."""
    if not 0 <= policy.keep_last <= MAX_KEEP:
        raise InvalidArgument(
            f"keep_last must be between 0 and {MAX_KEEP}, got {policy.keep_last}", reason="INVALID_RETENTION"
        )
    for name, value in (
        ("keep_daily", policy.keep_daily),
        ("keep_weekly", policy.keep_weekly),
        ("keep_monthly", policy.keep_monthly),
    ):
        if not 0 <= value <= MAX_KEEP_PERIODS:
            raise InvalidArgument(
                f"{name} must be between 0 and {MAX_KEEP_PERIODS}, got {value}", reason="INVALID_RETENTION"
            )
    if not (bucket or policy.keep_last or policy.keep_daily or policy.keep_weekly or policy.keep_monthly):
        raise InvalidArgument(
            "the policy keeps nothing: set keep_last (1 to 100) or one of keep_daily, keep_weekly, keep_monthly",
            reason="INVALID_RETENTION",
        )


_Change = Callable[[Settings], Settings]


class SettingsStore:
    """Settings in `<state dir>/settings.json`, written atomically."""

    def __init__(self, path: Path, config: Config):
        self._path = path
        #: With a bucket the directory may keep no archive at all (each stays until it is offsite).
        self.bucket = config.s3_url is not None
        self._lock = threading.Lock()
        defaults = Settings(
            keep=config.keep,
            keep_daily=config.keep_daily,
            keep_weekly=config.keep_weekly,
            keep_monthly=config.keep_monthly,
            schedule=Schedule(
                enabled=config.schedule_enabled,
                time_of_day=config.schedule_time.strftime("%H:%M"),
                time_zone=config.time_zone,
                catch_up=config.catch_up,
            ),
        )
        self._settings = self._load(defaults)

    @property
    def current(self) -> Settings:
        with self._lock:
            return self._settings

    def check_policy(self, policy: Policy) -> None:
        check_policy(policy, bucket=self.bucket)

    def set_policy(self, policy: Policy) -> Settings:
        self.check_policy(policy)
        return self._update(
            lambda s: replace(
                s,
                keep=policy.keep_last,
                keep_daily=policy.keep_daily,
                keep_weekly=policy.keep_weekly,
                keep_monthly=policy.keep_monthly,
            )
        )

    def set_schedule(
        self,
        *,
        enabled: bool | None = None,
        time_of_day: str | None = None,
        time_zone: str | None = None,
        catch_up: bool | None = None,
    ) -> Settings:
        try:
            if time_of_day is not None:
                time_of_day = parse_hhmm(time_of_day, variable="time_of_day").strftime("%H:%M")
            if time_zone is not None:
                parse_time_zone(time_zone, variable="time_zone")
        except ConfigError as exc:
            raise InvalidArgument(str(exc), reason="INVALID_SCHEDULE") from None

        def change(settings: Settings) -> Settings:
            old = settings.schedule
            return replace(
                settings,
                schedule=Schedule(
                    enabled=old.enabled if enabled is None else enabled,
                    time_of_day=old.time_of_day if time_of_day is None else time_of_day,
                    time_zone=old.time_zone if time_zone is None else time_zone,
                    catch_up=old.catch_up if catch_up is None else catch_up,
                ),
            )

        return self._update(change)

    def _update(self, change: _Change) -> Settings:
        with self._lock:
            updated = change(self._settings)
            self._save(updated)
            self._settings = updated
            return updated

    def _load(self, defaults: Settings) -> Settings:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return defaults
        except (OSError, ValueError) as exc:
            _logger.warning("ignoring unreadable settings file %s: %s", self._path, exc)
            return defaults
        try:
            schedule = data.get("schedule", {})
            loaded = Settings(
                keep=int(data.get("keep", defaults.keep)),
                # Settings saved before the GFS rules existed have none: the environment's then.
                keep_daily=int(data.get("keep_daily", defaults.keep_daily)),
                keep_weekly=int(data.get("keep_weekly", defaults.keep_weekly)),
                keep_monthly=int(data.get("keep_monthly", defaults.keep_monthly)),
                schedule=Schedule(
                    enabled=bool(schedule.get("enabled", defaults.schedule.enabled)),
                    time_of_day=str(schedule.get("time_of_day", defaults.schedule.time_of_day)),
                    time_zone=str(schedule.get("time_zone", defaults.schedule.time_zone)),
                    catch_up=bool(schedule.get("catch_up", defaults.schedule.catch_up)),
                ),
            )
            parse_hhmm(loaded.schedule.time_of_day, variable="time_of_day")
            parse_time_zone(loaded.schedule.time_zone, variable="time_zone")
            check_policy(loaded.policy)
        except (ConfigError, InvalidArgument, ValueError, TypeError, AttributeError) as exc:
            _logger.warning("ignoring invalid settings file %s: %s", self._path, exc)
            return defaults
        _logger.info("loaded settings saved through the API from %s", self._path)
        return loaded

    def _save(self, settings: Settings) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_json(self._path, asdict(settings))
        except OSError as exc:
            # Nothing changes: the caller keeps the old settings in memory, as on disk.
            raise from_os_error(exc, "saving the settings") from None

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

from .config import MAX_KEEP, MIN_KEEP, Config, ConfigError, parse_hhmm, parse_time_zone
from .errors import InvalidArgument, from_os_error
from .fsutil import write_json

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


_Change = Callable[[Settings], Settings]


class SettingsStore:
    """Settings in `<state dir>/settings.json`, written atomically."""

    def __init__(self, path: Path, config: Config):
        self._path = path
        #: With a bucket the directory may keep no archive at all (each stays until it is offsite).
        self.min_keep = 0 if config.s3_url else MIN_KEEP
        self._lock = threading.Lock()
        defaults = Settings(
            keep=config.keep,
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

    def check_keep(self, keep: int) -> None:
        if not self.min_keep <= keep <= MAX_KEEP:
            raise InvalidArgument(
                f"keep_last must be between {self.min_keep} and {MAX_KEEP}, got {keep}", reason="INVALID_RETENTION"
            )

    def set_keep(self, keep: int) -> Settings:
        self.check_keep(keep)
        return self._update(lambda s: replace(s, keep=keep))

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
                schedule=Schedule(
                    enabled=bool(schedule.get("enabled", defaults.schedule.enabled)),
                    time_of_day=str(schedule.get("time_of_day", defaults.schedule.time_of_day)),
                    time_zone=str(schedule.get("time_zone", defaults.schedule.time_zone)),
                    catch_up=bool(schedule.get("catch_up", defaults.schedule.catch_up)),
                ),
            )
            parse_hhmm(loaded.schedule.time_of_day, variable="time_of_day")
            parse_time_zone(loaded.schedule.time_zone, variable="time_zone")
        except (ConfigError, ValueError, TypeError, AttributeError) as exc:
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

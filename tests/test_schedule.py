"""The daily schedule, driven by an injected clock: time-machine moves the clock every thread reads, the
`schedule` library's included, so no test sleeps until 01:00.

gRPC's Python layer computes its waits from the same clock, so while the clock is moved these tests look
at the domain (`App`) directly and make no RPCs; the RPCs are checked with the real clock.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
import time_machine

from aperture_backup.app import App
from aperture_backup.config import Config, ConfigError
from aperture_backup.model import DEFAULT_KIND, Backup, State, Trigger
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartApp, StartService, wait_for

BERLIN = ZoneInfo("Europe/Berlin")


def _scheduled(app: App) -> list[Backup]:
    return [b for b in app.backups.list_backups() if b.trigger is Trigger.SCHEDULED]


def test_the_daily_backup_runs_at_its_local_time(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    # Ten seconds before the run: enough for the app to start first even on a loaded machine.
    with time_machine.travel(datetime(2026, 12, 1, 0, 59, 50, tzinfo=BERLIN), tick=True):
        app = app_factory(db.uri, schedule_enabled=True, schedule_time=time_of_day(1, 0), time_zone="Europe/Berlin")
        # 01:00 in Berlin in winter is 00:00 UTC.
        assert app.scheduler.next_run_time() == datetime(2026, 12, 1, 0, 0, tzinfo=UTC)
        assert _scheduled(app) == []
        wait_for(lambda: any(b.state is State.READY for b in _scheduled(app)))
        # The archive is READY a moment before the job returns to the scheduler, which then moves on.
        wait_for(lambda: app.scheduler.next_run_time() == datetime(2026, 12, 2, 0, 0, tzinfo=UTC), timeout=10)
        assert app.backups.status().last_successful is not None


def test_a_failed_scheduled_run_is_visible_and_the_thread_goes_on(app_factory: StartApp) -> None:
    with time_machine.travel(datetime(2026, 12, 1, 0, 59, 50, tzinfo=UTC), tick=True):
        app = app_factory(
            "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2",
            schedule_enabled=True,
            schedule_time=time_of_day(1, 0),
            time_zone="UTC",
        )
        wait_for(lambda: [b.state for b in _scheduled(app)] == [State.FAILED])
        failed = _scheduled(app)[0]
        assert failed.state is State.FAILED
        assert "127.0.0.1:1" in failed.error
        status = app.backups.status()
        assert status.last_failed is not None and status.last_failed.id == failed.id
        wait_for(lambda: app.scheduler.next_run_time() == datetime(2026, 12, 2, 1, 0, tzinfo=UTC))
        assert app.scheduler.alive


def test_a_missed_backup_is_caught_up_after_start_up(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    first = app_factory(db.uri, backup_dir=backup_dir)
    first.backups.start_backup(DEFAULT_KIND, Trigger.MANUAL).wait(60)
    first.stop()

    # The service was down for two days.
    with time_machine.travel(datetime.now(UTC) + timedelta(days=2), tick=True):
        app = app_factory(db.uri, backup_dir=backup_dir, schedule_enabled=True, catch_up=True)
        wait_for(lambda: any(b.state is State.READY for b in _scheduled(app)))
        app.stop()

    # Turned off, nothing is caught up.
    with time_machine.travel(datetime.now(UTC) + timedelta(days=4), tick=True):
        quiet = app_factory(db.uri, backup_dir=backup_dir, schedule_enabled=True, catch_up=False)
        time.sleep(2)
        assert len(_scheduled(quiet)) == 1


def test_set_schedule_changes_persist_and_validate(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16)
    backup_dir = tmp_path / "backups"
    svc = service_factory(db.uri, backup_dir=backup_dir, schedule_enabled=True)
    response = svc.client.set_schedule(time_of_day="03:15", time_zone="America/New_York")
    assert response.schedule.enabled and response.schedule.time_of_day == "03:15"
    next_run = response.next_run_time.ToDatetime(tzinfo=UTC).astimezone(ZoneInfo("America/New_York"))
    assert (next_run.hour, next_run.minute) == (3, 15)
    assert svc.client.status().next_scheduled_run == response.next_run_time

    for bad_time, bad_zone in (("24:00", None), ("3pm", None), (None, "Nowhere/City")):
        with pytest.raises(grpc.RpcError) as info:
            svc.client.set_schedule(time_of_day=bad_time, time_zone=bad_zone)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    off = svc.client.set_schedule(enabled=False)
    assert not off.schedule.enabled and not off.HasField("next_run_time")
    assert off.schedule.time_of_day == "03:15", "unset fields keep their value"
    svc.stop()

    restarted = service_factory(db.uri, backup_dir=backup_dir, schedule_enabled=True)
    schedule = restarted.client.get_schedule().schedule
    assert (schedule.enabled, schedule.time_of_day, schedule.time_zone) == (False, "03:15", "America/New_York")
    assert not restarted.client.status().HasField("next_scheduled_run")


def test_status_reports_the_last_backup_and_its_age(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri, schedule_enabled=True)
    empty = svc.client.status()
    assert not empty.HasField("last_successful_backup") and not empty.HasField("current_job")
    assert empty.database == db.dbname and empty.database_reachable
    assert empty.HasField("next_scheduled_run")
    backup = svc.client.create()
    status = svc.client.status()
    assert status.last_successful_backup.id == backup.id
    assert 0 <= status.last_successful_age.ToTimedelta().total_seconds() < 60


def test_a_fresh_install_makes_its_first_backup_soon_after_start_up(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    settings = {"schedule_enabled": True, "schedule_time": time_of_day(1, 0), "catch_up": True}
    started = time.monotonic()
    app = app_factory(db.uri, backup_dir=backup_dir, first_backup_delay=3.0, **settings)
    assert _scheduled(app) == [], "not at once: the database may still be starting"
    wait_for(lambda: any(b.state is State.READY for b in _scheduled(app)), timeout=60)
    assert time.monotonic() - started >= 3.0
    # The archive is READY a moment before its job ends and is recorded.
    wait_for(lambda: [e for e in app.history.entries() if e.kind == "backup"], timeout=10)
    [entry] = [e for e in app.history.entries() if e.kind == "backup"]
    assert (entry.trigger, entry.outcome, entry.caller_role, entry.caller_address) == ("scheduled", "succeeded", "", "")
    app.stop()

    # Not a fresh install any more: a restart makes no first backup again.
    again = app_factory(db.uri, backup_dir=backup_dir, first_backup_delay=0.0, **settings)
    time.sleep(2)
    assert len(_scheduled(again)) == 1
    # Turned off, a fresh install waits for the schedule.
    waiting = app_factory(db.uri, backup_dir=tmp_path / "other", first_backup_delay=None, **settings)
    time.sleep(2)
    assert _scheduled(waiting) == []


def test_the_first_backup_delay_is_read_and_checked() -> None:
    assert Config.from_env({}).first_backup_delay == 60.0
    assert Config.from_env({"APERTURE_BACKUP_FIRST_BACKUP_DELAY": "5m"}).first_backup_delay == 300.0
    assert Config.from_env({"APERTURE_BACKUP_FIRST_BACKUP_DELAY": "off"}).first_backup_delay is None
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_FIRST_BACKUP_DELAY must be from 0s to 24h"):
        Config.from_env({"APERTURE_BACKUP_FIRST_BACKUP_DELAY": "2d"})

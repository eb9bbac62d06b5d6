"""Retention people can trust. The rules (retention.py) over a simulated year of daily backups against a
table of expected survivors, in the schedule's time zone, and as properties over any mix of backups;
then through the real service: pins, the validate_only preview, the newest verified backup, the pinned
safety backup, GFS settings that persist, and refusals that say what is wrong."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aperture_backup import cli
from aperture_backup.config import Config, ConfigError
from aperture_backup.model import DEFAULT_KIND, Backup, Pin, State, Trigger, Verification
from aperture_backup.retention import Policy, decide, to_delete
from aperture_backup_client import pb
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2026, 12, 31, 12, 0, tzinfo=UTC)


def _backup(
    when: datetime,
    *,
    state: State = State.READY,
    trigger: Trigger = Trigger.SCHEDULED,
    pin: Pin | None = None,
    verified: bool | None = None,
) -> Backup:
    stamp = when.astimezone(UTC).strftime("%Y-%m-%dT%H-%M-%S-%f")
    verification = None if verified is None else Verification(time=when + timedelta(minutes=5), passed=verified)
    return Backup(
        id=f"aperture-backup-{stamp}Z-{trigger.value[:4]}{state.value[:2]}.sql.gz",
        state=state,
        create_time=when.astimezone(UTC),
        kind=DEFAULT_KIND,
        trigger=trigger,
        pin=pin,
        verification=verification,
    )


def _year_of_daily_backups() -> list[Backup]:
    """One backup at 01:00 Berlin time on every day of 2026."""
    first = date(2026, 1, 1)
    return [
        _backup(datetime.combine(first + timedelta(days=n), datetime.min.time(), BERLIN).replace(hour=1))
        for n in range(365)
    ]


def _days(backups: list[Backup]) -> list[str]:
    return [b.create_time.astimezone(BERLIN).strftime("%Y-%m-%d") for b in backups]


#: keep_last 3, keep_daily 7, keep_weekly 4, keep_monthly 6, on 31 December 2026 (a Thursday; ISO week 53
#: runs from Monday 28 December). Each survivor and the rules that keep it.
EXPECTED_SURVIVORS = {
    "2026-12-31": {"last", "daily", "weekly", "monthly", "newest"},
    "2026-12-30": {"last", "daily"},
    "2026-12-29": {"last", "daily"},
    "2026-12-28": {"daily"},
    "2026-12-27": {"daily", "weekly"},  # Sunday: the newest of week 52
    "2026-12-26": {"daily"},
    "2026-12-25": {"daily"},
    "2026-12-20": {"weekly"},
    "2026-12-13": {"weekly"},
    "2026-11-30": {"monthly"},
    "2026-10-31": {"monthly"},
    "2026-09-30": {"monthly"},
    "2026-08-31": {"monthly"},
    "2026-07-31": {"monthly"},
}


def test_a_year_of_daily_backups_keeps_the_expected_survivors() -> None:
    backups = _year_of_daily_backups()
    decisions = decide(backups, Policy(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=6), BERLIN, now=NOW)
    kept = {_days([d.backup])[0]: set(d.reasons) for d in decisions if d.keep}
    assert kept == EXPECTED_SURVIVORS
    assert len(to_delete(decisions)) == 365 - len(EXPECTED_SURVIVORS)


def test_periods_are_those_of_the_schedules_time_zone() -> None:
    # 22:30 and 23:30 UTC on 10 March are 23:30 on the 10th and 00:30 on the 11th in Berlin.
    early, late, later = (datetime(2026, 3, 10, h, 30, tzinfo=UTC) for h in (12, 22, 23))
    backups = [_backup(early), _backup(late), _backup(later)]
    policy = Policy(keep_last=0, keep_daily=2)
    assert [b.create_time for b in to_delete(decide(backups, policy, BERLIN, now=NOW))] == [early]
    assert [b.create_time for b in to_delete(decide(backups, policy, UTC, now=NOW))] == [late, early]


def test_pins_failures_uploads_and_the_newest_verified_backup() -> None:
    days = [datetime(2026, 6, d, 1, 0, tzinfo=UTC) for d in range(1, 11)]
    verified_old = _backup(days[0], verified=True)
    pinned = _backup(days[1], pin=Pin())
    expired = _backup(days[2], pin=Pin(NOW - timedelta(days=1)))
    failed_new = [_backup(d + timedelta(hours=1), state=State.FAILED) for d in days[5:]]
    upload = _backup(days[3], trigger=Trigger.UPLOADED)
    ready = [_backup(d) for d in days[4:]]
    backups = [verified_old, pinned, expired, upload, *ready, *failed_new]
    decisions = {d.backup.id: d for d in decide(backups, Policy(keep_last=2), UTC, now=NOW)}

    assert decisions[verified_old.id].reasons == ("newest verified",)
    assert decisions[pinned.id].reasons == ("pinned",)
    assert not decisions[expired.id].keep, "an expired pin no longer keeps a backup"
    assert decisions[upload.id].reasons == ("upload",)
    assert [b.id for b in ready if decisions[b.id].keep] == [ready[-2].id, ready[-1].id]
    # Five failures newer than every good backup push nothing out, and stay as the record of what failed.
    assert all(decisions[f.id].keep for f in failed_new)


_WHEN = st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2026, 12, 31), timezones=st.just(UTC))
_BACKUPS = st.lists(
    st.builds(
        _backup,
        _WHEN,
        state=st.sampled_from([State.READY, State.READY, State.FAILED, State.CREATING]),
        trigger=st.sampled_from([Trigger.SCHEDULED, Trigger.MANUAL, Trigger.UPLOADED, Trigger.PRE_RESTORE]),
        pin=st.one_of(st.none(), st.builds(Pin, st.one_of(st.none(), _WHEN))),
        verified=st.one_of(st.none(), st.booleans()),
    ),
    max_size=40,
    unique_by=lambda b: b.id,
)
_POLICIES = st.builds(Policy, st.integers(0, 10), st.integers(0, 10), st.integers(0, 6), st.integers(0, 6))


@settings(max_examples=300, deadline=None)
@given(backups=_BACKUPS, policy=_POLICIES)
def test_what_retention_never_deletes(backups: list[Backup], policy: Policy) -> None:
    deleted = {b.id for b in to_delete(decide(backups, policy, BERLIN, now=NOW))}
    ready = sorted((b for b in backups if b.state is State.READY), key=lambda b: (b.create_time, b.id))
    for backup in backups:
        if backup.pinned_at(NOW) or backup.trigger is Trigger.UPLOADED or backup.state is State.CREATING:
            assert backup.id not in deleted
    if ready:
        assert ready[-1].id not in deleted, "the newest READY backup"
        verified = [b for b in ready if b.verified]
        if verified:
            assert verified[-1].id not in deleted, "the newest verified backup"


@settings(max_examples=300, deadline=None)
@given(backups=_BACKUPS, policy=_POLICIES, failures=st.lists(_WHEN, max_size=10))
def test_failed_backups_never_push_out_good_ones(
    backups: list[Backup], policy: Policy, failures: list[datetime]
) -> None:
    extra = [_backup(when, state=State.FAILED, trigger=Trigger.MANUAL) for when in failures]
    extra = [b for b in extra if b.id not in {x.id for x in backups}]
    without = {d.backup.id for d in decide(backups, policy, BERLIN, now=NOW) if d.keep}
    with_failures = {d.backup.id for d in decide(backups + extra, policy, BERLIN, now=NOW) if d.keep}
    good = {b.id for b in backups if b.state is State.READY}
    assert without & good == with_failures & good


@settings(max_examples=200, deadline=None)
@given(backups=_BACKUPS, policy=_POLICIES, more=st.integers(1, 5), rule=st.integers(0, 3))
def test_a_larger_policy_never_keeps_fewer_good_backups(
    backups: list[Backup], policy: Policy, more: int, rule: int
) -> None:
    counts = [policy.keep_last, policy.keep_daily, policy.keep_weekly, policy.keep_monthly]
    counts[rule] += more
    larger = Policy(*counts)
    kept = {d.backup.id for d in decide(backups, policy, BERLIN, now=NOW) if d.keep and d.backup.state is State.READY}
    kept_larger = {
        d.backup.id for d in decide(backups, larger, BERLIN, now=NOW) if d.keep and d.backup.state is State.READY
    }
    assert kept <= kept_larger


# -- through the service -------------------------------------------------------------------------------


def _ids(svc_list: object) -> list[str]:
    return [b.id for b in svc_list]  # type: ignore[attr-defined]


def test_pins_keep_backups_and_preview_deletes_nothing(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=10)
    svc = service_factory(db.uri)
    oldest, middle, newer, newest = (svc.client.create().id for _ in range(4))

    pinned = svc.client.pin(oldest)
    assert pinned.pinned and not pinned.HasField("pin_expire_time")
    for_a_day = svc.client.pin(middle, ttl=timedelta(days=1))
    expiry = for_a_day.pin_expire_time.ToDatetime(UTC)
    assert timedelta(hours=23) < expiry - datetime.now(UTC) <= timedelta(days=1)

    preview = svc.client.set_retention(1, validate_only=True)
    assert list(preview.deleted_ids) == [newer], "pinned backups are kept; the newest is kept by keep_last"
    assert _ids(svc.client.list()) == [newest, newer, middle, oldest], "a preview deletes nothing"
    assert svc.client.get_retention().keep_last == 7, "and saves nothing"

    applied = svc.client.set_retention(1)
    assert list(applied.deleted_ids) == [newer]
    assert [(b.id, b.pinned) for b in svc.client.list()] == [(newest, False), (middle, True), (oldest, True)]

    assert not svc.client.unpin(oldest).pinned
    assert svc.client.get(oldest).pinned is False
    assert list(svc.client.set_retention(1).deleted_ids) == [oldest]


def test_pin_refusals_say_what_is_wrong(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=5)
    backup_dir = tmp_path / "backups"
    svc = service_factory(db.uri, backup_dir=backup_dir)
    good = svc.client.create()
    cases = [
        ("aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz", None, grpc.StatusCode.NOT_FOUND, "no backup"),
        ("../x", None, grpc.StatusCode.INVALID_ARGUMENT, "not a backup id"),
        (good.id, timedelta(seconds=-5), grpc.StatusCode.INVALID_ARGUMENT, "ttl must be positive"),
    ]
    for backup_id, ttl, code, words in cases:
        with pytest.raises(grpc.RpcError) as info:
            svc.client.pin(backup_id, ttl=ttl)
        assert info.value.code() == code and words in (info.value.details() or "")
    svc.stop()
    broken = service_factory("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2", backup_dir=backup_dir)
    with pytest.raises(grpc.RpcError):
        broken.client.create()
    failed = next(b for b in broken.client.list() if b.state == pb.BACKUP_STATE_FAILED)
    with pytest.raises(grpc.RpcError) as info:
        broken.client.pin(failed.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only READY backups can be pinned" in (info.value.details() or "")


def test_the_newest_verified_backup_and_the_safety_backup_survive_retention(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=10)
    svc = service_factory(db.uri)
    verified = svc.client.create().id
    svc.client.verify(verified)
    svc.client.create()
    result = svc.client.restore(verified)
    safety = svc.client.get(result.safety_backup.id)
    assert safety.pinned
    expiry = safety.pin_expire_time.ToDatetime(UTC) - datetime.now(UTC)
    assert timedelta(days=6, hours=23) < expiry <= timedelta(days=7), "pinned for the documented week"
    newest = svc.client.create().id

    deleted = svc.client.set_retention(1).deleted_ids
    remaining = _ids(svc.client.list())
    assert remaining == [newest, safety.id, verified]
    assert len(deleted) == 1


def test_gfs_rules_are_set_persisted_and_validated(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16)
    backup_dir = tmp_path / "backups"
    svc = service_factory(db.uri, backup_dir=backup_dir, keep_daily=3)
    assert svc.client.get_retention() == pb.RetentionPolicy(keep_last=7, keep_daily=3)
    response = svc.client.set_retention(0, keep_daily=7, keep_weekly=4, keep_monthly=12)
    assert response.policy == pb.RetentionPolicy(keep_last=0, keep_daily=7, keep_weekly=4, keep_monthly=12)
    bad = [
        ({"keep_last": 0}, "keeps nothing"),
        ({"keep_last": 1, "keep_daily": -1}, "keep_daily must be between 0 and 1000"),
        ({"keep_last": 1, "keep_monthly": 1001}, "keep_monthly must be between 0 and 1000"),
        ({"keep_last": 101}, "keep_last must be between 0 and 100"),
    ]
    for fields, words in bad:
        with pytest.raises(grpc.RpcError) as info:
            svc.client.stub.SetRetention(pb.SetRetentionRequest(policy=pb.RetentionPolicy(**fields)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (info.value.details() or "")
    svc.stop()
    restarted = service_factory(db.uri, backup_dir=backup_dir)
    assert restarted.client.get_retention().keep_monthly == 12, "what was set through the API survives a restart"


def test_gfs_and_verify_settings_come_from_the_environment() -> None:
    config = Config.from_env(
        {
            "APERTURE_BACKUP_KEEP_DAILY": "7",
            "APERTURE_BACKUP_KEEP_WEEKLY": "4",
            "APERTURE_BACKUP_KEEP_MONTHLY": "12",
            "APERTURE_BACKUP_VERIFY": "Daily",
            "APERTURE_BACKUP_VERIFY_SQL": "SELECT count(*) > 0 FROM users",
        }
    )
    assert (config.keep_daily, config.keep_weekly, config.keep_monthly) == (7, 4, 12)
    assert config.verify == "daily" and config.verify_sql == "SELECT count(*) > 0 FROM users"
    assert Config.from_env({}).verify == "weekly"
    for variable, value in (("KEEP_DAILY", "-1"), ("KEEP_WEEKLY", "many"), ("VERIFY", "hourly")):
        with pytest.raises(ConfigError, match=f"APERTURE_BACKUP_{variable}"):
            Config.from_env({f"APERTURE_BACKUP_{variable}": value})


def test_serve_flags_set_the_gfs_rules_and_the_verify_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("APERTURE_BACKUP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("APERTURE_BACKUP_KEEP_DAILY", "3")  # the flag wins over it
    parser = argparse.ArgumentParser()
    cli._serve_parser(parser.add_subparsers(dest="command"))
    flags = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12", "--verify", "Off"]
    config = cli.config_from_args(parser.parse_args(["serve", "--dir", str(tmp_path), *flags]))
    assert (config.keep_daily, config.keep_weekly, config.keep_monthly, config.verify) == (7, 4, 12, "off")
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_KEEP_MONTHLY"):
        cli.config_from_args(parser.parse_args(["serve", "--dir", str(tmp_path), "--keep-monthly", "5000"]))

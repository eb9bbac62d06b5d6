"""Notifications through real Apprise to a real local HTTP receiver (Apprise's `json://` webhook): a backup
that really fails, a restore that succeeds, a receiver that is down and comes back, silence seen through an
injected clock, and a slow receiver that does not hold up the job."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.config import Config, ConfigError
from aperture_backup.model import DEFAULT_KIND, Trigger
from aperture_backup.notify import Message, Notifier, parse_targets
from aperture_backup.silence import SilenceWatch
from aperture_backup_client import BackupClient
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.receiver import Receiver
from tests.support.service import StartApp, StartService, clean_environment, free_port, serve_process, wait_for

#: Nothing listens on port 1: the database refuses every connection, so a backup fails for real.
REFUSING_DATABASE = "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2"


def test_a_failed_backup_notifies_what_failed_why_and_what_to_do(service_factory: StartService) -> None:
    with Receiver() as receiver:
        svc = service_factory(REFUSING_DATABASE, notify_urls=(receiver.url,))
        with pytest.raises(grpc.RpcError) as info:
            svc.client.create()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        [message] = receiver.wait_for(1)
    assert message["path"] == "/hook"
    assert message["type"] == "failure"
    assert message["title"] == "Backup of database postgres failed"
    body = message["message"]
    assert "manual backup" in body and "127.0.0.1:1" in body, "what failed and why"
    assert "What to do: check that the database server is running" in body
    assert "aperture-backup create" in body
    status = svc.client.status()
    assert status.notifications.targets == 1 and status.notifications.last_error == ""
    assert status.notifications.HasField("last_delivered_time")


def test_a_restore_and_every_success_are_told_with_notify_on_all(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    with Receiver() as receiver:
        svc = service_factory(db.uri, notify_urls=(receiver.url,), notify_on="all")
        backup = svc.client.create()
        result = svc.client.restore(backup.id)
        backup_told, restore_told = receiver.wait_for(2)
    assert backup_told["type"] == "success" and backup_told["title"] == f"Backup of database {db.dbname} succeeded"
    assert backup.id in backup_told["message"]
    assert restore_told["type"] == "success"
    assert restore_told["title"] == f"Database {db.dbname} restored from {backup.id}"
    assert result.safety_backup.id in restore_told["message"], "says how to undo it"
    assert "applications must reconnect" in restore_told["message"]


def test_successes_are_not_told_by_default(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    with Receiver() as receiver:
        svc = service_factory(db.uri, notify_urls=(receiver.url,))
        svc.client.create()
        svc.client.create()
        time.sleep(1.0)
        assert receiver.received() == []


def test_a_receiver_that_is_down_gets_the_message_once_it_is_back() -> None:
    receiver = Receiver()  # not started yet: nothing listens on its port
    notifier = Notifier(parse_targets([receiver.url], variable="TEST"), retry_delays=(0.5,) * 10)
    notifier.start()
    try:
        notifier.send(Message(event="backup_failed", title="Backup failed", body="because", failure=True))
        wait_for(lambda: notifier.status().last_error)
        status = notifier.status()
        assert status.pending == 1, "waiting to be tried again"
        assert "#1 (json)" in status.last_error and "127.0.0.1" not in status.last_error, "no URL shown"
        with receiver:
            [message] = receiver.wait_for(1)
            assert message["title"] == "Backup failed"
            wait_for(lambda: notifier.status().pending == 0)
            assert notifier.status().given_up == 0
    finally:
        notifier.stop()


def test_a_receiver_that_never_answers_is_given_up_after_the_last_retry(caplog: pytest.LogCaptureFixture) -> None:
    receiver = Receiver()
    notifier = Notifier(parse_targets([receiver.url], variable="TEST"), retry_delays=(0.1, 0.1))
    notifier.start()
    try:
        with caplog.at_level(logging.WARNING):
            notifier.send(Message(event="backup_failed", title="Backup failed", body="because", failure=True))
            wait_for(lambda: notifier.status().given_up == 1)
        assert notifier.status().pending == 0
        assert "gave up notifying #1 (json) of 'Backup failed' after 3 attempts" in caplog.text
        assert str(receiver.port) not in caplog.text, "Apprise's own log lines have the URL replaced"
    finally:
        notifier.stop()


def test_a_slow_receiver_does_not_delay_the_job(service_factory: StartService) -> None:
    with Receiver(delay=3.0) as receiver:
        svc = service_factory(REFUSING_DATABASE, notify_urls=(receiver.url,))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            svc.client.create()
        assert time.monotonic() - started < 2.5, "the failure came back before the receiver answered"
        # The job's thread has ended too (it runs the listeners): nothing of it waits for the receiver.
        wait_for(lambda: not [t for t in threading.enumerate() if t.name == "job-backup"], timeout=2.0)
        assert receiver.received() == []
        receiver.wait_for(1)


def test_silence_is_told_after_stale_after_by_an_injected_clock(
    pg16: PgServer, make_database: MakeDatabase, app_factory: StartApp
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    app = app_factory(db.uri)
    backup = app.backups.start_backup(DEFAULT_KIND, Trigger.MANUAL)
    assert backup.wait(60) and backup.error is None
    now = [datetime.now(UTC)]
    with Receiver() as receiver:
        notifier = Notifier(parse_targets([receiver.url], variable="TEST"), database=db.dbname)
        notifier.start()
        watch = SilenceWatch(app.store, notifier, timedelta(hours=26), clock=lambda: now[0])
        try:
            assert not watch.check()
            now[0] += timedelta(hours=25)
            assert not watch.check() and not watch.is_stale()
            now[0] += timedelta(hours=2)
            assert watch.check() and watch.is_stale()
            [alarm] = receiver.wait_for(1)
            # Once per stale period, not at every check.
            assert watch.check()
            now[0] += timedelta(hours=26)
            assert watch.check()
            receiver.wait_for(2)
            time.sleep(0.5)
            assert len(receiver.received()) == 2
        finally:
            notifier.stop()
    assert alarm["type"] == "failure"
    assert alarm["title"] == f"No backup of database {db.dbname} for 27 h 0 min"
    assert backup.backup is not None and backup.backup.id in alarm["message"]
    assert "APERTURE_BACKUP_STALE_AFTER (26 h 0 min)" in alarm["message"]
    assert "What to do" in alarm["message"]

    # A new backup ends the silence.
    fresh = app.backups.start_backup(DEFAULT_KIND, Trigger.MANUAL)
    assert fresh.wait(60) and fresh.error is None
    watch = SilenceWatch(app.store, Notifier([]), timedelta(hours=26))
    assert not watch.is_stale()


def test_silence_on_a_fresh_install_counts_from_the_start(service_factory: StartService, tmp_path: Path) -> None:
    started = datetime.now(UTC)
    now = [started]
    svc = service_factory(REFUSING_DATABASE)
    with Receiver() as receiver:
        notifier = Notifier(parse_targets([receiver.url], variable="TEST"))
        notifier.start()
        try:
            watch = SilenceWatch(svc.server.app.store, notifier, timedelta(hours=26), clock=lambda: now[0])
            now[0] += timedelta(hours=30)
            assert watch.check()
            [alarm] = receiver.wait_for(1)
        finally:
            notifier.stop()
    assert "no successful backup since the service started" in alarm["message"]
    status = svc.client.status()
    assert not status.stale, "the service itself started just now"
    assert status.stale_after.ToTimedelta() == timedelta(hours=26)
    assert not status.HasField("notifications")


def test_notification_settings_are_read_and_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    urls = tmp_path / "urls"
    urls.write_text("# ours\njson://127.0.0.1:9/a\nntfy://my-topic, json://127.0.0.1:9/b\n")
    config = Config.from_env(
        {
            "APERTURE_BACKUP_NOTIFY_URLS_FILE": str(urls),
            "APERTURE_BACKUP_NOTIFY_ON": "all",
            "APERTURE_BACKUP_STALE_AFTER": "2d",
        }
    )
    assert config.notify_urls == ("json://127.0.0.1:9/a", "ntfy://my-topic", "json://127.0.0.1:9/b")
    assert config.notify_on == "all" and config.stale_after == 2 * 86400
    assert "127.0.0.1:9" not in repr(config), "URLs hold secrets"
    assert Config.from_env({"APERTURE_BACKUP_STALE_AFTER": "off"}).stale_after is None
    assert Config.from_env({}).stale_after == 26 * 3600 and Config.from_env({}).notify_on == "failure"

    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as info:
        Config.from_env({"APERTURE_BACKUP_NOTIFY_URLS": "json://127.0.0.1:9/a,discord://s3cret-webhook-token"})
    message = str(info.value)
    assert "APERTURE_BACKUP_NOTIFY_URLS" in message and "#2 (discord)" in message
    assert "s3cret" not in message and "s3cret" not in caplog.text
    with pytest.raises(ConfigError, match=r"#1 \(no scheme\).*scheme://"):
        Config.from_env({"APERTURE_BACKUP_NOTIFY_URLS": "hooks.example.com/s3cret"})
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_NOTIFY_ON must be one of failure, all"):
        Config.from_env({"APERTURE_BACKUP_NOTIFY_ON": "always"})
    with pytest.raises(ConfigError, match='APERTURE_BACKUP_STALE_AFTER must be a duration such as "26h"'):
        Config.from_env({"APERTURE_BACKUP_STALE_AFTER": "a day"})
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_STALE_AFTER must be from 1m"):
        Config.from_env({"APERTURE_BACKUP_STALE_AFTER": "5s"})
    with pytest.raises(ConfigError, match="both APERTURE_BACKUP_NOTIFY_URLS and APERTURE_BACKUP_NOTIFY_URLS_FILE"):
        Config.from_env({"APERTURE_BACKUP_NOTIFY_URLS": "ntfy://t", "APERTURE_BACKUP_NOTIFY_URLS_FILE": str(urls)})


def test_the_service_as_an_operator_runs_it_tells_its_first_backup_failing(tmp_path: Path) -> None:
    """`aperture-backup serve` from the environment alone: a fresh install makes its first backup a second
    after start-up, the database refuses it, a person hears of it, and the job history shows it."""
    urls = tmp_path / "notify-urls"
    port = free_port()
    with Receiver() as receiver:
        urls.write_text(receiver.url + "\n")
        environment = clean_environment(
            DATABASE_URL=REFUSING_DATABASE,
            DIR=str(tmp_path / "backups"),
            LISTEN=f"127.0.0.1:{port}",
            NOTIFY_URLS_FILE=str(urls),
            FIRST_BACKUP_DELAY="1s",
        )
        proc = serve_process(env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            [message] = receiver.wait_for(1, timeout=60)
            with BackupClient(f"127.0.0.1:{port}") as client:
                wait_for(lambda: list(client.list_jobs()))
                [job] = client.list_jobs()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert message["title"] == "Backup of database postgres failed"
    assert "The scheduled backup" in message["message"] and "127.0.0.1:1" in message["message"]
    assert (job.kind, job.trigger, job.outcome) == (
        pb.JOB_KIND_BACKUP,
        pb.BACKUP_TRIGGER_SCHEDULED,
        pb.JOB_OUTCOME_FAILED,
    )
    assert job.caller_role == "" and job.caller_address == "", "nobody asked: the schedule did"


def test_a_notification_url_apprise_cannot_use_stops_start_up_without_showing_it(tmp_path: Path) -> None:
    environment = clean_environment(
        DIR=str(tmp_path / "backups"), NOTIFY_URLS="ntfy://fine-topic,discord://only-a-s3cret-token"
    )
    result = subprocess.run(
        [sys.executable, "-m", "aperture_backup", "serve"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "configuration error: APERTURE_BACKUP_NOTIFY_URLS: notification URL #2 (discord) cannot be used" in (
        result.stderr
    )
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_an_offsite_copy_failing_is_told_once_per_backup(tmp_path: Path) -> None:
    with Receiver() as receiver:
        notifier = Notifier(parse_targets([receiver.url], variable="TEST"), notify_on="all", database="aperture")
        notifier.start()
        try:
            notifier.offsite_failing("aperture-backup-2026-12-01T01-00-00-000000Z-0000.sql.gz", "the bucket said 403")
            notifier.offsite_failing("aperture-backup-2026-12-01T01-00-00-000000Z-0000.sql.gz", "the bucket said 403")
            [failing] = receiver.wait_for(1)
            notifier.offsite_recovered("aperture-backup-2026-12-01T01-00-00-000000Z-0000.sql.gz")
            _, recovered = receiver.wait_for(2)
            time.sleep(0.5)
            assert len(receiver.received()) == 2, "a retried copy is not told again"
        finally:
            notifier.stop()
    assert failing["type"] == "failure" and failing["title"] == "Offsite copy of database aperture failing"
    assert "the bucket said 403" in failing["message"] and "What to do" in failing["message"]
    assert recovered["type"] == "success"

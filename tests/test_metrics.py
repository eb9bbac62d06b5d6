"""The Prometheus endpoint, scraped over real HTTP from a real service and parsed with Prometheus's own
text parser: job counts and durations, the newest backup, archives, the running job, and gRPC calls by
method and status code."""

from __future__ import annotations

import time

import grpc
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.config import Config, ConfigError
from tests.support.fixtures import MakeDatabase
from tests.support.metrics import scrape
from tests.support.postgres import PgServer, table_lock
from tests.support.service import StartService, free_port, pg_dump_children, wait_for


def test_metrics_tell_what_the_service_did(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri, metrics_listen=f"127.0.0.1:{free_port()}")
    empty = scrape(svc)
    assert empty[("aperture_backup_last_success_timestamp_seconds", ())] == 0
    assert empty[("aperture_backup_archives", (("location", "local"),))] == 0

    backup = svc.client.create()
    with pytest.raises(grpc.RpcError):
        svc.client.get("aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz")
    svc.client.restore(backup.id, skip_safety_backup=True)
    wait_for(
        lambda: scrape(svc).get(
            ("aperture_backup_runs_total", (("kind", "restore"), ("result", "success"), ("trigger", "manual")))
        )
    )

    samples = scrape(svc)
    assert (
        samples[("aperture_backup_runs_total", (("kind", "backup"), ("result", "success"), ("trigger", "manual")))] == 1
    )
    assert samples[("aperture_backup_duration_seconds_count", (("kind", "backup"),))] == 1
    assert samples[("aperture_backup_duration_seconds_count", (("kind", "restore"),))] == 1
    assert abs(samples[("aperture_backup_last_success_timestamp_seconds", ())] - time.time()) < 120
    assert samples[("aperture_backup_newest_archive_bytes", ())] == backup.size_bytes
    assert samples[("aperture_backup_archives", (("location", "local"),))] == 1
    assert samples[("aperture_backup_job_running", (("kind", "backup"),))] == 0
    assert samples[("aperture_backup_grpc_requests_total", (("code", "NOT_FOUND"), ("method", "Get")))] == 1
    assert samples[("aperture_backup_grpc_requests_total", (("code", "OK"), ("method", "Create")))] == 1

    # A running job shows, and a failed one is counted as such.
    with table_lock(db.uri):
        call = svc.client.stub.Create(pb.CreateRequest(), timeout=120)
        first = next(call)
        wait_for(pg_dump_children)
        assert scrape(svc)[("aperture_backup_job_running", (("kind", "backup"),))] == 1
        svc.client.cancel(first.backup.id)
    wait_for(
        lambda: scrape(svc).get(
            ("aperture_backup_runs_total", (("kind", "backup"), ("result", "cancelled"), ("trigger", "manual")))
        )
    )


def test_a_bad_metrics_address_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="APERTURE_BACKUP_METRICS_LISTEN"):
        Config.from_env({"APERTURE_BACKUP_METRICS_LISTEN": "9464"})


def test_notifications_that_do_not_get_through_show_in_the_metrics(service_factory: StartService) -> None:
    dead = free_port()  # nothing listens: every delivery fails and waits for its retry
    svc = service_factory(
        "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2",
        metrics_listen=f"127.0.0.1:{free_port()}",
        notify_urls=(f"json://127.0.0.1:{dead}/hook",),
    )
    assert scrape(svc)[("aperture_backup_notifications_pending", ())] == 0
    with pytest.raises(grpc.RpcError):
        svc.client.create()
    wait_for(lambda: svc.client.status().notifications.last_error)
    samples = scrape(svc)
    assert samples[("aperture_backup_notifications_pending", ())] == 1
    assert samples[("aperture_backup_notifications_given_up_total", ())] == 0

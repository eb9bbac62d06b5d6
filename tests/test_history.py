"""The job history (ListJobs): every kind of job with its trigger, caller, start, duration and outcome;
kept across a real restart of the service, bounded, paged, and readable with the read-only token."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.errors import Unavailable
from aperture_backup.history import JobHistory
from aperture_backup.jobs import Job, JobKind
from aperture_backup.model import Trigger
from aperture_backup_client import BackupClient
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


def test_the_history_tells_each_job_and_who_asked_and_survives_a_restart(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    backup_dir = tmp_path / "backups"
    svc = service_factory(db.uri, backup_dir=backup_dir, token=ADMIN, read_token=READER)
    admin = BackupClient(svc.target, token=ADMIN)
    reader = BackupClient(svc.target, token=READER)
    try:
        first = admin.create()
        second = admin.create()
        admin.restore(second.id, skip_safety_backup=True)
        third = admin.create()
        admin.delete(third.id)
        retention = admin.set_retention(1)
        assert retention.deleted_ids == [first.id]

        jobs = list(reader.list_jobs())
        assert [(j.kind, j.backup_id) for j in jobs] == [
            (pb.JOB_KIND_RETENTION, ""),
            (pb.JOB_KIND_DELETE, third.id),
            (pb.JOB_KIND_BACKUP, third.id),
            (pb.JOB_KIND_RESTORE, second.id),
            (pb.JOB_KIND_BACKUP, second.id),
            (pb.JOB_KIND_BACKUP, first.id),
        ]
        for job in jobs:
            assert job.outcome == pb.JOB_OUTCOME_SUCCEEDED, job
            assert job.trigger == pb.BACKUP_TRIGGER_MANUAL
            assert job.caller_role == "admin"
            assert job.caller_address.startswith("127.0.0.1:"), job.caller_address
            assert job.start_time.seconds > 0 and job.error == ""
        assert jobs[0].summary == f"deleted 1 archive(s): {first.id}"
        assert jobs[3].duration.ToTimedelta().total_seconds() > 0
        assert [j.id for j in jobs] == sorted((j.id for j in jobs), reverse=True)

        # Pages go on where the previous one ended; a made-up token is refused.
        page = reader.stub.ListJobs(pb.ListJobsRequest(page_size=4))
        assert [j.id for j in page.jobs] == [j.id for j in jobs[:4]]
        rest = reader.stub.ListJobs(pb.ListJobsRequest(page_size=4, page_token=page.next_page_token))
        assert [j.id for j in rest.jobs] == [j.id for j in jobs[4:]] and rest.next_page_token == ""
        with pytest.raises(grpc.RpcError) as info:
            reader.stub.ListJobs(pb.ListJobsRequest(page_token="page-2"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        admin.close()
        reader.close()
    svc.stop()

    restarted = service_factory(db.uri, backup_dir=backup_dir, token=ADMIN, read_token=READER)
    with BackupClient(restarted.target, token=READER) as reader_again:
        assert list(reader_again.list_jobs()) == jobs
        # Numbering goes on after the restart.
        with BackupClient(restarted.target, token=ADMIN) as admin_again:
            admin_again.create()
        newest = next(reader_again.list_jobs())
        assert newest.kind == pb.JOB_KIND_BACKUP and newest.id > jobs[0].id


def test_a_failed_job_is_in_the_history_with_its_reason(service_factory: StartService) -> None:
    svc = service_factory("postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2")
    with pytest.raises(grpc.RpcError):
        svc.client.create()
    [job] = svc.client.list_jobs()
    assert job.kind == pb.JOB_KIND_BACKUP and job.outcome == pb.JOB_OUTCOME_FAILED
    assert "127.0.0.1:1" in job.error and job.error_reason
    assert job.caller_role == "", "the service checks no tokens"
    assert job.caller_address.startswith("127.0.0.1:")
    assert job.backup_id, "the FAILED backup it left"


def test_the_history_is_bounded_and_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "state" / "history.json"
    history = JobHistory(path, limit=5)
    for number in range(8):
        job = Job(kind=JobKind.BACKUP, trigger=Trigger.SCHEDULED, description=f"backup {number}")
        job.finish(error=Unavailable("the database is down") if number == 7 else None)
        history.job_ended(job)
    entries = history.entries()
    assert [e.description for e in entries] == [f"backup {n}" for n in (7, 6, 5, 4, 3)]
    assert [e.seq for e in entries] == [8, 7, 6, 5, 4]
    assert entries[0].outcome == "failed" and entries[0].error == "the database is down"
    assert entries[1].outcome == "succeeded" and entries[1].caller_role == ""
    assert len(json.loads(path.read_text())["jobs"]) == 5
    assert sorted(p.name for p in path.parent.iterdir()) == ["history.json"], "no temporary file left"
    assert JobHistory(path, limit=5).entries() == entries

    path.write_text("{not json")
    assert JobHistory(path).entries() == [], "an unreadable history is ignored, not fatal"


def test_a_retention_run_that_cannot_delete_an_archive_is_recorded_as_failed(
    pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    db = make_database(pg16, seeded=True, rows=20)
    svc = service_factory(db.uri)
    old = svc.client.create()
    svc.client.create()
    # Something put a directory where the archive was: unlinking it fails, as on a read-only mount.
    archive = svc.backup_dir / old.id
    archive.unlink()
    archive.mkdir()
    (archive / "in-the-way").write_text("")
    assert svc.client.set_retention(1).deleted_ids == []
    [retention] = [j for j in svc.client.list_jobs() if j.kind == pb.JOB_KIND_RETENTION]
    assert retention.outcome == pb.JOB_OUTCOME_FAILED and retention.error_reason == "RETENTION_INCOMPLETE"
    assert old.id in retention.error and retention.summary == "deleted 0 archive(s)"

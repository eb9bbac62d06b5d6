"""The administrator's path: the real grpcurl binary against the running service, as the README shows."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.archives import restore_by_hand
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.service import StartService, grpcurl_path

SERVICE = "aperture.backup.v1.BackupService"


def _call(target: str, method: str, request: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [grpcurl_path(), "-plaintext", "-d", json.dumps(request or {}), target, f"{SERVICE}/{method}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _ok(target: str, method: str, request: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every response message (grpcurl prints a stream as consecutive JSON documents)."""
    result = _call(target, method, request)
    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    text, messages = result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].lstrip()
    return messages


def test_backup_walk_through_with_grpcurl(
    seeded_db: Database, make_database: MakeDatabase, service_factory: StartService, tmp_path: Path
) -> None:
    backup_dir = tmp_path / "backups"
    svc = service_factory(seeded_db.uri, backup_dir=backup_dir)
    source = fingerprint(seeded_db.uri)

    stream = _ok(svc.target, "Create")
    final = stream[-1]["backup"]
    assert final["state"] == "BACKUP_STATE_READY"
    assert final["id"].endswith(".sql.gz")
    assert stream[-1]["progress"]["phase"] == "PHASE_DONE"
    custom = _ok(svc.target, "Create", {"format": "BACKUP_FORMAT_CUSTOM"})[-1]["backup"]
    assert custom["id"].endswith(".dump")

    for backup in (final, custom):
        target = make_database(seeded_db.server)
        restore_by_hand(backup_dir / backup["id"], target)
        assert_same(source, fingerprint(target.uri))

    listed = _ok(svc.target, "List")[0]["backups"]
    assert [b["id"] for b in listed] == [custom["id"], final["id"]]
    assert _ok(svc.target, "Get", {"id": final["id"]})[0]["backup"] == final

    retention = _ok(svc.target, "SetRetention", {"policy": {"keepLast": 1}})[0]
    assert retention["policy"] == {"keepLast": 1}
    assert retention["deletedIds"] == [final["id"]]
    assert _ok(svc.target, "GetRetention")[0]["policy"] == {"keepLast": 1}

    bad = _call(svc.target, "Get", {"id": "../../etc/passwd"})
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr and "not a backup id" in bad.stderr
    missing = _call(svc.target, "Delete", {"id": final["id"]})
    assert "NotFound" in missing.stderr

    # After a restart, the same backups and the same policy.
    svc.stop()
    again = service_factory(seeded_db.uri, backup_dir=backup_dir)
    assert [b["id"] for b in _ok(again.target, "List")[0]["backups"]] == [custom["id"]]
    assert _ok(again.target, "GetRetention")[0]["policy"] == {"keepLast": 1}
    assert _ok(again.target, "Delete", {"id": custom["id"]})[0]["backup"]["id"] == custom["id"]
    assert _ok(again.target, "List")[0] == {}


@pytest.mark.parametrize("method", ["GetStatus", "GetSchedule"])
def test_status_calls_answer_through_grpcurl(method: str, seeded_db: Database, service_factory: StartService) -> None:
    svc = service_factory(seeded_db.uri, schedule_enabled=True)
    response = _ok(svc.target, method)[0]
    if method == "GetStatus":
        assert response["databaseReachable"] is True and response["database"] == seeded_db.dbname
    else:
        assert response["schedule"]["timeOfDay"] == "01:00" and "nextRunTime" in response

"""The Aperture backend's path: the generated TypeScript client (clients/typescript, ts-proto + grpc-js)
against the real service, driven by a small script compiled with the package's own tsc.

Needs node and npm; skips without them unless APERTURE_REQUIRE_NODE=1. The first run installs the
package's dependencies with `npm ci` (from package-lock.json, kept in clients/typescript/node_modules).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from scripts.gen_ts_client import (
    NODE_MODULES,
    PACKAGE,
    REQUIRE_NODE_ENV,
    TSC,
    NodeMissing,
    ensure_node_modules,
    node_tools,
)
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import StartService

MISSING_ID = "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the package's dependencies installed."""
    try:
        node_binary, _ = node_tools()
    except NodeMissing as exc:
        if os.environ.get(REQUIRE_NODE_ENV) == "1":
            pytest.fail(f"{exc}, and {REQUIRE_NODE_ENV}=1 requires it")
        pytest.skip(f"TypeScript client not tested: {exc}")
    ensure_node_modules()
    return node_binary


@pytest.fixture(scope="module")
def smoke_script(node: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test/smoke.ts compiled (with src/) into a temporary directory."""
    out = tmp_path_factory.mktemp("ts-build")
    result = subprocess.run(
        [str(TSC), "-p", str(PACKAGE / "tsconfig.json"), "--outDir", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}{result.stderr}"
    return out / "test" / "smoke.js"


def test_typescript_client_drives_the_service(
    node: str, smoke_script: Path, pg16: PgServer, make_database: MakeDatabase, service_factory: StartService
) -> None:
    database = make_database(pg16, seeded=True)
    svc = service_factory(database.uri)

    # NODE_PATH: the compiled script lives outside the package, so let it find the package's node_modules.
    result = subprocess.run(
        [node, str(smoke_script), svc.target, MISSING_ID],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    assert result.returncode == 0, f"smoke script failed:\n{result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)

    created = out["created"]
    archive = svc.backup_dir / created["id"]
    assert created["state"] == "BACKUP_STATE_READY"
    assert created["id"].endswith(".sql.gz")
    assert created["createTimeIsDate"] is True
    assert created["phases"][-1] == "PHASE_DONE" and "PHASE_DUMPING" in created["phases"]
    # int64 arrives as a decimal string (forceLong=string).
    assert created["sizeBytes"] == str(archive.stat().st_size)
    assert created["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()

    custom = out["custom"]
    assert custom["state"] == "BACKUP_STATE_READY" and custom["id"].endswith(".dump")
    # Two pages of one: list() followed the page token; newest first.
    assert out["listed"] == [custom["id"], created["id"]]

    download = out["download"]
    assert download["bytesWritten"] == archive.stat().st_size
    assert download["sha256Verified"] is True
    assert download["sha256"] == created["sha256"]
    assert download["resumedBytesWritten"] == archive.stat().st_size - archive.stat().st_size // 2
    assert download["resumedSha256Verified"] is False
    assert download["resumedSha256"] == created["sha256"]

    status = out["status"]
    assert status["lastSuccessfulId"] == custom["id"]
    assert status["database"] == database.dbname
    assert status["databaseReachable"] is True
    assert status["currentJob"] is None

    not_found = out["notFound"]
    assert not_found["raised"] is True
    assert not_found["code"] == 5 and not_found["isNotFound"] is True  # grpc status NOT_FOUND
    assert MISSING_ID in not_found["details"]
    assert not_found["domain"] == "backup.aperture.dev"
    assert not_found["reason"]

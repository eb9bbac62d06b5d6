"""The CLI as people and scripts use it: a subprocess against the real service, with and without a
pseudo-terminal. Progress bars and questions only on a terminal, JSON with --json, distinct exit codes,
and no traceback for any mistake of the user's."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest

from aperture.backup.v1 import backup_pb2 as pb
from tests.support.fingerprint import assert_same, fingerprint
from tests.support.fixtures import Database, MakeDatabase
from tests.support.postgres import PgServer, public_tables, table_lock
from tests.support.service import RunningService, StartService, free_port, pg_dump_children, wait_for


@pytest.fixture
def db(pg16: PgServer, make_database: MakeDatabase) -> Database:
    return make_database(pg16, seeded=True, rows=50)


@pytest.fixture
def svc(db: Database, service_factory: StartService) -> RunningService:
    return service_factory(db.uri)


def _env(svc: RunningService) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    environment["APERTURE_BACKUP_ADDRESS"] = svc.target
    environment["TZ"] = "Europe/Berlin"
    return environment


def cli(
    svc: RunningService, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI against `svc` (APERTURE_BACKUP_ADDRESS names it), or with `env` as the whole environment."""
    return subprocess.run(
        [sys.executable, "-m", "aperture_backup", *args],
        env=_env(svc) if env is None else env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def in_terminal(svc: RunningService, *args: str, answer: str | None = None, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal; type `answer` when it asks."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aperture_backup", *args],
        env={**_env(svc), "COLUMNS": "160", "TERM": "xterm"},
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    output = b""
    answered = answer is None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            output += data
            if answer is not None and not answered and b"[y/N]" in output:
                os.write(leader, answer.encode() + b"\n")
                answered = True
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    return proc.returncode, output.decode("utf-8", "replace")


# -- progress ----------------------------------------------------------------------------------------------


def test_create_shows_progress_only_on_a_terminal(svc: RunningService) -> None:
    plain = cli(svc, "create")
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == "", "no progress, no noise off a terminal"
    assert plain.stdout.count("\n") == 1 and ": READY, " in plain.stdout

    code, screen = in_terminal(svc, "create")
    assert code == 0, screen
    assert "backup" in screen and ("dumping" in screen or "preparing" in screen or "done" in screen), screen
    assert ": READY, " in screen


def test_restore_asks_on_a_terminal_and_says_what_it_replaces(
    svc: RunningService, db: Database, tmp_path: Path
) -> None:
    backup = svc.client.create()
    with psycopg.connect(db.uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.after_backup (a int)")
    before = fingerprint(db.uri)

    code, screen = in_terminal(svc, "restore", backup.id, "--skip-safety-backup", answer="n")
    assert code == 2 and "not confirmed" in screen, screen
    assert f"Replace the database '{db.dbname}' with the backup {backup.id}" in screen
    assert_same(before, fingerprint(db.uri))

    code, screen = in_terminal(svc, "restore", backup.id, "--skip-safety-backup", answer="y")
    assert code == 0, screen
    assert f"restored {backup.id}" in screen
    assert "after_backup" not in public_tables(db.uri)

    refused = cli(svc, "restore", backup.id)
    assert refused.returncode == 2 and "pass --yes" in refused.stderr


# -- tables and JSON ---------------------------------------------------------------------------------------


def test_list_is_a_readable_table_and_json_for_scripts(svc: RunningService) -> None:
    made = svc.client.create()
    custom = svc.client.create(format=pb.BACKUP_FORMAT_CUSTOM)
    table = cli(svc, "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "CREATED", "SIZE", "FORMAT", "TRIGGER", "STATE", "WHERE", "ERROR"]
    assert lines[1].startswith(custom.id) and "custom" in lines[1] and "READY" in lines[1]
    assert lines[2].startswith(made.id) and "plain+gzip" in lines[2] and "manual" in lines[2]
    assert " kB " in lines[2] or " MB " in lines[2]
    local = made.create_time.ToDatetime(tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    assert local.strftime("%Y-%m-%d %H:%M") in lines[2]

    listed = json.loads(cli(svc, "list", "--json").stdout)
    assert [b["id"] for b in listed["backups"]] == [custom.id, made.id]
    assert listed["backups"][0]["sizeBytes"] == str(custom.size_bytes), "the API's own JSON names and types"
    got = json.loads(cli(svc, "get", made.id, "--json").stdout)
    assert got["id"] == made.id and got["state"] == "BACKUP_STATE_READY"
    status = json.loads(cli(svc, "status", "--json").stdout)
    assert status["lastSuccessfulBackup"]["id"] == custom.id
    assert json.loads(cli(svc, "retention", "--json").stdout) == {"keepLast": 7}

    stream = cli(svc, "create", "--json")
    messages = [json.loads(line) for line in stream.stdout.splitlines()]
    assert len(messages) >= 2 and messages[-1]["backup"]["state"] == "BACKUP_STATE_READY"
    assert all("progress" in m for m in messages)


def test_jobs_is_a_table_of_the_history_and_json_for_scripts(svc: RunningService) -> None:
    assert cli(svc, "jobs").stderr.strip() == "no jobs have ended yet"
    made = svc.client.create()
    svc.client.delete(made.id)
    table = cli(svc, "jobs")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STARTED", "KIND", "TRIGGER", "CALLER", "DURATION", "OUTCOME", "BACKUP", "DETAIL"]
    assert lines[1].split()[2:4] == ["delete", "manual"] and "SUCCEEDED" in lines[1] and made.id in lines[1]
    assert "deleted a ready backup" in lines[1]
    assert lines[2].split()[2:4] == ["backup", "manual"] and lines[2].split()[4].startswith("127.0.0.1:")
    assert len(lines) == 3

    listed = json.loads(cli(svc, "jobs", "--json").stdout)
    assert [j["kind"] for j in listed["jobs"]] == ["JOB_KIND_DELETE", "JOB_KIND_BACKUP"]
    assert listed["jobs"][1]["backupId"] == made.id and listed["jobs"][1]["outcome"] == "JOB_OUTCOME_SUCCEEDED"
    assert [j["kind"] for j in json.loads(cli(svc, "jobs", "-n", "1", "--json").stdout)["jobs"]] == ["JOB_KIND_DELETE"]


def test_schedule_shows_and_changes_the_daily_backup(svc: RunningService) -> None:
    changed = cli(svc, "schedule", "03:30", "--tz", "Europe/Berlin")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.startswith("daily at 03:30 Europe/Berlin; next ")
    assert cli(svc, "schedule", "--off").stdout.startswith("off (would run at 03:30")
    shown = json.loads(cli(svc, "schedule", "--json").stdout)
    assert shown["schedule"]["timeOfDay"] == "03:30" and not shown["schedule"].get("enabled", False)
    bad = cli(svc, "schedule", "25:00")
    assert bad.returncode == 2 and "HH:MM" in bad.stderr


def test_retention_previews_and_asks_before_deleting(svc: RunningService) -> None:
    ids = [svc.client.create().id for _ in range(3)]
    preview = cli(svc, "retention", "--keep", "1", "--dry-run")
    assert preview.returncode == 0 and ids[0] in preview.stdout and ids[1] in preview.stdout
    assert len(list(svc.client.list())) == 3 and svc.client.get_retention().keep_last == 7
    refused = cli(svc, "retention", "--keep", "1")
    assert refused.returncode == 2 and "pass --yes" in refused.stderr and ids[0] in refused.stderr
    assert len(list(svc.client.list())) == 3
    done = cli(svc, "retention", "--keep", "1", "--yes")
    assert done.returncode == 0, done.stderr
    assert [b.id for b in svc.client.list()] == [ids[2]]
    assert cli(svc, "delete", ids[2]).returncode == 2
    assert cli(svc, "delete", ids[2], "--yes").returncode == 0
    assert list(svc.client.list()) == []


# -- exit codes and mistakes --------------------------------------------------------------------------------


def test_exit_codes_tell_outcomes_apart(svc: RunningService, db: Database, tmp_path: Path) -> None:
    missing = "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"
    assert cli(svc, "get", missing).returncode == 3
    assert cli(svc, "get", "../etc/passwd").returncode == 2
    assert cli(svc, "frobnicate").returncode == 2
    assert cli(svc, "list", "--no-such-flag").returncode == 2

    with table_lock(db.uri):
        running = svc.client.stub.Create(pb.CreateRequest(), timeout=120)
        next(running)
        busy = cli(svc, "create")
        assert busy.returncode == 4 and "is running" in busy.stderr
        svc.client.cancel(svc.client.status().current_job.backup_id)

    nobody = subprocess.run(
        [sys.executable, "-m", "aperture_backup", "status", "--server", f"127.0.0.1:{free_port()}"],
        env=_env(svc),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert nobody.returncode == 5 and "cannot be reached" in nobody.stderr

    version = cli(svc, "--version")
    assert version.returncode == 0 and version.stdout.startswith("aperture-backup ")
    assert "exit codes:" in cli(svc, "create", "--help").stdout


def test_user_mistakes_never_show_a_traceback(svc: RunningService, tmp_path: Path) -> None:
    for args in (
        ["upload", str(tmp_path / "nope.sql.gz")],
        ["upload", str(tmp_path)],
        ["download", "x", "-o", str(tmp_path)],
    ):
        result = cli(svc, *args)
        assert result.returncode == 2, result
        assert "Traceback" not in result.stderr and result.stderr.startswith("aperture-backup: ")

    missing = "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz"
    target = tmp_path / "out.sql.gz"
    assert cli(svc, "download", missing, "-o", str(target)).returncode == 3
    assert not target.exists() and not (tmp_path / "out.sql.gz.part").exists(), "no empty file left behind"

    # A download whose bytes do not match the server's record: nothing under the final name.
    backup = svc.client.create()
    stored = svc.backup_dir / backup.id
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    bad = cli(svc, "download", backup.id, "-o", str(target))
    assert bad.returncode == 1 and "SHA-256" in bad.stderr
    assert not target.exists() and not (tmp_path / "out.sql.gz.part").exists()


def test_a_closed_pipe_is_not_an_error(svc: RunningService) -> None:
    for _ in range(3):
        svc.client.create()
    shell = subprocess.run(  # noqa: S602 - the pipe is the point
        f"{sys.executable} -m aperture_backup list | head -n 1",
        shell=True,
        env=_env(svc),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shell.stdout.startswith("ID ")
    assert "Traceback" not in shell.stderr and "BrokenPipe" not in shell.stderr, shell.stderr


def _spawn_with_ctrl_c(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start `command` with SIGINT at its default, as from a terminal. A test run started in the background
    ignores SIGINT, and a child inherits that (Python then never raises KeyboardInterrupt); a handled
    signal is reset to the default at exec, so handle it here while the child starts."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_says_the_job_goes_on(svc: RunningService, db: Database) -> None:
    with table_lock(db.uri) as locker:
        proc = _spawn_with_ctrl_c([sys.executable, "-m", "aperture_backup", "create"], _env(svc))
        wait_for(lambda: pg_dump_children(database=db.dbname))
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "goes on with the job" in stderr and "aperture-backup cancel" in stderr
        assert "Traceback" not in stderr
        assert svc.client.status().HasField("current_job")
        locker.rollback()
    wait_for(lambda: not svc.client.status().HasField("current_job"))
    assert next(iter(svc.client.list())).state == pb.BACKUP_STATE_READY


def test_restore_says_when_postgresql_is_still_at_work_after_the_last_byte(svc: RunningService) -> None:
    """The bytes can all be sent while psql still builds indexes: the phase says so, not "done"."""
    backup = svc.client.create()
    stream = cli(svc, "restore", backup.id, "--yes", "--json", "--skip-safety-backup")
    assert stream.returncode == 0, stream.stderr
    messages = [json.loads(line) for line in stream.stdout.splitlines()]
    notes = [m.get("progress", {}).get("message", "") for m in messages]
    assert any("building indexes" in note for note in notes), notes
    assert messages[-1]["progress"]["phase"] == "PHASE_DONE" and "result" in messages[-1]


def test_cancel_from_the_cli_stops_the_running_job(svc: RunningService, db: Database) -> None:
    assert cli(svc, "cancel").returncode == 2  # nothing runs
    with table_lock(db.uri):
        running = svc.client.stub.Create(pb.CreateRequest(), timeout=120)
        first = next(running)
        wait_for(lambda: pg_dump_children(database=db.dbname))
        stopped = cli(svc, "cancel")
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"stopped: {first.backup.id}"
    assert svc.client.get(first.backup.id).state == pb.BACKUP_STATE_FAILED


def test_verify_pin_unpin_and_gfs_retention(svc: RunningService) -> None:
    older, newer = svc.client.create().id, svc.client.create().id
    verified = cli(svc, "verify")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.startswith(f"{newer}: verification passed: restore, tables, row_counts")
    status = cli(svc, "status")
    assert f"last verification: {newer} passed" in status.stdout
    streamed = [json.loads(line) for line in cli(svc, "verify", older, "--json").stdout.splitlines()]
    assert streamed[-1]["backup"]["verifyResult"] == "VERIFY_RESULT_PASSED"
    assert streamed[-1]["backup"]["id"] == older

    pinned = cli(svc, "pin", older, "--for", "30d")
    assert pinned.returncode == 0 and pinned.stdout.startswith(f"pinned {older} until ")
    assert svc.client.get(older).pinned
    table = cli(svc, "list").stdout.splitlines()
    assert "READY pinned verified" in next(line for line in table if line.startswith(older))
    assert "READY verified" in next(line for line in table if line.startswith(newer))
    assert cli(svc, "pin", older, "--for", "soon").returncode == 2
    assert cli(svc, "pin", "aperture-backup-2000-01-01T00-00-00-000000Z-0000.sql.gz").returncode == 3

    shown = cli(svc, "retention", "--daily", "7", "--weekly", "4", "--dry-run")
    assert shown.stdout.startswith(
        "keep the newest 7 backups and the newest backup of each of the last 7 days, 4 weeks"
    )
    assert svc.client.get_retention().keep_daily == 0, "a dry run saves nothing"
    done = cli(svc, "retention", "--keep", "1", "--monthly", "3", "--yes")
    assert done.returncode == 0, done.stderr
    assert svc.client.get_retention() == pb.RetentionPolicy(keep_last=1, keep_monthly=3)
    assert [b.id for b in svc.client.list()] == [newer, older], "pinned, and the newest verified"

    assert cli(svc, "unpin", older).stdout == f"unpinned {older}: retention may delete it\n"
    assert not svc.client.get(older).pinned


@pytest.mark.parametrize("listen", ["0.0.0.0:{port}", "127.0.0.1:{port}"])
def test_health_finds_the_service_at_the_port_it_listens_on(listen: str, svc: RunningService) -> None:
    """The image's HEALTHCHECK runs `aperture-backup health` with the service's own environment: without
    APERTURE_BACKUP_ADDRESS it goes to APERTURE_BACKUP_LISTEN's port, so a changed port stays healthy."""
    port = svc.target.rsplit(":", 1)[1]
    environment = {k: v for k, v in _env(svc).items() if k != "APERTURE_BACKUP_ADDRESS"}
    environment["APERTURE_BACKUP_LISTEN"] = listen.format(port=port)
    done = cli(svc, "health", env=environment)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    # Nothing configured: the documented default, which nothing listens on here.
    del environment["APERTURE_BACKUP_LISTEN"]
    assert cli(svc, "health", env=environment).returncode != 0 or port == "50051"


def test_the_default_address_follows_the_listen_address() -> None:
    from aperture_backup.cli_client import default_address

    assert default_address({}) == "127.0.0.1:50051"
    assert default_address({"APERTURE_BACKUP_LISTEN": "0.0.0.0:6000"}) == "127.0.0.1:6000"
    assert default_address({"APERTURE_BACKUP_LISTEN": "[::]:6000"}) == "[::1]:6000"
    assert default_address({"APERTURE_BACKUP_LISTEN": "10.1.2.3:6000"}) == "10.1.2.3:6000"
    # An explicit address wins; a port 0 (pick any) or a malformed value says nothing about where to go.
    assert default_address({"APERTURE_BACKUP_ADDRESS": "b:1", "APERTURE_BACKUP_LISTEN": "0.0.0.0:6000"}) == "b:1"
    assert default_address({"APERTURE_BACKUP_LISTEN": "0.0.0.0:0"}) == "127.0.0.1:50051"
    assert default_address({"APERTURE_BACKUP_LISTEN": "nonsense"}) == "127.0.0.1:50051"

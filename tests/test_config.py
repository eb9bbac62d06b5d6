"""Configuration: defaults, environment, flags over environment, and errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import time
from pathlib import Path

import pytest

from aperture_backup.config import Config, ConfigError


def test_defaults_match_the_product_description() -> None:
    config = Config.from_env({})
    assert config.database_url is None
    assert config.backup_dir == Path("./backups")
    assert config.listen == "127.0.0.1:50051"
    assert config.schedule_time == time(1, 0)
    assert config.schedule_enabled
    assert config.keep == 7


def test_environment_is_read() -> None:
    config = Config.from_env(
        {
            "APERTURE_BACKUP_DATABASE_URL": "postgresql://aperture:secret@db:5432/aperture",
            "APERTURE_BACKUP_DIR": "/backups",
            "APERTURE_BACKUP_LISTEN": "0.0.0.0:6000",
            "APERTURE_BACKUP_TOKEN": "a-token-of-sixteen-or-more",
            "APERTURE_BACKUP_SCHEDULE": "03:30",
            "APERTURE_BACKUP_KEEP": "14",
            "TZ": "Europe/Berlin",
        }
    )
    assert config.database_url == "postgresql://aperture:secret@db:5432/aperture"
    assert config.backup_dir == Path("/backups")
    assert config.listen == "0.0.0.0:6000"
    assert config.schedule_time == time(3, 30)
    assert config.keep == 14
    assert config.time_zone == "Europe/Berlin"


def test_schedule_can_be_turned_off() -> None:
    assert not Config.from_env({"APERTURE_BACKUP_SCHEDULE": "off"}).schedule_enabled


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("APERTURE_BACKUP_SCHEDULE", "25:00"),
        ("APERTURE_BACKUP_SCHEDULE", "1am"),
        ("APERTURE_BACKUP_KEEP", "0"),
        ("APERTURE_BACKUP_KEEP", "101"),
        ("APERTURE_BACKUP_KEEP", "seven"),
        ("APERTURE_BACKUP_LISTEN", "50051"),
        ("APERTURE_BACKUP_LISTEN", "host:99999"),
        ("APERTURE_BACKUP_DATABASE_URL", "postgresql://[bad"),
        ("TZ", "Mars/Olympus_Mons"),
        ("APERTURE_BACKUP_CATCH_UP", "maybe"),
        ("APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM", "256"),
        ("APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM", "1GB'; DROP TABLE users; --"),
        ("APERTURE_BACKUP_RESTORE_WORKERS", "17"),
        ("APERTURE_BACKUP_RESTORE_WORKERS", "-1"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({variable: value})


def test_restore_build_settings_are_read_and_server_leaves_postgresql_s_own() -> None:
    config = Config.from_env(
        {"APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM": "1GB", "APERTURE_BACKUP_RESTORE_WORKERS": "3"}
    )
    assert (config.restore_maintenance_work_mem, config.restore_workers) == ("1GB", 3)
    config = Config.from_env(
        {"APERTURE_BACKUP_RESTORE_MAINTENANCE_WORK_MEM": "server", "APERTURE_BACKUP_RESTORE_WORKERS": "server"}
    )
    assert (config.restore_maintenance_work_mem, config.restore_workers) == ("", None)
    assert (Config.from_env({}).restore_maintenance_work_mem, Config.from_env({}).restore_workers) == ("256MB", 1)


def test_password_is_not_echoed_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({"APERTURE_BACKUP_DATABASE_URL": "postgresql://u:hunter2@[bad/db"})
    assert "hunter2" not in str(info.value)


def test_a_port_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"APERTURE_BACKUP_DATABASE_URL.*port"):
        Config.from_env({"APERTURE_BACKUP_DATABASE_URL": "postgresql://u@h:notaport/db"})


def test_serve_refuses_bad_configuration_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APERTURE_BACKUP_")}
    env["APERTURE_BACKUP_KEEP"] = "0"
    result = subprocess.run(
        [sys.executable, "-m", "aperture_backup", "serve", "--dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "APERTURE_BACKUP_KEEP must be between 1 and 100" in result.stderr


def test_flags_override_the_environment(tmp_path: Path) -> None:
    config = Config.from_env({"APERTURE_BACKUP_KEEP": "3"}).with_overrides(keep=9, backup_dir=tmp_path)
    assert config.keep == 9
    assert config.backup_dir == tmp_path

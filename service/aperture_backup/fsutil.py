"""Writing small JSON files (manifests, settings) so that a crash never leaves a half-written one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any, *, temp: Path | None = None, exclusive: bool = False) -> None:
    """Write `data` to `path`, readable by the owner only. `exclusive`: create it, failing with
    FileExistsError when it exists (a reservation). Otherwise atomically: write `temp` (default: a hidden
    name beside `path`), fsync, rename over `path`, fsync the directory."""
    target = path if exclusive else temp or path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    with os.fdopen(os.open(target, flags, 0o600), "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    if not exclusive:
        os.replace(target, path)
        fsync_directory(path.parent)

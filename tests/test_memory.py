"""The serving process's malloc settings (memory.py), on this machine's C library (glibc)."""

from __future__ import annotations

import pytest

from aperture_backup import memory


def _rss_mb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_serve_limits_malloc_arenas_unless_the_environment_does(monkeypatch: pytest.MonkeyPatch) -> None:
    assert memory.limit_malloc_arenas()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not memory.limit_malloc_arenas(), "an operator's MALLOC_ARENA_MAX is left alone"


def test_release_hands_freed_heap_memory_back() -> None:
    # 80 MB of malloc'd blocks (above pymalloc's 512 bytes), every 16th kept: the holes between them are
    # free but stay in the process until trimmed, as after an upload's chunks.
    blocks = [bytes(4000) for _ in range(20_000)]
    kept = blocks[::16]
    del blocks
    before = _rss_mb()

    assert memory.release_free_memory()

    assert _rss_mb() < before - 40, f"RSS {before} MB -> {_rss_mb()} MB"
    assert len(kept) == 1250

"""Compressors and a hashing sink: the archive's bytes are compressed, hashed and counted on their way to
disk, in one pass, in bounded memory.

gzip output comes from ISA-L (`isal`), several times faster than zlib at the same ratio and still a
standard gzip stream that `gunzip` reads; zstd from `zstandard`, multi-threaded.
"""

from __future__ import annotations

import hashlib
import io
from typing import IO, BinaryIO, Protocol, cast

import zstandard
from isal import igzip_threaded

from .model import Compression

#: ISA-L level 3: on Aperture-like data (prose, JSONB, embeddings as text; `scripts/bench.py`) its output
#: is 9% larger than `gzip -6`'s, level 2's 12% (the target is within 10%). Level 3 costs about twice the
#: CPU of level 2 (150 vs 300 MB/s per core) but still runs at pg_dump's pace with two threads.
GZIP_LEVEL = 3
GZIP_THREADS = 2
ZSTD_LEVEL = 3
ZSTD_THREADS = 2


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...
    def close(self) -> None: ...


class HashingFile(io.RawIOBase):
    """Writes to `target`, hashing (SHA-256) and counting what passes. Closing it does not close the
    target: the archive writer fsyncs and renames the file after the compressor is done."""

    def __init__(self, target: BinaryIO):
        super().__init__()
        self._target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview | bytearray, /) -> int:  # type: ignore[override]
        view = memoryview(data)
        self.sha256.update(view)
        written = 0
        while written < len(view):
            n = self._target.write(view[written:])
            written += n if n is not None else len(view) - written
        self.size += len(view)
        return len(view)


def compressor(compression: Compression, sink: HashingFile) -> Sink:
    """A writer that compresses into `sink`; closing it flushes the compressed stream's end."""
    if compression is Compression.GZIP:
        gzip_writer = igzip_threaded.open(sink, "wb", compresslevel=GZIP_LEVEL, threads=GZIP_THREADS)  # type: ignore[no-untyped-call]
        return cast(Sink, gzip_writer)
    if compression is Compression.ZSTD:
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS).stream_writer(
            cast(IO[bytes], sink), closefd=False
        )
    return _Passthrough(sink)


class _Passthrough:
    def __init__(self, sink: HashingFile):
        self._sink = sink

    def write(self, data: bytes | memoryview, /) -> int:
        return self._sink.write(data)

    def close(self) -> None:
        pass

"""Compressors, decompressors and a hashing sink: the archive's bytes are compressed, hashed and counted on
their way to disk, and decompressed and checked on their way back, in one pass, in bounded memory.

gzip output comes from ISA-L (`isal`), several times faster than zlib at the same ratio and still a
standard gzip stream that `gunzip` reads; zstd from `zstandard`, multi-threaded.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import Counter
from collections.abc import Iterator
from typing import IO, BinaryIO, Protocol, cast

import zstandard
from isal import igzip_threaded, isal_zlib

from .errors import DataLoss
from .model import Compression

#: ISA-L level 3: on Aperture-like data (prose, JSONB, embeddings as text; `scripts/bench.py`) its output
#: is 9% larger than `gzip -6`'s, level 2's 12% (the target is within 10%). Level 3 costs about twice the
#: CPU of level 2 (150 vs 300 MB/s per core) but still runs at pg_dump's pace with two threads.
GZIP_LEVEL = 3
#: A restore's safety backup runs beside the load, on the cores the load needs (issue 16): ISA-L level 2
#: (measured on the benchmark's data: 0.57 CPU-s per 164 MB of SQL against level 3's 1.0, output 3% larger;
#: level 1 costs the same as 2 and is 5% larger). zstd keeps its level: its level 1 saves a fifth of the CPU
#: for output half as large again.
FAST_GZIP_LEVEL = 2
GZIP_THREADS = 2
ZSTD_LEVEL = 3
ZSTD_THREADS = 2

#: Largest piece of decompressed output produced at once, so memory stays flat however well data compresses.
GZIP_OUTPUT_LIMIT = 4 * 1024 * 1024
#: zstd's decompressobj cannot limit its output, so it gets small input slices: a zstd RLE block turns
#: 4 bytes into 128 KiB, so 1 KiB of hostile input yields at most ~32 MiB (measured: a zstd bomb of 1 GiB
#: of zeros peaked at exactly 32 MiB per 1 KiB slice). Real dumps decompress at ~150 MB/s this way.
ZSTD_INPUT_SLICE = 1024
#: isal's stub declares `error` as an instance; it is the exception class.
_GZIP_ERROR = cast(type[Exception], isal_zlib.error)


class Sink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...
    def close(self) -> None: ...


class HashingFile(io.RawIOBase):
    """Writes to `target`, hashing (SHA-256) and counting what passes. `target` writes all it is given or
    raises (a buffered file, or the archive's `fsutil.WritebackFile`, which handles short writes). Closing
    this does not close the target: the archive writer fsyncs and renames the file after the compressor
    is done."""

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
        self._target.write(view)
        self.size += len(view)
        return len(view)


def compressor(compression: Compression, sink: io.RawIOBase, *, fast: bool = False) -> Sink:
    """A writer that compresses into `sink` (the hashing file, or the encrypting stage before it); closing
    it flushes the compressed stream's end, but does not close `sink`. `fast`: gzip with less CPU (a safety
    backup's)."""
    if compression is Compression.GZIP:
        level = FAST_GZIP_LEVEL if fast else GZIP_LEVEL
        gzip_writer = igzip_threaded.open(sink, "wb", compresslevel=level, threads=GZIP_THREADS)  # type: ignore[no-untyped-call]
        return cast(Sink, gzip_writer)
    if compression is Compression.ZSTD:
        # With the content's checksum (XXH64) in each frame, as gzip has its CRC-32: without it, damage inside
        # a block can decode to other text without an error, and no check of the archive would notice.
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS, write_checksum=True).stream_writer(
            cast(IO[bytes], sink), closefd=False
        )
    return _Passthrough(sink)


class _Passthrough:
    def __init__(self, sink: io.RawIOBase):
        self._sink = sink

    def write(self, data: bytes | memoryview, /) -> int:
        return self._sink.write(data) or 0

    def close(self) -> None:
        pass


class _InflatedBytes:
    """Compressed bytes fed to this process's decompressors, by compression. Every full read of an archive
    (an upload's check, a restore, a verification) adds its size, so the count says how often archives are
    inflated: the metric `aperture_backup_inflated_bytes_total`, and how the tests prove that
    UploadAndRestore inflates an archive once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: Counter[Compression] = Counter()

    def add(self, compression: Compression, count: int) -> None:
        with self._lock:
            self._bytes[compression] += count

    def snapshot(self) -> dict[Compression, int]:
        with self._lock:
            return dict(self._bytes)


INFLATED = _InflatedBytes()


class Decompressor(Protocol):
    """Decompresses a stream fed piece by piece. Raises DataLoss (reason ARCHIVE_CORRUPT) when the data is
    corrupt, and from `end()` (reason ARCHIVE_TRUNCATED) when the stream stops before its end."""

    def feed(self, data: bytes) -> Iterator[bytes]: ...
    def end(self) -> None: ...


def decompressor(compression: Compression) -> Decompressor:
    if compression is Compression.GZIP:
        return _GzipDecompressor()
    if compression is Compression.ZSTD:
        return _ZstdDecompressor()
    return _Identity()


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        yield data

    def end(self) -> None:
        pass


class _GzipDecompressor:
    """gzip through ISA-L, member after member (pigz and `cat a.gz b.gz` write several); the decompressor
    checks each member's CRC and length, a missing last trailer is caught by `end()`."""

    def __init__(self) -> None:
        self._d = isal_zlib.decompressobj(wbits=31)
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        INFLATED.add(Compression.GZIP, len(data))
        try:
            while data:
                if self._d.eof:
                    # Bytes after a complete member must be another member; trailing garbage is corruption.
                    self._d = isal_zlib.decompressobj(wbits=31)
                self._fed = True
                out = self._d.decompress(data, GZIP_OUTPUT_LIMIT)
                if out:
                    yield out
                data = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
        except _GZIP_ERROR as exc:
            raise DataLoss(f"the archive's gzip data is corrupt: {exc}", reason="ARCHIVE_CORRUPT") from None

    def end(self) -> None:
        if self._fed and not self._d.eof:
            raise DataLoss(
                "the archive's gzip data stops before its end (no gzip trailer): the file is truncated",
                reason="ARCHIVE_TRUNCATED",
            )


class _ZstdDecompressor:
    """zstd, frame after frame, in small input slices so that output stays bounded (ZSTD_INPUT_SLICE)."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._d = self._dctx.decompressobj()
        self._fed = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        INFLATED.add(Compression.ZSTD, len(data))
        view = memoryview(data)
        try:
            while view:
                if self._d.eof:
                    rest = bytes(self._d.unused_data) + bytes(view)
                    self._d = self._dctx.decompressobj()
                    view = memoryview(rest)
                piece, view = view[:ZSTD_INPUT_SLICE], view[ZSTD_INPUT_SLICE:]
                self._fed = True
                out = self._d.decompress(piece)
                if out:
                    yield out
                if self._d.eof and self._d.unused_data:
                    # A frame ended inside this slice: the rest starts the next frame.
                    rest = bytes(self._d.unused_data) + bytes(view)
                    self._d = self._dctx.decompressobj()
                    view = memoryview(rest)
        except zstandard.ZstdError as exc:
            raise DataLoss(f"the archive's zstd data is corrupt: {exc}", reason="ARCHIVE_CORRUPT") from None

    def end(self) -> None:
        if self._fed and not self._d.eof:
            raise DataLoss(
                "the archive's zstd data stops before the end of its frame: the file is truncated",
                reason="ARCHIVE_TRUNCATED",
            )


# -- checking a stream whose content nobody needs --------------------------------------------------------


class Checker(Protocol):
    """Reads a compressed stream to its end, fed piece by piece, and throws the content away: the upload's
    check. Raises DataLoss like a Decompressor."""

    def feed(self, data: bytes) -> None: ...
    def end(self) -> None: ...


def checker(compression: Compression) -> Checker:
    if compression is Compression.ZSTD:
        return _ZstdChecker()
    return _Drain(decompressor(compression))


class _Drain:
    def __init__(self, stream: Decompressor):
        self._stream = stream

    def feed(self, data: bytes) -> None:
        for _ in self._stream.feed(data):
            pass

    def end(self) -> None:
        self._stream.end()


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


#: Output piece of the zstd check: memory stays at this however well the data compresses.
ZSTD_CHECK_OUTPUT = 128 * 1024


class _ZstdChecker:
    """zstd's check without the input slicing `_ZstdDecompressor` needs to bound its output: zstandard's
    stream writer decompresses a whole received chunk in C, handing the output to a sink that drops it
    piece by piece (ZSTD_CHECK_OUTPUT), so memory is bounded and Python runs once per MiB, not per KiB.
    Measured on a 30 MB `.sql.zst` of the benchmark's data: 187 MB/s of compressed input against 146 with
    1 KiB slices. The writer refuses corrupt data and garbage after a frame, but not a stream cut short, so
    `_ZstdFrames` walks the frame and block headers (a few per 128 KiB) to see that the last frame ends."""

    def __init__(self) -> None:
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast(IO[bytes], _Discard()), write_size=ZSTD_CHECK_OUTPUT, closefd=False
        )
        self._frames = _ZstdFrames()

    def feed(self, data: bytes) -> None:
        INFLATED.add(Compression.ZSTD, len(data))
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise DataLoss(f"the archive's zstd data is corrupt: {exc}", reason="ARCHIVE_CORRUPT") from None
        self._frames.feed(data)

    def end(self) -> None:
        if not self._frames.complete:
            raise DataLoss(
                "the archive's zstd data stops before the end of its frame: the file is truncated",
                reason="ARCHIVE_TRUNCATED",
            )


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50


class _ZstdFrames:
    """Where the frames of a zstd stream (RFC 8878) begin and end, from their headers alone: `complete`
    once at least one frame was seen and the stream stops right after one. The content is the
    decompressor's to check, and so is anything that is not a frame where one must start (it refuses it
    first); here it only means the stream never becomes complete."""

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of the header being read
        self._skip = 0  # content bytes still to pass over
        self._state = "frame"  # what comes next: "frame" (header), "block" (header), "checksum"; or "broken"
        self._checksum = False
        self._frames = 0

    @property
    def complete(self) -> bool:
        return self._frames > 0 and self._state == "frame" and self._skip == 0 and not self._pending

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._state == "broken":
                return
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            take = min(self._need() - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == self._need():
                self._parse()

    def _need(self) -> int:
        """Length of the header being read, as far as its first bytes tell."""
        if self._state == "block":
            return 3
        if self._state == "checksum":
            return 4
        if len(self._pending) < 4:
            return 4
        magic = int.from_bytes(self._pending[:4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            return 8
        if magic != _ZSTD_MAGIC:
            return 4
        if len(self._pending) < 5:
            return 5
        descriptor = self._pending[4]
        single_segment = descriptor & 0x20
        content_size = (0, 2, 4, 8)[descriptor >> 6] or (1 if single_segment else 0)
        return 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03] + content_size

    def _parse(self) -> None:
        header = bytes(self._pending)
        self._pending.clear()
        if self._state == "checksum":
            self._end_frame()
        elif self._state == "block":
            value = int.from_bytes(header, "little")
            last, block_type, size = value & 1, (value >> 1) & 3, value >> 3
            self._skip = 1 if block_type == 1 else size  # an RLE block holds one byte
            if last and self._checksum:
                self._state = "checksum"
            elif last:
                self._end_frame()
        else:
            magic = int.from_bytes(header[:4], "little")
            if magic == _ZSTD_MAGIC:
                self._checksum = bool(header[4] & 0x04)
                self._state = "block"
            elif magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
                self._skip = int.from_bytes(header[4:8], "little")
            else:
                self._state = "broken"

    def _end_frame(self) -> None:
        self._state = "frame"
        self._frames += 1

"""Recognising archives by their content, never by their name.

Aperture writes custom-format `.dump` files itself, older versions wrote `.sql.gz`, and administrators copy
files in by hand, so the only trustworthy signal is the first bytes: `PGDMP` for pg_dump's custom format,
`1f 8b` for gzip, `28 b5 2f fd` for zstd, and pg_dump's own header for plain SQL.
"""

from __future__ import annotations

import zlib

import zstandard

from .model import ArchiveKind, Compression, Format

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CUSTOM_MAGIC = b"PGDMP"

#: How much of a file `sniff` wants to see.
SNIFF_BYTES = 64 * 1024

_SQL_STARTS = (b"--", b"SET ", b"\\connect", b"CREATE ", b"BEGIN", b"SELECT ")


def _inner_format(data: bytes) -> Format | None:
    if data.startswith(CUSTOM_MAGIC):
        return Format.CUSTOM
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(_SQL_STARTS):
        return Format.PLAIN
    return None


def sniff(header: bytes) -> ArchiveKind | None:
    """The kind of archive whose file starts with `header` (pass at least SNIFF_BYTES when available), or
    None when it is not a pg_dump archive at all."""
    if header.startswith(GZIP_MAGIC):
        try:
            inner = zlib.decompressobj(wbits=31).decompress(header, 4096)
        except zlib.error:
            return None
        fmt = _inner_format(inner)
        return ArchiveKind(fmt, Compression.GZIP) if fmt else None
    if header.startswith(ZSTD_MAGIC):
        try:
            inner = zstandard.ZstdDecompressor().decompressobj().decompress(header)[:4096]
        except zstandard.ZstdError:
            return None
        fmt = _inner_format(inner)
        return ArchiveKind(fmt, Compression.ZSTD) if fmt else None
    fmt = _inner_format(header)
    return ArchiveKind(fmt, Compression.NONE) if fmt else None

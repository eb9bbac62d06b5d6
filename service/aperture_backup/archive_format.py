"""Recognising archives by their content, never by their name.

Aperture writes custom-format `.dump` files itself, older versions wrote `.sql.gz`, and administrators copy
files in by hand, so the only trustworthy signal is the first bytes: `PGDMP` for pg_dump's custom format,
`1f 8b` for gzip, `28 b5 2f fd` for zstd, and pg_dump's own header for plain SQL. An archive encrypted
with age starts with age's version line `age-encryption.org/v1`; what it holds is found after decrypting its
first chunk, which needs the service's identity.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import zstandard

from .encryption import AGE_MAGIC, HEAD_CIPHERTEXT_BYTES
from .model import DEFAULT_KIND, ArchiveKind, Compression, Format, kind_from_name

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CUSTOM_MAGIC = b"PGDMP"

#: How much of a file `sniff` wants to see (`sniff_bytes` for an encrypted one).
SNIFF_BYTES = 64 * 1024

#: Decrypts a prefix of an age file (`encryption.AgeKeys.decrypt_head`).
DecryptHead = Callable[[bytes], bytes]

_SQL_STARTS = (b"--", b"SET ", b"\\connect", b"CREATE ", b"BEGIN", b"SELECT ")


def _inner_format(data: bytes) -> Format | None:
    if data.startswith(CUSTOM_MAGIC):
        return Format.CUSTOM
    text = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(_SQL_STARTS):
        return Format.PLAIN
    return None


def is_encrypted(header: bytes | bytearray) -> bool:
    return header.startswith(AGE_MAGIC)


def sniff_bytes(header: bytes | bytearray) -> int:
    """How many bytes of a file starting with `header` `sniff` needs: an age file's first chunk is 64 KiB
    of plaintext after a header that grows with its recipients."""
    return HEAD_CIPHERTEXT_BYTES if is_encrypted(header) else SNIFF_BYTES


def sniff(header: bytes, *, decrypt_head: DecryptHead | None = None, name: str = "") -> ArchiveKind | None:
    """The kind of archive whose file starts with `header` (pass at least `sniff_bytes(header)` when
    available), or None when it is not a pg_dump archive at all.

    An age file is looked into with `decrypt_head` (which raises when the identity does not fit). Without
    one only its name can hint at what it holds, and that hint is used only to show it in List: a restore
    or check needs the identity, and then the content decides."""
    if is_encrypted(header):
        if decrypt_head is None:
            return (kind_from_name(name) or DEFAULT_KIND).with_encryption(True)
        found = sniff(decrypt_head(header))
        # age inside age, or something that is not an archive: not ours to guess.
        return found.with_encryption(True) if found is not None and not found.encrypted else None
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
